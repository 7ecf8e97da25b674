"""``python -m dataset_prep``: prepare | ensure | features. User mistakes exit 2 with one line."""

from __future__ import annotations

import argparse
import logging
import resource
import sys
from collections.abc import Sequence
from pathlib import Path

from dataset_prep.errors import DatasetPrepError
from dataset_prep.features import MODALITIES, FeatureOptions, build_features
from dataset_prep.prepare import DATASETS, PrepOptions, ensure_dataset, prepare_dataset
from dataset_prep.readers import RELEASES, AmazonReader, GenericReader, Reader
from recbole_speeder.config.schema import Key, cli_type
from recbole_speeder.errors import ArgumentParser, UsageError

EXAMPLES = """examples:
  python -m dataset_prep prepare --source 2014 --category Beauty --input raw/ --out dataset/
  python -m dataset_prep prepare --source generic --category Beauty \\
      --input ../shared/data/amazon_beauty/derived --out dataset/
  python -m dataset_prep ensure Amazon_Beauty --data-path dataset/
  python -m dataset_prep features Amazon_Beauty --data-path dataset/ --features text,image
  python -m dataset_prep features Amazon_Beauty --data-path dataset/ --features text \
      --text-encoder path/to/all-mpnet-base-v2 --features-out features/mpnet/
"""


def _modalities(value: str) -> tuple[str, ...]:
    names = tuple(v for v in value.split(",") if v and v != "none")
    unknown = set(names) - set(MODALITIES)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown modality {', '.join(sorted(unknown))}; "
                                         f"use a comma list of {', '.join(MODALITIES)}, or none")
    return names


def _feature_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("item features")
    group.add_argument("--features", type=_modalities, default=MODALITIES, metavar="LIST",
                       help="modalities to encode: text,image (default), text, or none; image needs URLs")
    group.add_argument("--text-encoder", metavar="MODEL",
                       help="sentence-transformers folder or hub id for the text features, mean or CLS pooled "
                       "as its folder says (default: the packaged all-MiniLM-L6-v2)")
    group.add_argument("--features-out", type=Path, metavar="DIR",
                       help="write the feature files and their manifest here instead of beside the .item file; "
                       "runs read them with --text_feature_file=DIR/<Dataset>.text_emb.npz")
    group.add_argument("--device", default="cpu", help="torch device for the encoders (default cpu)")
    group.add_argument("--batch-size", type=cli_type(Key(int, minimum=1)), default=64,
                       help="encoder batch size (default 64)")
    group.add_argument("--offline", action="store_true", help="never touch the network: cached images only")
    group.add_argument("--image-cache", type=Path,
                       help="image download folder (default <out>/<Dataset>/images)")
    group.add_argument("--workers", type=cli_type(Key(int, minimum=1)), default=16,
                       help="concurrent image downloads (default 16)")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")


def _prep_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kcore", type=cli_type(Key(int, minimum=0)), default=5,
                        help="minimum interactions per user and item, applied until nothing changes "
                        "(default 5; 0 or 1 disables)")
    parser.add_argument("--on-error", choices=("skip", "raise"), default="skip",
                        help="malformed raw lines: report file:line and skip them (counted), or stop "
                        "(default skip)")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m dataset_prep", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Turn Amazon review files into RecBole atomic files (.inter, .item) plus item feature "
                    "files for recbole-speeder.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prepare = commands.add_parser(
        "prepare", help="prepare a dataset from raw files of a given format",
        description="Read raw reviews + metadata, deduplicate, k-core, order by time, and write "
                    "<out>/<Dataset>/<Dataset>.inter, .item and item feature files.")
    prepare.add_argument("--source", required=True, choices=(*RELEASES, "generic"),
                         help="official release 2014 (McAuley), 2018 (Ni), 2023 (Hou), or generic "
                         "(TSV/CSV + JSONL)")
    prepare.add_argument("--category", help="category as in the file names, e.g. Beauty, Toys_and_Games")
    prepare.add_argument("--input", type=Path, help="folder holding the raw files under their official names "
                         "(generic: interactions.tsv[.gz]/.csv[.gz] + items.jsonl)")
    prepare.add_argument("--reviews", type=Path, help="review/interactions file, instead of --input's")
    prepare.add_argument("--meta", type=Path, help="metadata file, instead of --input's")
    prepare.add_argument("--out", type=Path, required=True, help="RecBole data_path to write into")
    prepare.add_argument("--dataset", help="RecBole dataset name (default Amazon_<category>)")
    columns = prepare.add_argument_group("generic columns")
    columns.add_argument("--user-col", default="user_id", help="user column (default user_id)")
    columns.add_argument("--item-col", default="item_id", help="item column (default item_id)")
    columns.add_argument("--time-col", default="timestamp", help="time column, unix seconds or ISO date "
                         "(default timestamp)")
    columns.add_argument("--rating-col", default="rating",
                         help="rating column, used if present (default rating)")
    columns.add_argument("--item-key", help="item id key in the metadata JSON lines (default: --item-col)")
    _prep_args(prepare)
    _feature_args(prepare)

    ensure = commands.add_parser(
        "ensure", help="make sure a known Amazon benchmark is ready (download + prepare when missing)",
        description="Do what the run script does: return at once when <data-path>/<Dataset>/<Dataset>.inter "
                    "and .item exist, else prepare them from <raw-dir>, downloading the official 2014 files "
                    "when they are missing.")
    ensure.add_argument("dataset", choices=tuple(DATASETS))
    ensure.add_argument("--data-path", type=Path, required=True, help="RecBole data_path")
    ensure.add_argument("--raw-dir", type=Path, help="raw file folder (default <data-path>/raw)")
    ensure.add_argument("--reviews-url", help="override the official reviews URL")
    ensure.add_argument("--meta-url", help="override the official metadata URL")
    _prep_args(ensure)
    _feature_args(ensure)

    features = commands.add_parser(
        "features", help="(re)build item feature files from an existing .item file",
        description="Encode <data-path>/<Dataset>/<Dataset>.item; files that are still fresh are kept.")
    features.add_argument("dataset", help="RecBole dataset name, e.g. Amazon_Beauty")
    features.add_argument("--data-path", type=Path, required=True, help="RecBole data_path")
    _feature_args(features)
    return parser


def _feature_options(args: argparse.Namespace) -> FeatureOptions:
    return FeatureOptions(modalities=args.features, device=args.device, batch_size=args.batch_size,
                          offline=args.offline, image_cache=args.image_cache, workers=args.workers,
                          show_progress=not args.no_progress, text_model=args.text_encoder,
                          out_dir=args.features_out)


def _reader(args: argparse.Namespace) -> Reader:
    if args.input is None and (args.reviews is None or (args.source != "generic" and args.meta is None)):
        raise DatasetPrepError("give --input FOLDER, or --reviews FILE and --meta FILE")
    if args.source == "generic":
        columns = dict(user_col=args.user_col, item_col=args.item_col, time_col=args.time_col,
                       rating_col=args.rating_col, item_key=args.item_key)
        if args.reviews is not None:
            return GenericReader(args.reviews, args.meta, **columns)
        reader = GenericReader.from_dir(args.input, **columns)
        reader.items_path = args.meta or reader.items_path
        return reader
    if args.reviews is not None and args.meta is not None:
        return AmazonReader(RELEASES[args.source], args.reviews, args.meta)
    if args.category is None:
        raise DatasetPrepError(f"--source {args.source} needs --category to find its files in {args.input}")
    reader = AmazonReader.from_dir(args.source, args.category, args.input)
    reader.reviews_path = args.reviews or reader.reviews_path
    reader.meta_path = args.meta or reader.meta_path
    return reader


def _peak_memory_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run(args: argparse.Namespace) -> None:
    prep = PrepOptions(kcore=getattr(args, "kcore", 5), on_error=getattr(args, "on_error", "skip"),
                       features=_feature_options(args))
    if args.command == "prepare":
        dataset = args.dataset or (f"Amazon_{args.category}" if args.category else None)
        if dataset is None:
            raise DatasetPrepError("give --dataset NAME (or --category, for Amazon_<category>)")
        result = prepare_dataset(_reader(args), dataset, args.out, prep)
        print(result.stats.table())
        for modality, path in result.features.items():
            print(f"  {modality} features: {path}")
        print(f"wrote {result.dataset_dir}/{dataset}.inter and .item")
    elif args.command == "ensure":
        urls = {role: url for role, url in (("reviews", args.reviews_url), ("meta", args.meta_url)) if url}
        path = ensure_dataset(args.dataset, args.data_path, raw_dir=args.raw_dir, urls=urls,
                              offline=args.offline, options=prep)
        print(f"ready: {path}")
    else:
        for modality, path in build_features(args.data_path / args.dataset, args.dataset,
                                             prep.features).items():
            print(f"{modality} features: {path}")
    print(f"peak memory (ru_maxrss): {_peak_memory_mib():.0f} MiB")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run(args)
    except (UsageError, FileNotFoundError, PermissionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
