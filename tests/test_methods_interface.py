"""The method interface every method follows: one default per hyperparameter (the tuned recipe), run values without
one, validation naming the argument, `hyperparameters()` round trips, help text from the docstring, auxiliary
networks, and no CLI or engine knowledge under flowkern/methods."""
from __future__ import annotations

import ast
import json
import typing
from pathlib import Path

import pytest
import torch
from helpers import fast_cpu, gaussian_batch, tiny_net

from flowkern.methods import METHODS, RUN_VALUES, Auxiliary, get_method
from flowkern.methods.parameters import args_help, method_parameters
from flowkern.nn import MLPFlowMap

pytestmark = pytest.mark.usefixtures(fast_cpu.__name__)
ROOT = Path(__file__).resolve().parents[1]

# The tuned recipe of every method (the README's quality table): `flowkern train`'s defaults before the constructors
# owned them, with benchmarks/quality_table.py's method flags on top (ct: ECT in 6 stages with minibatch-OT pairing).
EDM = {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}
OT = {"coupling": "ot", "coupling_block": 256}
RECIPE = {
    "fm": {"t_mean": 0.0, "t_std": 1.0},
    "pd": {"start_steps": 64, "round_steps": None, "min_steps": 1, "round_anneal": True},
    "cd": {"num_scales": 40, "target_decay": 0.95, "distance": "l2", **EDM},
    "ct": {"schedule": "ect", "s0": 10, "s1": 1280, "p_mean": None, "p_std": 2.0, "ect_q": 2.0, "ect_stages": 6,
           "distance": "pseudo_huber", "coupling": "ot", "coupling_block": 256, **EDM},
    "ctm": {"num_scales": 40, "max_teacher_steps": 4, "s_min_prob": 0.0, "target_decay": 0.99, "dsm_weight": 0.1,
            "distance": "l2", "gan": False, "gan_start": 0, "gan_lr": 2e-4, "p_mean": -1.2, "p_std": 1.2,
            "data_dim": None, **EDM},
    "meanflow": {"t_mean": -0.4, "t_std": 1.0, "equal_fraction": 0.75, "weight_power": 0.0, "weight_eps": 1e-3,
                 "jvp": "one_pass", "num_classes": 0, "cfg_scale": 1.0, "cfg_kappa": 0.0, "cfg_t_min": 0.0,
                 "cfg_t_max": 1.0, "label_dropout": 0.1, "coupling": "ot", "coupling_block": 256},
    **{name: {"p_mean": None, "p_std": 1.4, "tangent_warmup": 1000, "tangent_c": 2.0 if name == "sct" else 0.1,
              "adaptive_weighting": name == "sct", "weighting_lr": 0.002, "mid_t": 1.1, "jvp": "one_pass",
              **({"coupling": "independent", "coupling_block": 256} if name == "sct" else {})}
       for name in ("sct", "scd")},
    "shortcut": {"levels": 128, "bootstrap_fraction": 0.25, "target_ema": False, "target_decay": 0.999,
                 "target_clip": None, **OT},
    "lsd": {"off_diagonal_fraction": 0.25, **OT},
    "esd": {"off_diagonal_fraction": 0.25, **OT},
    "psd": {"off_diagonal_fraction": 0.25, "intermediate": "uniform", **OT},
    "f2d2": {"levels": 128, "bootstrap_fraction": 0.25, "divergence": "hutchinson", "probes": 1,
             "divergence_scale": 10.0, "consistency": "semigroup", "warm_start": True, "target_clip": None,
             "toward_noise_fraction": 0.5},
}
REQUIRED_RUN_VALUES = {"fm": set(), "pd": {"total_steps"}, "cd": {"sigma_data"}, "ct": {"sigma_data", "total_steps"},
                       "ctm": {"sigma_data"}, "meanflow": set(), "sct": {"sigma_data"}, "scd": {"sigma_data"},
                       "shortcut": set(), "lsd": set(), "esd": set(), "psd": set(), "f2d2": set()}
RUN = {"sigma_data": 0.5, "total_steps": 100}
ALLOWED_ANNOTATIONS = (int, float, bool, str, float | None, int | None, tuple[float, ...], tuple[int, ...])


def build(name, **kw):
    """The method `name` on a tiny network with its required run values (and a teacher when it takes one)."""
    cls = get_method(name)
    run = {p.name: RUN[p.name] for p in method_parameters(cls) if p.required}
    teacher = {"teacher": tiny_net(seed=1)} if cls.needs_teacher else {}
    return cls(joint_net() if getattr(cls, "divergence_head", False) else tiny_net(), **teacher, **{**run, **kw})


def joint_net():
    """tiny_net with a D head, for a method that trains a joint flow map (u, D)."""
    torch.manual_seed(0)
    return MLPFlowMap(2, hidden=32, depth=2, time_dim=16, divergence_head=True)


def seeded_losses(method, x0, seed=7) -> dict[str, float]:
    """Every loss term of one step on x0 from a fixed draw."""
    torch.manual_seed(seed)
    losses, _ = method.loss(method.model, x0, 0)
    losses = losses if isinstance(losses, dict) else {"model": losses}
    return {k: float(v.detach()) for k, v in losses.items()}


def is_allowed(annotation) -> bool:
    if typing.get_origin(annotation) is typing.Literal:
        return all(isinstance(a, str) for a in typing.get_args(annotation))
    return annotation in ALLOWED_ANNOTATIONS


@pytest.mark.parametrize("name", list(METHODS))
def test_defaults_are_the_recipe_and_run_values_have_none(name):
    params = method_parameters(get_method(name))
    defaults = {p.name: p.default for p in params if not p.required}
    assert defaults == RECIPE[name]
    assert {p.name for p in params if p.required} == REQUIRED_RUN_VALUES[name]
    assert all(p.run_value for p in params if p.required)


def test_shipped_recipes_leave_method_settings_to_the_constructor_defaults():
    """The recipes shipped with the package (flowkern/train/recipes/<method>.toml) hold train-level settings only,
    and the quality script passes no method flags: `flowkern train <method>` is the model of docs/results.md."""
    import tomllib

    recipes = sorted((ROOT / "flowkern" / "train" / "recipes").glob("*.toml"))
    assert {r.stem for r in recipes} == set(METHODS)
    for path in recipes:
        raw = tomllib.loads(path.read_text())
        assert set(raw) == {"train"}, path.name
    source = (ROOT / "benchmarks" / "quality_table.py").read_text()
    assert not any(f'"--{name}-' in source for name in METHODS)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_parameter_is_documented_with_an_allowed_annotation(name):
    for p in method_parameters(get_method(name)):
        assert p.help, (name, p.name)
        assert "SW2" not in p.help and "SW₂" not in p.help, (name, p.name)     # descriptions, not results
        assert is_allowed(p.annotation), (name, p.name, p.annotation)
        if typing.get_origin(p.annotation) is typing.Literal:
            assert p.default in typing.get_args(p.annotation)


def _bad_value(annotation):
    """A value of the wrong type or outside the choices for `annotation`."""
    if typing.get_origin(annotation) is typing.Literal:
        return "no-such-choice"
    if annotation is bool:
        return 1
    if annotation in (int, int | None):
        return 1.5
    return "x"


@pytest.mark.parametrize("name", list(METHODS))
def test_bad_values_raise_naming_the_argument(name):
    for p in method_parameters(get_method(name)):
        with pytest.raises((TypeError, ValueError), match=p.name):
            build(name, **{p.name: _bad_value(p.annotation)})


@pytest.mark.parametrize(("name", "kw"), [
    ("fm", {"t_mean": 0.3}),
    ("pd", {"start_steps": 8, "total_steps": 400}),
    ("cd", {"num_scales": 12, "distance": "pseudo_huber"}),
    ("ct", {"schedule": "ict", "sigma_data": 2.0, "coupling": "independent"}),
    ("ct", {}),
    ("ctm", {"num_scales": 12, "gan": True, "data_dim": 2}),
])
def test_hyperparameters_round_trip(name, kw):
    method = build(name, **kw)
    hp = method.hyperparameters()
    assert set(hp) == {p.name for p in method_parameters(type(method))}
    assert all(hp[k] == v for k, v in kw.items())
    assert json.loads(json.dumps(hp)) == hp
    if name == "ct":                                  # resolved at construction: iCT's −1.1 moved to σ_data
        assert hp["p_mean"] == method.p_mean and hp["p_mean"] is not None
    if name == "pd":
        assert hp["round_steps"] == 400 // 4
    teacher = {"teacher": method.teacher} if method.needs_teacher else {}
    model = tiny_net()
    model.load_state_dict(method.model.state_dict())
    again = type(method)(model, **teacher, **json.loads(json.dumps(hp)))
    assert again.hyperparameters() == hp
    again.load_state_dict(method.state_dict())
    x0 = gaussian_batch(64)
    assert seeded_losses(again, x0) == seeded_losses(method, x0)


def test_run_values_are_named_once():
    assert RUN_VALUES == ("sigma_data", "total_steps", "data_dim")


def test_methods_import_neither_argparse_nor_the_engine():
    for path in sorted((ROOT / "flowkern" / "methods").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for module in names:
                assert module != "argparse" and not module.startswith("flowkern.train"), (path.name, module)


def test_no_cli_helpers_left():
    import flowkern.methods as methods
    from flowkern.methods import _util
    from flowkern.methods.base import Method

    for attr in ("OPTIONS", "add_options", "option_values", "from_options"):
        assert not hasattr(Method, attr) and all(not hasattr(get_method(n), attr) for n in METHODS), attr
    assert not hasattr(methods, "available_methods")
    assert not any(hasattr(_util, f) for f in ("add_cli_options", "cli_values", "update_ema", "replay_rng"))


def test_args_help_reads_entries_and_continuations():
    doc = """Summary line.

    Args:
        alpha: the first
            one, continued.
        beta: the second.

    Returns:
        gamma: not an argument.
    """
    assert args_help(doc) == {"alpha": "the first one, continued.", "beta": "the second."}
    assert args_help("no block here") == {} and args_help(None) == {}
    with pytest.raises(TypeError, match="cls"):
        method_parameters("fm")


def test_auxiliary_validates_its_settings():
    net = torch.nn.Linear(2, 1)
    aux = Auxiliary(net, lr=1e-3)
    assert (aux.module, aux.lr, aux.betas, aux.weight_decay) == (net, 1e-3, (0.9, 0.999), 0.0)
    with pytest.raises(TypeError, match="module"):
        Auxiliary("net", lr=1e-3)
    with pytest.raises(ValueError, match="lr"):
        Auxiliary(net, lr=0.0)
    with pytest.raises(TypeError, match="betas"):
        Auxiliary(net, lr=1e-3, betas=(0.5,))
    with pytest.raises(ValueError, match="betas"):
        Auxiliary(net, lr=1e-3, betas=(0.5, 1.0))
    with pytest.raises(ValueError, match="weight_decay"):
        Auxiliary(net, lr=1e-3, weight_decay=-1.0)


@pytest.mark.parametrize("name", list(METHODS))
def test_methods_without_a_teacher_take_none(name):
    cls = get_method(name)
    if cls.needs_teacher:
        with pytest.raises(ValueError, match="teacher"):
            cls(tiny_net(), **{k: RUN[k] for k in REQUIRED_RUN_VALUES[name]})
    else:
        with pytest.raises(TypeError, match="teacher"):
            cls(tiny_net(), teacher=tiny_net(), **{k: RUN[k] for k in REQUIRED_RUN_VALUES[name]})
