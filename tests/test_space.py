"""Search-space files: the shipped ones load, bad ones fail with one line naming key, value and fix."""
from __future__ import annotations

import textwrap

import optuna
import pytest

from orchestration.space import (SPACES_DIR, OptunaSpace, SpaceError, load_space, with_overrides)
from orchestration.trainable import train_config
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


@pytest.mark.parametrize("dataset", DATASETS)
def test_shipped_spaces_load(dataset):
    s = load_space(dataset)
    assert s.dataset == dataset
    assert set(s.search.scheme) == set(LL_SCHEMES)
    assert s.scheduler.grace_period >= 2 and s.scheduler.grace_period <= s.epochs
    assert s.search.lr.log and s.search.lr.low < s.search.lr.high
    if dataset == "digits":
        assert s.resources.gpus_per_trial == 0 and s.resources.cpus_per_trial == 1
        assert s.search.lr.contains(1e-3) and s.search.delta_rel.contains(2.0)
        assert s.train["num_workers"] == 0
    else:
        assert s.resources.gpus_per_trial == 1
        assert s.search.delta_rel.values == [0.1, 0.2, 0.3, 0.4, 0.5]      # the paper's grid
        assert s.search.lr.contains(1e-5)
    # the paper's defaults are evaluated first, one per scheme
    points = s.start_points()
    assert [p["scheme"] for p in points] == s.search.scheme
    assert s.final_seeds >= 1
    assert (SPACES_DIR / f"{dataset}.yaml").is_file()


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
    old, new = edit
    assert old in GOOD
    with pytest.raises(SpaceError) as info:
        load_space("digits", write(tmp_path, GOOD.replace(old, new)))
    msg = str(info.value)
    assert "\n" not in msg
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
    assert o.start_points()[0] == {"scheme": "AN", "lr": 1e-3}
    with pytest.raises(SpaceError, match="grace_period"):
        with_overrides(s, epochs=1)
    with pytest.raises(SpaceError, match="search.scheme"):
        with_overrides(s, schemes=["LL-Z"])


def test_optuna_space_searches_delta_rel_only_for_ll_schemes():
    s = with_overrides(load_space("digits"), schemes=list(SCHEMES))
    space = OptunaSpace.of(s)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    for p in s.start_points():
        study.enqueue_trial(p)
    seen = []
    for i in range(40):
        t = study.ask()
        extra = space(t) or {}
        params = {**t.params, **extra}
        seen.append(params)
        study.tell(t, float(i % 7))
        assert params["mode"] == "end-to-end"
        assert s.search.lr.contains(params["lr"])
        if params["scheme"] in LL_SCHEMES:
            assert s.search.delta_rel.contains(params["delta_rel"])
        else:
            assert "delta_rel" not in params
    # the enqueued defaults come first, in order
    assert [p["scheme"] for p in seen[:len(SCHEMES)]] == list(SCHEMES)
    assert all(p["lr"] == 1e-3 for p in seen[:len(SCHEMES)])


def test_trial_config_to_train_config():
    cfg = train_config({"dataset": "digits", "epochs": 3, "seed": 0, "device": "auto", "data_root": None,
                        "train": {"num_workers": 0, "max_train_images": 64}, "wsml_sweep": "x",
                        "scheme": "LL-Ct", "mode": "end-to-end", "delta_rel": 1.5, "lr": 2e-3})
    assert (cfg.scheme, cfg.delta_rel, cfg.lr, cfg.epochs, cfg.num_workers, cfg.max_train_images) == \
        ("LL-Ct", 1.5, 2e-3, 3, 0, 64)
    # a final run: the chosen configuration and seed sit under "point"; baselines ignore delta_rel
    cfg = train_config({"dataset": "digits", "epochs": 3, "seed": 0, "train": {},
                        "point": {"scheme": BASELINES[1], "lr": 1e-3, "seed": 4, "delta_rel": 9.0,
                                  "wsml_source_trial": "abc"}})
    assert (cfg.scheme, cfg.seed, cfg.delta_rel) == ("AN", 4, 2.0)
