"""The docs stay true: the configuration reference matches the yaml and the schema, the README stays a user's page,
and CI runs its test command."""

from __future__ import annotations

import re

from recbole_speeder.config.reference import render
from recbole_speeder.config.schema import SCHEMA

from .conftest import REPO


def test_the_configuration_reference_is_written_from_the_yaml_and_the_schema():
    """docs/configuration.md is what ``python -m recbole_speeder.config.reference`` writes now, one row per key."""
    written = (REPO / "docs" / "configuration.md").read_text()
    assert written == render(), "docs/configuration.md is stale: run python -m recbole_speeder.config.reference"
    rows = re.findall(r"^\| `(\w+)` \| .* \| (.*) \|$", written, re.M)
    assert {key for key, _ in rows} == set(SCHEMA)
    assert all(accepts == SCHEMA[key].expects() for key, accepts in rows)


def test_the_readme_stays_a_users_page():
    """A newcomer's page (the study and dated runs live in docs/): short, with its two commands and one results
    table, and every local link it holds points at a file that exists."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert readme.count("<!-- main-command -->") == 1 and readme.count("<!-- test-command -->") == 1
    for target in re.findall(r"\]\((?!https?://|#)([^)#]+)", readme):
        assert (REPO / target).exists(), f"README links to {target}, which does not exist"


def test_the_readme_python_example_trains_loads_and_ranks(tmp_path, monkeypatch):
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## In Python"):]
    code = re.search(r"```python\n(.+?)\n```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)  # RecBole writes log/ and saved/ here
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    scores, top10 = namespace["scores"], namespace["top10"]
    assert scores.shape[1] == namespace["dataset"].item_num and top10.shape == (scores.shape[0], 10)
    assert namespace["config"]["model"] == "Speeder" and not namespace["model"].training


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- test-command -->\s*```bash\n(.+?)\n```\s*<!-- /test-command -->", readme, re.S)
    assert block, "README.md must print the test command between <!-- test-command --> markers"
    assert "pytest" in block.group(1)
    assert "<!-- test-command -->" in (REPO / ".ci" / "run").read_text()
