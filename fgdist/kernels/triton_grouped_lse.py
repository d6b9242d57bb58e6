"""Fused Triton kernel for the grouped masked logsumexp (DESIGN: "the kernel contract").

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
reference allows one outside row i's group, even for a row whose group is -1). The forward gathers
w[target] per row. In the backward a target inside the row's group is folded into the tile's
weights, g_i * softmax_ij + g_target_i * [j == target_i], in fp32 before they are rounded for the
products: for a cross-entropy (g = 1, g_target = -1) that is softmax - 1 at the target, small
where the row is confident, and it would be lost to cancellation if the two terms were summed
after the products. The rare target outside its row's group takes a separate, equally
deterministic path: a gathered row for dx, and for dw a second loop over such rows sorted by
target column.

Precision. Products take the input dtype with fp32 accumulation. The backward weights are
rounded to the input dtype before their products, as flash attention does, after scaling each
row by max(|g|, |g_target|) so that they lie in [-1, 1] and small upstream gradients do not
underflow fp16.
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
def _logits_tile(x_ptr, w_ptr, rows, cols, row_ok, col_ok, d, stride_x, stride_w,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
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
def _row_scale(g, gt, group_tgt):
    """Per-row scale of the backward weights: max(|g|, |g_target|), the target counted only
    when it lies in the row's group (the others take the separate path)."""
    return tl.maximum(tl.abs(g), tl.abs(tl.where(group_tgt >= 0, gt, 0.0)))


@triton.jit
def _grad_weights(s, lo, hi, cols, lse, g, gt, group_tgt, scale):
    """(g * softmax + g_target * [col == target]) / scale inside each row's group, 0 elsewhere.

    Rows without a local column have lse = -inf and an all-false mask; they are shifted by 0
    instead so that no inf - inf NaN is formed, even in the discarded branch.
    """
    shift = tl.where(lse == float("-inf"), 0.0, lse)
    inv = tl.where(scale > 0, 1.0 / scale, 0.0)
    softmax = tl.exp(s - shift[:, None])
    at_target = cols[None, :] == group_tgt[:, None]
    wts = (g * inv)[:, None] * softmax + tl.where(at_target, (gt * inv)[:, None], 0.0)
    return tl.where(_in_group(lo, hi, cols), wts, 0.0)


@triton.jit
def _target_logit(x_ptr, w_ptr, rows, row_ok, tgt, d, stride_x, stride_w,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
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
def _forward_kernel(x_ptr, w_ptr, lo_ptr, hi_ptr, tgt_ptr, tile_col_lo_ptr, tile_col_hi_ptr,
                    lse_ptr, target_logit_ptr, n_rows, n_cols, d, stride_x, stride_w,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One program per row tile: online logsumexp over the column tiles of its groups."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    lo = tl.load(lo_ptr + rows, mask=row_ok, other=0)
    hi = tl.load(hi_ptr + rows, mask=row_ok, other=0)
    col_lo = tl.load(tile_col_lo_ptr + pid)
    col_hi = tl.load(tile_col_hi_ptr + pid)

    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max
    l = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp(logit - m)
    for c0 in range(col_lo // BLOCK_N * BLOCK_N, col_hi, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        s = _logits_tile(x_ptr, w_ptr, rows, cols, row_ok, cols < n_cols, d, stride_x, stride_w,
                         BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, UPCAST)
        s = tl.where(_in_group(lo, hi, cols), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # A row that has met no column of its group yet still has max -inf: shift it by 0 so
        # that exp(-inf - shift) is 0 rather than NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - shift) + tl.sum(tl.exp(s - shift[:, None]), axis=1)
        m = m_new
    # l == 0: no column of the row's group was seen (log is given 1 to avoid evaluating log 0).
    lse = tl.where(l > 0, m + tl.log(tl.where(l > 0, l, 1.0)), float("-inf"))
    tl.store(lse_ptr + rows, lse, mask=row_ok)

    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    t = _target_logit(x_ptr, w_ptr, rows, row_ok, tgt, d, stride_x, stride_w, BLOCK_M, BLOCK_K)
    tl.store(target_logit_ptr + rows, t, mask=row_ok)


@triton.jit
def _dx_kernel(x_ptr, w_ptr, lo_ptr, hi_ptr, group_tgt_ptr, stray_tgt_ptr, lse_ptr,
               grad_lse_ptr, grad_tgt_ptr, tile_col_lo_ptr, tile_col_hi_ptr, dx_ptr,
               n_rows, n_cols, d,
               stride_x, stride_w, stride_dx,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One program per (row tile, feature chunk): dx = (g * softmax + g_t * onehot) @ w."""
    pid = tl.program_id(0)
    fs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # output features of this program
    f_ok = fs < d
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    lo = tl.load(lo_ptr + rows, mask=row_ok, other=0)
    hi = tl.load(hi_ptr + rows, mask=row_ok, other=0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("-inf"))
    g = tl.load(grad_lse_ptr + rows, mask=row_ok, other=0.0)
    gt = tl.load(grad_tgt_ptr + rows, mask=row_ok, other=0.0)
    group_tgt = tl.load(group_tgt_ptr + rows, mask=row_ok, other=-1)
    scale = _row_scale(g, gt, group_tgt)
    col_lo = tl.load(tile_col_lo_ptr + pid)
    col_hi = tl.load(tile_col_hi_ptr + pid)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for c0 in range(col_lo // BLOCK_N * BLOCK_N, col_hi, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        s = _logits_tile(x_ptr, w_ptr, rows, cols, row_ok, col_ok, d, stride_x, stride_w,
                         BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, UPCAST)
        p = _grad_weights(s, lo, hi, cols, lse, g, gt, group_tgt, scale)
        wf = tl.load(w_ptr + cols.to(tl.int64)[:, None] * stride_w + fs[None, :],
                     mask=col_ok[:, None] & f_ok[None, :], other=0.0)
        acc = _dot(p.to(wf.dtype), wf, acc, PRECISION, UPCAST)
    dx = acc * scale[:, None]

    # A target outside the row's group: g_target * w_target, gathered.
    stray = tl.load(stray_tgt_ptr + rows, mask=row_ok, other=-1)
    has = row_ok & (stray >= 0)
    wt = tl.load(w_ptr + stray.to(tl.int64)[:, None] * stride_w + fs[None, :],
                 mask=has[:, None] & f_ok[None, :], other=0.0)
    dx += gt[:, None] * wt.to(tl.float32)

    out = dx_ptr + rows.to(tl.int64)[:, None] * stride_dx + fs[None, :]
    tl.store(out, dx.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & f_ok[None, :])


@triton.jit
def _dw_kernel(x_ptr, w_ptr, lo_ptr, hi_ptr, group_tgt_ptr, lse_ptr, grad_lse_ptr, grad_tgt_ptr,
               tile_row_start_ptr, tile_row_end_ptr,
               stray_row_ptr, stray_col_ptr, tile_stray_start_ptr, tile_stray_end_ptr,
               dw_ptr, n_cols, d, stride_x, stride_w, stride_dw,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One program per (column tile, feature chunk): dw = (g * softmax + g_t * onehot)^T @ x."""
    pid = tl.program_id(0)
    fs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    f_ok = fs < d
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # The sorted rows whose group overlaps this column tile.
    row_start = tl.load(tile_row_start_ptr + pid)
    row_end = tl.load(tile_row_end_ptr + pid)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        lo = tl.load(lo_ptr + rows, mask=row_ok, other=0)
        hi = tl.load(hi_ptr + rows, mask=row_ok, other=0)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("-inf"))
        g = tl.load(grad_lse_ptr + rows, mask=row_ok, other=0.0)
        gt = tl.load(grad_tgt_ptr + rows, mask=row_ok, other=0.0)
        group_tgt = tl.load(group_tgt_ptr + rows, mask=row_ok, other=-1)
        scale = _row_scale(g, gt, group_tgt)
        s = _logits_tile(x_ptr, w_ptr, rows, cols, row_ok, col_ok, d, stride_x, stride_w,
                         BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, UPCAST)
        p = _grad_weights(s, lo, hi, cols, lse, g, gt, group_tgt, scale)
        xf = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + fs[None, :],
                     mask=row_ok[:, None] & f_ok[None, :], other=0.0)
        # The row scale cannot be factored out of a sum over rows: it goes onto x (exact when
        # it is a power of two, e.g. 1 or 1/batch).
        sx = (xf.to(tl.float32) * scale[:, None]).to(xf.dtype)
        acc = _dot(tl.trans(p.to(xf.dtype)), sx, acc, PRECISION, UPCAST)

    # Targets outside their row's group: those rows, sorted by target column, whose target
    # falls in this tile. A one-hot dot sums rows that share a target in a fixed order.
    t_start = tl.load(tile_stray_start_ptr + pid)
    t_end = tl.load(tile_stray_end_ptr + pid)
    for t0 in range(t_start, t_end, BLOCK_M):
        pos = t0 + tl.arange(0, BLOCK_M)
        pos_ok = pos < t_end
        rows = tl.load(stray_row_ptr + pos, mask=pos_ok, other=0)
        tcol = tl.load(stray_col_ptr + pos, mask=pos_ok, other=-1)
        gt = tl.load(grad_tgt_ptr + rows, mask=pos_ok, other=0.0)
        xf = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + fs[None, :],
                     mask=pos_ok[:, None] & f_ok[None, :], other=0.0)
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
    group_target: torch.Tensor  # int32 [R] the target where it lies in the row's group, else -1
    stray_target: torch.Tensor  # int32 [R] the target where it lies outside the group, else -1


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
    lo, hi, target = bounds[key_sorted], bounds[key_sorted + 1], target_col[order]
    in_group = (target >= lo) & (target < hi)
    stray = (target >= 0) & ~in_group
    none = torch.full_like(target, -1)

    def int32(t):
        return t.to(torch.int32).contiguous()

    return _RowPlan(
        order=order, lo=int32(lo), hi=int32(hi), target=int32(target),
        group_target=int32(torch.where(in_group, target, none)),
        stray_target=int32(torch.where(stray, target, none)),
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


def _column_tile_strays(plan: _RowPlan, n_cols: int, block_n: int):
    """Sorted rows re-sorted by stray target column (those without one first, at -1), and per
    column tile the range of that order whose stray target falls in the tile."""
    by_target = torch.argsort(plan.stray_target, stable=True)
    target_sorted = plan.stray_target[by_target].to(torch.int64)
    c0, c1 = _column_tiles(n_cols, block_n, plan.lo.device)
    start = torch.searchsorted(target_sorted, c0)
    end = torch.searchsorted(target_sorted, c1)
    return (by_target.to(torch.int32).contiguous(), target_sorted.to(torch.int32).contiguous(),
            start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous())


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
    meta = dict(BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
                PRECISION=_dot_precision(dtype), UPCAST=_INTERPRETED and dtype == torch.bfloat16,
                num_warps=tiles.num_warps, num_stages=tiles.num_stages)
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
        xs, w, plan.lo, plan.hi, plan.target, col_lo, col_hi, lse, target_logit,
        n_rows, w.shape[0], d, xs.stride(0), w.stride(0), **_meta(tiles, xs.dtype, False),
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
        xs, w, plan.lo, plan.hi, plan.group_target, plan.stray_target, lse, grad_lse, grad_tgt,
        col_lo, col_hi, dx,
        n_rows, w.shape[0], d, xs.stride(0), w.stride(0), dx.stride(0),
        **_meta(tiles, xs.dtype, True),
    )
    return dx


def _launch_dw(xs, w, plan, lse, grad_lse, grad_tgt, tiles: Tiles, out_dtype):
    n_cols, d = w.shape
    dw = torch.empty((n_cols, d), dtype=out_dtype, device=w.device)
    if n_cols == 0:
        return dw
    row_start, row_end = _column_tile_rows(plan, n_cols, tiles.block_n)
    stray_row, stray_col, stray_start, stray_end = _column_tile_strays(plan, n_cols, tiles.block_n)
    grid = (row_start.numel(), triton.cdiv(d, tiles.block_d))
    _dw_kernel[grid](
        xs, w, plan.lo, plan.hi, plan.group_target, lse, grad_lse, grad_tgt, row_start, row_end,
        stray_row, stray_col, stray_start, stray_end, dw,
        n_cols, d, xs.stride(0), w.stride(0), dw.stride(0), **_meta(tiles, xs.dtype, True),
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
    return _GroupedLSETriton.apply(x, w, row_group, col_offsets, target_col,
                                   tiles or default_tiles(x.shape[1], x.device))
