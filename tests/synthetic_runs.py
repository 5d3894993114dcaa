"""Writers of synthetic sweeps in the project's MLflow schema (orchestration.common's tags and metrics):
a parent run per sweep and nested trial and final runs, for the table and MLflow UI tests."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from orchestration import common as T


@dataclass
class RunSpec:
    scheme: str
    role: str = T.ROLE_TRIAL
    seed: int = 0
    delta_rel: float = 2.0
    lr: float = 1e-3
    epochs: int = 5                   # configured
    val_map: list[float] = field(default_factory=list)   # per epoch; its length = epochs run
    end_reason: str | None = "completed"   # None: tag left out
    status: str = "FINISHED"
    test_map: float | None = None
    gpu_hours: float = 0.0
    extra_metrics: dict = field(default_factory=dict)
    boostlu_alpha: float | None = None


def write_sweep(client: MlflowClient, name: str, dataset: str, mode: str,
                specs: list[RunSpec], t0: int | None = None) -> tuple[str, str, list[str]]:
    """Create experiment `name` with a parent sweep run and nested runs; (exp id, parent id, child ids)."""
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name)
    t0 = int(time.time() * 1000) if t0 is None else t0
    parent = client.create_run(exp_id, run_name=name, start_time=t0, tags={
        T.TAG_ROLE: T.ROLE_SWEEP, T.TAG_SWEEP: name, T.TAG_DATASET: dataset, T.TAG_MODE: mode})
    ids = []
    for i, s in enumerate(specs):
        trial_id = f"{s.scheme}_{i:03d}"
        tags = {T.TAG_PARENT: parent.info.run_id, T.TAG_ROLE: s.role, T.TAG_DATASET: dataset,
                T.TAG_SCHEME: s.scheme, T.TAG_MODE: mode, T.TAG_SEED: str(s.seed),
                T.TAG_TRIAL_ID: trial_id, T.TAG_SWEEP: name}
        if s.end_reason is not None:
            tags[T.TAG_STATUS_REASON] = s.end_reason
        run_name = f"{s.role}-{s.scheme}-{i:03d}" if s.role == T.ROLE_TRIAL else f"final-{s.scheme}-seed{s.seed}"
        run = client.create_run(exp_id, run_name=run_name, start_time=t0 + 1000 * (i + 1), tags=tags)
        params = {"dataset": dataset, "scheme": s.scheme, "delta_rel": s.delta_rel, "lr": s.lr,
                  "mode": mode, "seed": s.seed, "epochs": s.epochs, "batch_size": 32,
                  "boostlu_alpha": s.boostlu_alpha}
        metrics = []
        ts = t0 + 1000 * (i + 1)
        k = len(s.val_map)
        for e, v in enumerate(s.val_map, start=1):
            metrics += [Metric(T.VAL_MAP, v, ts + e, e), Metric(T.TRAIN_LOSS, 1.0 / e, ts + e, e),
                        Metric(T.CLEAN_RATE, 1 - (e - 1) * s.delta_rel / 100, ts + e, e)]
            if s.scheme.startswith("LL-"):
                metrics += [Metric(T.MODIFIED_FRAC, (e - 1) * s.delta_rel / 100, ts + e, e),
                            Metric(T.MODIFIED_TRUE_POS_FRAC, 0.0 if e == 1 else max(0.05, 0.6 - 0.1 * e),
                                   ts + e, e)]
        if k:
            best_epoch = int(np.argmax(s.val_map)) + 1
            metrics += [Metric(T.BEST_VAL_MAP, max(s.val_map), ts + 99, 0),
                        Metric(T.BEST_EPOCH, best_epoch, ts + 99, 0)]
        metrics += [Metric(T.EPOCHS_RUN, k, ts + 99, 0), Metric(T.GPU_HOURS, s.gpu_hours, ts + 99, 0),
                    Metric(T.TRAIN_HOURS, s.gpu_hours or 0.01, ts + 99, 0)]
        if s.test_map is not None:
            metrics.append(Metric(T.TEST_MAP, s.test_map, ts + 99, 0))
        for key, v in s.extra_metrics.items():
            metrics.append(Metric(key, v, ts + 99, 0))
        client.log_batch(run.info.run_id, metrics=metrics,
                         params=[Param(a, str(b)) for a, b in params.items()])
        client.set_terminated(run.info.run_id, s.status, end_time=ts + 500)
        ids.append(run.info.run_id)
    client.set_terminated(parent.info.run_id, "FINISHED")
    return exp_id, parent.info.run_id, ids


def curve(peak: float, epochs: int, rng: np.random.Generator) -> list[float]:
    base = np.linspace(peak - 20, peak, epochs) + rng.normal(0, 0.5, epochs)
    return [float(round(v, 4)) for v in base]


def final_specs(scheme: str, tests: list[float], epochs: int = 5, delta_rel: float = 2.0,
                lr: float = 1e-3, boostlu_alpha: float | None = None) -> list[RunSpec]:
    rng = np.random.default_rng(len(scheme))
    return [RunSpec(scheme, role=T.ROLE_FINAL, seed=s, epochs=epochs, delta_rel=delta_rel, lr=lr,
                    val_map=curve(t + 1, epochs, rng), test_map=t, gpu_hours=0.1, boostlu_alpha=boostlu_alpha)
            for s, t in enumerate(tests)]
