"""The fused Triton grouped logsumexp against fp64 truth, the PyTorch reference and masked CE.

Where the kernel runs: on a CUDA device when there is one; otherwise in Triton's interpreter
(TRITON_INTERPRET=1), which must be set before the kernel module is imported because @triton.jit
chooses interpreter or compiler when the decorator runs. Setting it in this process would also
leak into every other test of the session (e.g. `resolve_kernel` accepts kernel='triton' on CPU
only under it). So on a CPU-only machine the kernel tests run in a child pytest process on this
same file with TRITON_INTERPRET=1 set, launched by `test_kernel_suite_in_interpreter`; in the
parent they are skipped with that reason. Running this file with TRITON_INTERPRET=1 already set
runs them directly.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ON_GPU = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
RUN_KERNEL_HERE = ON_GPU or INTERPRETED
DEVICE = "cuda" if ON_GPU else "cpu"
ROOT = Path(__file__).resolve().parents[2]

kernel_test = pytest.mark.skipif(
    not RUN_KERNEL_HERE,
    reason="no GPU: run by test_kernel_suite_in_interpreter in a TRITON_INTERPRET=1 subprocess",
)


@pytest.mark.skipif(RUN_KERNEL_HERE, reason="the kernel tests run in this process")
def test_kernel_suite_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore::RuntimeWarning")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-W",
        "ignore::RuntimeWarning",
        str(Path(__file__).resolve()),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    summary = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
    print("interpreter subprocess:", *summary)
    assert proc.returncode == 0, f"interpreter subprocess failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"


def test_kernels_compile_for_hopper():
    """The interpreter accepts code that the compiler rejects: build all three kernels for sm_90
    down to a cubin (Triton's bundled ptxas), for each dtype. No GPU is needed for this."""
    if INTERPRETED:
        pytest.skip("under TRITON_INTERPRET=1 the kernels are not compiled")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.compiler import compile as triton_compile
    except ImportError as err:  # internal API, may move between Triton releases
        pytest.skip(f"Triton compile API not available: {err}")
    from fgdist.kernels import triton_grouped_lse as K

    fp32_buffers = {"lse_ptr", "target_logit_ptr", "grad_lse_ptr", "grad_tgt_ptr"}
    data = {"x_ptr", "w_ptr", "dx_ptr", "dw_ptr"}
    for dtype, name in [(torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float32, "fp32")]:
        tiles = K.default_tiles(512, torch.device("cuda"))
        meta = K._meta(tiles, dtype, with_block_d=True)
        for kernel in (K._forward_kernel, K._dx_kernel, K._dw_kernel):
            signature, constexprs = {}, {}
            for i, param in enumerate(kernel.params):
                if param.is_constexpr:
                    signature[param.name] = "constexpr"
                    constexprs[(i,)] = meta[param.name]
                elif param.name in data:
                    signature[param.name] = f"*{name}"
                elif param.name in fp32_buffers:
                    signature[param.name] = "*fp32"
                else:
                    signature[param.name] = "*i32" if param.name.endswith("_ptr") else "i32"
            compiled = triton_compile(
                ASTSource(kernel, signature, constexprs=constexprs),
                target=GPUTarget("cuda", 90, 32),
                options={"num_warps": meta["num_warps"], "num_stages": meta["num_stages"]},
            )
            assert "cubin" in compiled.asm, (kernel.__name__, name)


if RUN_KERNEL_HERE:
    from fgdist.kernels import grouped_lse
    from fgdist.kernels.reference import grouped_lse_torch
    from fgdist.kernels.triton_grouped_lse import (
        Tiles,
        _column_tile_rows,
        _plan_rows,
        _row_tile_columns,
        grouped_lse_triton,
    )

    # Small tiles: a few hundred columns span many column tiles, 37 rows span several row
    # tiles, and d = 45 is not a multiple of block_k or block_d (masked d loops).
    SMALL = Tiles(block_m=16, block_n=32, block_k=16, block_d=32)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Slack on top of "no worse than torch in the same dtype", relative to the quantity's scale:
# a few units in the last place. fp32 needs a few: the kernel adds the target term after the
# softmax sums (torch subtracts the one-hot first), which costs a few ulps where they cancel.
REL_TOL = {torch.float32: 2**-20, torch.bfloat16: 2**-8, torch.float16: 2**-11}


# ---------------------------------------------------------------------------------------------
# Problems and oracles
# ---------------------------------------------------------------------------------------------


def group_sizes(gen, n_cols, n_groups):
    """Random positive sizes summing to n_cols, including a size-1 group when n_groups > 1."""
    if n_groups == 1:
        return [n_cols]
    cuts = torch.randperm(n_cols - 2, generator=gen)[: n_groups - 2].sort().values + 1
    rest = torch.diff(torch.tensor([0, *cuts.tolist(), n_cols - 1])).tolist()
    sizes = [1, *rest]
    perm = torch.randperm(n_groups, generator=gen).tolist()
    return [sizes[i] for i in perm]


def make_problem(seed, n_groups, rows=37, d=45, n_cols=301, sizes=None):
    gen = torch.Generator().manual_seed(seed)
    sizes = sizes if sizes is not None else group_sizes(gen, n_cols, n_groups)
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    n = int(offsets[-1])
    x = torch.randn(rows, d, generator=gen, dtype=torch.float64)
    w = torch.randn(n, d, generator=gen, dtype=torch.float64) * 0.3
    row_group = torch.randint(0, len(sizes), (rows,), generator=gen)
    lo, hi = offsets[row_group], offsets[row_group + 1]
    span = (hi - lo).clamp(min=1)
    target = torch.where(hi > lo, lo + torch.randint(0, 10**6, (rows,), generator=gen) % span, -1)
    grad_lse = torch.randn(rows, generator=gen, dtype=torch.float64)
    grad_tgt = torch.randn(rows, generator=gen, dtype=torch.float64)
    return dict(x=x, w=w, row_group=row_group, offsets=offsets, target=target, grad_lse=grad_lse, grad_tgt=grad_tgt)


def rounded_to(p, dtype):
    """The problem with x and w rounded to dtype (kept in fp64), so the fp64 truth is exact for
    the very inputs the dtype run sees and only computation error is compared."""
    return dict(p, x=p["x"].to(dtype).double(), w=p["w"].to(dtype).double())


def group_mask(row_group, offsets, n_cols):
    col = torch.arange(n_cols)
    valid = row_group >= 0
    g = row_group.clamp(min=0)
    lo, hi = offsets[g].unsqueeze(1), offsets[g + 1].unsqueeze(1)
    return (col >= lo) & (col < hi) & valid.unsqueeze(1)


def dense_grouped_lse(x, w, row_group, offsets, target):
    """Materialized masked logits in x's dtype: the 'torch in the same dtype' and fp64 oracle."""
    logits = x @ w.T
    mask = group_mask(row_group, offsets, w.shape[0])
    lse = torch.logsumexp(logits.masked_fill(~mask, float("-inf")), dim=1)
    tgt = torch.where(
        target >= 0, logits.gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1), torch.zeros((), dtype=logits.dtype)
    )
    return lse, tgt


def leaf(t, device, dtype):
    return t.detach().to(device, dtype).clone().requires_grad_()


def run(fn, p, dtype, device="cpu"):
    """Values and gradients of fn(x, w, ...) under upstream gradients (grad_lse, grad_tgt)."""
    x, w = leaf(p["x"], device, dtype), leaf(p["w"], device, dtype)
    lse, tgt = fn(x, w, p["row_group"].to(device), p["offsets"].to(device), p["target"].to(device))
    finite = torch.isfinite(lse)
    g_lse = p["grad_lse"].to(device, lse.dtype)
    g_tgt = p["grad_tgt"].to(device, tgt.dtype)
    (torch.where(finite, lse, 0) * g_lse).sum().add((tgt * g_tgt).sum()).backward()
    return [t.detach().cpu().double() for t in (lse, tgt, x.grad, w.grad)]


def kernel(tiles=None):
    return lambda *args: grouped_lse_triton(*args, tiles=tiles)


def assert_no_worse_than_torch(got, same_dtype_torch, truth, dtype, what):
    """|kernel - fp64| <= |torch in the same dtype - fp64| + tol, in max norm."""
    for name, k, t, ref in zip(("lse", "target", "dx", "dw"), got, same_dtype_torch, truth):
        finite = torch.isfinite(ref)
        assert torch.equal(torch.isfinite(k), finite), f"{what} {name}: -inf pattern differs"
        err_k = (k[finite] - ref[finite]).abs().max().item()
        err_t = (t[finite] - ref[finite]).abs().max().item()
        tol = REL_TOL[dtype] * max(ref[finite].abs().max().item(), 1.0)
        assert err_k <= err_t + tol, f"{what} {name}: kernel err {err_k:.3g} > torch err {err_t:.3g} + {tol:.3g}"


def masked_cross_entropy(x, w, row_group, offsets, target):
    """F.cross_entropy over logits masked to the row's group: per-row lse - target."""
    logits = (x @ w.T).masked_fill(~group_mask(row_group, offsets, w.shape[0]), float("-inf"))
    return F.cross_entropy(logits, target, reduction="none")


def loss_and_grads(fn, p, dtype, device="cpu"):
    x, w = leaf(p["x"], device, dtype), leaf(p["w"], device, dtype)
    loss = fn(x, w, p["row_group"].to(device), p["offsets"].to(device), p["target"].to(device))
    loss.sum().backward()
    return [t.detach().cpu().double() for t in (loss, x.grad, w.grad)]


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@kernel_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed,n_groups", [(0, 1), (1, 2), (2, 4), (3, 7), (4, 7)])
def test_values_and_gradients_against_fp64_truth_and_reference(seed, n_groups, dtype):
    p = rounded_to(make_problem(seed, n_groups), dtype)
    got = run(kernel(SMALL), p, dtype, DEVICE)
    truth = run(dense_grouped_lse, p, torch.float64)
    same_dtype = run(dense_grouped_lse, p, dtype)
    assert_no_worse_than_torch(got, same_dtype, truth, dtype, f"seed {seed}")
    # The PyTorch reference (fp32 accumulation as well) agrees to the output dtype's precision.
    reference = run(grouped_lse_torch, p, dtype)
    for name, k, r in zip(("lse", "target", "dx", "dw"), got, reference):
        eps = torch.finfo(dtype).eps
        assert torch.allclose(k, r, rtol=4 * eps, atol=4 * eps * r.abs().max().item()), name


@kernel_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed,n_groups", [(5, 3), (6, 7)])
def test_loss_matches_cross_entropy_on_masked_logits(seed, n_groups, dtype):
    p = rounded_to(make_problem(seed, n_groups), dtype)

    def fused_loss(*args):
        lse, tgt = grouped_lse_triton(*args, tiles=SMALL)
        return lse - tgt

    got = loss_and_grads(fused_loss, p, dtype, DEVICE)
    truth = loss_and_grads(masked_cross_entropy, p, torch.float64)
    same_dtype = loss_and_grads(masked_cross_entropy, p, dtype)
    for name, k, t, ref in zip(("loss", "dx", "dw"), got, same_dtype, truth):
        err_k, err_t = (k - ref).abs().max().item(), (t - ref).abs().max().item()
        tol = REL_TOL[dtype] * max(ref.abs().max().item(), 1.0)
        assert err_k <= err_t + tol, f"{name}: kernel err {err_k:.3g} > torch err {err_t:.3g} + {tol:.3g}"


@kernel_test
def test_rows_without_local_columns_and_targets_outside_the_group():
    # Group 2 is empty here; rows 0-4 have no local group, rows 5-7 sit in the empty group.
    p = make_problem(7, None, sizes=[40, 1, 0, 120, 60, 80])
    rg, tgt = p["row_group"], p["target"]
    rg[:5] = -1
    tgt[:3] = -1
    rg[5:8] = 2
    rg[8:][rg[8:] == 2] = 3  # every other row has columns (their targets stay as drawn)
    # Rows 3-4 (group -1) and 5-7 (empty group) keep a local target: the contract still wants
    # x_i . w_target for them, and its gradient.
    tgt[3:8] = torch.tensor([0, 150, 40, 299, 40])
    got = run(kernel(SMALL), p, torch.float32, DEVICE)
    truth = run(dense_grouped_lse, p, torch.float64)
    lse, t, dx, dw = got
    assert torch.isneginf(lse[:8]).all() and torch.isfinite(lse[8:]).all()
    assert (t[:3] == 0).all()
    assert torch.allclose(t, truth[1], atol=1e-5)
    assert torch.allclose(dx, truth[2], atol=1e-5) and torch.allclose(dw, truth[3], atol=1e-5)
    # Rows without columns or target get no gradient at all.
    assert (dx[:3] == 0).all()


@kernel_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_mode_equals_full_cross_entropy(dtype):
    p = rounded_to(make_problem(8, 1, rows=40, n_cols=257), dtype)
    p["row_group"].zero_()
    p["offsets"] = torch.tensor([0, 257])
    p["target"] = torch.randint(0, 257, (40,), generator=torch.Generator().manual_seed(8))

    def fused_loss(*args):
        lse, tgt = grouped_lse(*args, kernel="triton")  # default tiles
        return lse - tgt

    def full_ce(x, w, row_group, offsets, target):
        return F.cross_entropy(x @ w.T, target, reduction="none")

    got = loss_and_grads(fused_loss, p, dtype, DEVICE)
    truth = loss_and_grads(full_ce, p, torch.float64)
    same_dtype = loss_and_grads(full_ce, p, dtype)
    for name, k, t, ref in zip(("loss", "dx", "dw"), got, same_dtype, truth):
        err_k, err_t = (k - ref).abs().max().item(), (t - ref).abs().max().item()
        assert err_k <= err_t + REL_TOL[dtype] * max(ref.abs().max().item(), 1.0), name


@kernel_test
def test_one_group_spanning_many_tiles():
    # A 250-column group spans 8+ column tiles of 32 and most rows; d = 45 straddles block_k.
    p = make_problem(9, None, rows=50, sizes=[20, 250, 1, 30])
    got = run(kernel(SMALL), p, torch.float32, DEVICE)
    truth = run(dense_grouped_lse, p, torch.float64)
    for k, ref in zip(got, truth):
        assert torch.allclose(k, ref, rtol=1e-5, atol=1e-5)


@kernel_test
def test_tiles_visit_only_the_columns_and_rows_of_their_groups():
    """The block-sparse ranges are exactly the hull of each tile's groups."""
    p = make_problem(10, None, rows=37, sizes=[5, 0, 90, 1, 64, 141])
    rg = p["row_group"]
    rg[-3:] = -1
    plan = _plan_rows(rg, p["offsets"], p["target"])
    lo, hi = plan.lo.long(), plan.hi.long()
    col_lo, col_hi = _row_tile_columns(plan, SMALL.block_m)
    for tile, (a, b) in enumerate(zip(col_lo.tolist(), col_hi.tolist())):
        rows = slice(tile * SMALL.block_m, (tile + 1) * SMALL.block_m)
        has = hi[rows] > lo[rows]
        if has.any():
            assert (a, b) == (lo[rows][has].min().item(), hi[rows][has].max().item())
        else:
            assert a >= b  # nothing to visit
    n_cols = int(p["offsets"][-1])
    start, end = _column_tile_rows(plan, n_cols, SMALL.block_n)
    for tile, (a, b) in enumerate(zip(start.tolist(), end.tolist())):
        c0, c1 = tile * SMALL.block_n, min((tile + 1) * SMALL.block_n, n_cols)
        overlap = ((hi > c0) & (lo < c1) & (hi > lo)).nonzero().flatten()
        if len(overlap):
            assert a <= overlap.min().item() and overlap.max().item() < b
            # No row outside the overlap except rows of empty groups inside the band.
            assert ((hi[a:b] > c0) & (lo[a:b] < c1) | (hi[a:b] == lo[a:b])).all()
    # With several groups, far fewer (row tile, column tile) pairs than dense are visited.
    visited = sum(
        max(0, -(-b // SMALL.block_n) - a // SMALL.block_n) for a, b in zip(col_lo.tolist(), col_hi.tolist()) if b > a
    )
    assert visited < len(col_lo) * -(-n_cols // SMALL.block_n)


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_is_bitwise_deterministic(dtype):
    p = make_problem(11, 5, rows=48)
    p["target"][1::2] = p["target"][0::2][: len(p["target"][1::2])]  # shared target columns
    p["row_group"][1::2] = p["row_group"][0::2][: len(p["row_group"][1::2])]
    first = run(kernel(SMALL), p, dtype, DEVICE)
    second = run(kernel(SMALL), p, dtype, DEVICE)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@kernel_test
def test_mixed_input_dtypes_return_gradients_in_each_dtype():
    p = make_problem(12, 3)
    x, w = leaf(p["x"], DEVICE, torch.bfloat16), leaf(p["w"], DEVICE, torch.float32)
    lse, tgt = grouped_lse_triton(
        x, w, p["row_group"].to(DEVICE), p["offsets"].to(DEVICE), p["target"].to(DEVICE), tiles=SMALL
    )
    (lse.sum() - tgt.sum()).backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32


@kernel_test
def test_dispatch_triton_matches_torch():
    p = make_problem(13, 4)
    via_triton = run(lambda *a: grouped_lse(*a, kernel="triton"), p, torch.float32, DEVICE)
    via_torch = run(lambda *a: grouped_lse(*a, kernel="torch"), p, torch.float32)
    for a, b in zip(via_triton, via_torch):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


@kernel_test
def test_objective_with_a_pool_on_triton_matches_torch():
    """Unlabeled images are one more group (the pool, 150 columns after 3 super-classes) for the
    kernel, whose contract is unchanged: the objective's loss and gradients with head.kernel=triton
    equal those with the PyTorch reference."""
    from fgdist.config import validate
    from fgdist.data.partition import make_plan
    from fgdist.training.head import InstanceHead
    from fgdist.training.objectives import Objective
    from tests.helpers import manifest_with_sizes

    plan = make_plan(manifest_with_sizes([40, 90, 21], pool=150), 1)
    gen = torch.Generator().manual_seed(14)
    instance_ids = torch.randint(0, plan.num_instances, (37,), generator=gen)
    super_ids = torch.bucketize(instance_ids, torch.tensor([40, 130, 151]), right=True)
    super_ids[super_ids == 3] = -1  # the pool's rows
    features = torch.randn(37, 45, generator=gen)
    logits = torch.randn(37, 3, generator=gen)
    results = []
    for kernel_name in ("triton", "torch"):
        cfg = validate({"objective": {"lambda_U": 0.5}, "head": {"kernel": kernel_name}}, "test")
        head = InstanceHead(plan, 0, 45, seed=2).to(DEVICE)
        x, lg = leaf(features, DEVICE, torch.float32), leaf(logits, DEVICE, torch.float32)
        objective = Objective(cfg, plan, 0, head).to(DEVICE)
        parts = objective({"features": x, "super_logits": lg}, super_ids.to(DEVICE), -1, instance_ids.to(DEVICE))
        parts["loss"].backward()
        results.append(
            [parts["pool_ce"].detach().cpu(), parts["loss"].detach().cpu(), x.grad.cpu(), head.weight.grad.cpu()]
        )
    assert (super_ids == -1).sum() > 5 and results[0][0] > 0
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
