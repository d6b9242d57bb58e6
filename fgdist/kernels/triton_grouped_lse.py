"""Fused Triton kernel for the grouped masked logsumexp (docs/DESIGN.md, "The kernel contract").

The contract is in fgdist/kernels/__init__.py; fgdist/kernels/reference.py is the oracle.

Layout. The wrapper sorts rows by group (rows with group -1 go last), so that every group's rows
are contiguous and, because group g owns the contiguous columns [col_offsets[g], col_offsets[g+1])
and offsets increase with g, the matched (row, column) pairs form a block-diagonal band:

  * a row tile only visits the column tiles between the first column of its first group and the
    last column of its last group (`_row_tile_columns`);
  * a column tile only visits the rows whose group overlaps it, a contiguous range of sorted rows
    (`_column_tile_rows`).

Inside a tile every element is masked so that row i only counts the columns of its own group.
Nothing rows x n_local is ever stored: the forward keeps an online logsumexp per row and the
backward recomputes the logits tile by tile, as flash attention does.

Determinism. dx and dw come from separate kernels. Each program owns a disjoint block of its
output and walks its inputs in a fixed order, so there are no atomics and repeated backward passes
are bitwise identical.

The target term. target_logit[i] = x_i . w[target_col[i]] for any local target column (the
reference allows one outside row i's group, even for a row whose group is -1), so it is kept
apart from the group band and computed in fp32 from gathered rows: a dot product per row in the
forward, g_target_i * w_target added per row in dx, and in dw a second loop over the rows sorted
by target column, which sums rows that share a target in a fixed order.

Precision. Products take the input dtype with fp32 accumulation. The backward weights
(softmax, times the upstream gradient for dw) are fp32; for 16-bit inputs they enter the
products as a hi + lo pair in the input dtype (two products instead of one). A single bf16
rounding would keep 8 bits, and a cross-entropy gradient cancels at the target column
(softmax_t - 1 for a confident row), which turns that rounding into a large relative error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class Tiles:
    """Tile sizes (powers of two, at least 16 because tl.dot needs it on GPUs)."""

    block_m: int  # rows per tile
    block_n: int  # columns per tile
    block_k: int  # chunk of d per step when computing logits (the d loop is masked)
    block_d: int  # output features per backward program; d > block_d recomputes logits per chunk
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k", "block_d"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"Tiles.{name} must be a power of two >= 16, got {size}")


def default_tiles(d: int, device: torch.device) -> Tiles:
    """Tiles for a feature size.

    GPU: chosen so that the three kernels compile for sm_90 without register spills in bf16 and
    fp16 (checked with ptxas; fp32 spills a few bytes); not yet timed on hardware. A wider
    block_d would save logit recomputation for large d but spills the [tile, block_d] fp32
    accumulator.
    """
    out_features = max(16, min(triton.next_power_of_2(d), 128))
    if device.type == "cuda":
        return Tiles(block_m=64, block_n=64, block_k=32, block_d=out_features, num_warps=8)
    # The interpreter runs each tile op through NumPy: bigger tiles mean fewer Python steps.
    return Tiles(block_m=32, block_n=64, block_k=64, block_d=min(out_features, 64))


# ---------------------------------------------------------------------------------------------
# Triton building blocks
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation.

    UPCAST is set only under TRITON_INTERPRET=1 for bf16: the interpreter stores bf16 as uint16
    and its tl.dot multiplies the bit patterns (triton-lang/triton#11584). fp32 operands hold
    bf16 values exactly and their products are exact, which is what bf16 tensor cores compute.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _logits_tile(
    x_ptr,
    w_ptr,
    rows,
    cols,
    row_ok,
    col_ok,
    d,
    stride_x,
    stride_w,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """fp32 logits x[rows] . w[cols]^T for one tile, d walked in masked chunks of BLOCK_K."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
    for k0 in range(0, d, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < d
        xt = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _dot(xt, tl.trans(wt), acc, PRECISION, UPCAST)
    return acc


@triton.jit
def _in_group(lo, hi, cols):
    """[rows, cols] mask: column j belongs to row i's group [lo_i, hi_i)."""
    return (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])


@triton.jit
def _softmax_weights(s, lo, hi, cols, lse):
    """exp(s - lse) inside each row's group, 0 elsewhere (fp32).

    Rows without a local column have lse = -inf and an all-false mask; they are shifted by 0
    instead so that no inf - inf NaN is formed, even in the discarded branch.
    """
    shift = tl.where(lse == float("-inf"), 0.0, lse)
    return tl.where(_in_group(lo, hi, cols), tl.exp(s - shift[:, None]), 0.0)


@triton.jit
def _dot_weights(wts, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + wts @ b for fp32 weights and b in the input dtype.

    For 16-bit b the weights go in as hi + lo, both in b's dtype: about 16 significant bits
    instead of 8 for bf16, for one more product (see the module docstring).
    """
    if b.dtype == tl.float32:
        return _dot(wts, b, acc, PRECISION, UPCAST)
    hi = wts.to(b.dtype)
    lo = (wts - hi.to(tl.float32)).to(b.dtype)
    acc = _dot(hi, b, acc, PRECISION, UPCAST)
    return _dot(lo, b, acc, PRECISION, UPCAST)


@triton.jit
def _target_logit(x_ptr, w_ptr, rows, row_ok, tgt, d, stride_x, stride_w, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """x_i . w[target_i] in fp32 (0 where target_i is -1), a gathered row per target."""
    has = row_ok & (tgt >= 0)
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    w_rows = w_ptr + tgt.to(tl.int64)[:, None] * stride_w
    for k0 in range(0, d, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        m = has[:, None] & (ks < d)[None, :]
        xt = tl.load(x_rows + ks[None, :], mask=m, other=0.0).to(tl.float32)
        wt = tl.load(w_rows + ks[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(xt * wt, axis=1)
    return acc


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _forward_kernel(
    x_ptr,
    w_ptr,
    lo_ptr,
    hi_ptr,
    tgt_ptr,
    tile_col_lo_ptr,
    tile_col_hi_ptr,
    lse_ptr,
    target_logit_ptr,
    n_rows,
    n_cols,
    d,
    stride_x,
    stride_w,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One program per row tile: online logsumexp over the column tiles of its groups."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    lo = tl.load(lo_ptr + rows, mask=row_ok, other=0)
    hi = tl.load(hi_ptr + rows, mask=row_ok, other=0)
    col_lo = tl.load(tile_col_lo_ptr + pid)
    col_hi = tl.load(tile_col_hi_ptr + pid)

    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max
    total = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp(logit - m)
    for c0 in range(col_lo // BLOCK_N * BLOCK_N, col_hi, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        s = _logits_tile(
            x_ptr,
            w_ptr,
            rows,
            cols,
            row_ok,
            cols < n_cols,
            d,
            stride_x,
            stride_w,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            PRECISION,
            UPCAST,
        )
        s = tl.where(_in_group(lo, hi, cols), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # A row that has met no column of its group yet still has max -inf: shift it by 0 so
        # that exp(-inf - shift) is 0 rather than NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        total = total * tl.exp(m - shift) + tl.sum(tl.exp(s - shift[:, None]), axis=1)
        m = m_new
    # total == 0: no column of the row's group was seen (log is given 1 to avoid evaluating log 0).
    lse = tl.where(total > 0, m + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
    tl.store(lse_ptr + rows, lse, mask=row_ok)

    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    t = _target_logit(x_ptr, w_ptr, rows, row_ok, tgt, d, stride_x, stride_w, BLOCK_M, BLOCK_K)
    tl.store(target_logit_ptr + rows, t, mask=row_ok)


@triton.jit
def _dx_kernel(
    x_ptr,
    w_ptr,
    lo_ptr,
    hi_ptr,
    tgt_ptr,
    lse_ptr,
    grad_lse_ptr,
    grad_tgt_ptr,
    tile_col_lo_ptr,
    tile_col_hi_ptr,
    dx_ptr,
    n_rows,
    n_cols,
    d,
    stride_x,
    stride_w,
    stride_dx,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One program per (row tile, feature chunk): dx = g * softmax @ w + g_target * w_target."""
    pid = tl.program_id(0)
    fs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # output features of this program
    f_ok = fs < d
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    lo = tl.load(lo_ptr + rows, mask=row_ok, other=0)
    hi = tl.load(hi_ptr + rows, mask=row_ok, other=0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("-inf"))
    col_lo = tl.load(tile_col_lo_ptr + pid)
    col_hi = tl.load(tile_col_hi_ptr + pid)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for c0 in range(col_lo // BLOCK_N * BLOCK_N, col_hi, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        s = _logits_tile(
            x_ptr,
            w_ptr,
            rows,
            cols,
            row_ok,
            col_ok,
            d,
            stride_x,
            stride_w,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            PRECISION,
            UPCAST,
        )
        p = _softmax_weights(s, lo, hi, cols, lse)
        wf = tl.load(
            w_ptr + cols.to(tl.int64)[:, None] * stride_w + fs[None, :], mask=col_ok[:, None] & f_ok[None, :], other=0.0
        )
        acc = _dot_weights(p, wf, acc, PRECISION, UPCAST)
    # The upstream gradient multiplies after the sum, so the weights stay in [0, 1] and a small
    # gradient cannot push them out of fp16's range.
    g = tl.load(grad_lse_ptr + rows, mask=row_ok, other=0.0)
    dx = acc * g[:, None]

    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    gt = tl.load(grad_tgt_ptr + rows, mask=row_ok, other=0.0)
    has = row_ok & (tgt >= 0)
    wt = tl.load(
        w_ptr + tgt.to(tl.int64)[:, None] * stride_w + fs[None, :], mask=has[:, None] & f_ok[None, :], other=0.0
    )
    dx += gt[:, None] * wt.to(tl.float32)

    out = dx_ptr + rows.to(tl.int64)[:, None] * stride_dx + fs[None, :]
    tl.store(out, dx.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & f_ok[None, :])


@triton.jit
def _dw_kernel(
    x_ptr,
    w_ptr,
    lo_ptr,
    hi_ptr,
    lse_ptr,
    grad_lse_ptr,
    grad_tgt_ptr,
    tile_row_start_ptr,
    tile_row_end_ptr,
    by_target_row_ptr,
    by_target_col_ptr,
    tile_tgt_start_ptr,
    tile_tgt_end_ptr,
    dw_ptr,
    n_cols,
    d,
    stride_x,
    stride_w,
    stride_dw,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One program per (column tile, feature chunk): dw = (g * softmax)^T @ x + target term."""
    pid = tl.program_id(0)
    fs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    f_ok = fs < d
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Softmax term: the sorted rows whose group overlaps this column tile.
    row_start = tl.load(tile_row_start_ptr + pid)
    row_end = tl.load(tile_row_end_ptr + pid)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        lo = tl.load(lo_ptr + rows, mask=row_ok, other=0)
        hi = tl.load(hi_ptr + rows, mask=row_ok, other=0)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("-inf"))
        g = tl.load(grad_lse_ptr + rows, mask=row_ok, other=0.0)
        s = _logits_tile(
            x_ptr,
            w_ptr,
            rows,
            cols,
            row_ok,
            col_ok,
            d,
            stride_x,
            stride_w,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            PRECISION,
            UPCAST,
        )
        # The upstream gradient cannot be factored out of a sum over rows: it goes into the fp32
        # weights (not onto x, whose rounding would add an error per row). In fp16, as in torch,
        # weights below its subnormal range (6e-8) then vanish: use loss scaling with fp16.
        p = _softmax_weights(s, lo, hi, cols, lse) * g[:, None]
        xf = tl.load(
            x_ptr + rows.to(tl.int64)[:, None] * stride_x + fs[None, :], mask=row_ok[:, None] & f_ok[None, :], other=0.0
        )
        acc = _dot_weights(tl.trans(p), xf, acc, PRECISION, UPCAST)

    # Target term: rows sorted by target column, those whose target falls in this tile. A
    # one-hot dot sums rows that share a target in a fixed order (no atomics).
    t_start = tl.load(tile_tgt_start_ptr + pid)
    t_end = tl.load(tile_tgt_end_ptr + pid)
    for t0 in range(t_start, t_end, BLOCK_M):
        pos = t0 + tl.arange(0, BLOCK_M)
        pos_ok = pos < t_end
        rows = tl.load(by_target_row_ptr + pos, mask=pos_ok, other=0)
        tcol = tl.load(by_target_col_ptr + pos, mask=pos_ok, other=-1)
        gt = tl.load(grad_tgt_ptr + rows, mask=pos_ok, other=0.0)
        xf = tl.load(
            x_ptr + rows.to(tl.int64)[:, None] * stride_x + fs[None, :], mask=pos_ok[:, None] & f_ok[None, :], other=0.0
        )
        one_hot = (cols[:, None] == tcol[None, :]).to(tl.float32)
        # tf32x3: fp32-accurate products on tensor cores (an "ieee" fp32 dot spills registers).
        acc = tl.dot(one_hot, xf.to(tl.float32) * gt[:, None], acc, input_precision="tf32x3")

    out = dw_ptr + cols.to(tl.int64)[:, None] * stride_dw + fs[None, :]
    tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=col_ok[:, None] & f_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Host side: the row order and the block-sparse tile ranges
# ---------------------------------------------------------------------------------------------


@dataclass
class _RowPlan:
    """Rows sorted by group and each sorted row's column range, all on x's device."""

    order: torch.Tensor  # sorted position -> original row
    lo: torch.Tensor  # int32 [R] first column of the sorted row's group
    hi: torch.Tensor  # int32 [R] end column of the sorted row's group (lo == hi: no column)
    target: torch.Tensor  # int32 [R] target column of the sorted row, or -1


def _plan_rows(row_group, col_offsets, target_col) -> _RowPlan:
    """Sort rows by group, rows with group -1 last.

    Group -1 is given the empty range [offsets[G], offsets[G]) after the last group, so lo and hi
    are non-decreasing along the sorted rows: this is what lets a column tile find its rows with
    a binary search. Groups without a local column also get an empty range.
    """
    n_groups = col_offsets.numel() - 1
    key = torch.where(row_group < 0, torch.full_like(row_group, n_groups), row_group)
    order = torch.argsort(key, stable=True)
    bounds = torch.cat([col_offsets, col_offsets[-1:]])
    key_sorted = key[order]

    def int32(t):
        return t.to(torch.int32).contiguous()

    return _RowPlan(
        order=order, lo=int32(bounds[key_sorted]), hi=int32(bounds[key_sorted + 1]), target=int32(target_col[order])
    )


def _row_tile_columns(plan: _RowPlan, block_m: int):
    """Per row tile, [first column of its first group, end of its last group).

    Rows without a column are left out (neutral values), so a tile of such rows gets an empty
    range and its loop does not run.
    """
    n_rows = plan.lo.numel()
    n_tiles = triton.cdiv(n_rows, block_m)
    pad = n_tiles * block_m - n_rows
    has = plan.hi > plan.lo
    lo = torch.where(has, plan.lo, torch.full_like(plan.lo, _INT32_MAX))
    hi = torch.where(has, plan.hi, torch.zeros_like(plan.hi))
    lo = torch.nn.functional.pad(lo, (0, pad), value=_INT32_MAX).view(n_tiles, block_m)
    hi = torch.nn.functional.pad(hi, (0, pad), value=0).view(n_tiles, block_m)
    return lo.amin(dim=1).contiguous(), hi.amax(dim=1).contiguous()


def _column_tiles(n_cols: int, block_n: int, device):
    starts = torch.arange(0, n_cols, block_n, device=device, dtype=torch.int64)
    return starts, torch.clamp(starts + block_n, max=n_cols)


def _column_tile_rows(plan: _RowPlan, n_cols: int, block_n: int):
    """Per column tile [c0, c1), the sorted rows whose group overlaps it: [start, end).

    start = first row whose group ends after c0, end = first row whose group starts at or after
    c1; both searches are valid because lo and hi are non-decreasing (see _plan_rows).
    """
    c0, c1 = _column_tiles(n_cols, block_n, plan.lo.device)
    start = torch.searchsorted(plan.hi.to(torch.int64), c0, right=True)
    end = torch.searchsorted(plan.lo.to(torch.int64), c1, right=False)
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


def _column_tile_targets(plan: _RowPlan, n_cols: int, block_n: int):
    """Sorted rows re-sorted by target column (rows without one first, at -1), and per column
    tile the range of that order whose target falls in the tile."""
    by_target = torch.argsort(plan.target, stable=True)
    target_sorted = plan.target[by_target].to(torch.int64)
    c0, c1 = _column_tiles(n_cols, block_n, plan.lo.device)
    start = torch.searchsorted(target_sorted, c0)
    end = torch.searchsorted(target_sorted, c1)
    return (
        by_target.to(torch.int32).contiguous(),
        target_sorted.to(torch.int32).contiguous(),
        start.to(torch.int32).contiguous(),
        end.to(torch.int32).contiguous(),
    )


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: tf32x3 keeps fp32 accuracy on tensor cores (plain TF32 would lose about three
    # digits, "ieee" runs on the FMA units). 16-bit inputs multiply natively and ignore it.
    return "tf32x3" if dtype == torch.float32 else "tf32"


# @triton.jit returns an InterpretedFunction instead of a JITFunction under TRITON_INTERPRET=1.
_INTERPRETED = not isinstance(_forward_kernel, triton.runtime.JITFunction)


def _unsort(sorted_values: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(sorted_values)
    out[order] = sorted_values  # a permutation: every row written once, deterministic
    return out


# ---------------------------------------------------------------------------------------------
# Launchers (all tensors in sorted row order)
# ---------------------------------------------------------------------------------------------


def _meta(tiles: Tiles, dtype: torch.dtype, with_block_d: bool) -> dict:
    """Compile-time constants and launch options shared by the launchers."""
    meta = dict(
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        PRECISION=_dot_precision(dtype),
        UPCAST=_INTERPRETED and dtype == torch.bfloat16,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    if with_block_d:
        meta["BLOCK_D"] = tiles.block_d
    return meta


def _launch_forward(xs, w, plan: _RowPlan, tiles: Tiles):
    n_rows, d = xs.shape
    lse = torch.full((n_rows,), float("-inf"), dtype=torch.float32, device=xs.device)
    target_logit = torch.zeros(n_rows, dtype=torch.float32, device=xs.device)
    if n_rows == 0:
        return lse, target_logit
    col_lo, col_hi = _row_tile_columns(plan, tiles.block_m)
    grid = (col_lo.numel(),)
    _forward_kernel[grid](
        xs,
        w,
        plan.lo,
        plan.hi,
        plan.target,
        col_lo,
        col_hi,
        lse,
        target_logit,
        n_rows,
        w.shape[0],
        d,
        xs.stride(0),
        w.stride(0),
        **_meta(tiles, xs.dtype, False),
    )
    return lse, target_logit


def _launch_dx(xs, w, plan, lse, grad_lse, grad_tgt, tiles: Tiles, out_dtype):
    n_rows, d = xs.shape
    dx = torch.empty((n_rows, d), dtype=out_dtype, device=xs.device)
    if n_rows == 0:
        return dx
    col_lo, col_hi = _row_tile_columns(plan, tiles.block_m)
    grid = (col_lo.numel(), triton.cdiv(d, tiles.block_d))
    _dx_kernel[grid](
        xs,
        w,
        plan.lo,
        plan.hi,
        plan.target,
        lse,
        grad_lse,
        grad_tgt,
        col_lo,
        col_hi,
        dx,
        n_rows,
        w.shape[0],
        d,
        xs.stride(0),
        w.stride(0),
        dx.stride(0),
        **_meta(tiles, xs.dtype, True),
    )
    return dx


def _launch_dw(xs, w, plan, lse, grad_lse, grad_tgt, tiles: Tiles, out_dtype):
    n_cols, d = w.shape
    dw = torch.empty((n_cols, d), dtype=out_dtype, device=w.device)
    if n_cols == 0:
        return dw
    row_start, row_end = _column_tile_rows(plan, n_cols, tiles.block_n)
    by_target_row, by_target_col, tgt_start, tgt_end = _column_tile_targets(plan, n_cols, tiles.block_n)
    grid = (row_start.numel(), triton.cdiv(d, tiles.block_d))
    _dw_kernel[grid](
        xs,
        w,
        plan.lo,
        plan.hi,
        lse,
        grad_lse,
        grad_tgt,
        row_start,
        row_end,
        by_target_row,
        by_target_col,
        tgt_start,
        tgt_end,
        dw,
        n_cols,
        d,
        xs.stride(0),
        w.stride(0),
        dw.stride(0),
        **_meta(tiles, xs.dtype, True),
    )
    return dw


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------


def _compute_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """tl.dot needs one operand dtype; mixed inputs are multiplied in the wider one."""
    dtype = torch.promote_types(x.dtype, w.dtype)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"grouped_lse_triton takes fp32, bf16 or fp16, got {x.dtype} and {w.dtype}")
    return dtype


class _GroupedLSETriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, row_group, col_offsets, target_col, tiles):
        dtype = _compute_dtype(x, w)
        device = x.device
        plan = _plan_rows(row_group.to(device), col_offsets.to(device), target_col.to(device))
        xs = x[plan.order].to(dtype).contiguous()
        wc = w.to(dtype).contiguous()
        lse_s, target_s = _launch_forward(xs, wc, plan, tiles)
        ctx.save_for_backward(x, w, lse_s)
        ctx.plan, ctx.tiles, ctx.dtype = plan, tiles, dtype
        return _unsort(lse_s, plan.order), _unsort(target_s, plan.order)

    @staticmethod
    def backward(ctx, grad_lse, grad_target):
        x, w, lse_s = ctx.saved_tensors
        plan, tiles = ctx.plan, ctx.tiles
        xs = x[plan.order].to(ctx.dtype).contiguous()
        wc = w.to(ctx.dtype).contiguous()
        g_lse = _sorted_grad(grad_lse, plan.order, x)
        g_tgt = _sorted_grad(grad_target, plan.order, x)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _unsort(_launch_dx(xs, wc, plan, lse_s, g_lse, g_tgt, tiles, x.dtype), plan.order)
        if ctx.needs_input_grad[1]:
            dw = _launch_dw(xs, wc, plan, lse_s, g_lse, g_tgt, tiles, w.dtype)
        return dx, dw, None, None, None, None


def _sorted_grad(grad, order, x):
    """Upstream gradient in sorted row order, fp32; an unused output gives zeros."""
    if grad is None:
        return torch.zeros(order.numel(), dtype=torch.float32, device=x.device)
    return grad[order].float().contiguous()


def grouped_lse_triton(x, w, row_group, col_offsets, target_col, tiles: Tiles | None = None):
    """See fgdist.kernels.grouped_lse for the contract. `tiles` overrides the tile sizes."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        shapes = f"{tuple(x.shape)} and {tuple(w.shape)}"
        raise ValueError(f"x [R, d] and w [N, d] must share d, got {shapes}")
    if row_group.shape != (x.shape[0],) or target_col.shape != (x.shape[0],):
        raise ValueError("row_group and target_col must have one entry per row of x")
    return _GroupedLSETriton.apply(
        x, w, row_group, col_offsets, target_col, tiles or default_tiles(x.shape[1], x.device)
    )
