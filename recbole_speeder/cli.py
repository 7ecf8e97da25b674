"""Command line of ``run_recbole_speeder.py`` and ``recbole-speeder``: RecBole's flags, plus any ``--key=value``
config override."""

from __future__ import annotations

import argparse
import sys
from logging import getLogger

from recbole_speeder.config.schema import Key, cli_type
from recbole_speeder.errors import ArgumentParser, RunFailed, UsageError
from recbole_speeder.experiments.commands import add_arguments, run_experiment, wants_experiment
from recbole_speeder.trainer import NonFiniteLossError


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Train and evaluate Speeder or any RecBole model. Other --key=value flags set config keys.",
        allow_abbrev=False,  # a config key must not be taken for a flag it abbreviates: --seed=7 is not --seeds
    )
    parser.add_argument("--model", "-m", default="Speeder", help="model name (Speeder, SASRec, BERT4Rec, ...)")
    parser.add_argument("--dataset", "-d", default="ml-100k", help="dataset name, e.g. ml-100k, Amazon_Beauty")
    parser.add_argument("--config_files", default=None, help="space-separated yaml config files")
    parser.add_argument("--nproc", type=cli_type(Key(int, minimum=1)), default=1, help="processes on this node")
    parser.add_argument("--world_size", type=int, default=-1, help="total processes over all nodes")
    parser.add_argument("--ip", default="localhost", help="master address")
    parser.add_argument("--port", default="5678", help="master port")
    parser.add_argument("--group_offset", type=cli_type(Key(int, minimum=0)), default=0,
                        help="global rank of this node's first process")
    add_arguments(parser)  # --compare, --tune and their options
    return parser


def check_overrides(flags: list[str]) -> None:
    """Arguments left after a command's own flags must be ``--key=value`` config overrides."""
    bad = [arg for arg in flags if not (arg.startswith("--") and "=" in arg)]
    if bad:
        raise UsageError(f"unrecognised arguments {bad}: config overrides take the form --key=value")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    args, rest = build_parser().parse_known_args(argv)
    check_overrides(rest)
    return args, rest


def main(argv: list[str] | None = None) -> dict | None:
    """Run what the command line asks; a user mistake prints one line and exits with status 2."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, overrides = parse_args(argv)
        config_files = args.config_files.split() if args.config_files else None
        if wants_experiment(args):
            return run_experiment(args, config_files, overrides, argv)
        from recbole_speeder.quick_start import run

        return run(
            args.model,
            args.dataset,
            config_file_list=config_files,
            nproc=args.nproc,
            world_size=args.world_size,
            ip=args.ip,
            port=args.port,
            group_offset=args.group_offset,
            cmd_args=overrides,
        )
    except (UsageError, FileNotFoundError) as err:
        getLogger().debug("usage error", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except (NonFiniteLossError, RunFailed) as err:  # the message says where the run's files are
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
