"""--compare (over --seeds) and --tune end to end on a 100-user slice of ml-100k, plus their parsers and the seed
aggregation on synthetic results."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import recbole
import torch
import yaml

from recbole_speeder.cli import main, parse_args
from recbole_speeder.config import Config
from recbole_speeder.errors import UsageError
from recbole_speeder.experiments import seeds
from recbole_speeder.experiments.report import flat_row
from recbole_speeder.experiments.sweep.space import parse_space
from recbole_speeder.experiments.variants import VARIANTS, parse_compare
from recbole_speeder.resources import properties_dir

from .conftest import REPO

# 100 users with 20-23 interactions each; short histories: seconds per model.
TINY = ["--dataset=ml-100k", "--show_progress=False", "--state=WARNING", "--log_wandb=False",
        "--user_inter_num_interval=[20,23]", "--MAX_ITEM_LIST_LENGTH=5"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """On the shared 2-core machine OpenMP spin-waiting made a tiny SASRec epoch 20x slower with 2 threads; Ray
    trials run with one thread (OMP_NUM_THREADS = --tune_cpus), and in-process reruns must match them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def random_text_features(tmp_path_factory) -> Path:
    """A text feature file for every ml-100k item (random vectors): Speeder runs without encoding titles."""
    from recbole_speeder.data.features import save_item_features

    item_file = Path(recbole.__file__).parent / "dataset_example" / "ml-100k" / "ml-100k.item"
    items = pd.read_csv(item_file, sep="\t", usecols=[0]).iloc[:, 0].astype(str).tolist()
    vectors = np.random.default_rng(0).normal(size=(len(items), 16))
    folder = tmp_path_factory.mktemp("text_features")
    return save_item_features(folder, "ml-100k", "text", items, vectors, encoder="random", source_sha256="random")


# ---------------------------------------------------------------------------------------------- parsers
def test_compare_list_reads_models_variants_and_inline_overrides():
    variants = parse_compare("Speeder, Speeder[text],Speeder[no-spae,lora_r=4,modalities=[text,id]],SASRec")
    assert [v.label for v in variants] == ["Speeder", "Speeder[text]",
                                           "Speeder[no-spae,lora_r=4,modalities=[text,id]]", "SASRec"]
    assert variants[1].overrides == VARIANTS["text"] == {"item_repr": "text"}
    # the config reads "[text,id]" as a list, as it reads the command line (tests/test_config_schema.py)
    assert variants[2].overrides == {**VARIANTS["no-spae"], "lora_r": 4, "modalities": "[text,id]"}
    assert variants[2].slug == "Speeder-no-spae-lora_r=4-modalities=-text-id"
    (esasrec,) = parse_compare("SASRec[esasrec]")
    assert esasrec.model == "SASRec" and esasrec.overrides["n_layers"] == esasrec.overrides["n_heads"] == 1
    for bad, message in [("Speeder[txet]", "unknown variant 'txet'"), ("SASRec,SASRec", "listed twice"),
                         ("Speeder[text", "unbalanced"), ("", "at least one model")]:
        with pytest.raises(UsageError, match=message):
            parse_compare(bad)


def test_shipped_search_spaces_parse_and_name_real_config_keys(tmp_path):
    for model, file in [("Speeder", "speeder.hyper"), ("SASRec", "sasrec.hyper")]:
        params = parse_space(properties_dir() / "hyper" / file)
        config = Config(model, "ml-100k", config_dict={"backbone_path": "tiny-random"})
        assert params and {p.name for p in params} <= config.model_keys()
    lr = parse_space(properties_dir() / "hyper" / "sasrec.hyper")[0]
    assert lr.kind == "loguniform"
    assert lr.to_ray().lower == pytest.approx(np.exp(lr.args[0]))  # natural-log bounds, as in hyperopt
    bad = tmp_path / "bad.hyper"
    bad.write_text("# a comment\nlearning_rate choice [0.1]\nn_layers normal 1,2\n")
    with pytest.raises(UsageError, match=r"bad.hyper:3: type must be one of"):
        parse_space(bad)


def test_usage_mistakes_exit_2_with_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a case that wrongly ran would write log/ and results/ here, not in the checkout
    args, overrides = parse_args(["--compare=SASRec", "--seed=7"])
    assert args.seeds is None and overrides == ["--seed=7"]  # a config key, not an abbreviation of --seeds
    for argv, message in [
        (["--compare=SASRec", "--tune=sasrec.hyper"], "separate runs"),
        (["--model=SASRec", "--tune=sasrec.hyper", "--tune_search=bayes"], "--tune_search for ray"),
        (["--model=SASRec", "--tune=nothing.hyper"], "search space nothing.hyper not found"),
        (["--compare=SASRec[txet]"], "unknown variant"),
        (["--seeds=2020,2021"], "give --compare too"),
        (["--compare=SASRec", "--seeds=2020,x"], "comma-separated non-negative integers"),
        (["--compare=SASRec", "--seeds=2020,2020"], "lists a seed twice"),
        (["--compare=SASRec", "--seeds=2020,2021", "--seed=7"], "drop --seed"),
        (["--compare=SASRec[seed=7]", "--seeds=2020,2021"], "drop seed= from SASRec[seed=7]"),
        (["--compare=SASRec[lora_r=4],Speeder"], "SASRec[lora_r=4]: ['lora_r'] is not a key of SASRec"),
        (["--compare=SASRec,BERT4Rec", "--lora_rr=4"], "unknown config key 'lora_rr' (command line); did you mean"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv + TINY)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------------------------------------- --compare
def test_compare_writes_tables_chart_and_configs_with_failed_rows(tmp_path, monkeypatch, capsys,
                                                                  random_text_features):
    import matplotlib.image

    monkeypatch.chdir(tmp_path)  # RecBole writes ./log
    with pytest.raises(SystemExit) as exit_info:  # a model failed: non-zero, after every table is written
        main(["--compare=Speeder,Speeder[text],SASRec,NoSuchModel", *TINY, "--epochs=1",
              "--backbone_path=tiny-random", "--mpo_stages=None", "--max_item_text_tokens=4",
              f"--text_feature_file={random_text_features}", f"--checkpoint_dir={tmp_path / 'saved'}",
              f"--results_dir={tmp_path / 'results'}"])
    assert exit_info.value.code == 1
    (out,) = (tmp_path / "results" / "ml-100k").iterdir()
    assert f"1 run(s) failed: NoSuchModel; their errors are in {out}" in capsys.readouterr().err
    table = pd.read_csv(out / "results.csv")
    assert table["model"].tolist() == ["Speeder", "Speeder[text]", "SASRec", "NoSuchModel"]
    assert table["status"].tolist() == ["ok", "ok", "ok", "failed"], table[["model", "error"]].to_string()
    assert isinstance(table.loc[3, "error"], str) and table.loc[3, "error"]
    ok = table[table["status"] == "ok"]
    assert ok["eval_split"].nunique() == 1  # one split for every model
    # the true item ranks no lower among 20 candidates than among all items
    for k in (1, 5, 10):
        assert (ok[f"uni19/hit@{k}"] >= ok[f"full/hit@{k}"]).all()
    assert ok[[c for c in ok if c.startswith(("full/", "uni19/"))]].stack().between(0, 1).all()
    assert (ok["params_frozen"] > 0).tolist() == [True, True, False]  # the LLM is frozen; SASRec trains all
    assert (ok["train_s"] > 0).all() and (ok["eval_s/uni19"] > 0).all()
    # text mode reads each history item's text tokens: longer prompts than one MRC token per item
    assert ok.loc[1, "prompt_tokens_per_user/full"] > ok.loc[0, "prompt_tokens_per_user/full"]

    markdown = (out / "results.md").read_text()
    ndcg = ok["uni19/ndcg@10"]
    assert ndcg.nunique() > 1 and markdown.count(f"**{ndcg.max():.4f}**") >= 1
    assert "## Failed" in markdown and "`NoSuchModel`:" in markdown
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 4 and rows[3]["traceback"]
    assert yaml.safe_load((out / "configs" / "Speeder-text.yaml").read_text())["item_repr"] == "text"
    assert len(list((out / "configs").glob("*.yaml"))) == 4
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(out / "results.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200


def test_compare_variants_are_read_as_literals_never_evaluated(tmp_path, monkeypatch, capsys):
    """``[id]`` is the ID modality, not Python's id(); code in a variant is refused and never runs."""
    monkeypatch.chdir(tmp_path)
    shared = [*TINY, "--epochs=1", "--backbone_path=tiny-random", "--mpo_stages=None", "--sampled_eval=none",
              f"--checkpoint_dir={tmp_path / 'saved'}", f"--results_dir={tmp_path / 'results'}"]
    with pytest.raises(SystemExit) as exit_info:
        main(["--compare=Speeder[mrc_dropout=open('marker','w').close() or 0.1]", *shared])
    assert exit_info.value.code == 2 and "mrc_dropout: expected a number" in capsys.readouterr().err
    assert not (tmp_path / "marker").exists() and not (tmp_path / "results").exists()
    out = Path(main(["--compare=Speeder[modalities=[id]]", *shared])["results_dir"])
    assert pd.read_csv(out / "results.csv")["status"].tolist() == ["ok"]
    assert yaml.safe_load((out / "configs" / "Speeder-modalities=-id.yaml").read_text())["modalities"] == ["id"]


# ---------------------------------------------------------------------------------------------- --seeds
def _comparison(folder: Path, seed: int | None, scores: dict[str, float | str], **config) -> Path:
    """A --compare folder as run_compare writes it: one results.csv row per model (a str score: that model failed
    with this error) and a config yaml per model; metrics derive from the score so that each differs."""
    rows = []
    (folder / "configs").mkdir(parents=True)
    for label, score in scores.items():
        row = {"label": label, "seed": seed, "config_file": f"configs/{label}.yaml"}
        if isinstance(score, str):
            row.update(status="failed", error=score)
        else:
            row.update(status="ok", eval_split="2b52d745c4", params_trainable=100, params_frozen=0, epochs=2,
                       train_seconds=600 * score, eval_seconds={"full": 3 * score, "uni19": 9.0},
                       valid_metric="NDCG@10", best_valid_score=score,
                       test={"full": {"hit@1": score / 2, "hit@10": score * 2, "ndcg@10": score, "mrr@10": score / 3},
                             "uni19": {"hit@1": 0.4 + score, "ndcg@10": 0.6 + score}})
        rows.append(flat_row(row))
        yaml.safe_dump({"model": label, "dataset": "ml-100k", "epochs": 2, **({"seed": seed} if seed else {}),
                        **config}, (folder / row["config_file"]).open("w"))
    pd.DataFrame(rows).to_csv(folder / "results.csv", index=False)
    return folder


def _aggregate(folders: list[Path], out: Path) -> pd.DataFrame:
    seeds.main([*map(str, folders), "--out", str(out)])
    return pd.read_csv(out / "seeds.csv", dtype={"seeds": str, "failed_seeds": str}).set_index("model")


def test_seed_aggregate_is_the_mean_and_sample_std_of_each_column_over_finished_runs(tmp_path):
    scores = {2020: {"Speeder": 0.031, "SASRec": 0.027, "BERT4Rec": 0.015},
              2021: {"Speeder": 0.036, "SASRec": "RuntimeError: CUDA out of memory", "BERT4Rec": 0.012},
              2022: {"Speeder": 0.029, "SASRec": 0.024, "BERT4Rec": 0.019}}
    folders = [_comparison(tmp_path / f"run-{seed}", seed, row, gpu_id=seed % 2) for seed, row in scores.items()]
    table = _aggregate(folders, tmp_path / "agg")

    speeder = np.array([row["Speeder"] for row in scores.values()])
    sasrec = np.array([0.027, 0.024])
    for label, values in [("Speeder", speeder), ("SASRec", sasrec)]:
        for column, factor in [("full/ndcg@10", 1), ("full/hit@10", 2), ("valid/ndcg@10", 1), ("train_s", 600)]:
            np.testing.assert_allclose(table.loc[label, f"{column}:mean"], np.mean(values * factor), rtol=1e-12)
            np.testing.assert_allclose(table.loc[label, f"{column}:std"], np.std(values * factor, ddof=1), rtol=1e-12)
        np.testing.assert_allclose(table.loc[label, "uni19/hit@1:mean"], np.mean(0.4 + values), rtol=1e-12)
    assert table.loc["SASRec", "params_trainable:std"] == 0 and table.loc["SASRec", "epochs:mean"] == 2
    assert table[["n", "runs"]].values.tolist() == [[3, 3], [2, 3], [3, 3]]
    assert table.loc["SASRec", "seeds"] == "2020 2022" and table.loc["SASRec", "failed_seeds"] == "2021"
    assert not any(column.startswith(("seed:", "eval_split:")) for column in table)

    markdown = (tmp_path / "agg" / "seeds.md").read_text()
    assert markdown.splitlines()[3] == f"python -m recbole_speeder.experiments.seeds {' '.join(map(str, folders))} " \
                                       f"--out {tmp_path / 'agg'}"
    assert f"| `SASRec` | 2 of 3 | {sasrec.mean() / 2:.4f} ± {sasrec.std(ddof=1) / 2:.4f} |" in markdown
    assert f"| {speeder.mean() * 10:.2f} ± {speeder.std(ddof=1) * 10:.2f} |" in markdown  # train minutes
    assert "## Test, full" in markdown and "## Test, uni19" in markdown
    assert "- `SASRec`, seed 2021: RuntimeError: CUDA out of memory" in markdown
    assert "Fewer than 3 finished seeds** for `SASRec`:" in markdown
    assert "- seed 2022: [../run-2022/results.md](../run-2022/results.md)" in markdown


def test_seed_aggregator_refuses_inputs_that_are_not_one_experiment_at_several_seeds(tmp_path, capsys):
    ok = [_comparison(tmp_path / f"ok-{seed}", seed, {"SASRec": 0.02 + seed / 1e5}) for seed in (1, 2)]
    cases = [
        ([ok[0], tmp_path / "empty"], "empty has no results.csv"),
        ([ok[0], _comparison(tmp_path / "other", 3, {"BERT4Rec": 0.02})], "aggregate runs of one --compare list"),
        ([ok[0], _comparison(tmp_path / "lr", 3, {"SASRec": 0.02}, learning_rate=0.01)],
         "SASRec ran with different learning_rate in"),
        ([ok[0], _comparison(tmp_path / "again", 1, {"SASRec": 0.03})], "both ran seed 1"),
        ([ok[0], _comparison(tmp_path / "unseeded", None, {"SASRec": 0.03})], "no seed recorded"),
    ]
    (tmp_path / "empty").mkdir()
    for folders, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            seeds.main([*map(str, folders), "--out", str(tmp_path / "agg")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "agg").exists()
    # a folder from before results.csv had a seed column: its configs' seed stands in
    old = pd.read_csv(ok[1] / "results.csv").drop(columns="seed")
    old.to_csv(ok[1] / "results.csv", index=False)
    assert _aggregate(ok, tmp_path / "agg").loc["SASRec", "seeds"] == "1 2"


def test_compare_over_seeds_reports_each_seed_and_their_mean_and_std(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--compare=SASRec,NoSuchModel", "--seeds=2020,2021", *TINY, "--epochs=1",
            f"--checkpoint_dir={tmp_path / 'saved'}", f"--results_dir={tmp_path / 'results'}"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    (out,) = (tmp_path / "results" / "ml-100k").iterdir()
    assert exit_info.value.code == 1 and "NoSuchModel (seed 2020), NoSuchModel (seed 2021)" in capsys.readouterr().err
    runs = {seed: pd.read_csv(out / f"seed-{seed}" / "results.csv") for seed in (2020, 2021)}
    for seed, table in runs.items():
        assert table["seed"].tolist() == [seed, seed] and table["status"].tolist() == ["ok", "failed"]
        assert yaml.safe_load((out / f"seed-{seed}" / "configs" / "SASRec.yaml").read_text())["seed"] == seed
        assert list((tmp_path / "saved" / f"compare-ml-100k-{out.name}" / f"seed-{seed}" / "SASRec").glob("*.pth"))
    metrics = [column for column in runs[2020] if column.startswith(("valid/", "full/", "uni19/"))]
    values = np.array([runs[seed].loc[0, metrics].astype(float) for seed in (2020, 2021)])
    assert (values[0] != values[1]).any()  # the seed changed the run

    table = pd.read_csv(out / "seeds.csv", dtype={"seeds": str, "failed_seeds": str}).set_index("model")
    assert table.loc["SASRec", ["n", "seeds"]].tolist() == [2, "2020 2021"]
    for stat, expected in [("mean", values.mean(0)), ("std", values.std(0, ddof=1))]:
        got = table.loc["SASRec", [f"{m}:{stat}" for m in metrics]].astype(float)
        np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert table.loc["NoSuchModel", ["n", "runs", "failed_seeds"]].tolist() == [0, 2, "2020 2021"]
    markdown = (out / "seeds.md").read_text()
    assert markdown.splitlines()[3] == f"python run_recbole_speeder.py {shlex.join(argv)}"  # copy-paste safe
    assert "- `NoSuchModel`, seed 2021:" in markdown and "[seed-2021/results.md](seed-2021/results.md)" in markdown
    assert "--seeds=2020,2021" in (out / "seed-2020" / "results.md").read_text()
    # the standalone aggregator over the same folders writes the same table
    again = _aggregate([out / "seed-2020", out / "seed-2021"], tmp_path / "again")
    pd.testing.assert_frame_equal(again, table)


# ---------------------------------------------------------------------------------------------- --tune
def _tiny_config_file(folder: Path) -> None:
    (folder / "tiny.yaml").write_text("MAX_ITEM_LIST_LENGTH: 5\nhidden_dropout_prob: 0.2\n")


def test_ray_sweep_ranks_on_valid_and_its_best_yaml_reproduces(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative config file and checkpoint dir: trials run in Ray's own folders
    _tiny_config_file(tmp_path)
    (tmp_path / "space.hyper").write_text("learning_rate choice [0.002, 0.01, -1.0]  # -1: a failing trial\n")
    summary = main(["--model=SASRec", "--tune=space.hyper", "--tune_search=grid", "--tune_gpus=0", "--tune_cpus=1",
                    "--config_files=tiny.yaml", "--checkpoint_dir=saved", "--results_dir=results", "--epochs=2",
                    *TINY])
    out = Path(summary["results_dir"])
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 3 and summary["failed"] == 1
    scores = trials["valid_ndcg@10"].dropna().tolist()
    assert len(scores) == 2 and scores == sorted(scores, reverse=True)
    failed = trials[trials["status"] == "failed"]
    assert failed["learning_rate"].tolist() == [-1.0]
    assert "learning_rate: expected a number > 0" in failed["error"].iloc[0]
    # each trial that trained checkpointed into a folder of its own
    trained = trials[trials["status"] != "failed"]["trial"]
    assert sorted(p.name for p in (tmp_path / "saved" / out.name).iterdir() if any(p.glob("*.pth"))) == sorted(trained)

    best = summary["best_trial"]
    assert best["status"] == "finished" and best["best_valid_score"] == scores[0]
    assert any(k.startswith("full/") for k in best["test_result"])
    config = yaml.safe_load(Path(summary["best_config"]).read_text())
    assert config["learning_rate"] == best["params"]["learning_rate"] and config["hidden_dropout_prob"] == 0.2
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the best yaml stands alone: paths in it are absolute
    again = main(["--model=SASRec", "--dataset=ml-100k", f"--config_files={summary['best_config']}"])
    assert again["best_valid_score"] == best["best_valid_score"]


def test_hyperopt_grid_records_a_failed_trial_and_goes_on(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "space.hyper").write_text("learning_rate choice [-1.0, 0.002]\nn_layers choice [1]\n")
    summary = main(["--model=SASRec", "--tune=space.hyper", "--tune_tool=hyperopt", "--epochs=1",
                    "--checkpoint_dir=saved", "--results_dir=results", *TINY])
    trials = pd.read_csv(Path(summary["results_dir"]) / "trials.csv")
    assert trials["status"].tolist() == ["finished", "failed"]  # ranked: the failed first trial goes last
    assert trials["learning_rate"].tolist() == [0.002, -1.0]
    assert summary["best_trial"]["best_valid_score"] == trials["valid_ndcg@10"].iloc[0]
    assert yaml.safe_load(Path(summary["best_config"]).read_text())["learning_rate"] == 0.002
    assert "trial_001" in (Path(summary["results_dir"]) / "trials.md").read_text()


# ---------------------------------------------------------------------------------------------- --tune on a cluster
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ray_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ray.scripts.scripts", *args]


@pytest.fixture
def ray_cluster(tmp_path) -> Iterator[tuple[str, str, dict[str, str]]]:
    """A one-node Ray cluster started the way users start one, ``ray start --head``: (address, node id, env).

    It uses token authentication, Ray's default once a machine has a token, with a token of its own. It is stopped
    through its own ``ray start --block`` process and process group, not ``ray stop``, which ends every Ray process
    of the user: other people's sweeps on a shared machine too.
    """
    pytest.importorskip("ray")
    token = tmp_path / "ray_token"
    token.write_text(uuid.uuid4().hex)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # an earlier ray.init() sets some
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    port = free_port()
    ports = [f"--{name}-port={free_port()}" for name in ("ray-client-server", "dashboard-agent-listen",
                                                           "metrics-export", "runtime-env-agent")]
    with open(tmp_path / "ray_start.log", "w") as log:
        head = subprocess.Popen(
            ray_cli("start", "--head", f"--port={port}", "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false",
                    "--disable-usage-stats", f"--temp-dir={temp_dir}", "--block", *ports),
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    address = f"127.0.0.1:{port}"
    try:
        deadline, status = time.monotonic() + 120, ""
        while "node_" not in status:
            assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "ray_start.log").read_text()
            time.sleep(1)
            status = subprocess.run(ray_cli("status", f"--address={address}"), env=env, capture_output=True,
                                    text=True).stdout
        (node_id,) = re.findall(r"node_([0-9a-f]+)", status)
        yield address, node_id, env
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        finally:
            try:
                os.killpg(head.pid, signal.SIGKILL)  # whatever of its own group outlived it
            except ProcessLookupError:
                pass
            shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_sweep_on_a_started_cluster_runs_its_trials_there_and_asha_stops_the_bad_one(
        tmp_path, ray_cluster, random_text_features):
    address, node_id, env = ray_cluster
    (tmp_path / "space.hyper").write_text("learning_rate choice [0.01, 1e-7]  # the second barely leaves its init\n")
    command = [sys.executable, str(REPO / "run_recbole_speeder.py"), "--model=Speeder", "--tune=space.hyper",
               "--tune_search=grid", "--tune_cpus=2", "--tune_gpus=0", f"--ray_address={address}",
               "--epochs=3", "--train_batch_size=32", "--mpo_stages=~", "--backbone_path=tiny-random",
               f"--text_feature_file={random_text_features}", "--checkpoint_dir=saved", "--results_dir=results",
               *TINY]

    # without the cluster's token: after Ray's own retries (logged), one line saying what to set; no report folder
    refused = subprocess.run(command, cwd=tmp_path, env={k: v for k, v in env.items() if k != "RAY_AUTH_MODE"},
                             capture_output=True, text=True, timeout=600)
    last = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert last.startswith(f"error: the Ray cluster at {address} uses token authentication: run with RAY_AUTH_MODE")
    assert not list((tmp_path / "results").rglob("*.*"))

    # one trial at a time (2 CPUs each on a 2-CPU cluster), in grid order: ASHA sees the good one first
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (out,) = (tmp_path / "results" / "ml-100k").glob("tune-Speeder-*")
    trials = pd.read_csv(out / "trials.csv").set_index("learning_rate")
    assert set(trials["node_id"]) == {node_id}, "the trials ran on another Ray cluster than the one started"
    assert trials.loc[0.01, "status"] == "finished" and trials.loc[0.01, "epochs"] == 3
    assert trials.loc[1e-7, "status"] == "stopped (ASHA)" and trials.loc[1e-7, "epochs"] < 3
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["learning_rate"] == 0.01 and best["epochs"] == 3
    summary = json.loads((out / "best.json").read_text())
    assert summary["best_trial"]["node_id"] == node_id and summary["best_config"] == str(out / "best.yaml")
