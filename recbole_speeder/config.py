"""RecBole ``Config`` that knows the plugin's models and yaml files.

Layering, later wins: RecBole's own defaults, then ``properties/overall.yaml``,
``properties/model/<Model>.yaml``, ``properties/dataset/<Dataset>.yaml``, then the user's config files,
config dict and command line (RecBole's order). The merged values are checked against ``config_schema.SCHEMA``
before RecBole derives anything from them; every mistake, RecBole's own checks included, is one UsageError line.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import yaml
from recbole.config import Config as RecBoleConfig

from recbole_speeder.compat import apply_compat
from recbole_speeder.config_schema import check_config, parse_value
from recbole_speeder.errors import UsageError
from recbole_speeder.metrics import register_metrics
from recbole_speeder.resources import properties_dir
from recbole_speeder.utils import get_model

# Keys that belong to one launch (resuming, distributed ranks, the device), not to what a run computes: replays of a
# run (checkpoints, retests) and sweeps' trials leave them out.
LAUNCH_KEYS = ("resume", "local_rank", "world_size", "nproc", "ip", "port", "offset", "gpu_id", "use_gpu")


def plain(value: Any) -> Any:
    """A config value as yaml/json types: dict keys as strings, tuples (hyperopt's choice of a list) as lists, numpy
    scalars as Python numbers, any other object as its string."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


@contextmanager
def _recbole_checks() -> Iterator[None]:
    """RecBole's own config checks raise ValueError & co. with a message that names the value: one line too."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, TypeError, NotImplementedError, RuntimeError) as err:
        raise UsageError(" ".join(str(err).split())) from None


class Config(RecBoleConfig):
    """``cmd_args`` replaces RecBole's reading of ``sys.argv``.

    RecBole parses every ``--key=value`` in ``sys.argv``, so a Config built inside pytest or a notebook picked
    up the host program's flags. Only the run script passes its command line here.
    """

    def __init__(
        self,
        model=None,
        dataset: str | None = None,
        config_file_list: list[str] | None = None,
        config_dict: dict | None = None,
        cmd_args: list[str] | None = None,
    ):
        apply_compat()
        register_metrics()  # VHR, ValidRatio, HR: RecBole checks the metrics list in __init__
        self._cmd_args = list(cmd_args or [])
        super().__init__(model, dataset, config_file_list, config_dict)

    def _load_cmd_line(self) -> dict:
        """``--key=value`` flags, each value read by ``parse_value`` (literals, never RecBole's ``eval``)."""
        cmd_config_dict = {}
        for arg in self._cmd_args:
            name, sep, value = arg[2:].partition("=")
            if not arg.startswith("--") or not sep:
                continue
            if cmd_config_dict.get(name, value) != value:
                raise UsageError(f"--{name} is given twice with different values")
            cmd_config_dict[name] = value
        return {name: parse_value(value) for name, value in cmd_config_dict.items()}

    def _load_config_files(self, file_list: list[str] | None) -> dict:
        """RecBole's reading of ``--config_files``, with a missing, malformed or empty file as one line."""
        values: dict = {}
        for file in file_list or []:
            try:
                with open(file, encoding="utf-8") as f:
                    loaded = yaml.load(f, Loader=self.yaml_loader)
            except OSError as err:
                raise UsageError(f"config file {file}: {err.strerror}") from None
            except yaml.YAMLError as err:
                raise UsageError(f"config file {file} is not valid yaml: {' '.join(str(err).split())}") from None
            if not isinstance(loaded, dict):
                raise UsageError(f"config file {file} must hold 'key: value' lines, not {type(loaded).__name__}")
            values.update(loaded)
        return values

    def _get_model_and_dataset(self, model, dataset):
        if model is None:
            model = self.external_config_dict.get("model")
        if isinstance(model, str):
            return super()._get_model_and_dataset(get_model(model), dataset)
        return super()._get_model_and_dataset(model, dataset)

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        props = properties_dir()
        for file in (props / "overall.yaml", props / "model" / f"{model}.yaml"):
            if file.is_file():
                self._update_internal_config_dict(str(file))
        dataset_file = props / "dataset" / f"{dataset}.yaml"
        if dataset_file.is_file():
            added = self._update_internal_config_dict(str(dataset_file)) or {}
            self.parameters["Dataset"] += [k for k in added if k not in self.parameters["Dataset"]]

    def _set_default_parameters(self):
        """Check every declared key (RecBole derives its settings from the merged values here), then RecBole's."""
        values = check_config(self.final_config_dict)
        self.final_config_dict.update(values)
        self.external_config_dict.update({k: values[k] for k in values.keys() & self.external_config_dict.keys()})
        with _recbole_checks():
            super()._set_default_parameters()

    def _set_train_neg_sample_args(self):
        with _recbole_checks():
            super()._set_train_neg_sample_args()

    def _set_eval_neg_sample_args(self, phase: str):
        with _recbole_checks():
            super()._set_eval_neg_sample_args(phase)

    def _init_device(self):
        # RecBole's distributed branch hard-codes NCCL and cuda:<local_rank>: CPU ranks (gloo) could not start.
        if "local_rank" not in self.final_config_dict:
            return super()._init_device()
        from recbole_speeder.trainer.distributed import init_distributed_device

        init_distributed_device(self.final_config_dict)
