"""The scheme registry (wsml/schemes.py) and what reads it: the config's fields, defaults and checks, the loss
dispatch, resume, the trial schema and the space files' `scheme_params`."""
import dataclasses
import math
import subprocess
import sys

import pytest
import torch

from wsml import schemes
from wsml.config import BASELINES, LL_SCHEMES, RECENT_SCHEMES, SCHEMES, TrainConfig, resume_mismatch
from wsml.errors import ConfigError
from wsml.losses import LossOutput, loss_function, scheme_loss
from wsml.methods.ack_the_unknown import APL_DEFAULTS, APLParams, EMParams, em_apl_loss, em_loss
from wsml.methods.ack_the_unknown import PUBLISHED_MAP as ACK_PUBLISHED
from wsml.methods.gr_loss import GR_PUBLISHED, gr_loss
from wsml.methods.gr_loss import PUBLISHED_MAP as GR_PUBLISHED_MAP
from wsml.methods.gr_loss import SEARCH_RANGES as GR_RANGES

from orchestration.common import SpaceError
from orchestration.search.space import Group, load_space, space_from_dict, with_overrides
from orchestration.search.study import GroupSpace
from orchestration.trial import SEARCHED, Point, Trial, applies

LOGITS = torch.tensor([[2.0, -1.0, 0.5, -3.0], [0.1, 1.5, -0.7, 4.0]])
OBSERVED = torch.tensor([[1, 0, 0, 0], [0, 1, 0, -1]])


def test_the_registry_is_every_scheme_in_the_tables_order():
    assert SCHEMES == BASELINES + LL_SCHEMES + RECENT_SCHEMES
    assert RECENT_SCHEMES == ("EM", "EM+APL", "GR") and LL_SCHEMES == ("LL-R", "LL-Ct", "LL-Cp")
    for name, s in schemes.REGISTRY.items():
        assert callable(loss_function(name)), s.loss
        assert s.state in (schemes.NO_STATE, schemes.LL_FLIPS, schemes.ROLE_ESTIMATOR, schemes.APL_SOFT_LABELS)
        assert s.published and s.published_in
    states = {n: s.state for n, s in schemes.REGISTRY.items() if s.state != schemes.NO_STATE}
    assert states == {"LL-Cp": "ll-flips", "ROLE": "role-estimator", "EM+APL": "apl-soft-labels"}
    assert [n for n, s in schemes.REGISTRY.items() if s.epoch_schedule] == ["EM+APL", "GR"]


def test_every_hyper_parameter_is_a_command_line_field_and_back():
    """The methods' hyper-parameters are no TrainConfig fields of their own (a new method adds none): each is a
    key of `scheme_params` and an option of the trainer, typed by the registry."""
    from wsml.train import _parser

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert "delta_rel" in fields and "option" in fields["delta_rel"].metadata      # the data set's default
    methods = schemes.hyper_names(with_dataset_defaults=False)
    assert not set(methods) & set(fields) and len(methods) == 14
    options = {a.dest: a for a in _parser()._actions}
    for name in methods:
        assert options[name].type is (int if schemes.hyper(name).integer else float), name
    assert options["apl_warmup_epoch"].type is int
    assert schemes.hyper("em_alpha") is schemes.REGISTRY["EM+APL"].hyper("em_alpha")    # one name, both schemes


def test_the_registry_holds_the_published_tables():
    for ds in schemes.BENCHMARKS:
        em, apl, gr = (TrainConfig(dataset=ds, scheme=s).resolve() for s in ("EM", "EM+APL", "GR"))
        assert em.scheme_params == {"em_alpha": APL_DEFAULTS[ds].alpha}
        assert tuple(apl.scheme_params.values()) == dataclasses.astuple(APL_DEFAULTS[ds])
        assert tuple(gr.param(f"gr_{f}") for f in GR_PUBLISHED.__dataclass_fields__) == \
            dataclasses.astuple(GR_PUBLISHED)
        for name, published in (("EM", ACK_PUBLISHED["EM"]), ("EM+APL", ACK_PUBLISHED["EM+APL"]),
                                ("GR", GR_PUBLISHED_MAP)):
            assert schemes.REGISTRY[name].published[(ds, "end-to-end")] == published[ds]
    assert schemes.REGISTRY["LL-R"].published[("pascal", "linear-init")] == 89.4
    assert schemes.hyper("gr_q2").search == GR_RANGES["q2"]
    # digits: CPU-sized; OpenImages: COCO's
    d = TrainConfig(scheme="EM+APL").resolve()
    assert d.scheme_params == {"em_alpha": 0.1, "apl_beta": 0.2, "apl_neg_proportion": 0.8, "apl_warmup_epoch": 3}
    assert TrainConfig(dataset="openimages", scheme="EM+APL").resolve().param("apl_beta") == APL_DEFAULTS["coco"].beta
    # other schemes have none
    assert TrainConfig(scheme="LL-R").resolve().scheme_params == {}
    with pytest.raises(ValueError, match="scheme_params\\['em_alpha'\\] is unset"):
        TrainConfig(scheme="LL-R").resolve().param("em_alpha")


def test_config_and_registry_import_without_torch():
    code = "import sys, wsml.config, wsml.schemes; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("settings,match", [
    ({"scheme": "LL-R", "em_alpha": 0.1}, "em_alpha=0.1: a hyper-parameter of EM or EM\\+APL, not of LL-R"),
    ({"scheme": "EM", "apl_beta": 0.5}, "apl_beta"),
    ({"scheme": "EM", "em_alpha": -0.1}, "em_alpha=-0.1: a number at least 0"),
    ({"scheme": "EM+APL", "apl_neg_proportion": 1.5}, "at most 1"),
    ({"scheme": "EM+APL", "apl_warmup_epoch": 10}, "apl_warmup_epoch=10: an integer below the number of epochs"),
    ({"scheme": "EM+APL", "apl_warmup_epoch": 2.5}, "an integer"),
    ({"scheme": "GR", "gr_q2": 0.0}, "gr_q2=0.0: a number above 0"),
    ({"scheme": "GR", "gr_sigma_end": math.nan}, "gr_sigma_end"),
    ({"scheme": "EM", "scheme_params": {"foo": 1}}, r"scheme_params\.foo=1: no scheme has it; EM's own are em_alpha"),
    ({"scheme": "EM", "foo": 1}, "unknown config key"),
])
def test_bad_hyper_parameters_are_refused_naming_the_field(settings, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(settings).resolve()


def test_epochs_are_compared_on_resume_where_the_scheme_schedules_over_them():
    for scheme, free in (("LL-R", True), ("EM", True), ("EM+APL", False), ("GR", False)):
        saved, now = (TrainConfig(scheme=scheme, epochs=e).resolve().to_dict() for e in (10, 12))
        assert (resume_mismatch(saved, now) is None) == free, scheme
    saved, now = (TrainConfig(scheme="GR", scheme_params={"gr_q2": q}).resolve().to_dict() for q in (0.01, 0.02))
    assert resume_mismatch(saved, now) == "gr_q2=0.01 but this run has gr_q2=0.02"


def test_the_dispatch_calls_each_methods_published_loss():
    complete = torch.ones_like(OBSERVED)
    em = TrainConfig(scheme="EM").resolve()
    out = scheme_loss("EM", LOGITS, OBSERVED, complete, 2, 0.0, 1.0, config=em)
    assert isinstance(out, LossOutput) and torch.equal(out.loss, em_loss(LOGITS, OBSERVED, EMParams(0.1)))
    apl = TrainConfig(scheme="EM+APL", scheme_params={"apl_warmup_epoch": 2}).resolve()
    soft = torch.tensor([[math.nan, 0.3, math.nan, math.nan], [0.1, math.nan, math.nan, math.nan]])
    out = scheme_loss("EM+APL", LOGITS, OBSERVED, complete, 3, 0.0, 1.0, soft_labels=soft, epochs=10, config=apl)
    assert torch.equal(out.loss, em_apl_loss(LOGITS, OBSERVED, soft, APLParams(0.1, 0.2, 0.8, 2)))
    assert out.selected.tolist() == [[False, True, False, False], [True, False, False, False]]
    gr = TrainConfig(scheme="GR", epochs=8).resolve()
    out = scheme_loss("GR", LOGITS, OBSERVED, complete, 3, 0.0, 1.0, epochs=8, config=gr)
    assert torch.equal(out.loss, gr_loss(LOGITS, OBSERVED, 3, 8, GR_PUBLISHED))
    with pytest.raises(ValueError, match="needs the run's resolved config"):
        scheme_loss("GR", LOGITS, OBSERVED, complete, 3, 0.0, 1.0)


def test_linear_phase_is_epoch_zero_em_without_pseudo_labels_and_grs_start_values():
    complete = torch.ones_like(OBSERVED)
    apl = TrainConfig(scheme="EM+APL").resolve()
    none_yet = torch.full(OBSERVED.shape, math.nan)
    out = scheme_loss("EM+APL", LOGITS, OBSERVED, complete, 0, 0.0, 1.0, soft_labels=none_yet, epochs=10, config=apl)
    assert torch.equal(out.loss, em_loss(LOGITS, OBSERVED, EMParams(apl.param("em_alpha")))) and not out.selected.any()
    gr = TrainConfig(scheme="GR").resolve()
    at_start = dataclasses.replace(GR_PUBLISHED, w_end=GR_PUBLISHED.w_start, b_end=GR_PUBLISHED.b_start,
                                   mu_end=GR_PUBLISHED.mu_start, sigma_end=GR_PUBLISHED.sigma_start)
    out = scheme_loss("GR", LOGITS, OBSERVED, complete, 0, 0.0, 1.0, epochs=10, config=gr)
    assert torch.equal(out.loss, gr_loss(LOGITS, OBSERVED, 5, 10, at_start))     # any epoch: constant schedules


def test_command_line_options_of_the_methods():
    from wsml.train import _parser, config_from_args

    text = _parser().format_help()
    assert "--em-alpha" in text and "--apl-warmup-epoch" in text and "--gr-q2" in text
    args = _parser().parse_args(["--scheme", "EM+APL", "--apl-warmup-epoch", "4", "--em-alpha", "0.05", "--out", "x"])
    cfg = config_from_args(args)
    assert cfg.scheme_params == {"em_alpha": 0.05, "apl_beta": 0.2, "apl_neg_proportion": 0.8, "apl_warmup_epoch": 4}
    assert isinstance(cfg.param("apl_warmup_epoch"), int)


# ------------------------------------------------------------------------------------- search and trials
def test_each_searched_hyper_parameter_applies_to_its_schemes_only():
    assert {"em_alpha", "apl_warmup_epoch", "gr_q3"} <= set(SEARCHED)
    assert applies("em_alpha", "EM") and applies("em_alpha", "EM+APL") and not applies("em_alpha", "GR")
    assert applies("delta_rel", "LL-Cp") and not applies("delta_rel", "EM")
    t = Trial.parse({"dataset": "digits", "epochs": 6, "scheme": "EM+APL", "lr": 1e-3, "em_alpha": 0.05,
                     "apl_warmup_epoch": 4.0, "gr_q2": 0.1, "delta_rel": 2.0, "train": {}})
    assert t.values["apl_warmup_epoch"] == 4 and isinstance(t.values["apl_warmup_epoch"], int)
    assert "gr_q2" not in t.values and "delta_rel" not in t.values
    cfg = t.train_config()
    assert (cfg.param("em_alpha"), cfg.param("apl_warmup_epoch"), cfg.param("apl_beta")) == (0.05, 4, 0.2)
    assert t.params()["em_alpha"] == "0.05" and "gr_q2" not in t.params()
    assert Point.of({"scheme": "EM+APL", "lr": 1e-3, "em_alpha": 0.05, "apl_warmup_epoch": 4}).label() == \
        "EM+APL lr=0.001 alpha=0.05 warmup_epoch=4"


def test_digits_space_searches_each_methods_own_values_from_its_defaults():
    s = with_overrides(load_space("digits"), schemes=["AN", "EM", "EM+APL", "GR", "LL-R"], epochs=6, num_samples=10)
    names = {g.scheme: set(s.search.params(g)) for g in s.search.groups()}
    assert names["AN"] == {"lr"} and names["LL-R"] == {"lr", "delta_rel"} and names["EM"] == {"lr", "em_alpha"}
    assert names["EM+APL"] == {"lr", "em_alpha", "apl_beta", "apl_neg_proportion", "apl_warmup_epoch"}
    assert {"gr_q2", "gr_q3", "gr_w_end"} <= names["GR"] and "gr_w_start" not in names["GR"]
    [apl] = s.group_points(Group("EM+APL", "end-to-end"))
    assert apl == {"lr": 1e-3, "em_alpha": 0.1, "apl_beta": 0.2, "apl_neg_proportion": 0.8, "apl_warmup_epoch": 3}
    space = GroupSpace.of(s.search, Group("EM+APL", "end-to-end"))
    assert space.distributions()["apl_warmup_epoch"].choices == (2.0, 3.0, 4.0)
    assert "EM+APL: uniform(0.5, 1)" in s.summary()["space.apl_neg_proportion"]


@pytest.mark.parametrize("edit,match", [
    (lambda p: p["EM"].update(apl_beta={"low": 0.1, "high": 0.5}), r"scheme_params\.EM\.apl_beta.*not a hyper-parameter of EM"),
    (lambda p: p.update(XX={}), "name a scheme among"),
    (lambda p: p["EM+APL"].update(apl_warmup_epoch={"low": 2, "high": 4}), "a whole number: list the values"),
    (lambda p: p["EM+APL"].update(apl_warmup_epoch={"values": [2, 6]}), "below the number of epochs.*raise epochs"),
    (lambda p: p["GR"].update(gr_q2={"low": 0.0, "high": 0.5}), r"gr_q2=0\.0 is invalid: a number above 0"),
    (lambda p: p["EM"].update(em_alpha={"low": 0.2, "high": 0.5}), r"start_with.*em_alpha.*must lie in search\.scheme_params\.EM"),
])
def test_bad_scheme_params_fail_with_one_line(edit, match):
    data = with_overrides(load_space("digits"), schemes=["EM", "EM+APL", "GR"], epochs=6).to_dict()
    edit(data["search"]["scheme_params"])
    with pytest.raises(SpaceError, match=match):
        space_from_dict(data)


def test_a_short_sweep_of_em_apl_with_its_default_warmup_fails_before_it_starts():
    data = load_space("digits").to_dict()
    data["search"]["scheme"] = ["EM+APL"]
    del data["search"]["scheme_params"]["EM+APL"]
    data["epochs"], data["scheduler"]["grace_period"] = 3, 2
    with pytest.raises(SpaceError, match="search.scheme EM\\+APL with epochs=3: invalid apl_warmup_epoch=3"):
        space_from_dict(data)


def test_warm_start_reuses_epoch_scheduled_schemes_only_from_runs_of_the_same_epochs():
    from orchestration.search.known import _same_config

    for scheme, reused in (("LL-R", True), ("EM", True), ("EM+APL", False), ("GR", False)):
        run, now = ({"scheme": scheme, "epochs": e, "lr": "0.001"} for e in ("10", "6"))
        assert _same_config(run, now) == reused, scheme


# ------------------------------------------------------------------------------------- adding a method
_NEW_METHOD = '''"""WAN with the weight of unobserved entries as a hyper-parameter: a made-up method for the test."""
from wsml.methods import Hyper, Range, Scheme

WEIGHT = Hyper("wanx_weight", "WANX: weight of the unobserved entries",
               dict.fromkeys(("pascal", "coco", "nuswide", "cub", "openimages", "digits"), 0.25), "ours",
               low=0.0, search=Range(0.05, 1.0, log=True))
SCHEMES = (Scheme("WANX", "recent", f"{__name__}:loss", hypers=(WEIGHT,),
                  published={(ds, "end-to-end"): 50.0 for ds in ("pascal", "coco", "nuswide", "cub")},
                  published_in="none"),)


def loss(b):
    import torch

    from wsml.losses import LossOutput, an_targets, bce

    weights = torch.where(b.observed == 0, b.run_config().param("wanx_weight"), 1.0)
    return LossOutput((weights * bce(b.logits, an_targets(b.observed))).mean(), b.no_selection())
'''

_CHECKS = '''
import sys
from wsml import schemes
from wsml.config import TrainConfig
from orchestration.search.space import Group, load_space, space_from_dict, with_overrides
assert list(schemes.REGISTRY)[-1] == "WANX" and "torch" not in sys.modules
assert TrainConfig(scheme="WANX").resolve().scheme_params == {"wanx_weight": 0.25}
data = with_overrides(load_space("digits"), schemes=["WANX", "AN"], epochs=3).to_dict()
data["search"]["scheme_params"]["WANX"] = {"wanx_weight": {"low": 0.05, "high": 1.0, "log": True}}
space = space_from_dict(data)
print(sorted(space.search.params(Group("WANX", "end-to-end"))), space.group_points(Group("WANX", "end-to-end")))
'''


def test_a_new_method_is_one_module_and_one_space_entry(tmp_path):
    """A method in a module of its own in a `wsml/methods/` folder (here kept outside the checkout, on
    PYTHONPATH) is a scheme of the registry with its defaults, a trainer option and a space entry."""
    from tests.helpers import ROOT, clean_env

    module = tmp_path / "plugins" / "wsml" / "methods" / "wanx.py"
    module.parent.mkdir(parents=True)
    module.write_text(_NEW_METHOD)
    env = clean_env(PYTHONPATH=f"{ROOT}:{tmp_path / 'plugins'}")
    r = subprocess.run([sys.executable, "-c", _CHECKS], env=env, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "['lr', 'wanx_weight'] [{'lr': 0.001, 'wanx_weight': 0.25}]"
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "wsml.train", "--scheme", "WANX", "--wanx-weight", "0.5",
                        "--epochs", "1", "--max-train-images", "128", "--num-workers", "0", "--device", "cpu",
                        "--cache-dir", str(tmp_path / "cache"), "--out", str(out)],
                       env=env, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    assert json.loads((out / "metrics.json").read_text())["config"]["scheme_params"] == {"wanx_weight": 0.5}
    bad = subprocess.run([sys.executable, "-m", "wsml.train", "--scheme", "AN", "--wanx-weight", "0.5",
                          "--out", str(tmp_path / "bad")], env=env, cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "wanx_weight=0.5: a hyper-parameter of WANX, not of AN" in bad.stderr
