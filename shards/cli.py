"""Build, merge, inspect and verify fgdist shard sets (docs/DESIGN.md, "The data path").

examples:
  python -m shards build --source synthetic --out data/synthetic
  python -m shards build --source fashion-mnist --out data/fmnist
  python -m shards build --source manifest --path images.csv --out data/mine --opt test_fraction=0.2
  python -m shards build --source pets --path oxford-iiit-pet --out data/pets --opt shorter_side=256
  python -m shards build --source folder --path photos/ --out data/mine --workers 8
  python -m shards build --source folder --path photos/ --out parts/0 --part 0/2   # one machine each,
  python -m shards build --source folder --path photos/ --out parts/1 --part 1/2   # then:
  python -m shards merge parts/0 parts/1 --out data/mine
  python -m shards inspect data/fmnist
  python -m shards verify data/fmnist
  python -m shards verify data/sop --url http://storage/sop   # the tars as training will stream them
"""

from __future__ import annotations

import argparse
import inspect
import json
import time

from fgdist import cli
from fgdist.data.shardset import UNLABELED, ShardSetError, open_split, verify_split
from shards.assemble import merge_parts
from shards.build import BUILD_OPTIONS, build_part, build_shards
from shards.sources import SourceError
from shards.sources.cifar100 import open_cifar100
from shards.sources.fashion_mnist import open_fashion_mnist
from shards.sources.files import open_folder, open_manifest
from shards.sources.pets import open_pets
from shards.sources.sop import open_sop
from shards.sources.synthetic import open_synthetic

# name -> function(**options) returning a Collection. Its keyword parameters are its `--opt`
# options (help and checks read the signature); `--path` fills a first parameter in PATH_PARAMS.
SOURCES = {
    "synthetic": open_synthetic,
    "fashion-mnist": open_fashion_mnist,
    "manifest": open_manifest,
    "folder": open_folder,
    "cifar100": open_cifar100,
    "pets": open_pets,
    "sop": open_sop,
}
PATH_PARAMS = ("root", "path")


def _parse_opt(text: str):
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--opt wants key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _source_params(opener) -> tuple[str | None, dict[str, inspect.Parameter]]:
    """(the parameter --path fills or None, the parameters --opt may set)."""
    params = dict(inspect.signature(opener).parameters)
    first = next(iter(params))
    return (first if first in PATH_PARAMS else None), params


def _build_defaults() -> dict[str, object]:
    params = inspect.signature(build_shards).parameters
    return {name: params[name].default for name in BUILD_OPTIONS}


def _open_source(args):
    """The collection, and the build options taken from `--opt`."""
    opener = SOURCES[args.source]
    path_param, params = _source_params(opener)
    options, build_options = {}, {}
    for key, value in args.opt:
        if key in BUILD_OPTIONS:
            build_options[key] = value
        elif key in params:
            options[key] = value
        else:
            raise SourceError(
                f"source {args.source!r}: unknown option {key!r}; its options: {', '.join(params)}; every source's: "
                f"{', '.join(BUILD_OPTIONS)} (python -m shards build --help lists them with their defaults)"
            )
    if args.path is not None:
        if path_param is None:
            raise SourceError(f"source {args.source!r} takes no --path")
        options[path_param] = args.path
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in options]
    if missing:
        raise SourceError(
            f"source {args.source!r} needs " + ", ".join("--path" if n == path_param else n for n in missing)
        )
    return opener(**options), build_options


def _shown(value) -> str:
    return "(unset)" if value is None else str(value)


def options_table() -> str:
    """Every source with its options and defaults, read from the openers' signatures, and the
    build's own options (each with its line of explanation): the build subcommand's help."""
    rows = [("source", "option", "default", None)]
    for name, opener in SOURCES.items():
        path_param, params = _source_params(opener)
        for i, (key, param) in enumerate(params.items()):
            default = "(required)" if param.default is inspect.Parameter.empty else _shown(param.default)
            rows.append((name if i == 0 else "", f"--path ({key})" if key == path_param else key, default, None))
    for i, (key, default) in enumerate(_build_defaults().items()):
        rows.append(("every source" if i == 0 else "", key, _shown(default), BUILD_OPTIONS[key]))
    widths = [max(len(row[c]) for row in rows) for c in range(3)]
    lines = ["source options (--opt key=value, repeatable; the value is parsed as JSON, else kept as a string):"]
    for *cells, note in rows:
        lines.append(("  " + "  ".join(cell.ljust(w) for cell, w in zip(cells, widths))).rstrip())
        if note:
            lines.append(" " * (6 + widths[0]) + note)  # under the option, indented
    return "\n".join(lines)


def cmd_build(args) -> int:
    collection, build_options = _open_source(args)
    started = time.perf_counter()
    common = dict(shard_size=args.shard_size, overwrite=args.overwrite, progress=not args.quiet, workers=args.workers)
    common |= dict(inputs={"--path": args.path}, **build_options)
    if args.part is not None:
        source = {"source": args.source, "path": args.path, "opt": sorted(map(str, args.opt))}
        results = build_part(collection, args.out, args.part, source=source, **common)
        images = sum(r.count for split in results.values() for r in split)
        for split, split_results in results.items():
            written = sum(r.count for r in split_results)
            print(
                f"{args.out}/{split}: part {args.part[0]}/{args.part[1]}: {written} images, {len(split_results)} shards"
            )
    else:
        manifests = build_shards(collection, args.out, **common)
        images = sum(m.num_instances for m in manifests.values())
        _print_manifests(args.out, manifests)
    seconds = time.perf_counter() - started
    print(f"{images} images in {seconds:.1f} s ({images / seconds:.0f} images/s, {args.workers} worker(s))")
    return 0


def _print_manifests(out, manifests) -> None:
    for split, m in manifests.items():
        print(
            f"{out}/{split}: {m.num_instances} samples, {len(m.shards)} shards, {m.num_super} super-classes, "
            f"{m.num_fine} fine classes" + _pool_note(m) + _skipped_note(m)
        )


def _pool_note(manifest) -> str:
    pool = manifest.pool
    return (
        f", {pool.count} unlabeled (the pool, instances [{pool.instance_begin}, {pool.instance_end}))" if pool else ""
    )


def cmd_merge(args) -> int:
    _print_manifests(args.out, merge_parts(args.parts, args.out, args.overwrite))
    return 0


def _parse_part(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    if not sep or not index.isdigit() or not count.isdigit() or not int(index) < int(count):
        raise argparse.ArgumentTypeError(f"--part wants I/N with 0 <= I < N, got {text!r}")
    return int(index), int(count)


def _skipped_note(manifest) -> str:
    skipped = manifest.skipped_corrupt
    if not skipped:
        return ""
    return f"; {len(skipped)} undecodable image(s) skipped (first: {skipped[0]}; all listed in manifest.json)"


def cmd_inspect(args) -> int:
    for split in args.splits:
        s = open_split(args.dir, split, args.url)
        m = s.manifest
        print(
            f"{s.path}: {m.num_instances} samples in {len(m.shards)} shards, {m.num_super} super-classes, "
            f"{m.num_fine} fine classes" + _pool_note(m) + _skipped_note(m)
        )
        for c in m.super_classes:
            shards = [sh for sh in m.shards if sh.super_id == c.id]
            print(
                f"  super {c.id:3d} {c.name:20s} instances [{c.instance_begin}, {c.instance_end})  {len(shards)} "
                "shard(s)"
            )
        if m.pool:
            shards = [sh for sh in m.shards if sh.super_id == UNLABELED]
            print(
                f"  pool          {'unlabeled':20s} instances [{m.pool.instance_begin}, {m.pool.instance_end})  "
                f"{len(shards)} shard(s)"
            )
    return 0


def cmd_verify(args) -> int:
    bad = 0
    for split in args.splits:
        where = f"{args.url.rstrip('/')}/{split}" if args.url else f"{args.dir}/{split}"
        try:
            problems = verify_split(open_split(args.dir, split, args.url))
        except ShardSetError as err:
            problems = [str(err)]
        for p in problems:
            print(f"FAIL {p}")
        bad += len(problems)
        if not problems:
            print(f"ok   {where}")
    return 1 if bad else 0


def main(argv=None) -> int:
    parser = cli.parser("python -m shards", __doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{build,merge,inspect,verify}")
    b = sub.add_parser(
        "build",
        help="build a shard set from a source (build --help lists every source's options)",
        description="Build a shard set (train/ and test/) from a source.",
        epilog=options_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("--source", required=True, choices=list(SOURCES), help="where the images come from")
    b.add_argument("--path", help="the source's root folder or file (the --path row of the table below)")
    b.add_argument("--out", required=True, help="the shard set's folder (written atomically)")
    b.add_argument("--shard-size", type=int, default=1000, help="max samples per shard (default: %(default)s)")
    b.add_argument(
        "--opt", type=_parse_opt, action="append", default=[], help="source or build option key=value (repeatable)"
    )
    b.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out that fgdist wrote (never another folder)"
    )
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.add_argument("--workers", type=int, default=1, help="encoding processes (default: %(default)s)")
    b.add_argument(
        "--part",
        type=_parse_part,
        metavar="I/N",
        help="build part I of N into --out (one machine each), then `merge` the parts",
    )
    b.set_defaults(run=cmd_build)
    m = sub.add_parser(
        "merge",
        help="join the parts of a build made with --part I/N into one shard set",
        description="Join the parts of a build made with --part I/N into the shard set a single build writes.",
    )
    m.add_argument("parts", nargs="+", help="the part folders (every part once, any order)")
    m.add_argument("--out", required=True, help="the shard set's folder (written atomically; the parts are kept)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing --out that fgdist wrote")
    m.set_defaults(run=cmd_merge)
    for name, run, summary in (
        ("inspect", cmd_inspect, "print a shard set's splits, super-classes and shard counts"),
        ("verify", cmd_verify, "check every shard: checksums, truncated tars, undecodable images, instance ids"),
    ):
        p = sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")
        p.add_argument(
            "dir", help="the shard set's folder (with --url: of its manifests and indexes, fetched if missing)"
        )
        p.add_argument("--url", help="read the tars from this URL (as data.shards_url does)")
        p.add_argument("--splits", nargs="+", default=["train", "test"], help="the splits to " + name)
        p.set_defaults(run=run)
    args = parser.parse_args(argv)
    return cli.run_reporting(lambda: args.run(args), (SourceError, ShardSetError, FileExistsError, ValueError))
