"""The instance head: its initial columns do not depend on how the line is cut, and saved slices
of one cut load into any other cut (weights and momentum), so a resume may change world size."""

import pytest
import torch

import fgdist.training.head
from fgdist.config import OptimConfig
from fgdist.data.partition import make_plan
from fgdist.training.head import InstanceHead, init_columns
from tests.helpers import manifest_with_sizes

# n = 20 columns: 3 ranks own [0, 7), [7, 14), [14, 20); 2 ranks own [0, 10), [10, 20).
SIZES = [5, 7, 8]
N, DIM, SEED = sum(SIZES), 6, 11
SMALL_BLOCK = 7  # every cut below crosses init blocks ([0, 7), [7, 14), ...) somewhere


def heads(world, optim=None, lr_mult=1.0, steps_per_epoch=4):
    plan = make_plan(manifest_with_sizes(SIZES), world)
    out = [InstanceHead(plan, r, DIM, SEED) for r in range(world)]
    if optim is not None:
        for h in out:
            h.build_optimizer(optim, lr_mult, steps_per_epoch)
    return out


def line(hs, what="weight"):
    """The concatenation of the heads' columns, in rank order."""
    return torch.cat(
        [h.weight.detach() if what == "weight" else h.optimizer.state[h.weight]["momentum_buffer"] for h in hs]
    )


@pytest.fixture
def small_init_block(monkeypatch):
    monkeypatch.setattr(fgdist.training.head, "INIT_BLOCK", SMALL_BLOCK)


def test_init_columns_do_not_depend_on_the_cut(small_init_block):
    whole = init_columns(0, N, DIM, SEED)
    assert whole.shape == (N, DIM)
    bound = 1.0 / DIM**0.5
    assert whole.abs().max() <= bound and whole.std() > 0.3 * bound
    # Ranges starting and ending inside a block, spanning several blocks, and empty.
    for begin, end in [(0, 7), (3, 5), (5, 16), (6, 8), (13, 20), (7, 7), (19, 20)]:
        assert torch.equal(init_columns(begin, end, DIM, SEED), whole[begin:end]), (begin, end)
    assert not torch.equal(init_columns(0, N, DIM, SEED + 1), whole)
    # Blocks are distinct draws (a per-block seed, not the same block repeated).
    assert not torch.equal(whole[0:7], whole[7:14])


def test_head_columns_are_the_same_on_1_2_and_3_ranks(small_init_block):
    one = line(heads(1))
    assert one.shape == (N, DIM)
    for world in (2, 3):
        hs = heads(world)
        assert [(h.column_begin, h.column_end) for h in hs][0][0] == 0 and hs[-1].column_end == N
        assert torch.equal(line(hs), one), world
    assert torch.equal(one, init_columns(0, N, DIM, SEED))


def test_default_init_block_cut_inside_a_block():
    # The real INIT_BLOCK (65536) with a cut that falls inside its first block.
    assert torch.equal(
        torch.cat([init_columns(0, 1000, 4, 2), init_columns(1000, 2500, 4, 2)]), init_columns(0, 2500, 4, 2)
    )


OPTIM = OptimConfig(lr=0.1, momentum=0.9, weight_decay=5e-4, milestones=[1, 2], gamma=0.5)


def trained_three_rank_heads():
    """3-rank heads after one optimizer step on a random global gradient (momentum is set)."""
    hs = heads(3, OPTIM)
    grad = torch.randn(N, DIM, generator=torch.Generator().manual_seed(5))
    for h in hs:
        # step() divides by the world size: each rank holds the sum of 3 per-rank means.
        h.weight.grad = grad[h.column_begin : h.column_end].clone() * 3
        h.step(3)
    return hs, grad


def test_slices_recut_from_3_ranks_to_2_and_1(small_init_block):
    hs, grad = trained_three_rank_heads()
    weight, momentum = line(hs), line(hs, "momentum")
    # One SGD step from the initial columns: momentum = grad + wd * w0, w = w0 - lr * momentum.
    w0 = init_columns(0, N, DIM, SEED)
    assert torch.allclose(momentum, grad + 5e-4 * w0, atol=1e-6)
    assert torch.allclose(weight, w0 - 0.1 * momentum, atol=1e-6)
    slices = [h.slice_state() for h in hs]
    assert [(s["column_begin"], s["column_end"]) for s in slices] == [(0, 7), (7, 14), (14, 20)]
    for world in (2, 1):
        target = heads(world, OPTIM)
        for h in target:
            h.load_slices(list(reversed(slices)), where=f"ckpt->{world}")  # any order
        assert torch.equal(line(target), weight), world
        assert torch.equal(line(target, "momentum"), momentum), world
        # The scheduler resumes too: one step taken, milestone 1 (x steps_per_epoch=4) not reached.
        assert all(h.scheduler.last_epoch == 1 and h.scheduler.get_last_lr() == [0.1] for h in target)
        # A saved slice of the new cut is exactly its part of the line.
        for h in target:
            s = h.slice_state()
            assert torch.equal(s["weight"], weight[h.column_begin : h.column_end])
            assert torch.equal(s["momentum"], momentum[h.column_begin : h.column_end])


def test_a_step_after_recut_equals_the_step_on_the_original_cut(small_init_block):
    hs, _ = trained_three_rank_heads()
    slices = [h.slice_state() for h in hs]
    two = heads(2, OPTIM)
    for h in two:
        h.load_slices(slices, where="ckpt")
    grad = torch.randn(N, DIM, generator=torch.Generator().manual_seed(6))
    for group, world in ((hs, 3), (two, 2)):
        for h in group:
            h.weight.grad = grad[h.column_begin : h.column_end] * world
            h.step(world)
    assert torch.allclose(line(two), line(hs), atol=1e-7)
    assert torch.allclose(line(two, "momentum"), line(hs, "momentum"), atol=1e-7)


def test_a_resume_after_a_milestone_keeps_the_lowered_lr(small_init_block):
    """Saved after the first milestone (1 step per epoch, milestones [1, 2]): the loaded head
    trains at lr x gamma, and its next step is the original head's next step."""
    hs = heads(3, OPTIM, steps_per_epoch=1)
    grad = torch.randn(N, DIM, generator=torch.Generator().manual_seed(7))
    for h in hs:
        h.weight.grad = grad[h.column_begin : h.column_end] * 3
        h.step(3)
    assert all(h.optimizer.param_groups[0]["lr"] == 0.05 for h in hs)
    slices = [h.slice_state() for h in hs]
    (one,) = heads(1, OPTIM, steps_per_epoch=1)
    one.load_slices(slices, where="ckpt")
    assert one.optimizer.param_groups[0]["lr"] == 0.05
    for group, world in ((hs, 3), ([one], 1)):
        for h in group:
            h.weight.grad = grad[h.column_begin : h.column_end] * world
            h.step(world)
    assert torch.allclose(line([one]), line(hs), atol=1e-7)
    assert one.optimizer.param_groups[0]["lr"] == 0.025  # the second milestone, from the right lr


def test_slices_without_momentum_load_weights_only(small_init_block):
    hs = heads(3)  # no optimizer: slice_state has momentum None
    slices = [h.slice_state() for h in hs]
    assert all(s["momentum"] is None and s["scheduler"] is None for s in slices)
    (one,) = heads(1, OPTIM)
    with torch.no_grad():
        one.weight.zero_()
    one.load_slices(slices, where="ckpt")
    assert torch.equal(one.weight.detach(), line(hs))
    assert one.weight not in one.optimizer.state or "momentum_buffer" not in one.optimizer.state[one.weight]


def missing_middle_slice():
    hs, _ = trained_three_rank_heads()
    slices = [h.slice_state() for h in hs]
    return [slices[0], slices[2]]  # columns [7, 14) are missing


def test_a_gap_in_the_slices_is_an_error(small_init_block):
    slices = missing_middle_slice()
    (one,) = heads(1, OPTIM)
    before = one.weight.detach().clone()
    with pytest.raises(ValueError, match=r"ckpt/head: saved head slices cover 13 of columns \[0, 20\)"):
        one.load_slices(slices, where="ckpt/head")
    assert torch.equal(one.weight.detach(), before)  # nothing half-loaded
    first, second = heads(2, OPTIM)
    with pytest.raises(ValueError, match=r"cover 7 of columns \[0, 10\)"):
        first.load_slices(slices, where="ckpt/head")
    with pytest.raises(ValueError, match=r"cover 6 of columns \[10, 20\)"):
        second.load_slices(slices, where="ckpt/head")


def test_the_gap_error_names_the_missing_range(small_init_block):
    (one,) = heads(1, OPTIM)
    with pytest.raises(ValueError) as err:
        one.load_slices(missing_middle_slice(), where="ckpt/head")
    assert "[7, 14)" in str(err.value)


def test_a_duplicated_slice_does_not_hide_a_gap(small_init_block):
    hs, _ = trained_three_rank_heads()
    slices = [h.slice_state() for h in hs]
    (one,) = heads(1, OPTIM)
    # [0, 7) twice and [14, 20): 7 + 7 + 6 = 20 columns "covered", [7, 14) missing.
    with pytest.raises(ValueError, match=r"cover 13 of columns \[0, 20\); columns \[7, 14\) are missing"):
        one.load_slices([slices[0], slices[0], slices[2]], where="ckpt/head")
