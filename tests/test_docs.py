"""The README stays true: its key tables match the config schema, and CI runs its test command."""

from __future__ import annotations

import re

from recbole_speeder.config_schema import SCHEMA

from .conftest import REPO


def test_readme_key_tables_list_every_schema_key_with_what_it_accepts():
    """One row per declared key (``epochs`` is in both tables); the last column is the schema's own wording."""
    readme = (REPO / "README.md").read_text()
    config = readme[readme.index("## Configuration"):readme.index("## Data")]
    rows = set()
    for line in config.splitlines():
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        if cells and re.fullmatch(r"`\w+`", cells[0]):
            key = cells[0].strip("`")
            assert key in SCHEMA, f"README documents {key}, which config_schema.SCHEMA does not declare"
            expects = SCHEMA[key].expects()
            assert cells[-1] == expects, f"README, {key}: the accepts cell should read {expects!r}"
            rows.add(key)
    assert rows == set(SCHEMA), f"README.md has no row for {sorted(set(SCHEMA) - rows)}"


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- test-command -->\s*```bash\n(.+?)\n```\s*<!-- /test-command -->", readme, re.S)
    assert block, "README.md must print the test command between <!-- test-command --> markers"
    assert "pytest" in block.group(1)
    assert "<!-- test-command -->" in (REPO / ".ci" / "run").read_text()
