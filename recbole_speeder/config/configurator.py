"""RecBole ``Config`` that knows the plugin's models and yaml files.

Layering, later wins: RecBole's own defaults, then ``properties/overall.yaml``,
``properties/model/<Model>.yaml``, ``properties/dataset/<Dataset>.yaml``, then the user's config files,
config dict and command line (RecBole's order). Every key the user sets must be one the run knows (a typo stops it,
naming the closest known key); every value typed as text is read as a literal, never evaluated; the merged values
are checked against ``schema.SCHEMA`` before RecBole derives anything from them. Every mistake, RecBole's own checks
included, is one UsageError line.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

import recbole
import yaml
from recbole.config import Config as RecBoleConfig

from recbole_speeder.compat import apply_compat
from recbole_speeder.config.schema import SCHEMA, check_config, parse_value
from recbole_speeder.config.snapshot import LAUNCH_KEYS
from recbole_speeder.errors import UsageError
from recbole_speeder.evaluation.metrics import register_metrics
from recbole_speeder.resources import properties_dir
from recbole_speeder.utils import get_model

# Keys RecBole sets itself or reads without a default in any yaml: known, although no file declares them. Those of
# the last two lines are user settings read only in RecBole 1.2.1's code: TailPercentage's tail_ratio, FEARec's
# contrast, sim and use_filter, the data transforms' eta, the dataset's encoding, some models' and trainers' options.
DERIVED_KEYS = frozenset({"model", "dataset", "config_files", "device", "single_spec", "MODEL_TYPE", "MODEL_INPUT_TYPE",
                          "eval_type", "valid_neg_sample_args", "test_neg_sample_args",
                          "tail_ratio", "contrast", "sim", "use_filter", "eta", "encoding", "has_residual", "cin",
                          "feature_num", "norm", "token_num_threshold", "xgb_early_stopping_rounds"})


@functools.cache
def known_keys() -> frozenset[str]:
    """Every key RecBole or the plugin knows: those of all their yaml files (every model's and dataset's), the
    plugin's declarations, and the keys RecBole derives or a launch sets. A key outside them is a typo."""
    folders = (Path(recbole.__file__).parent / "properties", properties_dir())
    keys = set(SCHEMA) | DERIVED_KEYS | set(LAUNCH_KEYS)
    for path in (file for folder in folders for file in folder.rglob("*.yaml")):
        keys |= set(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    return frozenset(keys)


@contextmanager
def _recbole_checks() -> Iterator[None]:
    """RecBole's own config checks raise ValueError & co. with a message that names the value: one line too."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, TypeError, NotImplementedError, RuntimeError) as err:
        raise UsageError(" ".join(str(err).split())) from None


def unknown_key_error(key: str, known: Collection[str], where: str) -> UsageError:
    """A key no yaml file or plugin declaration knows: one line naming the closest known key."""
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return UsageError(f"unknown config key '{key}' ({where}){hint}")


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

    def model_keys(self) -> set[str]:
        """Keys this run's model and dataset use: RecBole's and the plugin's yaml for them, and the derived ones."""
        return set(self.internal_config_dict) | DERIVED_KEYS | set(LAUNCH_KEYS)

    def _check_known_keys(self) -> None:
        """Every key the user set is one RecBole or the plugin knows, for some model (a settings dict or config file
        shared by several models holds the others' keys); a typo is one line naming the closest known key."""
        known = known_keys()
        sources = (("command line", self.cmd_config_dict), ("config file", self.file_config_dict),
                   ("config_dict", self.variable_config_dict))
        for where, values in sources:
            for key in values:
                if key not in known:
                    raise unknown_key_error(key, known, where)

    def _convert_config_dict(self, config_dict: dict) -> dict:
        """Values typed as text read as literals (``parse_value``); RecBole's own version calls ``eval`` on them."""
        return {key: parse_value(value) if isinstance(value, str) else value for key, value in config_dict.items()}

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
        return self._convert_config_dict(cmd_config_dict)

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
        """Check every key the user set and every declared value (RecBole derives its settings from the merged values
        here), then RecBole's own checks."""
        self._check_known_keys()
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
        from recbole_speeder.trainer.distributed import init_distributed_device  # torch.distributed: only when asked

        init_distributed_device(self.final_config_dict)
