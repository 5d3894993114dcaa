"""Search-space files: the shipped ones load, bad ones fail with one line naming key, value and fix."""
from __future__ import annotations

import textwrap

import optuna
import pytest

from orchestration.report import paper
from orchestration.common import SpaceError
from orchestration.search.per_scheme import quotas
from orchestration.search.study import GroupSpace
from orchestration.search.space import SPACES_DIR, FloatParam, Group, load_space, with_overrides
from orchestration.trial import Trial
from wsml.config import BASELINES, DATASETS, LL_SCHEMES, SCHEMES

GOOD = textwrap.dedent("""\
    dataset: digits
    search:
      scheme: [LL-R, LL-Ct, LL-Cp]
      delta_rel: {low: 0.5, high: 4.0}
      lr: {low: 2.0e-4, high: 5.0e-3, log: true}
    num_samples: 8
    epochs: 4
    scheduler: {grace_period: 2, reduction_factor: 2}
    resources: {cpus_per_trial: 1, gpus_per_trial: 0}
    final_seeds: 2
    train: {num_workers: 0}
    """)


def write(tmp_path, text: str):
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


def _space_error(tmp_path, old: str, new: str) -> str:
    """The one-line SpaceError of GOOD with `old` replaced by `new`."""
    assert old in GOOD
    with pytest.raises(SpaceError) as info:
        load_space("digits", write(tmp_path, GOOD.replace(old, new)))
    msg = str(info.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("dataset", DATASETS)
def test_shipped_spaces_load(dataset):
    s = load_space(dataset)
    assert s.dataset == dataset
    assert set(s.search.scheme) == set(LL_SCHEMES)
    assert s.scheduler.grace_period >= 2 and s.scheduler.grace_period <= s.epochs
    for opt in s.search.optimizer:
        lr = s.search.lr_for(opt)
        assert lr.log and lr.low < lr.high
    if dataset == "digits":
        assert s.resources.gpus_per_trial == 0 and s.resources.cpus_per_trial == 1
        assert s.search.lr.contains(1e-3) and s.search.delta_rel.contains(2.0)
        assert s.train["num_workers"] == 0
    else:
        assert s.resources.gpus_per_trial == 1
        assert s.search.delta_rel.values == [0.1, 0.2, 0.3, 0.4, 0.5]      # the authors' grid
        assert s.search.lr_for("adam").contains(1e-5)                        # the published code's default
    # every scheme starts from its default (the published code's) configuration among others
    points = s.start_points()
    assert {p["scheme"] for p in points} == set(s.search.scheme)
    assert s.final_seeds >= 1
    assert (SPACES_DIR / f"{dataset}.yaml").is_file()


@pytest.mark.parametrize("dataset", paper.PAPER_DATASETS)
def test_the_authors_best_settings_are_start_points_inside_the_ranges(dataset):
    """Each benchmark space evaluates the authors' published best setting of each scheme first."""
    s = load_space(dataset)
    for scheme in LL_SCHEMES:
        best = paper.authors_best(dataset, scheme)
        assert best is not None
        assert best["optimizer"] in s.search.optimizer
        assert s.search.lr_for(best["optimizer"]).contains(best["lr"])
        assert s.search.delta_rel.contains(best["delta_rel"])
        points = [p for p in s.start_points() if p["scheme"] == scheme]
        assert any(p.get("optimizer", "adam") == best["optimizer"] and p["lr"] == pytest.approx(best["lr"])
                   and p["delta_rel"] == pytest.approx(best["delta_rel"]) for p in points), (scheme, points)
        # and it is what the scheme's own study evaluates first
        group = s.group_points(Group(scheme, "end-to-end"))
        lr_key = "lr" if isinstance(s.search.lr, FloatParam) else f"lr_{best['optimizer']}"
        assert group[0][lr_key] == pytest.approx(best["lr"]) and group[0]["delta_rel"] == best["delta_rel"]
    assert paper.authors_best("pascal", "LL-Cp") == {"scheme": "LL-Cp", "optimizer": "sgd", "lr": 5e-3,
                                                     "delta_rel": 0.1}
    assert paper.authors_best("cub", "LL-R")["lr"] == 7.5e-5


@pytest.mark.parametrize("edit, key", [
    (("num_samples: 8", "num_samples: 8\nbogus: 1"), "bogus"),
    (("epochs: 4", "epochs: four"), "epochs"),
    (("low: 2.0e-4", "low: -1.0e-4"), "search.lr.low"),
    (("low: 0.5, high: 4.0", "low: 4.0, high: 0.5"), "search.delta_rel.low"),
    (("grace_period: 2", "grace_period: 1"), "scheduler.grace_period"),
    (("grace_period: 2", "grace_period: 5"), "scheduler.grace_period"),
    (("[LL-R, LL-Ct, LL-Cp]", "[LL-R, LL-X]"), "search.scheme"),
    (("gpus_per_trial: 0", "gpus_per_trial: -1"), "resources.gpus_per_trial"),
    (("reduction_factor: 2", "reduction_factor: 1"), "scheduler.reduction_factor"),
    (("{num_workers: 0}", "{num_workers: 0, lr: 0.1}"), "train.lr"),
    (("dataset: digits", "dataset: pascal"), "dataset"),
    (("cpus_per_trial: 1", "cpus_per_trial: 1, tpus: 2"), "resources.tpus"),
    (("delta_rel: {low: 0.5, high: 4.0}", "delta_rel: {values: [1, 200]}"), "search.delta_rel.values"),
])
def test_bad_values_name_key_value_and_fix(tmp_path, edit, key):
    msg = _space_error(tmp_path, *edit)
    assert key in msg, msg
    assert ":" in msg.split(key, 1)[1], msg          # "...: <the fix>"


def test_malformed_yaml_is_one_line(tmp_path):
    with pytest.raises(SpaceError) as info:
        load_space("digits", write(tmp_path, "dataset: digits\nsearch: [a, b\n"))
    msg = str(info.value)
    assert "malformed YAML" in msg and "line" in msg and "\n" not in msg


def test_unknown_dataset_and_missing_file(tmp_path):
    with pytest.raises(SpaceError, match="unknown data set 'mnist'"):
        load_space("mnist")
    with pytest.raises(SpaceError, match="not found"):
        load_space("digits", tmp_path / "nope.yaml")


def test_yaml_11_float_strings_are_numbers(tmp_path):
    s = load_space("digits", write(tmp_path, GOOD.replace("low: 2.0e-4", "low: 2e-4")))
    assert s.search.lr.low == pytest.approx(2e-4)


def test_overrides_validate_again():
    s = load_space("digits")
    o = with_overrides(s, num_samples=3, epochs=5, schemes=["AN", "LL-R"], gpus_per_trial=0.5, final_seeds=0)
    assert (o.num_samples, o.epochs, o.search.scheme, o.resources.gpus_per_trial, o.final_seeds) == \
        (3, 5, ["AN", "LL-R"], 0.5, 0)
    assert s.search.scheme == list(LL_SCHEMES)               # the loaded space is untouched
    # baselines start without delta_rel
    assert o.start_points()[0] == {"scheme": "AN", "mode": "end-to-end", "optimizer": "adam", "lr": 1e-3}
    with pytest.raises(SpaceError, match="grace_period"):
        with_overrides(s, epochs=1)
    with pytest.raises(SpaceError, match="search.scheme"):
        with_overrides(s, schemes=["LL-Z"])


def test_each_group_searches_only_what_applies_to_it():
    s = with_overrides(load_space("pascal"), schemes=list(SCHEMES))
    s.search.mode = ["end-to-end", "linear-init"]
    assert len(s.search.groups()) == 2 * len(SCHEMES)
    for group in s.search.groups():
        scheme, mode, _ = group
        space = GroupSpace.of(s.search, group)
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
        for p in s.group_points(group):
            study.enqueue_trial(p)
        for i in range(12):
            t = study.ask()
            constants = space(t)
            proposal = {**t.params, **constants}
            study.tell(t, float(i % 5))
            assert (proposal["scheme"], proposal["mode"]) == (scheme, mode)
            opt = proposal["optimizer"]
            assert opt in ("sgd", "adam") and s.search.lr_for(opt).contains(proposal["lr"])
            assert proposal[f"lr_{opt}"] == proposal["lr"]              # TPE models each optimizer's range apart
            assert ("delta_rel" in proposal) == (scheme in LL_SCHEMES)
            assert ("linear_init_lr" in proposal) == (mode == "linear-init")
            if i == 0 and scheme in LL_SCHEMES:                          # the authors' setting first
                assert (opt, proposal["lr"]) == ("sgd", 5e-3)


def test_quotas_share_the_trials_evenly():
    groups = [Group("LL-R", "end-to-end"), Group("LL-Ct", "end-to-end"), Group("LL-Cp", "end-to-end")]
    assert quotas(groups, 12) == dict.fromkeys(groups, 4)
    assert list(quotas(groups, 10).values()) == [4, 3, 3]
    with pytest.raises(SpaceError, match="num_samples"):
        with_overrides(load_space("digits"), num_samples=2)           # fewer trials than groups


def test_trial_config_to_train_config():
    cfg = Trial.parse({"dataset": "digits", "epochs": 3, "seed": 0, "device": "auto", "data_root": None,
                        "train": {"num_workers": 0, "max_train_images": 64}, "wsml_sweep": "x",
                        "scheme": "LL-Ct", "mode": "end-to-end", "delta_rel": 1.5, "lr": 2e-3}).train_config()
    assert (cfg.scheme, cfg.delta_rel, cfg.lr, cfg.epochs, cfg.num_workers, cfg.max_train_images) == \
        ("LL-Ct", 1.5, 2e-3, 3, 0, 64)
    # a final run: the chosen configuration and seed sit under "point"; baselines ignore delta_rel
    cfg = Trial.parse({"dataset": "digits", "epochs": 3, "seed": 0, "train": {},
                        "point": {"scheme": BASELINES[1], "lr": 1e-3, "seed": 4, "delta_rel": 9.0,
                                  "wsml_source_trial": "abc"}}).train_config()
    assert (cfg.scheme, cfg.seed, cfg.delta_rel) == ("AN", 4, 2.0)


def test_the_mini_table1_space_covers_every_row_and_column():
    s = load_space("digits", SPACES_DIR / "digits-table1.yaml")
    assert set(s.search.scheme) == set(SCHEMES) and s.search.mode == ["end-to-end", "linear-init"]
    assert quotas(s.search.groups(), s.num_samples) == dict.fromkeys(s.search.groups(), 1)
    assert s.final_seeds >= 3


def test_boostlu_rows_are_groups_of_their_own(tmp_path):
    s = load_space("digits", write(tmp_path, GOOD.replace(
        "lr: {low: 2.0e-4, high: 5.0e-3, log: true}",
        "lr: {low: 2.0e-4, high: 5.0e-3, log: true}\n  boostlu: [false, true]\n"
        "  boostlu_alpha: {low: 2.0, high: 10.0, log: true}")))
    groups = s.search.groups()
    assert len(groups) == 6 and Group("LL-R", "end-to-end", True) in groups
    assert quotas(groups, s.num_samples) == {g: (2 if i < 2 else 1) for i, g in enumerate(groups)}
    plain, boost = Group("LL-R", "end-to-end", False), Group("LL-R", "end-to-end", True)
    assert "boostlu_alpha" not in s.search.params(plain) and s.search.params(boost)["boostlu_alpha"].high == 10
    # the defaults start both; the BoostLU group with the BoostLU authors' alpha 5
    assert s.group_points(plain) == [{"lr": 1e-3, "delta_rel": 2.0}]
    assert s.group_points(boost) == [{"lr": 1e-3, "delta_rel": 2.0, "boostlu_alpha": 5.0}]
    space = GroupSpace.of(s.search, boost)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    t = study.ask()
    constants = space(t)
    assert constants["scheme"] == "LL-R" and 2.0 <= t.params["boostlu_alpha"] <= 10.0
    with pytest.raises(SpaceError, match="search.boostlu_alpha"):
        load_space("digits", write(tmp_path, GOOD.replace("scheme: [LL-R, LL-Ct, LL-Cp]",
                                                          "scheme: [LL-R, LL-Ct, LL-Cp]\n  boostlu: [true]")))


def test_max_concurrent_defaults_to_num_samples_and_is_checked(tmp_path):
    s = load_space("digits", write(tmp_path, GOOD))
    assert s.max_concurrent is None and s.concurrency == s.num_samples == 8
    s = load_space("digits", write(tmp_path, GOOD + "max_concurrent: 5\n"))
    assert s.concurrency == 5 and s.summary()["max_concurrent"] == "5"
    assert with_overrides(s, max_concurrent=20).concurrency == 8          # never more than the trials
    assert with_overrides(s, num_samples=4).concurrency == 4
    with pytest.raises(SpaceError, match=r"max_concurrent=0 is invalid: use an integer >= 1"):
        load_space("digits", write(tmp_path, GOOD + "max_concurrent: 0\n"))
    with pytest.raises(SpaceError, match=r"max_concurrent='all' is invalid: write a whole number"):
        load_space("digits", write(tmp_path, GOOD + "max_concurrent: all\n"))


def test_the_tuner_keeps_max_concurrent_trials_pending(tmp_path):
    """Tune keeps as many trials pending as the searcher may propose: the autoscaler sees all their demand."""
    from ray.tune.execution.tune_controller import _get_max_pending_trials
    from ray.tune.search import SearchGenerator

    from orchestration.run import tuner

    s = with_overrides(load_space("digits", write(tmp_path, GOOD)), max_concurrent=5)
    t = tuner.build(s, name="t", storage=str(tmp_path), trainable=lambda c: None, resources={"cpu": 1},
                    param_space={}, num_samples=s.num_samples, search=True)
    limited = t._local_tuner._tune_config.search_alg
    assert limited.max_concurrent == 5
    # what tune.run makes of it (a SearchGenerator), and what Ray 2.60's "auto" then keeps pending
    assert _get_max_pending_trials(SearchGenerator(limited)) == 5
    searcher, _ = tuner.searcher_and_scheduler(s)
    assert _get_max_pending_trials(SearchGenerator(searcher)) == 1     # without the limit: one at a time


@pytest.mark.parametrize("edit,line", [
    (("num_samples: 8", "num_samples: true"), "num_samples=True is invalid: write a whole number"),
    (("epochs: 4", "epochs: 2.5"), "epochs=2.5 is invalid: write a whole number"),
    (("lr: {low: 2.0e-4, high: 5.0e-3, log: true}", "lr: 5"),
     "search.lr=5 is invalid: write a mapping with keys values, low, high, log"),
    (("lr: {low: 2.0e-4, high: 5.0e-3, log: true}", "lr: {adam: {low: x, high: 1}}"),
     "search.lr.adam.low='x' is invalid: write a number"),
    (("scheme: [LL-R, LL-Ct, LL-Cp]", "scheme: [LL-R, 3]"), "search.scheme[1]=3 is invalid: write a string"),
    (("dataset: digits", "dataset: digits\nsource: elsewhere"), "source is an unknown key: known keys here are"),
])
def test_type_errors_from_the_schema_are_one_line(tmp_path, edit, line):
    """The types are pydantic's (orchestration.search.space._parse); its errors read as the file's keys."""
    assert line in _space_error(tmp_path, *edit)


def test_a_lone_name_is_a_list_of_one(tmp_path):
    s = load_space("digits", write(tmp_path, GOOD.replace("[LL-R, LL-Ct, LL-Cp]", "LL-R")))
    assert s.search.scheme == ["LL-R"]


@pytest.mark.parametrize("epochs,grace", [(4, 2), (3, 2), (5, 2), (8, 4), (2, 2)])
def test_fewer_epochs_shrink_ashas_grace_period(epochs, grace):
    """`--epochs 4` on the digits space (10 epochs, grace period 5) keeps a rung before the end: grace 2."""
    from orchestration.cost.estimate import asha_rungs

    loaded = load_space("digits")
    loaded.scheduler.grace_period = 5       # as the digits space shipped before bench/sweep.py's lr x delta_rel grid
    assert loaded.epochs == 10
    s = with_overrides(loaded, epochs=epochs)
    assert s.scheduler.grace_period == grace
    before_end = [r for r in asha_rungs(grace, s.scheduler.reduction_factor, epochs) if r < epochs]
    assert before_end if epochs >= 3 else not before_end


def test_more_epochs_keep_the_grace_period():
    space = load_space("digits")
    space.scheduler.grace_period = 5
    assert with_overrides(space, epochs=20).scheduler.grace_period == 5
