"""The instance head and its grouped loss at scale, on CPU, with 2 real gloo ranks.

n = 4,000,000 instance columns, d = 64, 1,000 super-classes of random sizes summing to n (random
cut points of the instance line, so the rank boundary falls inside a super-class and one
super-class is split). Each rank holds its InstanceHead slice (n/2 x d, fp32) with its SGD
(momentum 0.9, weight decay 5e-4) and an InstanceLoss (kernel = the PyTorch reference). A step is:
draw a per-rank batch of random feature rows (requires_grad, standing in for a backbone's
output) with their super ids and instance ids, loss forward, backward, head.step(world_size).

Modes (each in a fresh pair of processes, so each peak RSS is its own):
  grouped/by_superclass    base_indi_eff's instance term; rows from the rank's own columns
  grouped/by_superclass@4x the same with a 4x larger batch: memory must not grow with batch x n_local
  grouped/shuffled         rows drawn from all n columns (ordinary data parallel)
  grouped-cosine/by_superclass  head.logit = cosine (normalizes the whole slice every step)
  dense/shuffled           indi / base_indi's instance term: every row against all n columns
  backbone-w64, backbone-w8    ResNet-18 (fgdist.training.model.EmbeddingNet, CIFAR stem, 32x32 images) at
                           width 64 (torchvision's, d=512) and width 8 (d=64, the head's d):
                           forward + backward of the super-class CE, the gloo all-reduce of its
                           gradients (what DeepSpeed does), SGD step; for the head's share of a
                           real training step.

Memory per rank: peak RSS of the rank process (resource.getrusage ru_maxrss and VmHWM, kept as a
running maximum because the phase probes below reset the high-water mark); the baseline RSS
after `import torch` + gloo init; the head's weights, momentum and gradient bytes (numel x 4);
the rest = peak - baseline - weights - momentum - gradient. Per phase (loss forward, backward,
head.step) the peak RSS above the RSS at the start of the phase, read from VmHWM in
/proc/self/status after resetting it (echo 5 > /proc/self/clear_refs) at the start of the phase.

Time: per rank the median over the measured steps (after warm-up) of each phase; the table shows
the slower rank. Ranks meet at a barrier before every step (not timed). One torch thread per rank.

    python bench/head_scale.py --md bench/results/head_scale.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    MIB,
    hwm_bytes,
    max_rss_bytes,
    md_head,
    md_row,
    mib,
    reset_hwm,
    rss_bytes,
    run_meta,
)
from fgdist.config import ModelConfig, OptimConfig  # noqa: E402
from fgdist.data.partition import make_plan  # noqa: E402
from fgdist.harness import free_port, init_gloo, manifest_with_sizes  # noqa: E402
from fgdist.training.head import InstanceHead  # noqa: E402
from fgdist.training.model import EmbeddingNet  # noqa: E402
from fgdist.training.objectives import InstanceLoss  # noqa: E402

MODES = {
    # name: (kind, dense, routing, logit, batch multiplier)
    "grouped/by_superclass": ("head", False, "by_superclass", "dot", 1),
    "grouped/by_superclass@4x": ("head", False, "by_superclass", "dot", 4),
    "grouped/shuffled": ("head", False, "shuffled", "dot", 1),
    "grouped-cosine/by_superclass": ("head", False, "by_superclass", "cosine", 1),
    "dense/shuffled": ("head", True, "shuffled", "dot", 1),
    "backbone-w64": ("backbone", 64, None, None, 1),
    "backbone-w8": ("backbone", 8, None, None, 1),
}
DEFAULT_MODES = list(MODES)


def super_sizes(n: int, supers: int, seed: int) -> list[int]:
    """Sizes from supers-1 distinct random cut points of [1, n): every size >= 1, sum n."""
    cuts = sorted(random.Random(seed).sample(range(1, n), supers - 1))
    edges = [0, *cuts, n]
    return [b - a for a, b in zip(edges, edges[1:])]


# ---------------------------------------------------------------------------------------------
# Memory probes (Linux)
# ---------------------------------------------------------------------------------------------


class Phase:
    """Wall time of a phase and its peak RSS above the RSS at its start.

    Resetting VmHWM also resets what getrusage's ru_maxrss reports for a live process (both read
    the same high-water mark), so the process peak is tracked here: the high-water mark is read
    before every reset and the largest reading kept (`Phase.peak`)."""

    peak = 0

    def __init__(self, can_reset: bool):
        self.can_reset = can_reset

    @classmethod
    def observe(cls) -> int:
        cls.peak = max(cls.peak, hwm_bytes(), max_rss_bytes())
        return cls.peak

    def __enter__(self):
        self.start_rss = rss_bytes()
        if self.can_reset:
            Phase.observe()
            reset_hwm()
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.cpu_seconds = time.process_time() - self.c0
        self.extra = (hwm_bytes() - self.start_rss) if self.can_reset else None


# ---------------------------------------------------------------------------------------------
# One rank
# ---------------------------------------------------------------------------------------------


def run_head(rank, world, args, mode):
    _, dense, routing, logit, mult = MODES[mode]
    batch = args.batch * mult
    baseline = rss_bytes()
    Phase.observe()
    can_reset = reset_hwm()
    manifest = manifest_with_sizes(super_sizes(args.n, args.supers, args.seed))
    plan = make_plan(manifest, world)
    lo, hi = plan.column_range(rank)
    ends = torch.tensor([e for _, e in plan.super_ranges])

    t0 = time.perf_counter()
    head = InstanceHead(plan, rank, args.dim, seed=args.seed)
    head.build_optimizer(
        OptimConfig(lr=0.1, momentum=0.9, weight_decay=5e-4, milestones=[30, 60], gamma=0.1),
        lr_mult=1.0,
        steps_per_epoch=1000,
    )
    init_s = time.perf_counter() - t0
    loss_fn = InstanceLoss(plan, rank, head, dense=dense, routing=routing, logit=logit, temperature=0.1, kernel="torch")
    after_init = rss_bytes()

    gen = torch.Generator().manual_seed(1000 + rank)
    warmup, steps = (
        (args.dense_warmup, args.dense_steps)
        if dense
        else (args.cosine_warmup, args.cosine_steps)
        if logit == "cosine"
        else (args.warmup, args.steps)
    )
    times = {k: [] for k in ("batch", "forward", "backward", "head_step", "step")}
    cpu = {k: [] for k in ("forward", "backward", "head_step", "head", "step")}
    extra = {k: 0 for k in ("forward", "backward", "head_step")}
    exchanged, losses = [], []
    grad_bytes = momentum_bytes = 0
    touched = float("nan")
    cpu_s = 0.0
    rss_after_backward = rss_after_step = 0
    for step in range(warmup + steps):
        dist.barrier()
        with Phase(False) as p_batch:
            if routing == "by_superclass":
                inst = lo + torch.randint(0, hi - lo, (batch,), generator=gen)
            else:
                inst = torch.randint(0, args.n, (batch,), generator=gen)
            sup = torch.bucketize(inst, ends, right=True)
            feats = torch.randn(batch, args.dim, generator=gen).requires_grad_()
        with Phase(can_reset) as p_fwd:
            loss = loss_fn(feats, sup, inst).mean()
        with Phase(can_reset) as p_bwd:
            loss.backward()
        grad_bytes = head.weight.grad.numel() * head.weight.grad.element_size()
        rss_after_backward = rss_bytes()
        if step == warmup + steps - 1:  # columns with a nonzero gradient (outside the timed phases)
            g = head.weight.grad
            touched = (
                sum(int((g[a : a + 65536] != 0).any(dim=1).sum()) for a in range(0, g.shape[0], 65536)) / g.shape[0]
            )
        with Phase(can_reset) as p_opt:
            head.step(world)
        rss_after_step = rss_bytes()
        buf = head.optimizer.state[head.weight]["momentum_buffer"]
        momentum_bytes = buf.numel() * buf.element_size()
        if not torch.isfinite(loss) or feats.grad is None or not feats.grad.abs().sum() > 0:
            raise RuntimeError(f"rank {rank} {mode}: step {step}: loss {float(loss)}, feature gradient missing or zero")
        # Rows that left their rank this step (outside the timed phases).
        sent = torch.tensor([int(loss_fn.super_needs_remote[sup].sum())])
        dist.all_reduce(sent)
        if step >= warmup:
            for k, ph in (("batch", p_batch), ("forward", p_fwd), ("backward", p_bwd), ("head_step", p_opt)):
                times[k].append(ph.seconds)
            times["step"].append(p_batch.seconds + p_fwd.seconds + p_bwd.seconds + p_opt.seconds)
            cpu_s += p_batch.cpu_seconds + p_fwd.cpu_seconds + p_bwd.cpu_seconds + p_opt.cpu_seconds
            for k, ph in (("forward", p_fwd), ("backward", p_bwd), ("head_step", p_opt)):
                cpu[k].append(ph.cpu_seconds)
            cpu["head"].append(p_fwd.cpu_seconds + p_bwd.cpu_seconds + p_opt.cpu_seconds)
            cpu["step"].append(p_batch.cpu_seconds + cpu["head"][-1])
            exchanged.append(int(sent))
            losses.append(loss.item())
            for k, ph in (("forward", p_fwd), ("backward", p_bwd), ("head_step", p_opt)):
                if ph.extra is not None:
                    extra[k] = max(extra[k], ph.extra)  # steady state: after warm-up
    weight_bytes = head.weight.numel() * head.weight.element_size()
    # What zero-filling a fresh gradient-sized array costs alone (the reference backward's `dw`).
    zeros_cpu = []
    for _ in range(3):
        c0 = time.process_time()
        z = torch.zeros(head.weight.shape)
        zeros_cpu.append(time.process_time() - c0)
        del z
    return {
        "mode": mode,
        "rank": rank,
        "batch": batch,
        "steps": steps,
        "warmup": warmup,
        "columns": [lo, hi],
        "split_supers": [[s, *plan.super_ranges[s]] for s in plan.split_supers],
        "local_groups": len(plan.local_groups(rank)[0]),
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "all_s": times,
        "init_s": init_s,
        "zeros_cpu_s": statistics.median(zeros_cpu),
        "median_cpu_s": {k: statistics.median(v) for k, v in cpu.items()},
        "cpu_share": cpu_s / sum(times["step"]),
        "rows_exchanged_per_step": statistics.median(exchanged),
        "losses": losses,
        "baseline": baseline,
        "after_init": after_init,
        "after_backward": rss_after_backward,
        "after_step": rss_after_step,
        "peak": Phase.observe(),
        "weights": weight_bytes,
        "touched_columns": touched,
        "momentum": momentum_bytes,
        "gradient": grad_bytes,
        "phase_extra": extra if can_reset else None,
    }


def run_backbone(rank, world, args, mode):
    width = MODES[mode][1]
    baseline = rss_bytes()
    torch.manual_seed(rank)
    model = EmbeddingNet(ModelConfig(width=width, stem="cifar"), num_super=args.supers, num_fine=None)
    params = [p for p in model.parameters()]
    num_params = sum(p.numel() for p in params)
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    images = torch.randn(args.batch, 3, 32, 32)
    labels = torch.randint(0, args.supers, (args.batch,))
    times = {k: [] for k in ("fwd_bwd", "allreduce", "opt", "step")}
    cpu_steps = []
    cpu_s = 0.0
    for step in range(args.backbone_warmup + args.backbone_steps):
        dist.barrier()
        c0 = time.process_time()
        t0 = time.perf_counter()
        out = model(images)
        F.cross_entropy(out["super_logits"], labels).backward()
        t1 = time.perf_counter()
        flat = torch.cat([p.grad.reshape(-1) for p in params])  # one bucket, as DeepSpeed's flat all-reduce
        dist.all_reduce(flat)
        flat /= world
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if step >= args.backbone_warmup:
            cpu_s += time.process_time() - c0
            cpu_steps.append(time.process_time() - c0)
            for k, v in (("fwd_bwd", t1 - t0), ("allreduce", t2 - t1), ("opt", t3 - t2), ("step", t3 - t0)):
                times[k].append(v)
    return {
        "mode": mode,
        "rank": rank,
        "batch": args.batch,
        "steps": args.backbone_steps,
        "warmup": args.backbone_warmup,
        "width": width,
        "dim": 8 * width,
        "params": num_params,
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "all_s": times,
        "median_cpu_s": {"step": statistics.median(cpu_steps)},
        "cpu_share": cpu_s / sum(times["step"]),
        "baseline": baseline,
        "peak": max_rss_bytes(),
    }


def worker(rank, world, port, args, mode, queue):
    try:
        torch.set_num_threads(args.threads)
        init_gloo(rank, world, port)
        kind = MODES[mode][0]
        result = run_head(rank, world, args, mode) if kind == "head" else run_backbone(rank, world, args, mode)
        queue.put((rank, json.dumps(result)))
        dist.destroy_process_group()
    except BaseException:
        queue.put((rank, "FAILED\n" + traceback.format_exc()))
        raise


def run_mode(args, mode) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, args.world, port, args, mode, queue)) for r in range(args.world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            rank, data = queue.get(timeout=args.timeout)
            if data.startswith("FAILED"):
                raise RuntimeError(f"{mode}: rank {rank} failed:\n{data}")
            results[rank] = json.loads(data)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in sorted(results)]


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def head_seconds(r) -> float:
    """Median over the measured steps of the head's part of a step: loss fwd + bwd + head.step."""
    a = r["all_s"]
    return statistics.median(f + b + o for f, b, o in zip(a["forward"], a["backward"], a["head_step"]))


def bench_share(r) -> float:
    """The head's part of the bench's own steps (all measured steps together)."""
    a = r["all_s"]
    return (sum(a["forward"]) + sum(a["backward"]) + sum(a["head_step"])) / sum(a["step"])


def slower_rank(rs):
    """The rank with the larger median step: its phases are shown (they add up to its step)."""
    return max(rs, key=lambda r: r["median_s"]["step"])


def report(args, results: dict[str, list[dict]], meta: dict) -> str:
    lines = []
    head_modes = [m for m in results if MODES[m][0] == "head"]
    bb = {m: results[m] for m in results if MODES[m][0] == "backbone"}
    bb_step = {m: slower_rank(rs)["median_s"]["step"] for m, rs in bb.items()}
    lines += [
        "## Time per step (the rank with the slower median step)",
        "",
        "Per phase the median over the measured steps (medians need not add up); head = loss fwd + bwd + head.step, "
        "its median per step; head share of the bench step over all measured steps together.",
        "",
    ]
    share_cols = [f"head / (head + {m} step)" for m in bb]
    lines += md_head(
        [
            *("mode", "batch/rank", "steps", "rows exchanged/step (global)", "columns with a nonzero gradient"),
            *("loss fwd s", "bwd s", "head.step s", "head s", "step s", "head share of bench step", "CPU time / wall"),
            *share_cols,
        ]
    )
    for m in head_modes:
        rs = results[m]
        r = slower_rank(rs)
        fwd, bwd, opt, step = (r["median_s"][k] for k in ("forward", "backward", "head_step", "step"))
        headt = head_seconds(r)
        shares = [f"{headt / (headt + s):.0%}" for s in bb_step.values()]
        touched = sum(x["touched_columns"] * (x["columns"][1] - x["columns"][0]) for x in rs) / sum(
            x["columns"][1] - x["columns"][0] for x in rs
        )
        cells = [m, str(r["batch"]), str(r["steps"]), f"{r['rows_exchanged_per_step']:.0f}", f"{touched:.1%}"]
        cells += [f"{t:.3f}" for t in (fwd, bwd, opt, headt, step)]
        lines.append(md_row([*cells, f"{bench_share(r):.0%}", f"{r['cpu_share']:.0%}", *shares]))
    lines.append("")
    lines += [
        "CPU seconds of the rank process per phase (median over the measured steps; the same rank). The other jobs on "
        "the machine stretch wall time much more than CPU time, so the comparisons in the reading below use these.",
        "",
    ]
    bb_cpu = {m: slower_rank(rs)["median_cpu_s"]["step"] for m, rs in bb.items()}
    cpu_cols = [f"head / (head + {m} step)" for m in bb]
    lines += md_head(["mode", "loss fwd CPU s", "bwd CPU s", "head.step CPU s", "head CPU s", *cpu_cols])
    for m in head_modes:
        c = slower_rank(results[m])["median_cpu_s"]
        shares = [f"{c['head'] / (c['head'] + s):.0%}" for s in bb_cpu.values()]
        lines.append(md_row([m, *(f"{c[k]:.3f}" for k in ("forward", "backward", "head_step", "head")), *shares]))
    lines.append("")
    if bb:
        lines += [
            "Backbone steps (ResNet-18, CIFAR stem, 32x32, same batch per rank, both ranks at once, fp32):",
            "",
            *md_head(
                [
                    *("backbone", "d", "params", "fwd+bwd s", "grad all-reduce s", "SGD s", "step s", "step CPU s"),
                    *("CPU time / wall", "peak RSS MiB"),
                ]
            ),
        ]
        for m, rs in bb.items():
            r = slower_rank(rs)
            t = r["median_s"]
            cells = [m, str(r["dim"]), f"{r['params'] / 1e6:.2f} M", f"{t['fwd_bwd']:.2f}", f"{t['allreduce']:.3f}"]
            cells += [
                f"{t['opt']:.3f}",
                f"{t['step']:.2f}",
                f"{r['median_cpu_s']['step']:.2f}",
                f"{r['cpu_share']:.0%}",
            ]
            lines.append(md_row([*cells, mib(max(x["peak"] for x in rs))]))
        lines.append("")
    lines += [
        "## Memory per rank (MiB; the larger of the 2 ranks)",
        "",
        *md_head(
            [
                *("mode", "peak RSS", "baseline (torch + gloo)", "weights", "momentum", "gradient"),
                *("rest = peak - baseline - W - M - G", "peak above start: loss fwd", "bwd", "head.step"),
            ]
        ),
    ]
    for m in head_modes:
        r = max(results[m], key=lambda x: x["peak"])
        rest = r["peak"] - r["baseline"] - r["weights"] - r["momentum"] - r["gradient"]
        ex = r["phase_extra"] or {}
        cells = [m, *(mib(r[k]) for k in ("peak", "baseline", "weights", "momentum", "gradient")), mib(rest)]
        lines.append(
            md_row([*cells, *(mib(ex[k]) if k in ex else "n/a" for k in ("forward", "backward", "head_step"))])
        )
    lines.append("")
    r0 = results[head_modes[0]][0] if head_modes else None
    if r0:
        lines += [
            f"Split super-classes (id, begin, end): {r0['split_supers']}; rank columns: "
            + ", ".join(
                f"rank {r['rank']} {r['columns']} ({r['local_groups']} local super-classes)"
                for r in results[head_modes[0]]
            ),
            "",
        ]
    return "\n".join(lines)


def machine_meta() -> dict:
    return {
        **run_meta(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }


def render_md(meta: dict, args: dict, results: dict[str, list[dict]]) -> str:
    a = argparse.Namespace(**args)
    head = [
        "# Instance head at scale on CPU (2 gloo ranks)",
        "",
        f"- Command: `{meta['command']}` (from the repository root; {meta['total_s']:.0f} s in all)",
        f"- Machine: 2-core x86_64 CPU, no GPU, shared with other jobs (`{meta['cpu']}`, {meta['cores']} cores, "
        f"1-minute load average {meta['loadavg'][0]:.1f} before and {meta['loadavg_after'][0]:.1f} after the run); "
        f"torch {meta['torch']}, Python {meta['python']}, {a.threads} torch thread(s) per rank",
        f"- Date: {meta['date']}",
        f"- Commit: {meta['commit']}"
        + (" (the working tree had uncommitted changes to other tracked files)" if meta["dirty"] else ""),
        f"- Problem: n = {a.n:,} instances, d = {a.dim}, {a.supers:,} super-classes with random sizes (random cut "
        f"points, seed {a.seed}), {a.world} ranks of n/{a.world} = {a.n // a.world:,} columns, fp32, kernel = PyTorch "
        "reference (column chunks, logits recomputed in backward), head SGD lr 0.1, momentum 0.9, weight decay 5e-4; "
        f"per-rank batch {a.batch} random feature rows (requires_grad)",
        f"- Steps (warm-up + measured): grouped {a.warmup} + {a.steps}; grouped-cosine {a.cosine_warmup} + "
        f"{a.cosine_steps}; dense {a.dense_warmup} + {a.dense_steps}; backbone {a.backbone_warmup} + "
        f"{a.backbone_steps} (fewer where a step is long, to keep the run near 10 minutes)",
        "",
    ]
    return "\n".join(head) + "\n" + report(a, results, meta) + "\n" + notes(a, results)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--supers", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=256, help="rows per rank")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dense-steps", type=int, default=1)
    ap.add_argument("--dense-warmup", type=int, default=1)
    ap.add_argument("--cosine-steps", type=int, default=2)
    ap.add_argument("--cosine-warmup", type=int, default=1)
    ap.add_argument("--backbone-steps", type=int, default=1)
    ap.add_argument("--backbone-warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", nargs="+", default=DEFAULT_MODES, choices=list(MODES))
    ap.add_argument("--timeout", type=float, default=900, help="seconds to wait for a mode's ranks")
    ap.add_argument("--json", help="write the raw per-rank results here")
    ap.add_argument("--md", help="write the Markdown report here")
    ap.add_argument("--render", metavar="JSON", help="do not run: render --md from the --json of an earlier run")
    args = ap.parse_args(argv)

    if args.render:
        saved = json.loads(Path(args.render).read_text())
        text = render_md(saved["meta"], saved["args"], saved["results"])
        print(text)
        if args.md:
            Path(args.md).write_text(text)
        return

    meta = machine_meta()
    t0 = time.perf_counter()
    results = {}
    for mode in args.modes:
        t = time.perf_counter()
        results[mode] = run_mode(args, mode)
        print(f"{mode}: done in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    meta["total_s"] = time.perf_counter() - t0
    meta["loadavg_after"] = os.getloadavg()
    saved_args = {k: v for k, v in vars(args).items() if k not in ("render",)}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "args": saved_args, "results": results}, indent=1))
    text = render_md(meta, saved_args, results)
    print(text)
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(text)
        print(f"wrote {args.md}", file=sys.stderr)


def notes(a, results) -> str:
    """The reading of the numbers, from the numbers (only for the modes that ran)."""

    def rank_max(m, key):
        return max(r[key] for r in results[m])

    def extra(m, key):
        return max((r["phase_extra"] or {}).get(key, 0) for r in results[m])

    out = ["## Reading the numbers", ""]
    g = "grouped/by_superclass"
    if g in results:
        r = max(results[g], key=lambda x: x["peak"])
        W, M, G = r["weights"], r["momentum"], r["gradient"]
        n_local = r["columns"][1] - r["columns"][0]
        other = r["peak"] - r["baseline"] - W - M - G - extra(g, "head_step")
        touched = statistics.mean(x["touched_columns"] for x in results[g])
        out += [
            "**Memory is the head's state, nothing per row x column.** Per rank the weights are "
            f"n_local x d x 4 B = {n_local:,} x {a.dim} x 4 B = {mib(W)} MiB and the momentum as much. The gradient is "
            f"a dense fp32 n_local x d tensor ({mib(G)} MiB): the reference kernel's backward returns a dense `dw` "
            "(`fgdist/kernels/reference.py`, `dw = torch.zeros(w.shape, ...)`) and autograd keeps it as `weight.grad` "
            f"until `head.step`. Only {touched:.1%} of the columns have a nonzero gradient in a grouped step (the "
            "columns of the super-classes present in the batch), but a sparse gradient would not make the update "
            "sparse: SGD with momentum and weight decay changes every row every step (the momentum decays, `wd * w` "
            "enters it), so `head.step` reads and writes all n_local x d values anyway. So weights + momentum + "
            "gradient = 3x the weights.",
            "",
            f"The measured peak: {mib(r['peak'])} MiB = baseline {mib(r['baseline'])} + W + M + G + "
            f"{mib(extra(g, 'head_step'))} MiB (the head.step phase peaks that far above its start, in steady state) + "
            f"{mib(other)} MiB. `head.step` adds the weight decay into the gradient in place "
            "(`fgdist/training/head.py`: `grad.div_(world_size).add_(w, alpha=weight_decay)`, the optimizer's own "
            "weight decay "
            "set to 0) because `torch.optim.SGD` with `weight_decay` computes `grad + weight_decay * w` into a new "
            "slice-sized tensor (`_single_tensor_sgd`: `grad = grad.add(param, alpha=weight_decay)`), which would make "
            "the head peak at 4x its weights; a head.step phase near W above its start means that copy is back. The "
            f"backward phase peaks {mib(extra(g, 'backward'))} MiB above its start (the dense `dw`), the loss forward "
            f"{mib(extra(g, 'forward'))} MiB. The last {mib(other)} MiB do not change with the mode or the batch "
            "(process and allocator state).",
            "",
        ]
        checks = []
        g4 = "grouped/by_superclass@4x"
        if g4 in results:
            checks.append(
                f"a 4x batch ({results[g4][0]['batch']} rows per rank) moves the peak by "
                f"{(rank_max(g4, 'peak') - rank_max(g, 'peak')) / MIB:+,.0f} MiB"
            )
        d = "dense/shuffled"
        if d in results:
            checks.append(
                f"dense mode, where every one of the {2 * a.batch if a.world == 2 else a.world * a.batch} gathered "
                f"rows meets all {n_local:,} local columns, peaks "
                f"{(rank_max(d, 'peak') - rank_max(g, 'peak')) / MIB:+,.0f} MiB from grouped, its loss forward "
                f"{mib(extra(d, 'forward'))} MiB above its start (rows x 8,192-column logit chunks) and its backward "
                f"{mib(extra(d, 'backward'))} MiB (the dense `dw` plus {mib(extra(d, 'backward') - G)} MiB of chunk "
                "temporaries)"
            )
        if checks:
            out += [
                "Nothing grows with rows x n_local: "
                + "; ".join(checks)
                + ". A rows x n_local fp32 logits matrix would be "
                f"{2 * a.batch * n_local * 4 / MIB:,.0f} MiB in dense mode.",
                "",
            ]
        c = "grouped-cosine/by_superclass"
        if c in results:
            out += [
                "`head.logit = cosine` is the exception in size, though not rows x n_local: `F.normalize(w, dim=1)` "
                "(`fgdist/training/objectives.py`, `_logit_inputs`) materializes a normalized copy of the whole slice "
                "every "
                f"step (+{mib(extra(c, 'forward'))} MiB in the forward, saved for backward) and its backward allocates "
                f"+{mib(extra(c, 'backward'))} MiB of n_local x d temporaries; the step takes "
                f"{slower_rank(results[c])['median_cpu_s']['head']:.1f} CPU s instead of "
                f"{slower_rank(results[g])['median_cpu_s']['head']:.1f}. Every shipped config uses `dot`.",
                "",
            ]
        bb = {m: results[m] for m in results if MODES[m][0] == "backbone"}

        def cpu_of(m, key):
            return slower_rank(results[m])["median_cpu_s"][key]

        load = f"{statistics.mean(x['cpu_share'] for x in results[g]):.0%}"
        out += [
            f"**Time.** The machine was shared: in grouped/by_superclass each rank's timed phases got {load} of a core "
            "(CPU time / wall; the other modes: see that column), so wall times are inflated and drift with the other "
            "jobs; head.step does the same work in every grouped mode, and its wall-time spread across those rows "
            f"shows the drift. CPU seconds are steadier and are used here. The grouped step ({cpu_of(g, 'head'):.2f} "
            "CPU s) is dominated by passes over n_local x d arrays that do not depend on the batch: head.step "
            f"{cpu_of(g, 'head_step'):.2f} s (`grad /= world_size` and `grad += wd * w` in place, the momentum "
            f"update, the weight update, each over {n_local * a.dim / 1e6:,.0f} M floats) and the backward "
            f"{cpu_of(g, 'backward'):.2f} s, of which zero-filling the fresh {mib(G)} MiB `dw` is about "
            f"{slower_rank(results[g])['zeros_cpu_s']:.2f} s (`torch.zeros` of that shape timed alone in the same "
            "process; every step maps and faults in new pages for `dw`).",
        ]
        if g4 in results:
            out[-1] += (
                " The grouped loss itself is cheap: the 4x batch adds "
                f"{cpu_of(g4, 'forward') - cpu_of(g, 'forward'):.2f} CPU s to the forward and "
                f"{cpu_of(g4, 'backward') - cpu_of(g, 'backward'):.2f} to the backward, head.step "
                f"{cpu_of(g4, 'head_step') - cpu_of(g, 'head_step'):+.2f}."
            )
        if d in results:
            rows = a.world * a.batch
            flop = 4 * 2 * a.dim * rows * n_local
            loss_cpu = cpu_of(d, "forward") + cpu_of(d, "backward")
            out[-1] += (
                f" Dense mode takes {cpu_of(d, 'forward'):.1f} + {cpu_of(d, 'backward'):.1f} CPU s in the loss: {rows} "
                f"rows x {n_local:,} columns x 2d = {2 * a.dim * rows * n_local / 1e9:,.0f} GFLOP forward and about 3x "
                f"that in the backward (logits recomputed, dx, dw), {flop / 1e9 / loss_cpu:.1f} GFLOP/s per CPU "
                f"second: {cpu_of(d, 'head') / cpu_of(g, 'head'):.0f}x the grouped step."
            )
        out.append("")
        if bb:
            parts = []
            headc = cpu_of(g, "head")
            head_wall = head_seconds(slower_rank(results[g]))
            for m, rs in bb.items():
                r = slower_rank(rs)
                step = r["median_cpu_s"]["step"]
                line = (
                    f"{m} (d = {r['dim']}): {step:.2f} CPU s per step at batch {r['batch']}, so the grouped head "
                    f"({headc:.2f} CPU s) is {headc / (headc + step):.0%} of head + backbone "
                    f"({head_wall / (head_wall + r['median_s']['step']):.0%} in wall time)"
                )
                if r["dim"] != a.dim:
                    k = r["dim"] / a.dim
                    line += (
                        f"; this backbone's d is {r['dim']} while the head's is {a.dim}, and the head's work (its "
                        f"arrays and its FLOPs) is linear in d, so a head of d = {r['dim']} on the same columns would "
                        f"be about {k * headc / (k * headc + step):.0%}"
                    )
                parts.append(line)
            out += [
                "**Share of a real step.** This bench has no backbone, so the head is nearly all of its own step (the "
                "rest is drawing the batch). Against a ResNet-18 step (fgdist.training.model.EmbeddingNet, CIFAR stem, "
                "32x32 "
                "images, fp32, forward + backward + gradient all-reduce + SGD, both ranks at once on the same "
                "machine): " + "; ".join(parts) + ".",
                "",
            ]
        rs = results.get("grouped/shuffled")
        split = results[g][0]["split_supers"]
        sizes = ", ".join(f"super-class {s} with {e - b:,} columns" for s, b, e in split) or "none"
        out += [
            f"**Rows crossing ranks.** Split super-classes: {sizes}. Under by_superclass only rows of split "
            f"super-classes are exchanged (median {results[g][0]['rows_exchanged_per_step']:.0f} of "
            f"{a.world * a.batch} rows per step here)"
            + (
                f"; under shuffled {rs[0]['rows_exchanged_per_step']:.0f} of {a.world * a.batch} rows per step (every "
                "row whose super-class is not wholly on its own rank)"
                if rs
                else ""
            )
            + ". Each exchanged row costs d x 4 B of features "
            "plus two int64 ids out and 2 floats of partial statistics back; no column ever moves.",
            "",
        ]
    return "\n".join(out)


if __name__ == "__main__":
    main()
