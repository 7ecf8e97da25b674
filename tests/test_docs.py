"""The README stays true: every Speeder config key is documented, and CI runs its test command."""

from __future__ import annotations

import re

import yaml

from .conftest import REPO


def test_every_speeder_config_key_is_in_the_readme():
    keys = yaml.safe_load((REPO / "properties" / "model" / "Speeder.yaml").read_text())
    readme = (REPO / "README.md").read_text()
    missing = [key for key in keys if f"`{key}`" not in readme]
    assert not missing, f"README.md does not document {missing}"


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- test-command -->\s*```bash\n(.+?)\n```\s*<!-- /test-command -->", readme, re.S)
    assert block, "README.md must print the test command between <!-- test-command --> markers"
    assert "pytest" in block.group(1)
    assert "<!-- test-command -->" in (REPO / ".ci" / "run").read_text()
