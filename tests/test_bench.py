"""The scale benchmark's path works end to end at its smallest size (bench/scale.py; no timing is asserted)."""

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
                row.train_sampled_s_per_1k, row.full_users_per_s, row.candidate_users_per_s]
    assert all(value is not None and value > 0 for value in measured), row
    assert row.prepared_items == 2000 and 0.5 * 20000 < row.prepared_interactions <= 20000  # duplicates dropped
    assert f"| 2,000 | {row.prepared_interactions:,} |" in capsys.readouterr().out  # the table (--no_write: printed)
