"""EM, EM+APL and GR on small matrices, checked against the published formulas computed by hand (math.*)."""
import math

import pytest
import torch

from wsml.errors import ConfigError
from wsml.methods.ack_the_unknown import (
    APL_DEFAULTS,
    EM_DEFAULTS,
    EM_LOG_EPSILON,
    EM_TRAINING,
    APLParams,
    EMParams,
    apl_initial_soft_labels,
    apl_per_class_count,
    apl_pseudo_labelled,
    apl_update,
    apl_update_due,
    em_apl_loss,
    em_loss,
)
from wsml.methods.ack_the_unknown import PUBLISHED_MAP as ACK_PUBLISHED
from wsml.methods.ack_the_unknown import SEARCH_RANGES as ACK_RANGES
from wsml.methods.gr_loss import GR_DEFAULTS, GR_LOG_EPSILON, GR_PUBLISHED, GR_TRAINING, GRParams, gr_k, gr_loss, gr_schedule, gr_v
from wsml.methods.gr_loss import PUBLISHED_MAP as GR_PUBLISHED_MAP
from wsml.methods.gr_loss import SEARCH_RANGES as GR_RANGES

PUBLISHED_MAP = {**ACK_PUBLISHED, "GR": GR_PUBLISHED_MAP}
SEARCH_RANGES = {**ACK_RANGES, "GR": GR_RANGES}

NAN = math.nan
# 2 images x 3 classes: probabilities chosen by hand, the logits that give them
PROBS = [[0.5, 0.2, 0.9],
         [0.7, 0.5, 0.1]]
OBSERVED = torch.tensor([[1, 0, 0],
                         [0, 1, -1]])


def _logits(probs=PROBS):
    return torch.tensor([[math.log(p / (1 - p)) for p in row] for row in probs], dtype=torch.float64).float()


def _nl(x, eps):
    return -math.log(x + eps)


# ---------------------------------------------------------------------------------------------- EM

def _em_entry(p, obs, alpha, eps=EM_LOG_EPSILON):
    if obs == 1:
        return _nl(p, eps)
    if obs == -1:
        return _nl(1 - p, eps)
    return -alpha * (p * _nl(p, eps) + (1 - p) * _nl(1 - p, eps))


def _em_entry_grad(p, obs, alpha, eps=EM_LOG_EPSILON):
    """d entry / d logit, with dp/dz = p (1 - p)."""
    s = p * (1 - p)
    if obs == 1:
        return -s / (p + eps)
    if obs == -1:
        return s / (1 - p + eps)
    dh_dp = math.log(p + eps) + p / (p + eps) - math.log(1 - p + eps) - (1 - p) / (1 - p + eps)
    return alpha * dh_dp * s


def test_em_by_hand():
    alpha = 0.2
    expected = sum(_em_entry(p, int(o), alpha) for row, orow in zip(PROBS, OBSERVED.tolist())
                   for p, o in zip(row, orow)) / 6
    got = em_loss(_logits(), OBSERVED, EMParams(alpha))
    assert got.dtype == torch.float32 and got.shape == ()
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_em_literal_values():
    # p = 0.5 unobserved: -alpha * H = alpha * log(0.5 + 1e-5) = 0.2 * -0.6931271807...
    one = em_loss(torch.zeros(1, 1), torch.zeros(1, 1), EMParams(0.2))
    assert one.item() == pytest.approx(0.2 * math.log(0.50001), abs=1e-7)
    assert one.item() == pytest.approx(-0.13862544, abs=1e-7)
    # observed positive at p = 0.5: -log(0.50001), and the epsilon caps -log p at -log(1e-5) = 11.51
    assert em_loss(torch.zeros(1, 1), torch.ones(1, 1), EMParams(0.2)).item() == pytest.approx(0.69312718, abs=1e-7)
    assert em_loss(torch.full((1, 1), -100.0), torch.ones(1, 1), EMParams(0.2)).item() == pytest.approx(
        -math.log(1e-5), abs=1e-4)


def test_em_reduction_is_over_b_times_c():
    # the loss of a batch equals the mean of its per-entry losses: duplicating the batch changes nothing
    logits = _logits()
    one = em_loss(logits, OBSERVED, EMParams(0.1))
    two = em_loss(torch.cat([logits, logits]), torch.cat([OBSERVED, OBSERVED]), EMParams(0.1))
    assert one.item() == pytest.approx(two.item(), rel=1e-6)


def test_em_gradient_by_hand():
    alpha = 0.2
    z = _logits().requires_grad_()
    em_loss(z, OBSERVED, EMParams(alpha)).backward()
    expected = [[_em_entry_grad(p, o, alpha) / 6 for p, o in zip(row, orow)]
                for row, orow in zip(PROBS, OBSERVED.tolist())]
    assert torch.allclose(z.grad, torch.tensor(expected), atol=1e-7)


def test_em_pushes_unobserved_toward_one_half():
    z = torch.tensor([[-1.5, 0.0, 1.5]], requires_grad=True)      # p = 0.18, 0.5, 0.82
    em_loss(z, torch.zeros(1, 3), EMParams(0.1)).backward()
    g = z.grad[0]
    assert g[0] < 0 < g[2]                    # descent raises the low p, lowers the high one
    assert abs(g[1]) < 1e-6                   # p = 0.5 is the maximum of the entropy
    # observed positives are pushed up, observed negatives down
    z = torch.zeros(1, 2, requires_grad=True)
    em_loss(z, torch.tensor([[1, -1]]), EMParams(0.1)).backward()
    assert z.grad[0, 0] < 0 < z.grad[0, 1]


def test_em_alpha_zero_leaves_unobserved_alone():
    z = torch.zeros(1, 3, requires_grad=True)
    em_loss(z, torch.tensor([[1, 0, 0]]), EMParams(0.0)).backward()
    assert z.grad[0, 1] == 0 and z.grad[0, 2] == 0


def test_em_finite_at_extreme_logits_and_in_bf16():
    z = torch.tensor([[200.0, -200.0, 30.0, -30.0]], requires_grad=True)
    loss = em_loss(z, torch.tensor([[0, 0, 1, -1]]), EMParams(0.2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    low = em_loss(_logits().bfloat16(), OBSERVED, EMParams(0.2))
    assert low.dtype == torch.float32


# ------------------------------------------------------------------------------------------ EM+APL

def test_em_apl_loss_by_hand():
    params = APLParams(alpha=0.2, beta=0.5, neg_proportion=0.9, warmup_epoch=2)
    # (0, 1) holds the pseudo-negative 0.3; (1, 2) holds one too, but it is an observed negative: ignored;
    # (0, 0) is an observed positive: a stray soft label there is ignored as well
    soft = torch.tensor([[0.4, 0.3, NAN],
                         [NAN, NAN, 0.6]])
    eps = EM_LOG_EPSILON

    def entry(p, o, s):
        if o == 0 and not math.isnan(s):
            return 0.5 * (s * _nl(p, eps) + (1 - s) * _nl(1 - p, eps))
        return _em_entry(p, o, 0.2)

    expected = sum(entry(p, o, s) for row, orow, srow in zip(PROBS, OBSERVED.tolist(), soft.tolist())
                   for p, o, s in zip(row, orow, srow)) / 6
    z = _logits().requires_grad_()
    loss = em_apl_loss(z, OBSERVED, soft, params)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    # the pseudo-negative's gradient: beta * p(1-p) * (-s/(p+eps) + (1-s)/(1-p+eps)) / (B*C)
    p, s = 0.2, 0.3
    by_hand = 0.5 * p * (1 - p) * (-s / (p + eps) + (1 - s) / (1 - p + eps)) / 6
    assert z.grad[0, 1].item() == pytest.approx(by_hand, abs=1e-7)
    assert z.grad[0, 1] < 0                   # p = 0.2 below its soft label 0.3: descent raises it
    assert torch.isfinite(z.grad).all()
    # without soft labels it is EM
    none = apl_initial_soft_labels(OBSERVED)
    assert em_apl_loss(_logits(), OBSERVED, none, params).item() == pytest.approx(
        em_loss(_logits(), OBSERVED, EMParams(0.2)).item(), abs=1e-7)


def test_pseudo_negative_is_pulled_toward_its_soft_label():
    params = APLParams(alpha=0.0, beta=1.0, neg_proportion=0.9, warmup_epoch=1)
    z = torch.tensor([[math.log(0.3 / 0.7), math.log(0.1 / 0.9), math.log(0.05 / 0.95)]], requires_grad=True)
    em_apl_loss(z, torch.zeros(1, 3), torch.tensor([[0.1, 0.1, 0.1]]), params).backward()
    g = z.grad[0]
    assert g[0] > 0                           # p = 0.3 above its soft label: pushed down
    assert abs(g[1]) < 1e-5                   # p = s: (nearly) stationary, up to the epsilon
    assert g[2] < 0                           # p = 0.05 below: pushed up


def test_apl_timing():
    params = APLParams(alpha=0.1, beta=0.2, neg_proportion=0.9, warmup_epoch=5)
    # after epochs 5..9 of 10; the published code also labels after epoch 10, which trains nothing
    assert [e for e in range(1, 11) if apl_update_due(e, 10, params)] == [5, 6, 7, 8, 9]
    assert not any(apl_update_due(e, 5, params) for e in range(1, 6))


def test_apl_per_class_count():
    observed = torch.zeros(5000, 3, dtype=torch.long)
    observed[:1000, 0] = 1
    observed[:10, 1] = 1
    observed[:4000, 2] = -1
    params = APLParams(alpha=0.2, beta=0.02, neg_proportion=0.9, warmup_epoch=5)
    # int(0.9 * U_c / (10 - 5)): U = 4000, 4990, 1000 (observed negatives are not unobserved)
    assert apl_per_class_count(observed, 10, params) == [720, 898, 180]
    # truncation: 0.9 * 4 / 5 = 0.72 -> 0
    assert apl_per_class_count(torch.zeros(4, 1), 10, params) == [0]
    with pytest.raises(ConfigError, match="warmup_epoch"):
        apl_per_class_count(observed, 5, params)


def test_apl_labels_over_several_epochs_by_hand():
    observed = torch.tensor([[1, 0],
                             [0, 1],
                             [0, 0],
                             [0, 0],
                             [0, -1]])
    params = APLParams(alpha=0.2, beta=0.5, neg_proportion=1.0, warmup_epoch=2)
    epochs = 4
    # U = (4, 3): per update int(4/2) = 2 entries of class 0 and int(3/2) = 1 of class 1
    assert apl_per_class_count(observed, epochs, params) == [2, 1]
    soft = apl_initial_soft_labels(observed)
    assert soft.dtype == torch.float32 and torch.isnan(soft).all()

    p1 = torch.rand(5, 2)
    soft = apl_update(observed, soft, p1, 1, epochs, params)      # epoch 1 < warmup: nothing
    assert torch.isnan(soft).all()

    p2 = torch.tensor([[0.9, 0.05],
                       [0.1, 0.8],
                       [0.2, 0.05],
                       [0.2, 0.01],
                       [0.3, 0.00]])
    before = soft.clone()
    soft = apl_update(observed, soft, p2, 2, epochs, params)
    assert torch.isnan(before).all()                               # the input is not modified
    # class 0: candidates rows 1-4 (.1 .2 .2 .3): the two lowest, the tie at .2 going to row 2;
    # class 1: candidates rows 0, 2, 3 (row 4 is an observed negative, row 1 observed positive): row 3
    expected = torch.tensor([[NAN, NAN],
                             [0.1, NAN],
                             [0.2, NAN],
                             [NAN, 0.01],
                             [NAN, NAN]])
    assert torch.equal(torch.isnan(soft), torch.isnan(expected))
    assert torch.equal(soft.nan_to_num(-1), expected.nan_to_num(-1))

    p3 = torch.tensor([[0.9, 0.02],
                       [0.0, 0.9],
                       [0.3, 0.02],
                       [0.25, 0.0],
                       [0.35, 0.1]])
    soft = apl_update(observed, soft, p3, 3, epochs, params)
    # class 0: only rows 3, 4 remain (1, 2 keep the labels of epoch 2 whatever their new predictions);
    # class 1: rows 0, 2 remain, tied at .02: row 0
    expected = torch.tensor([[NAN, 0.02],
                             [0.1, NAN],
                             [0.2, NAN],
                             [0.25, 0.01],
                             [0.35, NAN]])
    assert torch.equal(soft.nan_to_num(-1), expected.nan_to_num(-1))
    assert apl_pseudo_labelled(soft).sum() == 6

    # after the last epoch nothing changes
    assert torch.equal(apl_update(observed, soft, torch.zeros(5, 2), 4, epochs, params).nan_to_num(-1),
                       expected.nan_to_num(-1))

    # the batch of images (3, 1) in epoch 4, its rows looked up by index
    index = torch.tensor([3, 1])
    probs = [[0.4, 0.3], [0.6, 0.7]]
    z = _logits(probs)
    eps = EM_LOG_EPSILON
    by_hand = (0.5 * (0.25 * _nl(0.4, eps) + 0.75 * _nl(0.6, eps))     # (3, 0): soft .25
               + 0.5 * (0.01 * _nl(0.3, eps) + 0.99 * _nl(0.7, eps))   # (3, 1): soft .01
               + 0.5 * (0.1 * _nl(0.6, eps) + 0.9 * _nl(0.4, eps))     # (1, 0): soft .1
               + _nl(0.7, eps)) / 4                                     # (1, 1): observed positive
    got = em_apl_loss(z, observed[index], soft[index], params)
    assert got.item() == pytest.approx(by_hand, abs=1e-6)


def test_apl_takes_all_candidates_when_fewer_remain():
    observed = torch.tensor([[0], [0], [0], [1]])
    params = APLParams(alpha=0.1, beta=0.1, neg_proportion=1.0, warmup_epoch=1)
    # U = 3, epochs 2: int(3 / 1) = 3 per update; two of the three are already labelled
    soft = torch.tensor([[0.5], [NAN], [0.4], [NAN]])
    new = apl_update(observed, soft, torch.tensor([[0.9], [0.8], [0.7], [0.0]]), 1, 2, params)
    assert new.flatten().tolist() == pytest.approx([0.5, 0.8, 0.4, NAN], nan_ok=True)


def test_apl_rejects_bad_predictions():
    observed = torch.zeros(2, 2)
    params = APLParams(alpha=0.1, beta=0.1, neg_proportion=1.0, warmup_epoch=1)
    soft = apl_initial_soft_labels(observed)
    with pytest.raises(ValueError, match="non-finite"):
        apl_update(observed, soft, torch.tensor([[NAN, 0.1], [0.2, 0.3]]), 1, 3, params)
    with pytest.raises(ValueError, match="shape"):
        apl_update(observed, soft, torch.zeros(3, 2), 1, 3, params)


# ---------------------------------------------------------------------------------------------- GR

def test_gr_schedule_keeps_the_published_off_by_one():
    p = GR_PUBLISHED     # beta [0, 2, -2, -2], alpha [0.5, 2, 0.8, 0.5]
    s1 = gr_schedule(1, 8, p)
    # w, b: max(1 - 0 - 1, 0) / 8 = 0 -> start; mu, sigma: max(1 - 0, 0) / 8 = 1/8 of the way
    assert (s1.w, s1.b) == (0.0, -2.0)
    assert s1.mu == pytest.approx(0.5 + 0.3 / 8) and s1.sigma == pytest.approx(2 - 1.5 / 8)
    s8 = gr_schedule(8, 8, p)
    assert s8.w == pytest.approx(2 * 7 / 8) and s8.b == -2.0          # w never reaches w_T
    assert s8.mu == pytest.approx(0.8) and s8.sigma == pytest.approx(0.5)
    # linear_init n = 2 of 8: epochs <= 2 at the start values, then steps of 1/6
    for e in (0, 1, 2):
        s = gr_schedule(e, 8, p, linear_init_epochs=2)
        assert (s.w, s.b, s.mu, s.sigma) == (0.0, -2.0, 0.5, 2.0)
    s3 = gr_schedule(3, 8, p, linear_init_epochs=2)
    assert s3.w == 0.0 and s3.mu == pytest.approx(0.5 + 0.3 / 6)
    s5 = gr_schedule(5, 8, p, linear_init_epochs=2)
    assert s5.w == pytest.approx(2 * 2 / 6) and s5.sigma == pytest.approx(2 - 1.5 * 3 / 6)
    with pytest.raises(ConfigError, match="linear_init_epochs"):
        gr_schedule(1, 2, p, linear_init_epochs=2)


def test_gr_k_and_v_by_hand():
    s = gr_schedule(8, 8, GR_PUBLISHED)        # w 1.75, b -2, mu 0.8, sigma 0.5
    probs = torch.tensor([0.0, 0.5, 0.8, 1.0])
    k = [1 / (1 + math.exp(-(1.75 * p - 2))) for p in probs.tolist()]
    v = [math.exp(-0.5 * ((p - 0.8) / 0.5) ** 2) for p in probs.tolist()]
    assert gr_k(probs, s).tolist() == pytest.approx(k, abs=1e-7)
    assert gr_v(probs, s).tolist() == pytest.approx(v, abs=1e-7)
    assert gr_v(probs, s)[2].item() == 1.0     # the weight peaks at mu


def _gr_entry(p, o, sched, q2, q3, eps=GR_LOG_EPSILON):
    if o == 1:
        return _nl(p, eps)
    if o == -1:
        return _nl(1 - p, eps)
    k = 1 / (1 + math.exp(-(sched.w * p + sched.b)))
    v = math.exp(-0.5 * ((p - sched.mu) / sched.sigma) ** 2)
    return v * (k * (1 - p ** q2) / q2 + (1 - k) * (1 - (1 - p) ** q3) / q3)


def _gr_entry_grad(p, o, sched, q2, q3, eps=GR_LOG_EPSILON):
    """d entry / d logit with k and v held constant (they are computed on the detached p)."""
    s = p * (1 - p)
    if o == 1:
        return -s / (p + eps)
    if o == -1:
        return s / (1 - p + eps)
    k = 1 / (1 + math.exp(-(sched.w * p + sched.b)))
    v = math.exp(-0.5 * ((p - sched.mu) / sched.sigma) ** 2)
    # d/dz (1 - p^q2)/q2 = -p^q2 (1 - p);  d/dz (1 - (1-p)^q3)/q3 = (1-p)^q3 p
    return v * (k * -(p ** q2) * (1 - p) + (1 - k) * (1 - p) ** q3 * p)


@pytest.mark.parametrize("epoch", [1, 5, 8])
@pytest.mark.parametrize("q2q3", [(0.01, 1.0), (0.5, 0.7)])
def test_gr_loss_and_gradient_by_hand(epoch, q2q3):
    q2, q3 = q2q3
    params = GRParams.from_published([0, 2, -2, -2], [0.5, 2, 0.8, 0.5], [q2, q3])
    sched = gr_schedule(epoch, 8, params)
    expected = sum(_gr_entry(p, o, sched, q2, q3) for row, orow in zip(PROBS, OBSERVED.tolist())
                   for p, o in zip(row, orow)) / 6
    z = _logits().requires_grad_()
    loss = gr_loss(z, OBSERVED, epoch, 8, params)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    grads = [[_gr_entry_grad(p, o, sched, q2, q3) / 6 for p, o in zip(row, orow)]
             for row, orow in zip(PROBS, OBSERVED.tolist())]
    assert torch.allclose(z.grad, torch.tensor(grads), atol=1e-6)


def test_gr_literal_value():
    # p = 0.5 unobserved, epoch 1 of 8, published settings: K = sigmoid(-2), V = exp(-0.5 (0.0375/1.8125)^2),
    # (1 - 0.5^0.01)/0.01 = 0.69075, (1 - 0.5)/1 = 0.5
    k = 1 / (1 + math.exp(2))
    v = math.exp(-0.5 * (0.0375 / 1.8125) ** 2)
    by_hand = v * (k * (1 - 0.5 ** 0.01) / 0.01 + (1 - k) * 0.5)
    assert by_hand == pytest.approx(0.522626, abs=1e-6)
    assert gr_loss(torch.zeros(1, 1), torch.zeros(1, 1), 1, 8, GR_PUBLISHED).item() == pytest.approx(by_hand, abs=1e-6)
    # an observed positive at p = 0.5: -log(0.5 + 1e-7); the epsilon caps -log p at -log(1e-7) = 16.12
    assert gr_loss(torch.zeros(1, 1), torch.ones(1, 1), 1, 8, GR_PUBLISHED).item() == pytest.approx(
        -math.log(0.5 + 1e-7), abs=1e-6)
    assert gr_loss(torch.full((1, 1), -100.0), torch.ones(1, 1), 1, 8, GR_PUBLISHED).item() == pytest.approx(
        -math.log(1e-7), abs=1e-4)


def test_gr_reduction_is_the_mean_over_b_times_c():
    z = _logits()
    one = gr_loss(z, OBSERVED, 3, 8, GR_PUBLISHED)
    two = gr_loss(torch.cat([z, z]), torch.cat([OBSERVED, OBSERVED]), 3, 8, GR_PUBLISHED)
    assert one.item() == pytest.approx(two.item(), rel=1e-6)


def test_gr_direction_follows_the_soft_label():
    z = torch.zeros(1, 1, requires_grad=True)             # p = 0.5
    negative = GRParams(0, 0, -20, -20, 0.5, 2, 0.5, 2, 0.01, 1)    # K ~ 0: the negative term
    gr_loss(z, torch.zeros(1, 1), 1, 8, negative).backward()
    wide = z.grad[0, 0].item()
    assert wide > 0                                       # descent lowers p
    z.grad = None
    positive = GRParams(0, 0, 20, 20, 0.5, 2, 0.5, 2, 0.01, 1)      # K ~ 1: the positive term
    gr_loss(z, torch.zeros(1, 1), 1, 8, positive).backward()
    assert z.grad[0, 0] < 0                               # descent raises p
    # 4 sigma from mu the weight V, and so the push, is exp(-8) of what it is at mu
    narrow = GRParams(0, 0, -20, -20, 0.9, 0.1, 0.9, 0.1, 0.01, 1)
    z.grad = None
    gr_loss(z, torch.zeros(1, 1), 1, 8, narrow).backward()
    assert z.grad[0, 0].item() == pytest.approx(wide * math.exp(-8), rel=1e-4)      # V = 1 in `wide`


def test_gr_finite_at_extreme_logits():
    # torch.pow(p, 0.01) has an infinite gradient at p = 0 (and (1-p)^q3 at p = 1 for q3 < 1): NaN in the
    # published code once sigmoid underflows; the log-sigmoid form stays finite
    params = GRParams(0, 2, -2, -2, 0.5, 2, 0.8, 0.5, 0.01, 0.5)
    z = torch.tensor([[-200.0, 200.0, -120.0, 120.0]], requires_grad=True)
    loss = gr_loss(z, torch.zeros(1, 4), 4, 8, params)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


# ------------------------------------------------------------------------------- hyper-parameters

def test_published_defaults():
    assert APL_DEFAULTS["pascal"] == APLParams(alpha=0.2, beta=0.02, neg_proportion=0.9, warmup_epoch=5)
    assert APL_DEFAULTS["coco"] == APLParams(alpha=0.1, beta=0.9, neg_proportion=0.9, warmup_epoch=5)
    assert APL_DEFAULTS["nuswide"] == APLParams(alpha=0.1, beta=0.2, neg_proportion=0.9, warmup_epoch=4)
    assert APL_DEFAULTS["cub"] == APLParams(alpha=0.01, beta=0.4, neg_proportion=0.9, warmup_epoch=3)
    assert {k: v.alpha for k, v in EM_DEFAULTS.items()} == {"pascal": 0.2, "coco": 0.1, "nuswide": 0.1, "cub": 0.01}
    assert [(t.batch_size, t.lr, t.lr_head_mult, t.epochs) for t in EM_TRAINING.values()] == [
        (8, 1e-5, 1.0, 10), (16, 1e-5, 1.0, 10), (16, 1e-5, 1.0, 10), (8, 1e-4, 1.0, 10)]
    assert GR_PUBLISHED == GRParams(w_start=0, w_end=2, b_start=-2, b_end=-2, mu_start=0.5, sigma_start=2,
                                    mu_end=0.8, sigma_end=0.5, q2=0.01, q3=1)
    assert set(GR_DEFAULTS) == set(EM_DEFAULTS) == set(GR_TRAINING)
    assert GR_TRAINING["coco"].epochs == 8 and GR_TRAINING["coco"].lr_head_mult == 10.0
    assert set(PUBLISHED_MAP) == set(SEARCH_RANGES) == {"EM", "EM+APL", "GR"}


def test_search_ranges_contain_the_published_defaults():
    for scheme, defaults in (("EM", EM_DEFAULTS), ("EM+APL", APL_DEFAULTS), ("GR", GR_DEFAULTS)):
        for params in defaults.values():
            for name, r in SEARCH_RANGES[scheme].items():
                assert r.low <= getattr(params, name) <= r.high, (scheme, name)


@pytest.mark.parametrize("make", [
    lambda: EMParams(-0.1),
    lambda: EMParams(math.nan),
    lambda: APLParams(alpha=0.1, beta=0.1, neg_proportion=1.5, warmup_epoch=2),
    lambda: APLParams(alpha=0.1, beta=-1, neg_proportion=0.9, warmup_epoch=2),
    lambda: APLParams(alpha=0.1, beta=0.1, neg_proportion=0.9, warmup_epoch=0),
    lambda: APLParams(alpha=0.1, beta=0.1, neg_proportion=0.9, warmup_epoch=2.5),
    lambda: GRParams(0, 2, -2, -2, 0.5, 0.0, 0.8, 0.5, 0.01, 1),
    lambda: GRParams(0, 2, -2, -2, 0.5, 2, 0.8, 0.5, 0.0, 1),
    lambda: GRParams(0, 2, -2, math.inf, 0.5, 2, 0.8, 0.5, 0.01, 1),
])
def test_bad_hyper_parameters_are_refused(make):
    with pytest.raises(ConfigError):
        make()
