"""Config values are checked when the config is built: one line and exit status 2 before any data loads.

The schema (recbole_speeder/config/schema.py) is tied to the yaml files here and to docs/configuration.md in
test_docs.py.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import pytest
import yaml

from recbole_speeder.cli import main
from recbole_speeder.config import Config
from recbole_speeder.config.schema import SCHEMA, Key, cli_type, parse_value
from recbole_speeder.errors import UsageError
from recbole_speeder.resources import properties_dir

from .conftest import REPO
from .test_plugin import run_script

PROPS = properties_dir()
PLUGIN_YAMLS = [PROPS / "overall.yaml", PROPS / "model" / "Speeder.yaml"]
ALL_YAMLS = [*PLUGIN_YAMLS, *sorted((PROPS / "dataset").glob("*.yaml"))]
KEY_LINE = re.compile(r"^(\w+):(.*)$")
TAG = re.compile(r"#\s*\((\w+)\)")


def yaml_lines(path) -> dict[str, str]:
    """Top-level key -> its whole line."""
    return {m.group(1): line for line in path.read_text().splitlines() if (m := KEY_LINE.match(line))}


# ---------------------------------------------------------------------------------------------- bad values
BAD_VALUES = [
    # (model, key, value as typed, a fragment the message must hold)
    ("Speeder", "mrc_tokens", "abc", "expected an integer >= 1, got 'abc'"),
    ("Speeder", "mrc_tokens", "0", "expected an integer >= 1, got 0"),
    ("Speeder", "mrc_tokens", "1.5", "got 1.5"),
    ("Speeder", "lora_r", "-1", "expected an integer >= 0, got -1"),
    ("Speeder", "lora_dropout", "1.5", "expected a number >= 0 and < 1, got 1.5"),
    ("Speeder", "modalities", "[text,audio]", "expected a non-empty list of text, image, id, got '[text,audio]'"),
    ("Speeder", "modalities", "[]", "got []"),
    ("Speeder", "modalities", "[text,text]", "got '[text,text]'"),
    ("Speeder", "item_repr", "image", "expected one of mrc, text, got 'image'"),
    ("Speeder", "router", "gated", "expected one of learned, uniform, got 'gated'"),
    ("Speeder", "id_init", "pca", "expected one of auto, random, text, got 'pca'"),
    ("Speeder", "ranking_chunk_size", "0", "expected an integer >= 1, got 0"),
    ("Speeder", "similarity", "l2", "expected one of cos, dot"),
    ("Speeder", "autocast_dtype", "int8", "expected one of auto, bfloat16, float16, float32, got 'int8'"),
    ("Speeder", "backbone_dtype", "float64", "got 'float64'"),
    ("Speeder", "backbone_layers", "0", "expected an integer >= 1, or ~, got 0"),
    ("Speeder", "predict_mode", "beam", "expected one of score, generate, got 'beam'"),
    ("Speeder", "generate_decoder", "beam", "expected one of constrained, free"),
    ("Speeder", "generate_candidates", "1", "expected an integer >= 2, got 1"),
    ("Speeder", "lr_scheduler", "step", "expected one of constant, linear, cosine, got 'step'"),
    ("Speeder", "dist_backend", "mpi", "expected one of gloo, nccl, or ~, got 'mpi'"),
    ("Speeder", "spae_time", "maybe", "expected True or False, got 'maybe'"),
    ("Speeder", "spae_time", "1", "expected True or False, got 1"),
    ("Speeder", "temperature", "0", "expected a number > 0, got 0"),
    ("Speeder", "lora_target_modules", "[q_proj,[v_proj]]", "expected a non-empty list of names"),
    ("Speeder", "prompt_suffix", " Next:", "train_all_positions"),
    ("Speeder", "mpo_stages", "[{name: a, train: [mrc, backbone]}]", "unknown train ['backbone']"),
    ("Speeder", "mpo_stages", "a:text+audio:mrc:1", "unknown modalities ['audio']"),
    ("Speeder", "mpo_stages", "a:text:mrc:0", "epochs must be an integer >= 1, not 0"),
    ("Speeder", "mpo_stages", "[1, 2]", "expected a list of stage dicts"),
    ("Speeder", "mpo_stages", "a:text:all:1:0.1:words", "has 6 fields; expected name:modalities:train:epochs"),
    ("Speeder", "mpo_stages", "[{name: a, users: 2}]", "unknown key(s) ['users']"),
    ("Speeder", "epochs", "0", "expected an integer >= 1, got 0"),
    ("SASRec", "epochs", "ten", "got 'ten'"),
    ("SASRec", "train_batch_size", "abc", "expected an integer >= 1, got 'abc'"),
    ("SASRec", "eval_batch_size", "-5", "got -5"),
    ("SASRec", "learning_rate", "0", "expected a number > 0, got 0"),
    ("SASRec", "topk", "[0,10]", "expected a non-empty list of integers >= 1, got [0, 10]"),
    ("SASRec", "metrics", "[Hit,Foo]", "got ['Hit', 'Foo']"),
    ("SASRec", "valid_metric", "NDCG@50", "got 'NDCG@50'"),
    ("SASRec", "eval_candidates", "fixed", "expected one of seeded, recbole, got 'fixed'"),
    ("SASRec", "offline", "maybe", "expected True or False, got 'maybe'"),
    ("BERT4Rec", "seed", "-1", "expected an integer >= 0, got -1"),
]


@pytest.fixture
def no_data(monkeypatch, tmp_path):
    """A cwd where RecBole's log/ would appear, and a dataset loader that must never be called."""
    import recbole_speeder.quick_start

    def loaded(config):
        raise AssertionError("the dataset was loaded before the bad value was reported")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(recbole_speeder.quick_start, "create_dataset", loaded)
    return tmp_path


@pytest.mark.parametrize(("model", "key", "value", "fragment"), BAD_VALUES,
                         ids=[f"{m}-{k}={v}" for m, k, v, _ in BAD_VALUES])
def test_a_bad_value_exits_2_with_one_line_naming_the_key_before_data_loads(no_data, capsys, model, key, value,
                                                                            fragment):
    with pytest.raises(SystemExit) as exit_info:
        backbone = ["--backbone_path=tiny-random"] if model == "Speeder" else []
        main([f"--model={model}", "--dataset=ml-100k", *backbone, f"--{key}={value}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith(f"error: {key}") and len(err.strip().splitlines()) == 1, err
    assert fragment in err and "Traceback" not in err
    assert not (no_data / "log").exists() and not (no_data / "saved").exists()


@pytest.mark.parametrize(("command", "message"), [
    (["run_recbole_speeder.py", "--model=Speeder", "--dataset=ml-100k", "--backbone_path=tiny-random",
      "--mrc_tokens=abc"], "error: mrc_tokens: expected an integer >= 1, got 'abc'"),
    (["run_recbole_speeder.py", "--model=Speeder", "--dataset=ml-100k", "--modalities=[text,audio]"],
     "error: modalities: expected a non-empty list of text, image, id, got '[text,audio]'"),
    (["-m", "dataset_prep", "prepare", "--source=2014", "--out=x", "--kcore=-1"],
     "error: argument --kcore: expected an integer >= 0, got '-1'"),
], ids=["run-script-mrc_tokens", "run-script-modalities", "dataset_prep-kcore"])
def test_the_real_commands_print_one_line_and_no_traceback(tmp_path, command, message):
    if command[0].endswith(".py"):
        done = run_script(*command[1:], cwd=tmp_path)
    else:
        done = subprocess.run([sys.executable, *command], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2
    assert done.stderr.startswith(message) and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert list(tmp_path.iterdir()) == []  # no log/, saved/ or dataset folder


def test_distributed_runs_check_the_config_before_spawning_ranks(no_data, capsys, monkeypatch):
    import torch.multiprocessing

    monkeypatch.setattr(torch.multiprocessing, "spawn", lambda *args, **kwargs: pytest.fail("ranks were spawned"))
    with pytest.raises(SystemExit) as exit_info:
        main(["--model=Speeder", "--dataset=ml-100k", "--nproc=2", "--mrc_tokens=abc"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: mrc_tokens: expected an integer >= 1, got 'abc'\n"
    assert not (no_data / "log").exists()


def test_recbole_and_config_file_mistakes_are_one_line_too(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1\n")
    for kwargs, message in [
        ({"cmd_args": ["--eval_args={'mode': 'xyz'}"]}, "the mode [xyz] in eval_args is not supported"),
        ({"cmd_args": ["--epochs=1", "--epochs=2"]}, "--epochs is given twice"),
        ({"config_file_list": [str(bad)]}, "bad.yaml is not valid yaml"),
        ({"config_file_list": [str(tmp_path / "absent.yaml")]}, "absent.yaml: No such file"),
        ({"config_dict": {"modalities": ("text", "audio")}}, "modalities: expected"),
    ]:
        with pytest.raises(UsageError, match=re.escape(message)) as err:
            Config("Speeder", "ml-100k", **kwargs)
        assert "\n" not in str(err.value)


def test_an_unknown_key_stops_the_run_naming_the_closest_known_one(tmp_path):
    """Command line, config file and config dict alike. Every key of RecBole's and the plugin's yaml files is known,
    for any model: a settings dict or file shared by Speeder and SASRec holds both's keys."""
    typo = tmp_path / "typo.yaml"
    typo.write_text("lerning_rate: 0.01\n")
    for model, kwargs, message in [
        ("Speeder", {"cmd_args": ["--mrc_token=2"]}, "unknown config key 'mrc_token' (command line); did you mean "
                                                    "'mrc_tokens'?"),
        ("Speeder", {"config_file_list": [str(typo)]}, "unknown config key 'lerning_rate' (config file); did you "
                                                       "mean 'learning_rate'?"),
        ("SASRec", {"config_dict": {"n_layer": 1}}, "unknown config key 'n_layer' (config_dict); did you mean "
                                                   "'n_layers'?"),
        ("SASRec", {"cmd_args": ["--zzz=1"]}, "unknown config key 'zzz' (command line)\n"),  # nothing close
    ]:
        with pytest.raises(UsageError, match=re.escape(message.rstrip("\n"))) as err:
            Config(model, "ml-100k", **kwargs)
        assert message.endswith("?") or str(err.value) == message.rstrip("\n")
    known = {"n_layers": 1, "hidden_dropout_prob": 0.2, "eval_step": 2, "item_inter_num_interval": "[5,inf)",
             "lora_r": 4, "backbone_path": "tiny-random"}
    assert Config("SASRec", "ml-100k", config_dict=known)["n_layers"] == 1
    # keys RecBole reads only in its code (TailPercentage's, FEARec's): no yaml declares them
    metrics = Config("SASRec", "ml-100k", cmd_args=["--metrics=['NDCG','TailPercentage']", "--tail_ratio=4"])
    assert metrics["tail_ratio"] == 4
    assert Config("FEARec", "ml-100k", config_dict={"contrast": "us_x", "use_filter": True})["contrast"] == "us_x"
    assert Config("Speeder", "ml-100k", cmd_args=["--mrc_tokens=2", "--n_layers=2"])["mrc_tokens"] == 2


def test_a_typo_on_the_command_line_exits_2_with_one_line(tmp_path):
    done = run_script("--model=Speeder", "--dataset=ml-100k", "--mrc_token=2", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr == "error: unknown config key 'mrc_token' (command line); did you mean 'mrc_tokens'?\n"
    assert not (tmp_path / "log").exists()  # stopped before RecBole's logger started


def test_values_typed_as_text_are_read_as_literals_never_evaluated(tmp_path, monkeypatch):
    """RecBole's Config calls ``eval`` on every string of a config dict; the plugin's reads them as literals."""
    monkeypatch.chdir(tmp_path)
    code = "open('marker', 'w').close() or 0.1"
    with pytest.raises(UsageError, match=re.escape(f"mrc_dropout: expected a number >= 0 and < 1, got {code!r}")):
        Config("Speeder", "ml-100k", config_dict={"mrc_dropout": code})
    for config_dict in ({"eval_step": code}, {"seed": "__import__('os').getpid()"}):  # keys outside the schema
        try:
            Config("SASRec", "ml-100k", config_dict=config_dict)
        except UsageError:
            pass
    assert not (tmp_path / "marker").exists()
    # [id] stays a list of names, not a list holding Python's built-in id function
    assert Config("Speeder", "ml-100k", config_dict={"modalities": "[id]"})["modalities"] == ["id"]
    assert Config("Speeder", "ml-100k", cmd_args=["--modalities=[id]"])["modalities"] == ["id"]


def test_compare_checks_every_model_before_the_first_trains(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["--compare=SASRec,NoSuchModel,Speeder[mrc_tokens=0]", "--dataset=ml-100k", "--results_dir=results"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err == "error: Speeder[mrc_tokens=0]: mrc_tokens: expected an integer >= 1, got 0\n"
    assert not (tmp_path / "results").exists() and not (tmp_path / "log").exists()


def test_run_script_flags_are_checked_like_config_values(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--nproc=0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: argument --nproc: expected an integer >= 1, got '0'")


# ---------------------------------------------------------------------------------------------- good values
def test_command_line_lists_read_bare_words_python_literals_and_single_items():
    def config(*args: str, model: str = "Speeder") -> Config:
        return Config(model, "ml-100k", cmd_args=list(args))

    bare = config("--modalities=[text,id]", "--lora_target_modules=[q_proj, v_proj, o_proj]")
    quoted = config("--modalities=['text','id']")  # the shell has removed the outer double quotes
    assert bare["modalities"] == quoted["modalities"] == ["text", "id"]
    assert bare["lora_target_modules"] == ["q_proj", "v_proj", "o_proj"]
    assert config("--modalities=text")["modalities"] == ["text"]
    assert bare.external_config_dict["modalities"] == ["text", "id"]  # what checkpoints and --compare replay
    stages = config("--mpo_stages=[{name: warm, modalities: [text], train: [head], learning_rate: 5e-4}, "
                    "{name: full}]")["mpo_stages"]
    assert stages == [{"name": "warm", "modalities": ["text"], "train": ["head"], "learning_rate": 5e-4},
                      {"name": "full"}]
    assert config("--mpo_stages=~", "--resume=~")["mpo_stages"] is None
    # RecBole's own keys keep their text: an interval is not a list
    assert config("--user_inter_num_interval=[5,inf]")["user_inter_num_interval"] == "[5,inf]"


def test_baselines_check_the_shared_keys_and_need_no_speeder_keys():
    sasrec = Config("SASRec", "ml-100k", cmd_args=["--epochs=2", "--eval_candidates=recbole", "--topk=10",
                                                   "--metrics=NDCG", "--valid_metric=ndcg@10"])
    assert (sasrec["epochs"], sasrec["topk"], sasrec["metrics"]) == (2, [10], ["NDCG"])
    assert sasrec["mrc_tokens"] is None and sasrec["mpo_stages"] is None
    assert Config("SASRec", "ml-100k", cmd_args=["--mrc_tokens=2"])["mrc_tokens"] == 2  # checked, harmless


@pytest.mark.parametrize(("text", "value"), [
    ("1e-3", 1e-3), ("3", 3), ("True", True), ("false", False), ("~", None), ("null", None), ("None", None),
    ("['text', 'id']", ["text", "id"]), ("[text,id]", "[text,id]"), ("tiny-random", "tiny-random"),
    (" Answer:", " Answer:"), ("", ""), ("__import__('os').getcwd()", "__import__('os').getcwd()"),
])
def test_parse_value_reads_literals_and_never_evaluates(text, value):
    assert parse_value(text) == value


def test_key_types_are_strict_where_python_is_loose():
    with pytest.raises(UsageError, match="got True"):
        Key(int).check("n", True)  # a bool is an int to Python, not to a config
    assert Key(float, above=0).check("lr", 1) == 1
    with pytest.raises(UsageError, match="got nan"):
        Key(float, minimum=0).check("w", float("nan"))
    assert Key(list, choices=("a", "b")).check("k", ("b", "a")) == ["b", "a"]  # hyperopt hands tuples
    with pytest.raises(UsageError, match=r"got '\[a'"):
        Key(list).check("k", "[a")  # not valid yaml: never a one-item list of '[a'
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=cli_type(Key(int, minimum=1)))
    assert parser.parse_args(["--n=3"]).n == 3
    with pytest.raises(SystemExit):
        parser.parse_args(["--n=0"])


# ---------------------------------------------------------------------------------------------- ties to the yaml
def test_every_plugin_yaml_key_is_declared_with_the_type_of_its_comment():
    declared = set()
    for path in ALL_YAMLS:
        for key, line in yaml_lines(path).items():
            if path in PLUGIN_YAMLS:
                assert key in SCHEMA, f"{path.name}: {key} has no entry in config_schema.SCHEMA"
            if key not in SCHEMA:
                continue
            declared.add(key)
            tag = TAG.search(line)
            assert tag and tag.group(1) == SCHEMA[key].tag(), f"{path.name}: {key} is declared {SCHEMA[key].tag()}"
            assert ("~" in line) == SCHEMA[key].optional, f"{path.name}: {key}: ~ in its line <=> optional"
            for choice in SCHEMA[key].choices:
                assert re.search(rf"\b{choice}\b", line), f"{path.name}: {key}'s comment does not name {choice}"
    assert set(SCHEMA) == declared, f"declared in SCHEMA but on no yaml line: {set(SCHEMA) - declared}"


def test_every_yaml_default_passes_its_own_check():
    for path in ALL_YAMLS:
        for key, value in yaml.safe_load(path.read_text()).items():
            if key in SCHEMA:
                SCHEMA[key].check(key, value)
