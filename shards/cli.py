"""python -m shards build | inspect | verify

python -m shards build --source synthetic --out data/synthetic
python -m shards build --source fashion-mnist --out data/fmnist
python -m shards build --source manifest --path images.csv --out data/mine
python -m shards build --source folder --path photos/ --out data/mine --opt shorter_side=256
python -m shards inspect data/fmnist
python -m shards verify data/fmnist
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys

from fgdist.shardset import ShardSetError, open_split, verify_split
from shards.build import build_shards
from shards.sources import SourceError
from shards.sources.cifar100 import open_cifar100
from shards.sources.fashion_mnist import open_fashion_mnist
from shards.sources.files import open_folder, open_manifest
from shards.sources.pets import open_pets
from shards.sources.sop import open_sop
from shards.sources.synthetic import open_synthetic

# name -> function(**options) returning a Collection; `--path` fills its first parameter.
SOURCES = {
    "synthetic": open_synthetic,
    "fashion-mnist": open_fashion_mnist,
    "manifest": open_manifest,
    "folder": open_folder,
    "cifar100": open_cifar100,
    "pets": open_pets,
    "sop": open_sop,
}


def _parse_opt(text: str):
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--opt wants key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _open_source(args):
    opener = SOURCES[args.source]
    options = dict(args.opt)
    params = list(inspect.signature(opener).parameters)
    if args.path is not None:
        options[params[0]] = args.path
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise SourceError(f"source {args.source!r}: unknown option(s) {unknown}; it takes {params}")
    return opener(**options)


def cmd_build(args) -> int:
    collection = _open_source(args)
    manifests = build_shards(
        collection, args.out, shard_size=args.shard_size, overwrite=args.overwrite, progress=not args.quiet
    )
    for split, m in manifests.items():
        print(
            f"{args.out}/{split}: {m.num_instances} samples, {len(m.shards)} shards, {m.num_super} super-classes, "
            f"{m.num_fine} fine classes"
        )
    return 0


def cmd_inspect(args) -> int:
    for split in args.splits:
        s = open_split(args.dir, split)
        m = s.manifest
        print(
            f"{s.path}: {m.num_instances} samples in {len(m.shards)} shards, {m.num_super} super-classes, "
            f"{m.num_fine} fine classes"
        )
        for c in m.super_classes:
            shards = [sh for sh in m.shards if sh.super_id == c.id]
            print(
                f"  super {c.id:3d} {c.name:20s} instances [{c.instance_begin}, {c.instance_end})  {len(shards)} "
                "shard(s)"
            )
    return 0


def cmd_verify(args) -> int:
    bad = 0
    for split in args.splits:
        try:
            problems = verify_split(open_split(args.dir, split))
        except ShardSetError as err:
            problems = [str(err)]
        for p in problems:
            print(f"FAIL {p}")
        bad += len(problems)
        if not problems:
            print(f"ok   {args.dir}/{split}")
    return 1 if bad else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shards", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build a shard set from a source")
    b.add_argument("--source", required=True, choices=sorted(SOURCES))
    b.add_argument("--path", help="the source's root folder or file (manifest, folder, data set roots)")
    b.add_argument("--out", required=True)
    b.add_argument("--shard-size", type=int, default=1000, help="max samples per shard")
    b.add_argument("--opt", type=_parse_opt, action="append", default=[], help="source option key=value (repeatable)")
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(run=cmd_build)
    for name, run in (("inspect", cmd_inspect), ("verify", cmd_verify)):
        p = sub.add_parser(name)
        p.add_argument("dir")
        p.add_argument("--splits", nargs="+", default=["train", "test"])
        p.set_defaults(run=run)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (SourceError, ShardSetError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
