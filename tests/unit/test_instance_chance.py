"""The instance CE's chance level (what the trainer logs as param instance_ce_chance) and the
comparison's rule for the epoch a run's instance CE leaves it."""

import math

import pytest

from fgdist.data.partition import Plan
from fgdist.report.comparison import FROM_START, LEAVE_CHANCE_MARGIN, NEVER, InstanceCurve
from fgdist.training.objectives import instance_ce_chance, softmax_group_sizes


def test_chance_is_the_image_mean_of_ln_n():
    # Super-classes of 2 and 4 images: 2 rows at ln 2, 4 rows at ln 4 = 2 ln 2; mean 10 ln 2 / 6.
    assert instance_ce_chance([2, 4]) == pytest.approx(5 / 3 * math.log(2))
    assert instance_ce_chance([3, 0, 1]) == pytest.approx(math.log(3) * 3 / 4)  # an empty group has no rows
    assert instance_ce_chance([1000]) == pytest.approx(math.log(1000))


def test_group_sizes_follow_the_objective():
    plan = Plan(world_size=2, num_instances=10, super_ranges=((0, 3), (3, 3), (3, 10)))
    assert softmax_group_sizes(plan, dense=False) == [3, 0, 7]
    assert softmax_group_sizes(plan, dense=True) == [10]
    assert instance_ce_chance(softmax_group_sizes(plan, dense=True)) == pytest.approx(math.log(10))


@pytest.mark.parametrize("counts", [[], [0, 0], [3, -1]])
def test_chance_of_no_images_is_an_error(counts):
    with pytest.raises(ValueError, match="group sizes"):
        instance_ce_chance(counts)


def curve(values, steps_per_epoch=2, chance=2.0):
    return InstanceCurve([(i + 1) / steps_per_epoch for i in range(len(values))], values, chance)


def test_leaves_at_the_first_epoch_whose_mean_is_below_the_margin():
    assert LEAVE_CHANCE_MARGIN == 0.05  # threshold 1.9 for chance 2.0 below
    # Epoch means 2.05, 1.92 (its second value 1.88 alone is below 1.9: the mean decides), 1.55.
    c = curve([2.1, 2.0, 1.96, 1.88, 1.6, 1.5])
    assert c.epoch_means() == pytest.approx({1: 2.05, 2: 1.92, 3: 1.55})
    assert c.leaves_chance() == 3


def test_never_leaves_when_every_epoch_mean_stays_within_the_margin():
    assert curve([2.04, 1.94, 1.95, 1.92, 1.98, 1.91]).leaves_chance() == NEVER


def test_below_from_the_start():
    # head.init=features: the first logged value is already far below chance.
    assert curve([0.5, 0.4, 0.3, 0.3]).leaves_chance() == FROM_START
    # Epoch 1's mean below, its first value not: learnt within epoch 1, not below from the start.
    assert curve([1.95, 1.2, 1.0, 0.9]).leaves_chance() == 1


def test_epochs_of_a_resumed_run_on_another_world_size():
    # 4 steps/epoch, then 2 after a resume at the start of epoch 2: fractional epochs say which is which.
    c = InstanceCurve([0.25, 0.5, 0.75, 1.0, 1.5, 2.0], [2.0, 2.0, 2.0, 2.0, 1.0, 1.2], chance=2.0)
    assert c.epoch_means() == pytest.approx({1: 2.0, 2: 1.1})
    assert c.leaves_chance() == 2
