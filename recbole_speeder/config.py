"""RecBole ``Config`` that knows the plugin's models and yaml files.

Layering, later wins: RecBole's own defaults, then ``properties/overall.yaml``,
``properties/model/<Model>.yaml``, ``properties/dataset/<Dataset>.yaml``, then the user's config files,
config dict and command line (RecBole's order).
"""

from __future__ import annotations

from recbole.config import Config as RecBoleConfig

from recbole_speeder.compat import apply_compat
from recbole_speeder.metrics import register_metrics
from recbole_speeder.resources import properties_dir
from recbole_speeder.utils import get_model


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
        cmd_config_dict = {}
        for arg in self._cmd_args:
            name, sep, value = arg[2:].partition("=")
            if not arg.startswith("--") or not sep:
                continue
            if cmd_config_dict.get(name, value) != value:
                raise SyntaxError(f"command line arg '{name}' is given twice with different values")
            cmd_config_dict[name] = value
        return self._convert_config_dict(cmd_config_dict)

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

    def _init_device(self):
        # RecBole's distributed branch hard-codes NCCL and cuda:<local_rank>: CPU ranks (gloo) could not start.
        if "local_rank" not in self.final_config_dict:
            return super()._init_device()
        from recbole_speeder.trainer.distributed import init_distributed_device

        init_distributed_device(self.final_config_dict)
