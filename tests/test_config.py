"""Configuration: validation of every field, override precedence, name checking."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
from torch import nn

from djpq_compiler.config import DJPQConfig, GateSpec, Override, QuantSpec
from djpq_compiler.errors import ConfigError


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"bits": 1}, "bits"),
        ({"bits": 33}, "bits"),
        ({"bits": 8.0}, "bits"),
        ({"bits": True}, "bits"),
        ({"min_bits": 1}, "min_bits"),
        ({"max_bits": 64}, "max_bits"),
        ({"min_bits": 8, "max_bits": 4, "bits": 4}, "min_bits"),
        ({"bits": 16, "max_bits": 8}, "bits"),
        ({"learn_bits": 1}, "learn_bits"),
        ({"signed": "yes"}, "signed"),
        ({"per_channel": None}, "per_channel"),
        ({"bind_min_bits": 1}, "bind_min_bits"),
        ({"bind_min_bits": None}, "bind_min_bits"),
    ],
)
def test_quant_spec_rejects(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=f"QuantSpec.{field}"):
        QuantSpec(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": -1.0}, "threshold"),
        ({"threshold": math.inf}, "threshold"),
        ({"mu_init": math.nan}, "mu_init"),
        ({"log_sigma2_init": "x"}, "log_sigma2_init"),
        ({"mu_jitter": -0.1}, "mu_jitter"),
        ({"log_sigma2_init": 1.0}, "start closed"),  # log alpha = -1 < 0
        ({"mu_init": 0.0}, "start closed"),
    ],
)
def test_gate_spec_rejects(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        GateSpec(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"input_bits": 1}, "input_bits"),
        ({"round_to": 0}, "round_to"),
        ({"calibration_batches": 0}, "calibration_batches"),
        ({"loss_kind": "bops"}, "loss_kind"),
        ({"allowed_bits": (2, 3, 8)}, "allowed_bits"),
        ({"allowed_bits": (8, 4)}, "allowed_bits"),
        ({"allowed_bits": (4, 4)}, "allowed_bits"),
        ({"allowed_bits": ()}, "allowed_bits"),
        ({"allowed_bits": (1, 2)}, "allowed_bits"),
        ({"allowed_bits": (2, 64)}, "allowed_bits"),
        ({"allowed_bits": 8}, "allowed_bits"),
        ({"weight": 8}, "weight"),
        ({"gate": QuantSpec()}, "gate"),
        ({"prune": "no"}, "prune"),
        ({"strict": None}, "strict"),
        ({"ignore": ("",)}, "ignore"),
        ({"ignore": (int,)}, "ignore"),
        ({"overrides": ("fc",)}, "overrides"),
        ({"restricted": True, "weight": QuantSpec(bits=6)}, "weight.*allowed_bits"),
        (
            {"restricted": True, "overrides": (Override("fc", activation=QuantSpec(bits=3)),)},
            r"overrides\[0\].activation",
        ),
        (
            {
                "restricted": True,
                "allowed_bits": (2, 4),
                "weight": QuantSpec(bits=4),
                "activation": QuantSpec(bits=4),
                "fix_first_last_8bit": True,
            },
            "fix_first_last_8bit",
        ),
    ],
)
def test_djpq_config_rejects(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        DJPQConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"match": "fc"}, "sets nothing"),
        ({"match": "", "prune": False}, "non-empty"),
        ({"match": int, "prune": False}, "nn.Module subclass"),
        ({"match": "fc", "weight": 8}, "Override.weight"),
        ({"match": "fc", "prune": 0}, "Override.prune"),
        ({"match": "fc", "gamma_scale": -0.5}, "Override.gamma_scale must be >= 0"),
        ({"match": "fc", "gamma_scale": math.nan}, "Override.gamma_scale must be a finite"),
        ({"match": "fc", "gamma_scale": math.inf}, "Override.gamma_scale must be a finite"),
        ({"match": "fc", "gamma_scale": "2"}, "Override.gamma_scale must be a finite"),
        ({"match": "fc", "gamma_scale": True}, "Override.gamma_scale must be a finite"),
        ({"match": "fc", "gamma_scale": None}, "weight, activation, prune, gamma_scale"),
    ],
)
def test_override_rejects(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Override(**kwargs)


def test_configs_are_frozen_and_sequences_become_tuples() -> None:
    cfg = DJPQConfig(overrides=[Override("fc", prune=False)], allowed_bits=[2, 8])  # type: ignore[arg-type]
    assert isinstance(cfg.overrides, tuple) and cfg.allowed_bits == (2, 8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.prune = False  # type: ignore[misc]
    assert hash(DJPQConfig()) == hash(DJPQConfig())


def test_resolve_global_default_and_signed_weights() -> None:
    r = DJPQConfig(weight=QuantSpec(bits=4)).resolve("layer1.conv", nn.Conv2d)
    assert r.weight == QuantSpec(bits=4, signed=True)
    assert r.activation == QuantSpec() and r.prune and not r.ignored
    assert dict(r.sources) == {"weight": "global", "activation": "global", "prune": "global",
                               "gamma_scale": "global"}
    assert r.gamma_scale == 1.0


def test_resolve_precedence_name_over_pattern_over_type_over_first_last() -> None:
    w2, w4, w6, w8 = (QuantSpec(bits=b) for b in (2, 4, 6, 8))
    cfg = DJPQConfig(
        fix_first_last_8bit=True,
        overrides=(
            Override("fc", weight=w2),  # exact name, listed first: still beats everything
            Override("f*", weight=w4, prune=False),
            Override("*", weight=w6, activation=w6),  # later pattern beats earlier for activation
            Override(nn.Linear, weight=w8, activation=w8, prune=True),
        ),
    )
    r = cfg.resolve("fc", nn.Linear, first_or_last=True)
    assert r.weight == QuantSpec(bits=2, signed=True)
    assert r.activation == w6  # pattern '*' beats the type override
    assert r.prune is False  # pattern 'f*' beats the type override
    sources = dict(r.sources)
    assert sources == {"weight": "name 'fc'", "activation": "pattern '*'", "prune": "pattern 'f*'",
                       "gamma_scale": "global"}

    later = DJPQConfig(overrides=(Override("l*", weight=w4), Override("layer*", weight=w2)))
    assert later.resolve("layer1", nn.Conv2d).weight == QuantSpec(bits=2, signed=True)
    earlier = DJPQConfig(overrides=(Override("layer*", weight=w2), Override("l*", weight=w4)))
    assert earlier.resolve("layer1", nn.Conv2d).weight == QuantSpec(bits=4, signed=True)


def test_type_override_beats_first_last_rule_which_beats_global() -> None:
    cfg = DJPQConfig(
        weight=QuantSpec(bits=4),
        fix_first_last_8bit=True,
        overrides=(Override(nn.Conv2d, activation=QuantSpec(bits=2)),),
    )
    first = cfg.resolve("conv1", nn.Conv2d, first_or_last=True)
    assert first.weight == QuantSpec(bits=8, learn_bits=False, signed=True)
    assert first.activation == QuantSpec(bits=2)
    middle = cfg.resolve("conv2", nn.Conv2d)
    assert middle.weight is not None and middle.weight.bits == 4
    # subclasses match a type override
    assert cfg.resolve("x", type("MyConv", (nn.Conv2d,), {})).activation == QuantSpec(bits=2)
    assert cfg.resolve("fc", nn.Linear).activation == QuantSpec()


def test_ignore_beats_every_override_and_quantize_off() -> None:
    cfg = DJPQConfig(
        ignore=("head.*", nn.Embedding),
        overrides=(Override("head.fc", prune=True),),
    )
    r = cfg.resolve("head.fc", nn.Linear)
    assert r.ignored and r.weight is None and r.activation is None and not r.prune
    assert cfg.resolve("emb", nn.Embedding).ignored
    off = DJPQConfig(quantize=False, prune=False, overrides=(Override("fc", weight=QuantSpec()),))
    r_off = off.resolve("conv", nn.Conv2d, first_or_last=True)
    assert r_off.weight is None and r_off.activation is None and not r_off.prune
    assert off.resolve("fc", nn.Linear).weight == QuantSpec(signed=True)


def test_check_names_reports_unmatched_overrides_and_ignores() -> None:
    names = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "fc"]
    DJPQConfig(overrides=(Override("layer1.*", prune=False),), ignore=("fc",)).check_names(names)
    cfg = DJPQConfig(overrides=(Override("layer1.0.conv3", prune=False),), ignore=("head*",))
    with pytest.raises(ConfigError) as info:
        cfg.check_names(names)
    msg = str(info.value)
    assert "'layer1.0.conv3'" in msg and "'head*'" in msg
    assert "did you mean layer1.0.conv1" in msg or "did you mean layer1.0.conv2" in msg
    assert "Valid module names include: conv1" in msg


#: (overrides, module, first_or_last, expected gamma_scale, expected source): the per-layer
#: regulariser strength resolves like every other field (name > pattern > type > global).
GAMMA_SCALE_RESOLUTION = [
    ((), "features.3", False, 1.0, "global"),
    ((Override("features.*", gamma_scale=0.5),), "features.3", False, 0.5, "pattern 'features.*'"),
    ((Override("features.*", gamma_scale=0.5),), "fc", True, 1.0, "global"),
    ((Override(nn.Linear, gamma_scale=2.0), Override("f*", gamma_scale=3.0)), "fc", False, 3.0,
     "pattern 'f*'"),
    ((Override("fc", gamma_scale=0.0), Override("*", gamma_scale=3.0)), "fc", False, 0.0,
     "name 'fc'"),
    ((Override("fc", prune=False), Override(nn.Linear, gamma_scale=2)), "fc", True, 2.0,
     "type Linear"),  # a field left None falls through; an int scale is a float
]


@pytest.mark.parametrize(("overrides", "name", "first_or_last", "scale", "source"),
                         GAMMA_SCALE_RESOLUTION)
def test_gamma_scale_resolves_with_the_override_precedence(
        overrides: tuple[Override, ...], name: str, first_or_last: bool, scale: float,
        source: str) -> None:
    r = DJPQConfig(overrides=overrides, fix_first_last_8bit=True).resolve(
        name, nn.Linear if name == "fc" else nn.Conv2d, first_or_last=first_or_last)
    assert r.gamma_scale == scale and isinstance(r.gamma_scale, float)
    assert dict(r.sources)["gamma_scale"] == source


def test_misspelt_gamma_scale_override_names_the_close_module() -> None:
    cfg = DJPQConfig(overrides=(Override("features.3.conv", gamma_scale=0.5),))
    with pytest.raises(ConfigError, match=r"did you mean features\.3\.conv1"):
        cfg.check_names(["features.3.conv1", "fc"])
