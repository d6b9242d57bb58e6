"""What the pool of unlabeled images costs the instance head as it grows (issue 21).

A pool row's softmax runs over every pool column (Eqn 3 on unlabeled data), so its cost per row
is O(d x P) where a labeled row's is O(d x n_b). This measures one rank holding the whole line:
2,000 labeled columns in 5 super-classes (Fashion-MNIST's grouping of the 2,000-image set) plus a
pool of P columns, d = 128 (the Fashion-MNIST config's width-16 ResNet-18), a batch of 256 rows
drawn over all columns (so pool rows are P / (P + 2,000) of it, as in a real epoch), the
PyTorch reference kernel. A step: loss forward, backward, head SGD step; median of --steps after
one warm-up. Memory: the process's peak RSS (each pool size in a fresh process) and the head's
weights + momentum + gradient. With k ranks the columns, and so the head's memory and the pool
rows' work, divide by k (docs/DESIGN.md, "The pool").

    python bench/pool_scale.py --pools 10000 60000 1000000 --md bench/results/pool_scale.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import max_rss_bytes, md_head, md_row, mib, rss_bytes, run_meta, write_report  # noqa: E402

LABELED = [776, 216, 195, 615, 198]  # the first 2,000 Fashion-MNIST training images per super-class
DIM, BATCH = 128, 256


def measure(pool: int, steps: int) -> dict:
    """One pool size, in this process."""
    import torch

    from fgdist.config import OptimConfig
    from fgdist.data.partition import make_plan
    from fgdist.harness import manifest_with_sizes
    from fgdist.training.head import InstanceHead
    from fgdist.training.objectives import InstanceLoss

    torch.set_num_threads(1)
    baseline = rss_bytes()
    plan = make_plan(manifest_with_sizes(LABELED, pool=pool), 1)
    head = InstanceHead(plan, 0, DIM, seed=0)
    head.build_optimizer(OptimConfig(lr=0.1, momentum=0.9, weight_decay=5e-4), lr_mult=1.0, steps_per_epoch=100)
    loss_fn = InstanceLoss(
        plan, 0, head, dense=False, routing="by_superclass", logit="dot", temperature=0.1, kernel="torch"
    )
    ends = torch.tensor([end for _, end in plan.group_ranges])
    gen = torch.Generator().manual_seed(0)
    times = []
    for step in range(steps + 1):
        inst = torch.randint(0, plan.num_instances, (BATCH,), generator=gen)
        groups = torch.bucketize(inst, ends, right=True)
        feats = torch.randn(BATCH, DIM, generator=gen).requires_grad_()
        t0 = time.perf_counter()
        loss = loss_fn(feats, groups, inst).mean()
        loss.backward()
        head.step(1)
        if step:  # the first is the warm-up (the optimizer's momentum buffer appears there)
            times.append(time.perf_counter() - t0)
        if not torch.isfinite(loss):
            raise RuntimeError(f"pool {pool}: step {step}: loss {float(loss)}")
    weights = head.weight.numel() * 4
    return {
        "pool": pool,
        "pool_rows": float((groups == plan.pool_group).float().mean()),
        "step_s": statistics.median(times),
        "peak": max_rss_bytes() - baseline,
        "head_bytes": 3 * weights,  # weights, momentum, gradient (fp32)
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pools", type=int, nargs="+", default=[10_000, 60_000, 1_000_000])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one size, print JSON
    parser.add_argument("--md", help="write the table as Markdown here")
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure(args.one, args.steps)))
        return 0
    rows = []
    for pool in args.pools:
        cmd = [sys.executable, __file__, "--one", str(pool), "--steps", str(args.steps)]
        result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        rows.append(result)
        print(f"pool {pool:,}: {result['step_s']:.3f} s/step, peak +{mib(result['peak'])} MiB", flush=True)
    meta = run_meta()
    lines = [f"{key}: {value}" for key, value in meta.items()] + [""]
    lines += md_head(["pool columns", "pool rows in a batch", "head step (s)", "peak RSS above start (MiB)",
                      "head weights+momentum+gradient (MiB)"])  # fmt: skip
    for r in rows:
        cells = [f"{r['pool']:,}", f"{r['pool_rows']:.0%}", f"{r['step_s']:.3f}", mib(r["peak"]), mib(r["head_bytes"])]
        lines.append(md_row(cells))
    print("\n".join(lines))
    if args.md:
        write_report(args.md, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
