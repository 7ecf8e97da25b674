"""Search spaces in RecBole's params-file format (``.hyper``), for Ray Tune and for hyperopt.

One parameter per line, ``<config key> <type> <values>``::

    learning_rate loguniform -8,0      # exp(uniform(-8, 0)): natural-log bounds, as in RecBole/hyperopt
    hidden_dropout_prob uniform 0.1,0.5
    n_layers quniform 1,4,1            # uniform rounded to a multiple of q
    mrc_tokens choice [1,2]            # a Python list of values

Lines starting with ``#`` and text after `` #`` are comments (RecBole's own reader does not accept those).
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass
from pathlib import Path

from recbole_speeder.errors import UsageError
from recbole_speeder.resources import properties_dir

KINDS = ("choice", "uniform", "quniform", "loguniform")


@dataclass(frozen=True)
class Param:
    name: str
    kind: str
    args: tuple  # choice: the values; uniform/loguniform: (low, high); quniform: (low, high, q)

    def to_ray(self):
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.args))
        if self.kind == "uniform":
            return tune.uniform(*self.args)
        if self.kind == "quniform":
            return tune.quniform(*self.args)
        return tune.loguniform(math.exp(self.args[0]), math.exp(self.args[1]))

    def to_hyperopt(self):
        from hyperopt import hp

        if self.kind == "choice":
            return hp.choice(self.name, list(self.args))
        return getattr(hp, self.kind)(self.name, *self.args)


def find_space_file(path: str) -> Path:
    """``path`` as given, else the plugin's ``properties/hyper/<path>`` (so ``--tune=speeder.hyper`` works)."""
    for candidate in (Path(path), properties_dir() / "hyper" / path, properties_dir() / "hyper" / f"{path}.hyper"):
        if candidate.is_file():
            return candidate.resolve()
    raise UsageError(f"search space {path} not found (also looked in {properties_dir() / 'hyper'})")


def _line_error(path: Path, number: int, message: str) -> UsageError:
    return UsageError(f"{path}:{number}: {message}")


def parse_space(path: str | Path) -> list[Param]:
    """The parameters of a ``.hyper`` file; a malformed line is a one-line error naming file and line."""
    path = Path(path)
    params: list[Param] = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        parts = line.split(maxsplit=2)
        if len(parts) < 3:
            raise _line_error(path, number, f"expected '<key> <type> <values>', got '{line}'")
        name, kind, text = parts[0], parts[1], parts[2].strip()
        if kind not in KINDS:
            raise _line_error(path, number, f"type must be one of {KINDS}, not '{kind}'")
        if any(p.name == name for p in params):
            raise _line_error(path, number, f"'{name}' is given twice")
        try:
            if kind == "choice":
                values = ast.literal_eval(text)
                if not isinstance(values, list) or not values:
                    raise ValueError("choice needs a non-empty list")
                args = tuple(values)
            else:
                args = tuple(float(v) for v in text.split(","))
                if len(args) != (3 if kind == "quniform" else 2) or args[0] >= args[1]:
                    raise ValueError(f"{kind} needs low,high{',q' if kind == 'quniform' else ''} with low < high")
        except (ValueError, SyntaxError) as err:
            raise _line_error(path, number, f"cannot read '{text}' for {kind}: {err}") from None
        params.append(Param(name, kind, args))
    if not params:
        raise UsageError(f"search space {path} defines no parameter")
    return params


def grid_size(params: list[Param]) -> int:
    """Points of the grid spanned by the ``choice`` lines."""
    return math.prod(len(p.args) for p in params if p.kind == "choice")
