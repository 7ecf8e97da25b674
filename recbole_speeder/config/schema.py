"""What each plugin config key accepts, checked when the config is built: before any data loads or weights are read.

:data:`SCHEMA` declares every key of ``properties/overall.yaml``, ``properties/model/Speeder.yaml`` and the dataset
yamls' preparation options (``raw_dir``, ``offline``): its type, its choices or range, and whether ``~`` is allowed.
``Config`` checks the merged value of each declared key (yaml files, config dict and command line alike) and stops
at the first bad one with a single line: ``mrc_tokens: expected an integer >= 1, got 'abc'``. Keys that depend on
other keys (``mpo_stages``, ``prompt_suffix``, ...) have a rule that runs once every key has passed its own check.

``tests/test_config_schema.py`` ties each declaration to the ``(type)`` tag of its yaml line, and
``tests/test_docs.py`` to ``docs/configuration.md``, which ``python -m recbole_speeder.config.reference`` writes from
both. A new key is one line here plus its yaml line. RecBole's own keys outside those files are left to RecBole
(whose errors ``Config`` also shows as one line).
"""

from __future__ import annotations

import argparse
import ast
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from recbole_speeder.config.choices import (
    AUTOCAST_DTYPES,
    BACKBONE_DTYPES,
    BACKBONE_INITS,
    CANDIDATE_NEGATIVES,
    DIST_BACKENDS,
    EVAL_CANDIDATES,
    GENERATE_ANSWERS,
    GENERATE_COPIES,
    GENERATE_DECODERS,
    GENERATE_LABELS,
    GENERATE_SAMPLINGS,
    GENERATE_VALIDITY,
    ID_INITS,
    ITEM_REPRS,
    LR_SCHEDULERS,
    MODALITIES,
    NEGATIVE_DISTRIBUTIONS,
    PREDICT_MODES,
    ROUTERS,
    SIMILARITIES,
    TITLE_SCORES,
)
from recbole_speeder.config.stages import parse_stages
from recbole_speeder.errors import UsageError

Rule = Callable[[Any, Mapping[str, Any]], None]
_NOUNS = {int: ("an integer", "integers"), float: ("a number", "numbers"), bool: ("True or False", "booleans"),
          str: ("a string", "names"), dict: ("a dict", "dicts")}  # (a value, a list's items)


@dataclass(frozen=True)
class Key:
    """What one config key accepts."""

    kind: type | tuple[type, ...]  # int, float, bool, str, list or dict; a tuple where a key takes two forms
    optional: bool = False  # ~ (None) is accepted
    choices: tuple[str, ...] = ()  # a str: one of them; a list: a subset of them, each at most once
    minimum: float | None = None  # a number (or each item of a list of numbers) is >= minimum
    above: float | None = None  # ... is > above
    below: float | None = None  # ... is < below
    item: type = str  # the type of a list's items
    rule: Rule | None = None  # a check against other keys, run after every key has passed its own
    phrase: str = ""  # what the key accepts, where the fields above cannot say it

    @property
    def kinds(self) -> tuple[type, ...]:
        return self.kind if isinstance(self.kind, tuple) else (self.kind,)

    def expects(self) -> str:
        """What the key accepts, as error messages and README's key tables word it."""
        if self.phrase:
            text = self.phrase
        elif self.kinds[0] is list:
            items = ", ".join(self.choices) if self.choices else _NOUNS[self.item][1] + self._range()
            text = f"a non-empty list of {items}"
        elif self.choices:
            text = "one of " + ", ".join(self.choices)
        else:
            text = _NOUNS[self.kinds[0]][0] + self._range()
        return f"{text}, or ~" if self.optional else text

    def _range(self) -> str:
        bounds = [f"{op} {bound:g}" for op, bound in ((">=", self.minimum), (">", self.above), ("<", self.below))
                  if bound is not None]
        return " " + " and ".join(bounds) if bounds else ""

    def check(self, name: str, value: Any) -> Any:
        """``value`` as the code reads it, or a :class:`UsageError` naming the key, the value and what it accepts.

        A list or dict key also reads a bracketed string as yaml (``[text, id]``: the command line's form) and a
        list key a single item as a one-item list (``--modalities=text``).
        """
        if value is None and self.optional:
            return None
        read = value
        bracketed = isinstance(value, str) and value.lstrip()[:1] in ("[", "{")
        if bracketed and {list, dict} & set(self.kinds):
            read = _yaml_collection(value)
        if list in self.kinds:
            if isinstance(read, tuple):
                read = list(read)
            if str not in self.kinds and not bracketed and self._fits(read, self.item):
                read = [read]
            if isinstance(read, list) and self._fits_list(read):
                return read
        for kind in self.kinds:
            if kind is not list and self._fits(read, kind):
                return read
        raise UsageError(f"{name}: {self.mismatch(value)}")

    def mismatch(self, value: Any) -> str:
        """What went wrong, without the key's name (argparse adds the flag's)."""
        return f"expected {self.expects()}, got {value!r}"

    def _fits_list(self, values: list) -> bool:
        if not values or not all(self._fits(v, self.item) for v in values):
            return False
        return not self.choices or len(set(values)) == len(values)

    def _fits(self, value: Any, kind: type) -> bool:
        if kind is bool or isinstance(value, bool):
            return kind is bool and isinstance(value, bool)
        if kind in (int, float):
            number = isinstance(value, int) or (kind is float and isinstance(value, float) and math.isfinite(value))
            return number and self._in_range(value)
        if kind is str and self.choices:
            return value in self.choices
        return isinstance(value, kind)

    def _in_range(self, value: float) -> bool:
        return ((self.minimum is None or value >= self.minimum) and (self.above is None or value > self.above)
                and (self.below is None or value < self.below))

    def tag(self) -> str:
        """The ``(type)`` tag of the key's yaml comment."""
        return self.kinds[0].__name__


class _YamlLoader(yaml.SafeLoader):
    """yaml as RecBole reads config files: ``5e-4`` is a float too (YAML 1.1 alone reads it as a string)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _yaml_collection(text: str) -> Any:
    """``[text, id]`` or ``{a: 1}`` read as yaml; the text itself when it is not valid yaml."""
    try:
        return yaml.load(text, Loader=_YamlLoader)
    except yaml.YAMLError:
        return text


def parse_value(text: str) -> Any:
    """A value typed as text (``--key=value``, ``--compare`` overrides): a Python literal (``1e-3``, ``'a'``,
    ``['text', 'id']``), true / false in any case, ``~`` or null, else the text itself.

    Unlike RecBole's ``eval`` of its command line, nothing is executed. ``[text, id]`` stays text here: list keys of
    :data:`SCHEMA` read it (:meth:`Key.check`), and RecBole's interval keys need ``[5,inf]`` as it was typed.
    """
    try:
        return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        pass
    word = text.strip().lower()
    if word in ("true", "false"):
        return word == "true"
    if word in ("~", "null"):
        return None
    return text


def cli_type(key: Key) -> Callable[[str], Any]:
    """An argparse ``type=`` that reads a flag as ``key`` reads a config value, with the same wording."""

    def convert(text: str) -> Any:
        try:
            return key.check("", parse_value(text))
        except UsageError:
            raise argparse.ArgumentTypeError(key.mismatch(text)) from None

    return convert


# ---------------------------------------------------------------------------------------------- rules
def _stages_rule(value: Any, config: Mapping[str, Any]) -> None:
    parse_stages(value, epochs=config["epochs"], learning_rate=config["learning_rate"],
                 modalities=config["modalities"], warn=False)


def _suffix_rule(value: str, config: Mapping[str, Any]) -> None:
    if value and config.get("train_all_positions"):
        raise UsageError(f"prompt_suffix: expected '' while train_all_positions is True (every position is read at "
                         f"its item; set train_all_positions: False), got {value!r}")


def _sampled_rule(value: int, config: Mapping[str, Any]) -> None:
    if value and config["predict_mode"] != "score":
        raise UsageError(f"sampled_softmax_negatives trains score mode's ranking: it needs predict_mode: score, got "
                         f"{config['predict_mode']!r}")


def _lazy_rule(value: bool, config: Mapping[str, Any]) -> None:
    learner = str(config.get("learner") or "adam").lower()
    if value and config["sampled_softmax_negatives"] and learner not in ("adam", "adamw"):
        raise UsageError(f"lazy_id_update is Adam's lazy row update: it needs learner adam or adamw, got {learner!r} "
                         "(or set lazy_id_update: False)")


def _id_init_rule(value: str, config: Mapping[str, Any]) -> None:
    modalities = config["modalities"] or []
    if value == "text" and not {"text", "id"} <= set(modalities):
        raise UsageError(f"id_init: text starts the ID table from the text features: it needs modalities with text "
                         f"and id, got {modalities!r}")


def _metrics_rule(value: list, config: Mapping[str, Any]) -> None:
    from recbole.evaluator.register import metric_types  # RecBole's registry, the plugin's metrics added

    if any(m.lower() not in metric_types for m in value):
        raise UsageError(f"metrics: expected names of metrics ({', '.join(sorted(metric_types))}), got {value!r}")


def _valid_metric_rule(value: str, config: Mapping[str, Any]) -> None:
    name, at, k = value.partition("@")
    metrics = [m.lower() for m in config["metrics"]]
    if name.lower() not in metrics or (at and not (k.isdigit() and int(k) in config["topk"])):
        raise UsageError(f"valid_metric: expected one of metrics {config['metrics']} at a cut-off of topk "
                         f"{config['topk']}, e.g. {config['metrics'][0]}@{config['topk'][-1]}, got {value!r}")


# ---------------------------------------------------------------------------------------------- declarations
SCHEMA: dict[str, Key] = {
    # properties/overall.yaml
    "seed": Key(int, minimum=0),
    "reproducibility": Key(bool),
    "data_path": Key(str),
    "checkpoint_dir": Key(str),
    "keep_freed_memory": Key(bool),
    "show_progress": Key(bool),
    "epochs": Key(int, minimum=1),
    "train_batch_size": Key(int, minimum=1),
    "learning_rate": Key(float, above=0),
    "train_neg_sample_args": Key(dict, optional=True),
    "stopping_step": Key(int, minimum=0),
    "eval_args": Key(dict),
    "repeatable": Key(bool),
    "metrics": Key(list, rule=_metrics_rule, phrase="a non-empty list of metric names"),
    "topk": Key(list, item=int, minimum=1),
    "valid_metric": Key(str, rule=_valid_metric_rule, phrase="one of metrics at a cut-off of topk, e.g. NDCG@10"),
    "eval_batch_size": Key(int, minimum=1),
    "eval_scores_per_batch": Key(int, minimum=1),
    "MAX_ITEM_LIST_LENGTH": Key(int, minimum=1),
    "eval_candidates": Key(str, choices=EVAL_CANDIDATES),
    "candidate_negatives": Key(str, choices=CANDIDATE_NEGATIVES),
    "eval_full_beside": Key(bool),
    "eval_exclude_history": Key(bool),
    "eval_users": Key(int, optional=True, minimum=1),
    # properties/dataset/<Dataset>.yaml: preparing missing Amazon data
    "raw_dir": Key(str, optional=True),
    "offline": Key(bool),
    # properties/model/Speeder.yaml
    "backbone_path": Key(str),
    "backbone_local_files_only": Key(bool),
    "backbone_offline_copy": Key(bool),
    "backbone_init": Key(str, choices=BACKBONE_INITS),
    "backbone_dtype": Key(str, choices=BACKBONE_DTYPES),
    "backbone_layers": Key(int, optional=True, minimum=1),
    "lora_r": Key(int, minimum=0),
    "lora_alpha": Key(int, minimum=1),
    "lora_dropout": Key(float, minimum=0, below=1),
    "lora_target_modules": Key(list),
    "item_repr": Key(str, choices=ITEM_REPRS),
    "item_text_fields": Key(list),
    "max_item_text_tokens": Key(int, minimum=1),
    "text_feature_file": Key(str, optional=True),
    "image_feature_file": Key(str, optional=True),
    "feature_cache_dir": Key(str, optional=True),
    "modalities": Key(list, choices=MODALITIES),
    "mrc_tokens": Key(int, minimum=1),
    "expert_hidden": Key(int, minimum=1),
    "router": Key(str, choices=ROUTERS),
    "mrc_dropout": Key(float, minimum=0, below=1),
    "history_dropout": Key(float, minimum=0, below=1),
    "id_embedding_dim": Key(int, minimum=1),
    "id_init": Key(str, choices=ID_INITS, rule=_id_init_rule),
    "item_chunk_size": Key(int, minimum=1),
    "spae_absolute": Key(bool),
    "spae_relative": Key(bool),
    "spae_time": Key(bool),
    "spae_time_buckets": Key(int, minimum=1),
    "spae_time_unit": Key(float, above=0),
    "spae_text_markers": Key(bool),
    "prompt_prefix": Key(str),
    "prompt_suffix": Key(str, rule=_suffix_rule),
    "prefix_cache": Key(bool),
    "length_bucket_tokens": Key(int, minimum=0),
    "length_bucket_padding": Key(float, minimum=0),
    "inference_mode": Key(bool),
    "autocast_dtype": Key(str, choices=AUTOCAST_DTYPES),
    "autocast_frozen_weights": Key(bool),
    "last_layer_reads_only": Key(bool),
    "ranking_chunk_size": Key(int, minimum=1),
    "similarity": Key(str, choices=SIMILARITIES),
    "temperature": Key(float, above=0),
    "head_dropout": Key(float, minimum=0, below=1),
    "train_all_positions": Key(bool),
    "sampled_softmax_negatives": Key(int, minimum=0, rule=_sampled_rule),
    "sampled_softmax_distribution": Key(str, choices=NEGATIVE_DISTRIBUTIONS),
    "lazy_id_update": Key(bool, rule=_lazy_rule),
    "mpo_stages": Key((list, str), optional=True, item=dict, rule=_stages_rule,
                      phrase="a list of stage dicts or a name:modalities:train:epochs:lr,... string"),
    "lr_scheduler": Key(str, choices=LR_SCHEDULERS),
    "warmup_steps": Key(int, minimum=0),
    "checkpoint_every_steps": Key(int, minimum=0),
    "resume": Key(str, optional=True),
    "init_from": Key(str, optional=True),
    "dist_backend": Key(str, optional=True, choices=DIST_BACKENDS),
    "ddp_find_unused_parameters": Key(bool),
    "predict_mode": Key(str, choices=PREDICT_MODES),
    "generate_decoder": Key(str, choices=GENERATE_DECODERS),
    "generate_candidates": Key(int, minimum=2),
    "generate_labels": Key(str, choices=GENERATE_LABELS),
    "generate_answer": Key(str, choices=GENERATE_ANSWERS),
    "generate_copy": Key(str, choices=GENERATE_COPIES),
    "generate_train_sampling": Key(str, optional=True, choices=GENERATE_SAMPLINGS),
    "generate_candidates_text": Key(str),
    "generate_answer_text": Key(str),
    "generate_separator": Key(str),
    "generate_max_new_tokens": Key(int, minimum=1),
    "generate_title_score": Key(str, choices=TITLE_SCORES),
    "generate_validity": Key(str, choices=GENERATE_VALIDITY),
    "generate_score_loss_weight": Key(float, minimum=0),
}


def check_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The declared keys that ``config`` sets, as the code reads them; a UsageError at the first bad value.

    A key the config does not set (Speeder's keys under SASRec) is not checked.
    """
    values = {name: key.check(name, config[name]) for name, key in SCHEMA.items() if name in config}
    merged = {**config, **values}
    for name, value in values.items():
        rule = SCHEMA[name].rule
        if rule is not None and value is not None:
            rule(value, merged)
    return values
