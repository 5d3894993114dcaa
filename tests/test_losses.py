"""Each Table 1 loss against a direct computation on a tiny batch."""
import math

import torch

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


# A larger batch for EPR and ROLE: 4 images, 5 classes, observed positives, negatives and unknowns.
BIG_LOGITS = [[2.0, -1.0, 0.5, 3.0, -2.5], [-2.5, 1.5, -2.0, -1.3, -3.0],
              [1.2, 2.2, 1.7, 3.0, 2.0], [-1.8, 0.4, 2.6, 1.1, -0.2]]
BIG_OBSERVED = [[1, 0, 0, 0, -1], [0, 1, -1, 0, 0], [0, 0, 1, 0, 0], [0, -1, 0, 0, 1]]
BIG_ESTIMATOR = [[5.3, 0.2, -0.1, 0.35, -5.3], [0.0, 4.0, -4.5, -0.3, 0.1],
                 [0.25, -0.4, 5.3, 0.05, -0.2], [0.3, -5.0, 1.0, -0.15, 5.3]]
EXPECTED = 1.5


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def _observed_term(p, o):
    """-log p on an observed positive, -log(1 - p) on an observed negative, 0 elsewhere."""
    return -math.log(p) if o == 1 else -math.log(1 - p) if o == -1 else 0.0


def _regularizer_by_hand(probs):
    """(batch mean of each image's summed probabilities - expected)^2 / C^2, with loops."""
    batch, classes = len(probs), len(probs[0])
    mean_sum = sum(sum(row) for row in probs) / batch
    return (mean_sum - EXPECTED) ** 2 / classes ** 2


def _big(values, grad=False):
    return torch.tensor(values, dtype=torch.float32, requires_grad=grad)


def test_epr_by_hand_on_a_batch():
    probs = [[_sigmoid(v) for v in row] for row in BIG_LOGITS]
    batch, classes = 4, 5
    entries = sum(_observed_term(probs[i][j], BIG_OBSERVED[i][j]) for i in range(batch) for j in range(classes))
    expected = entries / (batch * classes) + _regularizer_by_hand(probs)
    got = scheme_loss("EPR", _big(BIG_LOGITS), torch.tensor(BIG_OBSERVED), torch.zeros(4, 5), 1, 0.0, EXPECTED).loss
    assert math.isclose(got.item(), expected, rel_tol=1e-5)
    # the mean of per-image squares (the form this replaced) differs on this batch, so the check can fail
    per_image = sum((sum(row) - EXPECTED) ** 2 for row in probs) / batch / classes ** 2
    assert abs(per_image - _regularizer_by_hand(probs)) > 0.5 * _regularizer_by_hand(probs)
    assert math.isclose(expected_positive_regularizer(torch.tensor(probs), EXPECTED).item(),
                        _regularizer_by_hand(probs), rel_tol=1e-5)


def test_role_by_hand_on_a_batch_with_its_gradients():
    """The single-positive work's `loss_role`: 0.5 (observed terms of both sides) + 0.5 (cross terms of both
    sides), the mean over B x C entries, + 0.5 (both regularizers); each cross term trains only its own side."""
    p = [[_sigmoid(v) for v in row] for row in BIG_LOGITS]
    q = [[_sigmoid(v) for v in row] for row in BIG_ESTIMATOR]
    batch, classes = 4, 5
    total = 0.0
    for i in range(batch):
        for j in range(classes):
            o = BIG_OBSERVED[i][j]
            observed = _observed_term(p[i][j], o) + _observed_term(q[i][j], o)
            cross = (-(q[i][j] * math.log(p[i][j]) + (1 - q[i][j]) * math.log(1 - p[i][j]))
                     - (p[i][j] * math.log(q[i][j]) + (1 - p[i][j]) * math.log(1 - q[i][j])))
            total += 0.5 * observed + 0.5 * cross
    expected = total / (batch * classes) + 0.5 * (_regularizer_by_hand(p) + _regularizer_by_hand(q))

    logits, est = _big(BIG_LOGITS, grad=True), _big(BIG_ESTIMATOR, grad=True)
    got = scheme_loss("ROLE", logits, torch.tensor(BIG_OBSERVED), torch.zeros(4, 5), 1, 0.0, EXPECTED,
                      estimator_logits=est).loss
    assert math.isclose(got.item(), expected, rel_tol=1e-5)

    # Gradients by hand. With the other side held fixed (detached), d/dx of a side's terms is
    # 0.5 (x_prob - target_of_observed) + 0.5 (x_prob - other_prob), over B*C, plus its regularizer's
    # 0.5 * 2 (mean_sum - expected) / C^2 / B * x_prob (1 - x_prob).
    got.backward()

    def side_gradient(mine, other):
        mean_sum = sum(sum(row) for row in mine) / batch
        grad = []
        for i in range(batch):
            row = []
            for j in range(classes):
                o, m = BIG_OBSERVED[i][j], mine[i][j]
                observed = m - 1 if o == 1 else m if o == -1 else 0.0
                entry = 0.5 * observed + 0.5 * (m - other[i][j])
                reg = 0.5 * 2 * (mean_sum - EXPECTED) / classes ** 2 / batch * m * (1 - m)
                row.append(entry / (batch * classes) + reg)
            grad.append(row)
        return torch.tensor(grad)

    torch.testing.assert_close(logits.grad, side_gradient(p, q), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(est.grad, side_gradient(q, p), rtol=1e-4, atol=1e-7)


def test_role_estimator_initialisation():
    init = init_role_estimator(OBSERVED, torch.Generator().manual_seed(0))
    assert math.isclose(torch.sigmoid(init[0, 0]).item(), 0.995, rel_tol=1e-5)
    assert math.isclose(torch.sigmoid(init[1, 2]).item(), 0.005, rel_tol=1e-4)
    unobserved = torch.sigmoid(init[OBSERVED == 0])
    assert ((unobserved >= 0.4 - 1e-6) & (unobserved <= 0.6 + 1e-6)).all()
    wide = torch.sigmoid(init_role_estimator(torch.zeros(200, 50), torch.Generator().manual_seed(0)))
    assert wide.min() < 0.41 and wide.max() > 0.59     # uniform over the whole +-logit(0.6) range


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
