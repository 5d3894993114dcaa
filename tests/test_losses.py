"""Each Table 1 loss against a direct computation on a tiny batch."""
import math

import torch
import torch.nn.functional as F

from wsml.losses import expected_positive_regularizer, init_role_estimator, scheme_loss

LOGITS = torch.tensor([[2.0, -1.0, 0.5], [-0.5, 1.5, -2.0]])
OBSERVED = torch.tensor([[1, 0, 0], [0, 1, -1]])
COMPLETE = torch.tensor([[1, 0, 1], [0, 1, 0]])
P = torch.sigmoid(LOGITS)


def nll(p, t):
    return -(t * torch.log(p) + (1 - t) * torch.log(1 - p))


def loss(scheme, epoch=1, **kw):
    return scheme_loss(scheme, LOGITS, OBSERVED, COMPLETE, epoch, kw.pop("delta_rel", 0.0), 1.5, **kw).loss


def test_full_and_an():
    assert torch.isclose(loss("full"), nll(P, COMPLETE.float()).mean())
    assert torch.isclose(loss("AN"), nll(P, (OBSERVED == 1).float()).mean())


def test_wan_weights_unobserved_negatives():
    w = torch.tensor([[1, 0.5, 0.5], [0.5, 1, 1]])   # C=3 -> 1/(C-1) = 0.5 on unobserved
    assert torch.isclose(loss("WAN"), (w * nll(P, (OBSERVED == 1).float())).mean())


def test_lsan_smooths_targets():
    t = torch.where(OBSERVED == 1, 0.9, 0.1)
    assert torch.isclose(loss("LSAN"), nll(P, t).mean())


def test_epr():
    m = torch.zeros(2, 3)
    m[OBSERVED == 1] = -torch.log(P[OBSERVED == 1])
    m[OBSERVED == -1] = -torch.log(1 - P[OBSERVED == -1])
    reg = ((P.sum(1) - 1.5) ** 2).mean() / 9
    assert torch.isclose(loss("EPR"), m.mean() + reg)
    assert torch.isclose(expected_positive_regularizer(P, 1.5), reg)


def test_role_and_its_initialisation():
    est = torch.tensor([[3.0, 0.2, -0.1], [0.0, 2.0, -3.0]])
    q = torch.sigmoid(est)
    pos = lambda probs: torch.where(OBSERVED == 1, -torch.log(probs), torch.where(OBSERVED == -1, -torch.log(1 - probs), 0.0))
    expected = 0.5 * (pos(P) + nll(P, q) + pos(q) + nll(q, P)).mean() + 0.5 * (
        expected_positive_regularizer(P, 1.5) + expected_positive_regularizer(q, 1.5))
    assert torch.isclose(loss("ROLE", estimator_logits=est), expected)
    init = init_role_estimator(OBSERVED, torch.Generator().manual_seed(0))
    assert math.isclose(torch.sigmoid(init[0, 0]).item(), 0.995, rel_tol=1e-5)
    assert math.isclose(torch.sigmoid(init[1, 2]).item(), 0.005, rel_tol=1e-4)
    unobserved = torch.sigmoid(init[OBSERVED == 0])
    assert ((unobserved >= 0.4 - 1e-6) & (unobserved <= 0.6 + 1e-6)).all()


def test_large_loss_schemes():
    # epoch 2, delta_rel 20 % of 6 entries -> k = ceil(1.2) = 2; candidates: (0,1) (0,2) (1,0)
    an = nll(P, (OBSERVED == 1).float())
    cands = {(0, 1): an[0, 1], (0, 2): an[0, 2], (1, 0): an[1, 0]}
    top2 = sorted(cands, key=lambda k: -cands[k])[:2]
    out = scheme_loss("LL-R", LOGITS, OBSERVED, COMPLETE, 2, 20.0, 1.5)
    assert {tuple(i) for i in out.selected.nonzero().tolist()} == set(top2)
    rejected = an.clone()
    for i in top2:
        rejected[i] = 0
    assert torch.isclose(out.loss, rejected.mean())
    corrected = an.clone()
    for i in top2:
        corrected[i] = -torch.log(P[i])
    assert torch.isclose(scheme_loss("LL-Ct", LOGITS, OBSERVED, COMPLETE, 2, 20.0, 1.5).loss, corrected.mean())
    # epoch 1 of every LL scheme is plain AN
    assert torch.isclose(scheme_loss("LL-Cp", LOGITS, OBSERVED, COMPLETE, 1, 20.0, 1.5).loss, an.mean())


def test_bf16_logits_stay_finite():
    big = torch.tensor([[40.0, -40.0]], dtype=torch.bfloat16)
    out = scheme_loss("AN", big, torch.tensor([[0, 1]]), torch.tensor([[0, 1]]), 1, 0.0, 1.0)
    assert torch.isfinite(out.loss)
