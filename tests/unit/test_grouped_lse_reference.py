"""The PyTorch reference equals F.cross_entropy over logits masked to the row's group."""

import pytest
import torch
import torch.nn.functional as F

from fgdist.kernels import grouped_lse, reference


def random_problem(seed, rows=37, d=45, sizes=(1, 60, 17, 120, 3), dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    n = int(offsets[-1])
    x = torch.randn(rows, d, generator=gen, dtype=dtype)
    w = torch.randn(n, d, generator=gen, dtype=dtype) * 0.3
    row_group = torch.randint(0, len(sizes), (rows,), generator=gen)
    lo, hi = offsets[row_group], offsets[row_group + 1]
    target = lo + (torch.rand(rows, generator=gen, dtype=torch.float64) * (hi - lo)).long()
    return x, w, row_group, offsets, target


def masked_ce(x, w, row_group, offsets, target):
    logits = x @ w.T
    col = torch.arange(w.shape[0])
    mask = (col >= offsets[row_group].unsqueeze(1)) & (col < offsets[row_group + 1].unsqueeze(1))
    return F.cross_entropy(logits.masked_fill(~mask, float("-inf")), target, reduction="sum")


@pytest.mark.parametrize("chunk", [7, 8192])
def test_values_and_gradients_match_masked_cross_entropy(monkeypatch, chunk):
    monkeypatch.setattr(reference, "COLUMN_CHUNK", chunk)
    x, w, rg, off, tgt = random_problem(0)
    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    lse, t = grouped_lse(x1, w1, rg, off, tgt, kernel="torch")
    (lse - t).sum().backward()
    x2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()
    masked_ce(x2, w2, rg, off, tgt).backward()
    assert torch.allclose((lse - t).sum(), masked_ce(x, w, rg, off, tgt).float(), atol=1e-4)
    assert torch.allclose(x1.grad.double(), x2.grad, atol=1e-5)
    assert torch.allclose(w1.grad.double(), w2.grad, atol=1e-5)


def test_dense_mode_equals_full_cross_entropy():
    x, w, _, _, tgt = random_problem(1)
    n = w.shape[0]
    lse, t = grouped_lse(x, w, torch.zeros(len(x), dtype=torch.long), torch.tensor([0, n]), tgt)
    assert torch.allclose((lse - t).double(), F.cross_entropy(x @ w.T, tgt, reduction="none"), atol=1e-5)


def test_rows_without_local_columns_get_minus_inf_and_no_gradient():
    x, w, rg, off, tgt = random_problem(2)
    rg[:5] = -1
    tgt[:5] = -1
    x = x.requires_grad_()
    lse, t = grouped_lse(x, w, rg, off, tgt)
    assert torch.isneginf(lse[:5]).all() and (t[:5] == 0).all()
    (lse[5:].sum() - t.sum()).backward()
    assert (x.grad[:5] == 0).all()
