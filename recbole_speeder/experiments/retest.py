"""Test a trained model again under another evaluation: other candidate lists, decoder or user sample.

``python -m recbole_speeder.experiments.retest saved/Speeder-<time>.safetensors --generate_decoder=free``

A Speeder checkpoint (``.safetensors``) or a RecBole one (``.pth``: SASRec, BERT4Rec, ... trained by the run script)
is rebuilt with its run's own config values, the ``--key=value`` flags overriding them, and tested as the run script
tests: protocol and per-user inference cost logged, the full ranking beside a sampled test. One generative model
then gives its constrained and its free decoder's answers, and models trained apart are compared on the same
lists (``--eval_args``, ``--candidate_negatives``) or the same users (``--eval_users``). Keys that shape the model
or its training change nothing but can break the rebuild: override evaluation keys only.
"""

from __future__ import annotations

import json
import sys
from logging import getLogger
from pathlib import Path

from recbole_speeder.cli import check_overrides
from recbole_speeder.config.schema import parse_value
from recbole_speeder.errors import ArgumentParser, UsageError


def parse_overrides(flags: list[str]) -> dict:
    """``--key=value`` flags as a config dict, values read as the run script reads them."""
    check_overrides(flags)
    return {key[2:]: parse_value(value) for key, _, value in (flag.partition("=") for flag in flags)}


def retest(checkpoint: str, config_dict: dict) -> dict:
    """The test result (and the full ranking beside a sampled one) of ``checkpoint`` under ``config_dict``."""
    from recbole_speeder.evaluation.protocol import evaluate_test
    from recbole_speeder.quick_start import load_tester

    config, trainer, *_, test_data = load_tester(checkpoint, config_dict)
    result = evaluate_test(trainer, config, test_data, load_best_model=False, show_progress=config["show_progress"])
    getLogger().info(f"test result: {result['test_result']}")
    return {"checkpoint": str(checkpoint), "model": config["model"], "overrides": config_dict, **result}


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("checkpoint", help="a run's best checkpoint: saved/<Model>-<time>.safetensors or .pth")
    parser.add_argument("--out", help="also write the result as JSON to this file")
    args, flags = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        result = retest(args.checkpoint, parse_overrides(flags))
    except (UsageError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    text = json.dumps(result, indent=2, default=str)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
