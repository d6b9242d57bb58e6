"""The grouped logsumexp behind one dispatch (docs/DESIGN.md, "The kernel contract").

    partial_lse, target_logit = grouped_lse(x, w, row_group, col_offsets, target_col, kernel)

    x           [R, d]      row features (fp32, bf16 or fp16)
    w           [N, d]      this rank's head slice, N = n_local columns
    row_group   [R] int64   local group of each row, or -1 when the row's group has no local column
    col_offsets [G+1] int64 group g owns local columns [col_offsets[g], col_offsets[g+1]);
                            dense mode (indi / base_indi) is G = 1, offsets [0, N]
    target_col  [R] int64   local column of the row's own instance, or -1 when not local

    partial_lse[i]  = logsumexp_j x_i . w_j over the columns of row i's group (-inf if none), fp32
    target_logit[i] = x_i . w_target_col[i] when target_col[i] >= 0, else 0, fp32

Both outputs are differentiable with respect to x and w; neither implementation materializes a
rows x n_local logits matrix.
"""

from __future__ import annotations

import os

import torch

from fgdist.kernels.reference import grouped_lse_torch

KERNELS = ("auto", "triton", "torch")


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """`auto` picks Triton on CUDA and the PyTorch reference elsewhere."""
    if kernel not in KERNELS:
        raise ValueError(f"head.kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if kernel == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("head.kernel='triton' needs a CUDA device (or TRITON_INTERPRET=1 on CPU)")
    return kernel


def grouped_lse(x, w, row_group, col_offsets, target_col, kernel: str = "auto"):
    if resolve_kernel(kernel, x.device) == "triton":
        from fgdist.kernels.triton_grouped_lse import grouped_lse_triton

        return grouped_lse_triton(x, w, row_group, col_offsets, target_col)
    return grouped_lse_torch(x, w, row_group, col_offsets, target_col)
