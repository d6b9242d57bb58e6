"""PyTorch reference for the grouped logsumexp (the CPU path and the test oracle).

Rows are segmented by group; each group's logits are computed in column chunks with an online
logsumexp, so memory is O(rows_in_group x chunk), never rows x n_local. The backward recomputes
the logits chunk by chunk (as flash attention does) instead of saving them.
"""

from __future__ import annotations

import torch

# Columns per chunk: bounds the transient logits block to rows_g x COLUMN_CHUNK fp32 values.
COLUMN_CHUNK = 8192


def _group_segments(row_group: torch.Tensor, col_offsets: torch.Tensor):
    """Yield (row indices, first column, end column) for every group that has rows here."""
    offsets = col_offsets.tolist()
    order = torch.argsort(row_group, stable=True)
    sorted_groups = row_group[order]
    groups, counts = torch.unique_consecutive(sorted_groups, return_counts=True)
    start = 0
    for g, c in zip(groups.tolist(), counts.tolist()):
        rows = order[start : start + c]
        start += c
        if g < 0 or offsets[g] == offsets[g + 1]:
            continue  # no local column for these rows: partial_lse stays -inf
        yield rows, offsets[g], offsets[g + 1]


def _target_logit(x32: torch.Tensor, w: torch.Tensor, target_col: torch.Tensor) -> torch.Tensor:
    has_target = target_col >= 0
    out = torch.zeros(x32.shape[0], dtype=torch.float32, device=x32.device)
    if has_target.any():
        rows = has_target.nonzero(as_tuple=True)[0]
        out[rows] = (x32[rows] * w[target_col[rows]].float()).sum(dim=1)
    return out


class _GroupedLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, row_group, col_offsets, target_col):
        x32 = x.float()
        lse = torch.full((x.shape[0],), float("-inf"), dtype=torch.float32, device=x.device)
        for rows, c0, c1 in _group_segments(row_group, col_offsets):
            xg = x32[rows]
            acc = torch.full((rows.numel(),), float("-inf"), dtype=torch.float32, device=x.device)
            for a in range(c0, c1, COLUMN_CHUNK):
                logits = xg @ w[a : min(a + COLUMN_CHUNK, c1)].float().T
                acc = torch.logaddexp(acc, torch.logsumexp(logits, dim=1))
            lse[rows] = acc
        target = _target_logit(x32, w, target_col)
        ctx.save_for_backward(x, w, row_group, col_offsets, target_col, lse)
        return lse, target

    @staticmethod
    def backward(ctx, grad_lse, grad_target):
        x, w, row_group, col_offsets, target_col, lse = ctx.saved_tensors
        x32 = x.float()
        dx = torch.zeros_like(x32)
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        grad_lse = grad_lse.float()
        for rows, c0, c1 in _group_segments(row_group, col_offsets):
            xg = x32[rows]
            g = grad_lse[rows].unsqueeze(1)
            lse_g = lse[rows].unsqueeze(1)
            for a in range(c0, c1, COLUMN_CHUNK):
                b = min(a + COLUMN_CHUNK, c1)
                wc = w[a:b].float()
                weights = torch.exp(xg @ wc.T - lse_g) * g  # softmax x upstream grad
                dx[rows] += weights @ wc
                dw[a:b] += weights.T @ xg
        has_target = target_col >= 0
        if has_target.any():
            rows = has_target.nonzero(as_tuple=True)[0]
            gt = grad_target[rows].float().unsqueeze(1)
            dx[rows] += gt * w[target_col[rows]].float()
            dw.index_add_(0, target_col[rows], gt * x32[rows])
        return dx.to(x.dtype), dw.to(w.dtype), None, None, None


def grouped_lse_torch(x, w, row_group, col_offsets, target_col):
    """See fgdist.kernels.grouped_lse for the contract."""
    return _GroupedLSE.apply(x, w, row_group, col_offsets, target_col)
