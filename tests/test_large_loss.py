"""The large-loss rule on small matrices worked out by hand."""
import math

import pytest
import torch

from wsml.large_loss import LargeLossRule, apply_large_loss_rule, clean_rate, num_to_modify, select_large_losses

# 3 images x 4 classes; observed: 1 positive, 0 unobserved, -1 observed negative
LOSSES = torch.tensor([[0.9, 0.1, 0.8, 0.3],
                       [0.2, 0.7, 0.7, 0.05],
                       [2.0, 0.6, 0.4, 0.5]])
OBSERVED = torch.tensor([[1, 0, 0, 0],
                         [0, 1, 0, 0],
                         [-1, 0, 0, 1]])


def test_epoch_one_changes_nothing():
    for scheme in ("LL-R", "LL-Ct", "LL-Cp"):
        rule = LargeLossRule(scheme, 50.0)
        assert num_to_modify(3, 4, 1, rule) == 0
        assert not select_large_losses(LOSSES, OBSERVED, 1, rule).any()


def test_k_follows_delta_rel_in_percent():
    # k = ceil(B*C*(t-1)*delta_rel/100): 12 entries, delta_rel 10 % -> 1.2 -> 2 in epoch 2, 2.4 -> 3 in epoch 3
    assert num_to_modify(3, 4, 2, LargeLossRule("LL-R", 10.0)) == 2
    assert num_to_modify(3, 4, 3, LargeLossRule("LL-Ct", 10.0)) == 3
    # LL-Cp: fixed k = ceil(B*C*delta_rel/100) from epoch 2 on
    assert num_to_modify(3, 4, 2, LargeLossRule("LL-Cp", 10.0)) == 2
    assert num_to_modify(3, 4, 7, LargeLossRule("LL-Cp", 10.0)) == 2
    # the paper's 0.2 % on a VOC batch: 16*20*0.002 = 0.64 -> 1; exact products are not rounded up
    assert num_to_modify(16, 20, 2, LargeLossRule("LL-R", 0.2)) == 1
    assert num_to_modify(16, 20, 11, LargeLossRule("LL-R", 0.5)) == 16
    assert num_to_modify(16, 20, 5, LargeLossRule("AN", 0.5)) == 0


def test_selects_largest_unobserved_only():
    # candidates (observed == 0) and their losses: (0,1) .1, (0,2) .8, (0,3) .3, (1,0) .2, (1,2) .7,
    # (1,3) .05, (2,1) .6, (2,2) .4. The observed (0,0)=.9 and (2,0)=2.0 are never chosen.
    mask = select_large_losses(LOSSES, OBSERVED, 3, LargeLossRule("LL-R", 10.0))   # k = 3
    expected = torch.zeros(3, 4, dtype=torch.bool)
    expected[0, 2] = expected[1, 2] = expected[2, 1] = True
    assert torch.equal(mask, expected)


def test_ties_choose_exactly_k_lower_index_first():
    losses = torch.tensor([[0.5, 0.5, 0.5, 0.5]] * 3)
    observed = torch.zeros(3, 4, dtype=torch.long)
    mask = select_large_losses(losses, observed, 2, LargeLossRule("LL-R", 10.0))  # k = 2
    assert mask.sum() == 2
    assert mask[0, 0] and mask[0, 1]


def test_fewer_candidates_than_k_takes_all():
    observed = torch.ones(3, 4, dtype=torch.long)
    observed[1, 3] = 0
    mask = select_large_losses(LOSSES, observed, 11, LargeLossRule("LL-R", 50.0))
    assert mask.sum() == 1 and mask[1, 3]


def test_apply_reject_and_correct():
    selected = torch.zeros(3, 4, dtype=torch.bool)
    selected[0, 2] = True
    loss_pos = torch.full((3, 4), 7.0)
    rejected = apply_large_loss_rule(LOSSES, loss_pos, selected, "LL-R")
    assert rejected[0, 2] == 0 and torch.equal(rejected[~selected], LOSSES[~selected])
    for scheme in ("LL-Ct", "LL-Cp"):
        corrected = apply_large_loss_rule(LOSSES, loss_pos, selected, scheme)
        assert corrected[0, 2] == 7.0 and torch.equal(corrected[~selected], LOSSES[~selected])


def test_clean_rate():
    assert clean_rate(1, LargeLossRule("LL-R", 0.2)) == 1.0
    assert math.isclose(clean_rate(3, LargeLossRule("LL-R", 0.2)), 0.996)
    assert math.isclose(clean_rate(9, LargeLossRule("LL-Cp", 0.2)), 0.998)


@pytest.mark.parametrize("scheme", ["LL-R", "LL-Ct", "LL-Cp"])
def test_never_selects_observed_on_random_batches(scheme):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        losses = torch.rand(8, 6, generator=g)
        observed = torch.randint(-1, 2, (8, 6), generator=g)
        mask = select_large_losses(losses, observed, 4, LargeLossRule(scheme, 20.0))
        assert not mask[observed != 0].any()
        k = min(num_to_modify(8, 6, 4, LargeLossRule(scheme, 20.0)), int((observed == 0).sum()))
        assert int(mask.sum()) == k
        rest = losses[(observed == 0) & ~mask]
        if k and rest.numel():   # every chosen loss is >= every unchosen candidate loss
            assert losses[mask].min() >= rest.max()
