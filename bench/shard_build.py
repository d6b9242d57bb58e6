"""Shard build throughput: images/s of the shard builder (shards/build.py) with 1, 2 and N
encoding workers, on a folder of JPEG photos or on the synthetic source.

    PYTHONPATH=. python bench/shard_build.py --source jpeg --images 100000 --workers 1 2 4 \
        --out bench/results/shard_build_jpeg.md
    PYTHONPATH=. python bench/shard_build.py --source synthetic --images 100000 --workers 1 2 4 \
        --out bench/results/shard_build_synthetic.md

`jpeg`: the folder source on `--photos` (made once, then reused: `<super>/<fine>/<i>.jpg`, 100
super-classes x 4 fine, 1,000 smooth random pictures of `--size` pixels at JPEG quality 90, repeated,
about what `--opt shorter_side=256` makes of catalogue photos). The builder reads each file and
decodes it once: the work of a real catalogue. `synthetic`: the paper's 32 px PNGs, made in memory
by the source before the clock starts; the builder only checks and writes them, so this measures
the builder's own overhead. The clock covers the build (listing to published folder), not the
source's opening. Each build is written to `--scratch` and removed after it is timed.

CPU s: user + system time of the build and its workers. On a machine shared with other work the
wall-clock rate depends on the share this build gets; images per CPU second much less, and it is
what the arithmetic for more cores starts from.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import md_head, md_row, run_meta  # noqa: E402
from shards.build import build_shards  # noqa: E402
from shards.sources.files import open_folder  # noqa: E402
from shards.sources.synthetic import open_synthetic  # noqa: E402

SUPERS, FINES = 100, 4
DISTINCT = 1000  # different pictures in the JPEG folder
TARGET = 100_000_000  # the catalogue of issue 22


def _photo(seed: int, size: tuple[int, int]) -> Image.Image:
    """A smooth picture (a colour gradient and a few boxes): compresses like a product photo, not like noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    corners = rng.uniform(0, 255, (4, 3)).astype(np.float32)
    fx, fy = (x / w)[..., None], (y / h)[..., None]
    top = corners[0] * (1 - fx) + corners[1] * fx
    bottom = corners[2] * (1 - fx) + corners[3] * fx
    pixels = top * (1 - fy) + bottom * fy
    for _ in range(4):
        x0, y0 = rng.integers(0, w - 16), rng.integers(0, h - 16)
        pixels[y0 : y0 + rng.integers(8, h // 2), x0 : x0 + rng.integers(8, w // 2)] = rng.uniform(0, 255, 3)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def _jpeg(seed: int, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    _photo(seed, size).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def photo_folder(root: Path, images: int, size: tuple[int, int]) -> Path:
    """`root` with `images` JPEG files under <super>/<fine>/, made unless a complete one is there.
    DISTINCT pictures are encoded and written over and over: the builder reads and decodes every
    file anyway, and encoding 100k pictures would take longer than the benchmark."""
    done = root / ".complete"
    if done.is_file() and done.read_text() == f"{images} {size}":
        return root
    if root.exists():
        shutil.rmtree(root)
    pictures = [_jpeg(seed, size) for seed in range(min(images, DISTINCT))]
    for i in range(images):
        path = root / f"s{i % SUPERS:03d}" / f"f{i // SUPERS % FINES}" / f"{i:07d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pictures[i % len(pictures)])
    done.write_text(f"{images} {size}")
    return root


def collection(args):
    if args.source == "synthetic":
        per_fine = args.images // (SUPERS * FINES)
        test = max(1, per_fine // 5)
        return open_synthetic(
            num_super=SUPERS, fine_per_super=FINES, train_per_fine=per_fine - test, test_per_fine=test
        )
    return open_folder(str(photo_folder(Path(args.photos), args.images, tuple(args.size))))


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the pool's workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed_build(source, workers: int, out: Path, test_fraction) -> dict:
    load_before, cpu_before = os.getloadavg()[0], cpu_seconds()
    started = time.perf_counter()
    manifests = build_shards(source, out, progress=False, workers=workers, test_fraction=test_fraction)
    seconds = time.perf_counter() - started
    cpu = cpu_seconds() - cpu_before
    images = sum(m.num_instances for m in manifests.values())
    size = sum(p.stat().st_size for p in out.rglob("*.tar"))
    shutil.rmtree(out)
    return {
        "workers": workers,
        "images": images,
        "seconds": seconds,
        "cpu": cpu,
        "mib": size / 2**20,
        "load": (load_before, os.getloadavg()[0]),
    }


COLUMNS = ["workers", "images", "seconds", "images/s", "vs 1 worker", "CPU s", "images per CPU s", "tar MiB"]
COLUMNS += ["load avg before/after", "100M images at this rate"]


def report(args, meta, rows) -> str:
    lines = [
        f"# Shard build throughput: {args.source}",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}; commit {meta['commit']}{' (uncommitted changes)' if meta['dirty'] else ''}; "
        f"{os.cpu_count()} CPU cores; Python {meta['python']}.",
        "",
        *md_head(COLUMNS),
    ]
    one = rows[0]["images"] / rows[0]["seconds"] if rows[0]["workers"] == 1 else None
    for r in rows:
        rate = r["images"] / r["seconds"]
        cells = [str(r["workers"]), f"{r['images']:,}", f"{r['seconds']:.1f}", f"{rate:,.0f}"]
        cells += [f"{rate / one:.2f}x" if one else "-", f"{r['cpu']:.1f}", f"{r['images'] / r['cpu']:,.0f}"]
        cells += [f"{r['mib']:,.0f}", "{:.1f} / {:.1f}".format(*r["load"]), f"{TARGET / rate / 3600:.1f} h"]
        lines.append(md_row(cells))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=["jpeg", "synthetic"], default="jpeg")
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--size", type=int, nargs=2, default=[320, 256], metavar=("W", "H"))
    parser.add_argument("--photos", default="/tmp/fgdist_bench_photos", help="where the JPEG folder is made once")
    parser.add_argument("--scratch", default="/tmp/fgdist_bench_shards", help="where each build is written")
    parser.add_argument("--out", help="write the Markdown report here (default: print it)")
    args = parser.parse_args()
    meta = run_meta("shards", "fgdist")
    source = collection(args)
    test_fraction = 0.2 if args.source == "jpeg" else None
    rows = []
    for workers in args.workers:
        rows.append(timed_build(source, workers, Path(args.scratch), test_fraction))
        print(f"{workers} worker(s): {rows[-1]['images'] / rows[-1]['seconds']:,.0f} images/s", flush=True)
    text = report(args, meta, rows)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
