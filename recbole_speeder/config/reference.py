"""``docs/configuration.md``, written from the plugin's yaml files and :data:`schema.SCHEMA`: every key with its
default, its one-line comment and what it accepts, in the yaml files' own sections.

``python -m recbole_speeder.config.reference`` rewrites the file; ``tests/test_docs.py`` fails when it is stale.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from recbole_speeder.config.schema import SCHEMA
from recbole_speeder.resources import properties_dir

KEY_LINE = re.compile(r"^(\w+):\s*(.*?)\s*(?:#\s*\((\w+)\)\s*(.*))?$")
SOURCES = (  # (yaml file, the heading its keys go under, keys of it to document: None = all)
    ("overall.yaml", "Every model (properties/overall.yaml)", None),
    ("model/Speeder.yaml", "Speeder (properties/model/Speeder.yaml)", None),
    ("dataset/Amazon_Beauty.yaml", "Preparing Amazon data (properties/dataset/Amazon_*.yaml)", ("raw_dir", "offline")),
)
HEADER = """# Configuration reference

Every key the plugin declares, with its default, what it does and what it accepts. Set a key in a yaml file
(`--config_files`), as `config_dict` in Python, or on the command line (`--key=value`); later wins, and an unknown key
stops the run naming the closest known one. RecBole's own keys (`n_layers`, `train_neg_sample_args`, ...) work as in
RecBole. This page is written by `python -m recbole_speeder.config.reference` from `properties/*.yaml` and
`recbole_speeder/config/schema.py`; edit those, not this page.
"""


@dataclass
class Section:
    title: str
    intro: list[str] = field(default_factory=list)
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # key, default, comment


def sections(path: Path, keep: tuple[str, ...] | None) -> list[Section]:
    """A yaml file's keys in the sections its comment blocks open (a block after a blank line starts one)."""
    values = yaml.safe_load(path.read_text())
    found: list[Section] = []
    comments: list[str] = []
    blank = True
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip()
            if blank:
                comments = [text]
            else:
                comments.append(text)
            blank = False
            continue
        blank = not line.strip()
        match = KEY_LINE.match(line)
        if not match or (keep is not None and match.group(1) not in keep):
            continue
        key, raw, _, comment = match.groups()
        if comments:
            found.append(Section(comments[0], comments[1:]))
            comments = []
        if not found:
            found.append(Section(""))
        default = raw if raw else yaml.safe_dump(values[key], default_flow_style=True, width=10**6).strip()
        found[-1].rows.append((key, default, comment or ""))
    return [section for section in found if section.rows]


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    lines = [HEADER]
    for file, heading, keep in SOURCES:
        lines += [f"## {heading}", ""]
        for section in sections(properties_dir() / file, keep):
            if section.title and keep is None:
                lines += [f"### {section.title}", ""]
            if section.intro:
                lines += [" ".join(section.intro), ""]
            lines += ["| key | default | what it does | accepts |", "|---|---|---|---|"]
            for key, default, comment in section.rows:
                accepts = SCHEMA[key].expects() if key in SCHEMA else ""
                lines.append(f"| `{key}` | `{cell(default)}` | {cell(comment)} | {cell(accepts)} |")
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    if argv and argv[0].startswith("-"):
        print("usage: python -m recbole_speeder.config.reference [OUT.md]  (default: docs/configuration.md)")
        return
    out = Path(argv[0] if argv else "docs/configuration.md")
    out.write_text(render(), encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
