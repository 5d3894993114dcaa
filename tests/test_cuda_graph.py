"""A step captured as a CUDA graph does what the eager step does (runs only where CUDA exists)."""
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")


def _trainer(graph: bool, scheme: str, lr: float, optimizer: str = "adam", boostlu_alpha: float | None = None):
    from wsml.config import TrainConfig
    from wsml.data.loading import load_data
    from wsml.trainer import Trainer

    torch.backends.cudnn.deterministic = True
    cfg = TrainConfig(dataset="digits", scheme=scheme, delta_rel=5.0, lr=lr, optimizer=optimizer, precision="fp32",
                      cuda_graph=graph, device="cuda", num_workers=0, max_train_images=256,
                      boostlu_alpha=boostlu_alpha).resolve()
    trainer = Trainer(cfg, load_data(cfg), torch.device("cuda"), log=lambda _m: None)
    torch.backends.cudnn.benchmark = False
    return trainer


@pytest.mark.parametrize("scheme,optimizer,boostlu_alpha", [("LL-R", "adam", None), ("LL-Cp", "adam", None),
                                                          ("LL-R", "sgd", None), ("ROLE", "sgd", None),
                                                          ("LL-R", "adam", 5.0), ("EM", "adam", None),
                                                          ("EM+APL", "adam", None), ("GR", "adam", None)])
def test_graph_step_matches_eager_loss_and_gradients(scheme, optimizer, boostlu_alpha):
    from wsml.trainer import _GraphedStep

    # lr ~ 0: both start every step from the same weights, so each step's loss and gradients
    # are compared directly (with a real lr, Adam's sign-like first steps amplify rounding)
    eager, graphed = (_trainer(g, scheme, 1e-12, optimizer, boostlu_alpha) for g in (False, True))
    if optimizer == "adam":
        eager.optimizer = torch.optim.Adam(eager.optimizer.param_groups, capturable=True, fused=True)
    if eager.soft_labels is not None:      # EM+APL: the same pseudo-labels in both, as after an update
        g = torch.Generator().manual_seed(0)
        soft = torch.where(torch.rand(eager.soft_labels.shape, generator=g) < 0.3, 0.2, float("nan"))
        eager.soft_labels, graphed.soft_labels = soft.cuda(), soft.cuda()
    rng = np.random.RandomState(0)
    step = None
    for i in range(8):
        index = torch.as_tensor(rng.choice(256, 32, replace=False), device="cuda")
        x = eager.to_input(torch.from_numpy(eager.data.train.images[index.cpu().numpy()]))
        loss_e, sel_e, _ = eager._step(x, index, 3)
        step = step or _GraphedStep(graphed, 3, x, index, warmup=True)
        loss_g, sel_g, _ = step(x, index)
        torch.testing.assert_close(loss_g, loss_e, rtol=1e-4, atol=1e-5)
        assert torch.equal(sel_g, sel_e)
        for (name, p_e), p_g in zip(eager.model.named_parameters(), graphed.model.parameters()):
            torch.testing.assert_close(p_g.grad, p_e.grad, rtol=1e-3, atol=1e-5, msg=f"grad of {name} at step {i}")
        if eager.estimator is not None:   # ROLE's estimator steps inside the graph too
            torch.testing.assert_close(graphed.estimator.grad, eager.estimator.grad, rtol=1e-3, atol=1e-8)
    assert torch.equal(graphed.observed, eager.observed)   # LL-Cp's flips land in the same entries


@pytest.mark.parametrize("optimizer,lr", [("adam", 1e-3), ("sgd", 1e-2)])
def test_graph_epoch_trains_like_eager(optimizer, lr):
    eager, graphed = _trainer(False, "LL-R", lr, optimizer), _trainer(True, "LL-R", lr, optimizer)
    for epoch in (1, 2):
        e, g = eager.train_epoch(epoch), graphed.train_epoch(epoch)
        assert abs(e["train_loss"] - g["train_loss"]) < 0.02 * e["train_loss"]
