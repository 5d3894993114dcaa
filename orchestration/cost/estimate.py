"""What a sweep will cost, before it starts: trials, epochs, images, GPU-hours and wall time.

`estimate(space, data, rate, slots)` adds up, from the space file alone:

* trials per (scheme, mode, BoostLU) group (`orchestration.search.per_scheme.quotas`);
* epochs per trial: at most `epochs`; expected from ASHA's rungs
  (`asha_expected_epochs`): a trial stopped at a rung has trained that rung's
  epochs. The expectation assumes that trials reach the rungs in the order
  they started, that each keeps its rank among the group's trials from rung to
  rung, and that no trial is better for starting later. TPE's later proposals
  tend to be better, so more of them pass (the estimate is then low); the
  trainer's own stop rule (`stop_drop`) ends some trials before ASHA does (then
  it is high);
* images per epoch (`data_sizes`): the training split after the validation
  split, trained; validation and test evaluated every epoch (the trainer
  evaluates the test split only when validation improves: an upper bound);
* the final stage: every group's best configuration, `final_seeds` seeds, all
  epochs;
* time per trial from `orchestration.cost.throughput` and wall time with `slots`
  trials at once: the search, then the final stage, each trial plus its
  start-up (`TRIAL_STARTUP_S`: Tune placing it, the trainable loading its data
  and building its model, before its first epoch); the trials are taken to
  keep every slot busy (starting nodes and building the image cache are not
  counted).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsml.config import TrainConfig

from orchestration.search import per_scheme
from orchestration.cost import prices, throughput
from orchestration.common import ESTIMATE_PREFIX, SweepError, method_name

# Seconds per trial outside its epochs (Tune placing it, the trainable's imports, data and model, checkpoint
# writes), measured on the demo (search_spaces/digits-demo.yaml, 2 cores, 8 search trials + 12 final runs, 2 at
# once): it spent 143 s where this estimate without start-up said 103 s (final stage included), 40 s over 10
# trials per slot = 4.0 s each. Where it goes, from a demo's trial logs (Ray's result.json; a machine ~15x
# loaded, so in epochs' time): a worker's first trial spent 2.4-2.7 epochs' time before its first epoch
# (4.5-5.0 s at the estimate's 1.84 s per epoch), a later trial on the same worker 0.05-0.2, and Tune took
# about 1 s from one trial's end to the next one's start. A CPU figure: a GPU trial's start-up (CUDA context,
# image cache) is longer and not measured yet.
TRIAL_STARTUP_S = 4.0

# Official split sizes (images), for data sets not prepared yet: (train, val) as the published layout
# calls them, i.e. the official train split (of which val_frac goes to validation) and the official
# val split (the test set).
_OFFICIAL_EXTRA = {
    # NUS-WIDE's own split (Chua et al., CIVR 2009): 161,789 train, 107,859 test. The paper's data is
    # the subset still online when the single-positive work re-crawled it in 2020: smaller.
    "nuswide": (161789, 107859, "NUS-WIDE's official split (the paper's re-crawled subset is smaller: an upper "
                                "bound)"),
    # Open Images V3 (READMEV3 of github.com/openimages/dataset): 9,011,219 train, 41,620 validation,
    # 125,436 test. The published code trains on the train images with human-verified labels only, a
    # subset whose size the release does not state.
    "openimages": (9011219, 125436, "Open Images V3's official split (train: all 9.0 M images; the published "
                                    "code uses those with human-verified labels, fewer: an upper bound)"),
}


@dataclass(frozen=True)
class DataSizes:
    train: int              # images trained per epoch
    val: int                # evaluated per epoch
    test: int               # evaluated per epoch (at most)
    source: str             # where the numbers come from


def official_sizes(dataset: str) -> tuple[int, int, str]:
    from wsml.data.prepare import OFFICIAL_COUNTS

    _, train, test = OFFICIAL_COUNTS.get(dataset, (0, None, None))
    if train is not None and test is not None:
        return train, test, f"{dataset}'s official split sizes (wsml.data.prepare.OFFICIAL_COUNTS)"
    return _OFFICIAL_EXTRA[dataset]


def data_sizes(dataset: str, data_root: str | None, train: dict) -> DataSizes:
    """Images per epoch of a run with the space's `train:` settings: the prepared data set's own counts
    (its label arrays' first dimension, memory-mapped), else the official split sizes (said)."""
    cfg = TrainConfig.from_dict({"dataset": dataset, **train}).resolve()
    if dataset == "digits":
        from wsml.data.digits import SPLIT_SIZES

        n_train, n_val, n_test = SPLIT_SIZES["train"], SPLIT_SIZES["val"], SPLIT_SIZES["test"]
        source = "the built-in digits set"
    else:
        root = Path(data_root) if data_root else None
        files = [root / f"formatted_{s}_labels.npy" for s in ("train", "val")] if root else []
        if files and all(f.is_file() for f in files):
            official_train, n_test = (int(np.load(f, mmap_mode="r").shape[0]) for f in files)
            source = f"the prepared data set in {root}"
        else:
            official_train, n_test, source = official_sizes(dataset)
            source += ": the data set is not prepared here"
        n_val = int(round(cfg.val_frac * official_train))       # as wsml.data.protocol.split_train_val
        n_train = official_train - n_val
    if cfg.max_train_images is not None:
        n_train = min(n_train, cfg.max_train_images)
    return DataSizes(n_train, n_val, n_test, source)


# ------------------------------------------------------------------ ASHA
def asha_rungs(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """The epochs at which Ray's ASHAScheduler (one bracket) compares trials, ascending."""
    count = int(np.log(max_t / grace_period) / np.log(reduction_factor) + 1)
    return sorted(int(grace_period * reduction_factor ** k) for k in range(count))


def asha_epochs(values: np.ndarray, grace_period: int, reduction_factor: float, max_t: int) -> np.ndarray:
    """Epochs each trial trains under ASHA's rule when trial i's metric at every rung is `values[..., i]`
    and the trials reach every rung in index order (`values`: sims x trials, or one row).

    The rule (Ray's AsyncHyperBandScheduler, one bracket): at a rung, a trial whose metric is below the
    (1 - 1/reduction_factor) percentile (numpy's linear interpolation) of the metrics the rung recorded
    before it is stopped; the first trial at a rung always goes on.
    """
    values = np.atleast_2d(np.asarray(values, dtype=float))
    sims, n = values.shape
    epochs = np.full((sims, n), float(max_t))
    alive = np.ones((sims, n), dtype=bool)
    q = 1 - 1 / reduction_factor
    rows = np.arange(sims)
    for rung in asha_rungs(grace_period, reduction_factor, max_t):
        if rung >= max_t:
            break
        recorded = np.where(alive, values, np.nan)      # what the rung records, in arrival order
        for i in range(1, n):
            before = np.sort(recorded[:, :i], axis=1)   # NaN (not recorded) sorts last
            m = (~np.isnan(before)).sum(axis=1)
            pos = q * np.maximum(m - 1, 0)
            lo = np.floor(pos).astype(int)
            hi = np.minimum(lo + 1, np.maximum(m - 1, 0))
            cutoff = before[rows, lo] + (pos - lo) * (before[rows, hi] - before[rows, lo])
            stop = alive[:, i] & (m > 0) & (values[:, i] < cutoff)
            epochs[stop, i] = rung
            alive[:, i] &= ~stop                        # (still recorded at this rung, as Ray does)
    return epochs


def asha_expected_epochs(trials: int, grace_period: int, reduction_factor: float, max_t: int,
                         sims: int = 4000, seed: int = 0) -> float:
    """Expected epochs per trial of a group of `trials` under ASHA (see the module docstring for the
    assumptions); a seeded Monte Carlo over the trials' standings, so the same inputs give the same number."""
    if trials <= 1:
        return float(max_t)
    values = np.random.default_rng(seed).random((sims, trials))
    return float(asha_epochs(values, grace_period, reduction_factor, max_t).mean())


# -------------------------------------------------------------- estimate
@dataclass
class GroupCost:
    method: str                     # the table row: "LL-R", "LL-R + BoostLU"
    mode: str
    trials: int
    expected_epochs: float          # per trial


@dataclass
class Estimate:
    groups: list[GroupCost]
    epochs: int                     # per trial, at most
    rungs: list[int]
    data: DataSizes
    rate: throughput.Rate
    gpus_per_trial: float
    slots: int                      # trials at once
    slots_note: str
    final_runs: int
    linear_init_images: int = 0     # LinearInit: one feature pass over train + val (cached for every trial)
    keep_checkpoints: int = 2       # per run (the space file's)
    startup_s: float = TRIAL_STARTUP_S      # per trial, before its first epoch
    notes: list[str] = field(default_factory=list)

    @property
    def trials(self) -> int:
        return sum(g.trials for g in self.groups)

    @property
    def trials_with_finals(self) -> int:
        return self.trials + self.final_runs

    @property
    def search_epochs_most(self) -> int:
        return self.trials * self.epochs

    @property
    def search_epochs_expected(self) -> float:
        return sum(g.trials * g.expected_epochs for g in self.groups)

    @property
    def final_epochs(self) -> int:
        return self.final_runs * self.epochs

    @property
    def epoch_seconds(self) -> float:
        """One trial's epoch: training the train split, evaluating validation and test."""
        return self.data.train / self.rate.train + (self.data.val + self.data.test) / self.rate.evaluate

    @property
    def trial_seconds(self) -> float:
        """Trial time (summed over trials) of the search (expected) and the final stage."""
        extra = self.linear_init_images / self.rate.evaluate
        return (self.search_epochs_expected + self.final_epochs) * self.epoch_seconds + extra

    @property
    def device_hours(self) -> float:
        """GPU-hours (GPU trials: the trials' share of their GPUs) or CPU trial-hours."""
        share = self.gpus_per_trial if self.gpus_per_trial > 0 else 1.0
        return self.trial_seconds * share / 3600

    @property
    def wall_seconds(self) -> float:
        """Search, then final stage, each keeping `slots` trials busy (never shorter than one whole trial),
        every trial with its start-up (`startup_s`)."""
        full_trial = self.epochs * self.epoch_seconds + self.startup_s
        search = max((self.search_epochs_expected * self.epoch_seconds + self.trials * self.startup_s) / self.slots,
                     full_trial)
        final = math.ceil(self.final_runs / self.slots) * full_trial if self.final_runs else 0.0
        return search + final + self.linear_init_images / self.rate.evaluate

    def params(self) -> dict[str, str]:
        """The estimate as the sweep run's MLflow params (`estimate.*`), shown beside what was spent."""
        values = {"device": self.rate.device, "slots": str(self.slots),
                  "epochs": f"{self.search_epochs_expected + self.final_epochs:.0f}",
                  "epochs_most": str(self.search_epochs_most + self.final_epochs),
                  "trial_hours": f"{self.trial_seconds / 3600:.4g}",
                  "gpu_hours": f"{self.device_hours if self.gpus_per_trial > 0 else 0.0:.4g}",
                  "wall_s": f"{self.wall_seconds:.0f}"}
        return {ESTIMATE_PREFIX + k: v for k, v in values.items()}

    def lines(self) -> list[str]:
        """What --dry-run prints."""
        d, r = self.data, self.rate
        gpu = self.gpus_per_trial > 0
        out = [f"trials: {self.trials} in {len(self.groups)} (scheme, mode, BoostLU) group(s), each its own TPE study and "
               "ASHA"]
        for g in self.groups:
            out.append(f"  {g.method:14s} {g.mode:11s} {g.trials:3d} trial(s), expected {g.expected_epochs:.1f} "
                       f"epochs each")
        rungs = ", ".join(str(x) for x in self.rungs if x < self.epochs) or "none below max_t"
        out += [f"epochs per trial: at most {self.epochs}; expected {self.search_epochs_expected / self.trials:.1f} "
                f"with ASHA (rungs at epoch {rungs}; assumes trials keep their rank from rung to rung and reach "
                "the rungs in the order they start)",
                f"search: at most {self.search_epochs_most} epochs, expected {self.search_epochs_expected:.0f}",
                f"final stage: {self.final_runs} run(s) x {self.epochs} epochs = {self.final_epochs} epochs",
                f"images per epoch: {d.train:,} trained, {d.val:,} validation + {d.test:,} test evaluated "
                f"({d.source})",
                f"throughput per trial on {r.device}: {r.train:,.0f} training, {r.evaluate:,.0f} evaluation "
                f"images/s ({r.source}): {self.epoch_seconds:,.1f} s per epoch"]
        if self.linear_init_images:
            out.append(f"LinearInit: one feature pass over {self.linear_init_images:,} images (cached for every "
                       "trial)")
        hours = self.trial_seconds / 3600
        if gpu:
            out.append(f"estimate: {self.device_hours:,.2f} GPU-hours on {r.device} ({hours:,.2f} trial-hours x "
                       f"{self.gpus_per_trial:g} GPU per trial)")
        else:
            out.append(f"estimate: {hours:,.3f} trial-hours on CPU cores (no GPU)")
        w = self.wall_seconds
        out.append(f"estimate: wall time {w:,.0f} s ({_human(w)}) with {self.slots} trial(s) at once "
                   f"({self.slots_note}): search and final stage, {self.startup_s:g} s start-up per trial")
        if gpu:
            out += prices.cost_lines(self, self.keep_checkpoints)
        out += [f"note: {n}" for n in self.notes]
        return out


def _human(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def estimate(space, data: DataSizes, rate: throughput.Rate, slots: int, slots_note: str,
             notes: list[str] | None = None, gpus_per_trial: float | None = None) -> Estimate:
    if slots < 1:
        raise SweepError(f"no trial fits on the resources given ({slots_note}): pass --gpus N")
    groups_ = space.search.groups()
    quota = per_scheme.quotas(groups_, space.num_samples)
    sch = space.scheduler
    groups = [GroupCost(method_name(g.scheme, 1.0 if g.boostlu else None), g.mode, quota[g],
                        asha_expected_epochs(quota[g], sch.grace_period, sch.reduction_factor, space.epochs))
              for g in groups_]
    linear = any(g.mode == "linear-init" for g in groups_)
    return Estimate(groups=groups, epochs=space.epochs, rungs=asha_rungs(sch.grace_period, sch.reduction_factor,
                                                                         space.epochs),
                    data=data, rate=rate, slots=slots,
                    gpus_per_trial=space.resources.gpus_per_trial if gpus_per_trial is None else gpus_per_trial,
                    slots_note=slots_note, final_runs=len(groups_) * space.final_seeds,
                    linear_init_images=(data.train + data.val) if linear else 0, notes=list(notes or []),
                    keep_checkpoints=space.keep_checkpoints)


def for_resources(space, data_root: str | None, *, cpus_per_trial: float, gpus_per_trial: float,
                  cpus: float | None, gpus: float, gpu_name: str | None, gpu_type: str | None = None,
                  where: str) -> Estimate:
    """The estimate for trials of `cpus_per_trial` / `gpus_per_trial` on `cpus` CPUs (None: not a limit) and
    `gpus` GPUs named `gpu_name` (as CUDA or Ray report it) or `gpu_type` (a name of the throughput table);
    `where` says where those counts come from."""
    notes: list[str] = []
    data = data_sizes(space.dataset, data_root, space.train)
    cfg = TrainConfig.from_dict({"dataset": space.dataset, **space.train}).resolve()
    assert cfg.arch is not None and cfg.image_size is not None      # resolve() fills them in
    if gpus_per_trial > 0:
        gpu = gpu_type
        if gpu is None and gpu_name:
            found = throughput.find_gpu(gpu_name)
            if found is None:
                notes.append(f"{gpu_name} is not in the throughput table: estimated as a {throughput.DEFAULT_GPU} "
                             "(pass --gpu-type, or measure it with bench/gpu.py)")
            gpu = found.name if found else None
        if gpu is None:
            gpu = throughput.DEFAULT_GPU
            if not gpu_name:
                notes.append(f"no GPU type known here: estimated for {gpu} GPUs (cluster.yaml's workers); pass "
                             f"--gpu-type one of {', '.join(throughput.gpu_names())}")
        if gpus <= 0:
            notes.append("no GPU on the cluster described: wall time for 1 GPU; pass --gpus N (on an autoscaling "
                         "cluster: the GPUs it may start)")
            gpus, cpus, where = 1, None, "assumed"
        rate = throughput.gpu_rate(gpu, cfg.arch, cfg.image_size, cfg.cuda_graph)
        if gpus_per_trial < 1:      # trials sharing a GPU share its rate (a 448 px ResNet-50 keeps it busy alone)
            rate = throughput.Rate(rate.device, rate.train * gpus_per_trial, rate.evaluate * gpus_per_trial,
                                   rate.source + f"; {gpus_per_trial:g} of the GPU per trial")
        slots = int(gpus // gpus_per_trial + 1e-9)
        if cpus is not None:
            slots = min(slots, int(cpus // cpus_per_trial + 1e-9))
        note = f"{gpus:g} GPU(s), {gpus_per_trial:g} per trial; {where}"
    else:
        rate = throughput.cpu_rate(cfg.arch, cpus_per_trial)
        if cpus is None or cpus <= 0:
            raise SweepError("no CPU count for CPU trials: pass --address or run on the machine the trials use")
        slots = int(cpus // cpus_per_trial + 1e-9)
        note = f"{cpus:g} CPU(s), {cpus_per_trial:g} per trial; {where}"
    return estimate(space, data, rate, slots, note, notes, gpus_per_trial=gpus_per_trial)
