"""The scale, ranking, profiling and dataset-build benchmarks' paths work end to end at their smallest sizes
(bench/scale.py, bench/ranking.py, bench/sampled_profile.py, bench/dataset_build.py, bench/eval_batch.py; no timing
is asserted)."""

from __future__ import annotations

import sys

from .conftest import REPO


def test_the_scale_benchmark_measures_its_smallest_size(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.chdir(tmp_path)
    from bench import scale

    monkeypatch.setattr(sys, "argv", ["bench/scale.py"])
    (row,) = scale.main(["--sizes=2k:20k", "--backbone_path=tiny-random", "--train_rows=16", "--eval_users=8",
                         "--repeats=1", "--encode_texts=0", "--no_write", f"--workdir={tmp_path}"])
    assert row.stopped == "", row.stopped
    measured = [row.prep_s, row.build_s, row.build_bytes_per_interaction, row.train_full_s_per_1k,
                row.train_sampled_s_per_1k, row.train_sampled_dense_adam_s_per_1k, row.full_users_per_s,
                row.candidate_users_per_s]
    assert all(value is not None and value > 0 for value in measured), row
    assert row.prepared_items == 2000 and 0.5 * 20000 < row.prepared_interactions <= 20000  # duplicates dropped
    assert f"| 2,000 | {row.prepared_interactions:,} |" in capsys.readouterr().out  # the table (--no_write: printed)


def test_the_ranking_benchmark_compares_equal_hits_at_small_sizes(monkeypatch, capsys):
    """Both paths collect the same hits (the bench raises otherwise), over several chunks and with the top-k."""
    monkeypatch.syspath_prepend(str(REPO))
    from bench import ranking

    rows = ranking.main(["--items=3k,20k", "--eval_users=16", "--chunk_size=4096", "--topk_items", "--repeats=1",
                         "--no_write"])
    assert [row.items for row in rows] == [3000, 20000]
    assert all(row.matmul_s > 0 and row.dense_s > 0 and row.chunked_s > 0 for row in rows)
    assert "| 20,000 |" in capsys.readouterr().out


def test_the_sampled_step_profile_times_and_lists_operators(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO))
    from bench import sampled_profile

    sampled_profile.main(["--sizes=2k:20k", "--steps=1", "--rows=5", f"--workdir={tmp_path}"])
    out = capsys.readouterr().out
    assert "2,000 items, 20,000 interactions:" in out and " s per step (" in out
    assert "Self CPU time total" in out  # the profiler's table


def test_the_dataset_build_benchmark_builds_with_both_classes(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.chdir(tmp_path)
    from bench import dataset_build

    rows = dataset_build.main(["--sizes=2k:20k", "--no_write", f"--workdir={tmp_path}"])
    assert [row["kind"] for row in rows] == ["recbole", "speeder"] and not any(row["stopped"] for row in rows)
    assert all(row["build_s"] > 0 and row["peak_mib"] > 0 for row in rows)
    assert rows[1]["train_rows"] < rows[0]["train_rows"]  # Speeder's training part is tiled
    assert "| speeder |" in capsys.readouterr().out


def test_the_evaluation_batch_benchmark_fits_the_batch_and_ranks_the_same(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.chdir(tmp_path)
    from bench import eval_batch

    rows = eval_batch.main(["--sizes=2k:20k", "--eval_users=64", "--eval_scores_per_batch=40000", "--no_write",
                            f"--workdir={tmp_path}"])
    assert [row["setting"] for row in rows] == ["fitted", "1024"] and not any(row["stopped"] for row in rows)
    assert [row["eval_batch_size"] for row in rows] == [40000 // (rows[0]["prepared_items"] + 1), 1024]  # + padding
    assert rows[0]["ndcg@10"] == rows[1]["ndcg@10"] and all(row["users_per_s"] > 0 for row in rows)
    assert f"| fitted: {rows[0]['eval_batch_size']} |" in capsys.readouterr().out
