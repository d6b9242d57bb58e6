"""Benchmark of the grouped logsumexp: forward + backward time and peak memory.

Implementations (each computes the summed loss sum_i (partial_lse_i - target_logit_i) and its
gradients with respect to x and w):

  triton             the fused block-sparse Triton kernel (CUDA only)
  torch_reference    fgdist.kernels.reference, segmented by group, column-chunked
  masked_dense       full rows x n_local logits, masked to each row's group, F.cross_entropy
  torch_linear_ce    torch.nn.functional.linear_cross_entropy, chunked by rows/4 (dense case
                     only; only when this torch has it). Its "auto" chunking picked far
                     smaller chunks on CPU and ran about 10x slower.
  cut_cross_entropy  the cut-cross-entropy package (dense case only; CUDA; only if importable)

Sizes: on CUDA rows=4096, d=512, n_local in {125000, 1250000}, groups in {1, 12, 100}, bf16; on
CPU rows=512, d=128, n_local in {12500, 125000}, same groups, fp32. Groups are equal column
ranges and rows are spread uniformly over them.

Time: the median of up to --repeats timed runs after --warmup runs; a case stops early once its
timed runs add up to --case-budget seconds (at least one run).

Peak memory, counting the gradients of x and w: on CUDA torch.cuda.max_memory_allocated above
what was allocated before the first timed run. On CPU the peak resident set size above the one
before the call, sampled every 2 ms by a thread (psutil; a shorter peak can be missed), in a
fresh child process per case after one warm-up run. The child has glibc map every allocation of
1 MiB or more fresh (mallopt), so that no freed heap block is reused unseen; the timing process
keeps glibc's default, whose page-fault costs that setting would distort.

Every implementation's TFLOP/s is counted on matched (row, column) pairs only: forward
2*d*pairs (timed alone, without autograd), backward 6*d*pairs (logit recomputation plus the dx
and dw products; fwd+bwd time minus forward time) and both; on CUDA each also as a fraction of
the bf16 matmul rate of a large torch.matmul measured in the same process, with the speed-up
over masked_dense.

    python bench/kernel.py --out bench/results/kernel_cpu.json --md bench/results/kernel_cpu.md
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import MIB, RssPeak, command_line, git_commit, md_head, md_row, shell_date  # noqa: E402
from fgdist.kernels.reference import grouped_lse_torch  # noqa: E402

GPU_SIZES = dict(rows=4096, d=512, n_local=[125_000, 1_250_000], groups=[1, 12, 100])
CPU_SIZES = dict(rows=512, d=128, n_local=[12_500, 125_000], groups=[1, 12, 100])
IMPLS = ["triton", "torch_reference", "masked_dense", "torch_linear_ce", "cut_cross_entropy"]


# ---------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------


def make_case(rows, d, n_local, groups, dtype, device, seed=0):
    """Equal column ranges per group, rows uniform over groups, a target column in each row's
    group. Logits have a realistic spread (unit-norm rows times a temperature of 1/0.05)."""
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.linspace(0, n_local, groups + 1).round().long()
    row_group = torch.randint(0, groups, (rows,), generator=gen)
    lo, hi = offsets[row_group], offsets[row_group + 1]
    target = lo + (torch.rand(rows, generator=gen, dtype=torch.float64) * (hi - lo)).long()
    x = F.normalize(torch.randn(rows, d, generator=gen), dim=1) / 0.05
    w = F.normalize(torch.randn(n_local, d, generator=gen), dim=1)
    pairs = int((hi - lo).sum())
    to = dict(device=device)
    return dict(
        x=x.to(dtype=dtype, **to),
        w=w.to(dtype=dtype, **to),
        row_group=row_group.to(**to),
        offsets=offsets.to(**to),
        target=target.to(**to),
        pairs=pairs,
    )


def group_mask(row_group, offsets, n_cols):
    col = torch.arange(n_cols, device=row_group.device)
    return (col >= offsets[row_group].unsqueeze(1)) & (col < offsets[row_group + 1].unsqueeze(1))


# ---------------------------------------------------------------------------------------------
# Implementations: (x, w, row_group, offsets, target) -> summed loss
# ---------------------------------------------------------------------------------------------


def loss_triton(x, w, rg, off, tgt):
    from fgdist.kernels.triton_grouped_lse import grouped_lse_triton

    lse, t = grouped_lse_triton(x, w, rg, off, tgt)
    return (lse - t).sum()


def loss_reference(x, w, rg, off, tgt):
    lse, t = grouped_lse_torch(x, w, rg, off, tgt)
    return (lse - t).sum()


def loss_masked_dense(x, w, rg, off, tgt):
    logits = (x @ w.T).masked_fill(~group_mask(rg, off, w.shape[0]), float("-inf"))
    return F.cross_entropy(logits, tgt, reduction="sum")


def loss_linear_ce(x, w, rg, off, tgt):
    # The chunked path (options given) never materializes all logits; older torch has none.
    chunked = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    options = chunked(batch_chunk_size=max(1, x.shape[0] // 4)) if chunked else None
    return F.linear_cross_entropy(x, w, tgt, reduction="sum", options=options)


def loss_cut_cross_entropy(x, w, rg, off, tgt):
    from cut_cross_entropy import linear_cross_entropy

    try:  # no gradient filtering, like the fused kernel
        return linear_cross_entropy(x, w, tgt, reduction="sum", filter_eps=None)
    except TypeError:
        return linear_cross_entropy(x, w, tgt, reduction="sum")


LOSSES = {
    "triton": loss_triton,
    "torch_reference": loss_reference,
    "masked_dense": loss_masked_dense,
    "torch_linear_ce": loss_linear_ce,
    "cut_cross_entropy": loss_cut_cross_entropy,
}


def why_not(impl, device, groups):
    """Reason an implementation does not apply to this case, or None."""
    cuda = device.type == "cuda"
    if impl == "triton" and not cuda:
        return "needs CUDA; the CPU interpreter is for tests only"
    if impl in ("torch_linear_ce", "cut_cross_entropy") and groups != 1:
        return "dense only (no per-row column mask)"
    if impl == "torch_linear_ce" and not hasattr(F, "linear_cross_entropy"):
        return "torch.nn.functional.linear_cross_entropy not in this torch"
    if impl == "cut_cross_entropy":
        if not cuda:
            return "needs CUDA"
        try:
            import cut_cross_entropy  # noqa: F401
        except ImportError:
            return "cut-cross-entropy not installed"
    return None


def estimated_bytes(impl, rows, d, n_local, dtype):
    """Rough peak beyond the inputs, to skip a case before it runs out of memory."""
    size = torch.finfo(dtype).bits // 8
    grads = (rows + n_local) * d * size
    if impl == "masked_dense":
        # logits, masked copy, log-softmax, its gradient and the logits' gradient + bool mask
        return grads + rows * n_local * (5 * size + 1)
    if impl == "torch_reference":  # fp32 dw accumulator and fp32 copy of w per chunk
        return grads + n_local * d * 4 + rows * 8192 * 4 * 3
    return grads + 2 * rows * 8192 * 4  # chunked / fused: small transients


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def fwd_bwd(loss_fn, case):
    x = case["x"].detach().requires_grad_()
    w = case["w"].detach().requires_grad_()
    loss = loss_fn(x, w, case["row_group"], case["offsets"], case["target"])
    loss.backward()
    return loss.detach(), x.grad, w.grad


def time_call(fn, device):
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class CudaPeak:
    """Peak CUDA allocation above the one before the block."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.delta = torch.cuda.max_memory_allocated() - self.base


def map_large_allocations_fresh():
    """Have glibc mmap every allocation of 1 MiB or more and unmap it on free.

    By default glibc raises its mmap threshold adaptively (up to 32 MiB) and keeps freed blocks
    below it in the heap, where the next run reuses them without raising the RSS: the RSS delta
    would then miss them. Returns whether the setting took (glibc only).
    """
    m_mmap_threshold = -3  # from malloc.h
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, 1 << 20))
    except (OSError, AttributeError):
        return False


def forward_only(loss_fn, case):
    with torch.no_grad():
        return loss_fn(case["x"], case["w"], case["row_group"], case["offsets"], case["target"])


def measure(loss_fn, case, device, warmup, repeats, budget_s):
    """Median fwd+bwd time of the timed runs and median forward-only time (no autograd); on
    CUDA also the peak memory of the first fwd+bwd run."""

    def run():
        return time_call(lambda: fwd_bwd(loss_fn, case), device)

    for _ in range(warmup):
        fwd_bwd(loss_fn, case)
    gc.collect()
    result = {}
    if device.type == "cuda":
        with CudaPeak() as peak:
            times = [run()]
        result["peak_mib"] = peak.delta / MIB
    else:
        times = [run()]
    while len(times) < repeats and sum(times) < budget_s:
        times.append(run())
    result.update(time_ms=1e3 * statistics.median(times), time_ms_min=1e3 * min(times), runs=len(times))
    forward = [time_call(lambda: forward_only(loss_fn, case), device) for _ in range(len(times))]
    result["fwd_ms"] = 1e3 * statistics.median(forward)
    return result


def add_rates(by_impl: dict, d: int, pairs: int, matmul_tflops: float | None) -> None:
    """TFLOP/s counted on matched (row, column) pairs only, whatever an implementation computes
    beyond them: forward 2*d*pairs, backward 6*d*pairs (logit recomputation, dx and dw), each
    also as a fraction of the measured bf16 matmul rate; and the speed-up over masked_dense."""
    dense = by_impl.get("masked_dense")
    for r in by_impl.values():
        if "skipped" in r:
            continue
        bwd_ms = max(r["time_ms"] - r["fwd_ms"], 1e-6)
        r["tflops"] = 8 * d * pairs / (r["time_ms"] / 1e3) / 1e12
        r["fwd_tflops"] = 2 * d * pairs / (r["fwd_ms"] / 1e3) / 1e12
        r["bwd_tflops"] = 6 * d * pairs / (bwd_ms / 1e3) / 1e12
        if matmul_tflops:
            for key in ("tflops", "fwd_tflops", "bwd_tflops"):
                r[f"{key}_of_matmul"] = r[key] / matmul_tflops
            r["fraction_of_matmul"] = r["tflops_of_matmul"]
        if dense is not None and "skipped" not in dense and r is not dense:
            r["speedup_vs_masked_dense"] = dense["time_ms"] / r["time_ms"]


def cpu_peak_mib(impl, rows, d, n_local, groups):
    """Peak RSS delta of one fwd+bwd, measured by a fresh child process (`--memory-probe`)."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--memory-probe",
        impl,
        str(rows),
        str(d),
        str(n_local),
        str(groups),
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]


def memory_probe(impl, rows, d, n_local, groups):
    """The child side of cpu_peak_mib: prints {"peak_mib": ...} as its last line."""
    map_large_allocations_fresh()
    case = make_case(rows, d, n_local, groups, torch.float32, torch.device("cpu"))
    fwd_bwd(LOSSES[impl], case)  # warm-up: lazy library state is not the loss's memory
    gc.collect()
    with RssPeak() as peak:
        fwd_bwd(LOSSES[impl], case)
    print(json.dumps({"peak_mib": peak.delta / MIB}))


def bf16_matmul_tflops(device, n=8192, repeats=10):
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    seconds = statistics.median(time_call(lambda: a @ b, device) for _ in range(repeats))
    return 2 * n**3 / seconds / 1e12


def free_bytes(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def machine_description(device):
    if device.type == "cuda":
        host = f"{os.cpu_count()}-core {platform.machine()} host"
        return f"{torch.cuda.get_device_name(device)}, {host}"
    return f"{os.cpu_count()}-core {platform.machine()} CPU, no GPU"


def _fmt(result, key, spec):
    return spec.format(result[key]) if key in result else ""


def markdown_table(results, cuda):
    head = ["n_local", "groups", "matched pairs", "implementation", "fwd+bwd ms", "runs", "peak MiB"]
    if cuda:
        head += ["matched TFLOP/s fwd / bwd / both", "of bf16 matmul (both)", "vs masked_dense"]
    lines = md_head(head)
    for r in results:
        cells = [f"{r['n_local']:,}", str(r["groups"]), f"{r['pairs']:,}", r["impl"]]
        if "skipped" in r:
            cells += [f"skipped: {r['skipped']}", "", ""] + (["", "", ""] if cuda else [])
        else:
            cells += [f"{r['time_ms']:.1f}", str(r["runs"]), f"{r['peak_mib']:.0f}"]
            if cuda:
                rates = [_fmt(r, k, "{:.1f}") for k in ("fwd_tflops", "bwd_tflops", "tflops")]
                cells += [
                    " / ".join(rates),
                    _fmt(r, "fraction_of_matmul", "{:.0%}"),
                    _fmt(r, "speedup_vs_masked_dense", "{:.1f}x"),
                ]
        lines.append(md_row(cells))
    return "\n".join(lines)


def run_case(impl, case, sizes, device, args):
    reason = why_not(impl, device, case["groups"])
    if reason:
        return dict(skipped=reason)
    need = estimated_bytes(impl, sizes["rows"], sizes["d"], case["n_local"], args.dtype)
    have = free_bytes(device)
    if need > args.memory_fraction * have:
        return dict(skipped=f"needs ~{need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB free")
    try:
        result = measure(LOSSES[impl], case, device, args.warmup, args.repeats, args.case_budget)
        if device.type == "cpu":
            result["peak_mib"] = cpu_peak_mib(impl, sizes["rows"], sizes["d"], case["n_local"], case["groups"])
        return result
    except torch.OutOfMemoryError:
        return dict(skipped="out of memory")
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--memory-probe"]:
        impl, *numbers = argv[1:]
        return memory_probe(impl, *map(int, numbers))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--rows", type=int, help="default: 4096 on CUDA, 512 on CPU")
    parser.add_argument("--d", type=int, help="default: 512 on CUDA, 128 on CPU")
    parser.add_argument("--n-local", type=int, nargs="+", help="default: see module docstring")
    parser.add_argument("--groups", type=int, nargs="+", help="default: 1 12 100")
    parser.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case, at most")
    parser.add_argument(
        "--case-budget",
        type=float,
        default=10.0,
        help="stop timing a case once its timed runs add up to this many seconds",
    )
    parser.add_argument(
        "--memory-fraction",
        type=float,
        default=0.6,
        help="skip a case whose estimated peak exceeds this share of free memory",
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON results")
    parser.add_argument("--md", type=Path, help="also write a Markdown report here")
    args = parser.parse_args(argv)

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    cuda = device.type == "cuda"
    sizes = dict(GPU_SIZES if cuda else CPU_SIZES)
    overrides = dict(rows=args.rows, d=args.d, n_local=args.n_local, groups=args.groups)
    sizes.update({key: value for key, value in overrides.items() if value})
    args.dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)

    meta = dict(
        command=command_line(argv),
        machine=machine_description(device),
        date=shell_date(),
        load_average_at_start=os.getloadavg(),
        commit=git_commit(),
        torch=torch.__version__,
        device=str(device),
        dtype=str(args.dtype),
        threads=torch.get_num_threads(),
        rows=sizes["rows"],
        d=sizes["d"],
        warmup=args.warmup,
        repeats=args.repeats,
        memory=(
            "torch.cuda.max_memory_allocated above the allocation before the call"
            if cuda
            else "peak RSS above the RSS before the call, sampled every 2 ms (psutil), in a fresh "
            "child process per case with glibc's mmap threshold fixed at 1 MiB"
        ),
        time=f"median of up to {args.repeats} timed runs (fewer once a case's runs pass "
        f"{args.case_budget:g} s), one forward + backward each",
    )
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    if cuda:
        meta["bf16_matmul_tflops"] = bf16_matmul_tflops(device)

    results = []
    for n_local in sizes["n_local"]:
        for groups in sizes["groups"]:
            case = make_case(sizes["rows"], sizes["d"], n_local, groups, args.dtype, device)
            case.update(n_local=n_local, groups=groups)
            by_impl = {}
            for impl in args.impls:
                r = dict(n_local=n_local, groups=groups, pairs=case["pairs"], impl=impl)
                r.update(run_case(impl, case, sizes, device, args))
                by_impl[impl] = r
                results.append(r)
                print(
                    f"n_local={n_local} groups={groups} {impl}: "
                    + (
                        f"skipped ({r['skipped']})"
                        if "skipped" in r
                        else f"{r['time_ms']:.1f} ms, {r['peak_mib']:.0f} MiB"
                    ),
                    flush=True,
                )
            add_rates(by_impl, sizes["d"], case["pairs"], meta.get("bf16_matmul_tflops"))
            del case
            gc.collect()

    meta["load_average_at_end"] = os.getloadavg()
    table = markdown_table(results, cuda)
    print()
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, results=results), indent=2) + "\n")
    if args.md:
        header = [
            f"# Grouped logsumexp benchmark ({meta['machine']})",
            "",
            f"- command: `{meta['command']}`",
            f"- machine: {meta['machine']}",
            f"- date: {meta['date']}",
            f"- commit: {meta['commit']}",
            f"- torch {meta['torch']}, triton {meta.get('triton', '-')}, {meta['dtype']}, {meta['threads']} threads",
            f"- rows={meta['rows']}, d={meta['d']}; time: {meta['time']}, after {meta['warmup']} warm-up run(s)",
            f"- peak memory: {meta['memory']}",
            "- 1/5/15-minute load average at start {} and end {} (other work on the "
            "machine slows and scatters the times)".format(
                *(", ".join(f"{v:.1f}" for v in meta[k]) for k in ("load_average_at_start", "load_average_at_end"))
            ),
        ]
        if cuda:
            header.append(f"- bf16 matmul rate: {meta['bf16_matmul_tflops']:.0f} TFLOP/s")
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text("\n".join(header) + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
