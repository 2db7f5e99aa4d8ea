"""DQ quantizer: forward values, exact gradients, bits, restricted/fixed/t modes, observers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from djpq_compiler.config import QuantSpec
from djpq_compiler.errors import ConfigError, QuantizationError
from djpq_compiler.modules import DQQuantizer, dq_quantize, levels


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _set(q: DQQuantizer, d: float, q_max: float) -> DQQuantizer:
    """Set step and clip directly (and leave calibration)."""
    with torch.no_grad():
        q.log_q_max.fill_(math.log(q_max))
        if q.log_d is not None:
            q.log_d.fill_(math.log(d))
    q.calibrating = False
    return q


# ------------------------------------------------------------------------------ forward values
def test_signed_forward_values_including_clip_boundaries() -> None:
    x = _t(-2.0, -1.0, -0.9, -0.1, 0.0, 0.1, 0.125, 0.375, 0.99, 1.0, 1.3)
    q = dq_quantize(x, _t(0.25), _t(1.0), signed=True)
    # 0.125/0.25 = 0.5 -> 0 and 0.375/0.25 = 1.5 -> 2 (round half to even)
    expected = _t(-1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0)
    torch.testing.assert_close(q, expected)


def test_unsigned_forward_values_including_clip_boundaries() -> None:
    x = _t(-1.0, -1e-9, 0.0, 0.3, 0.4, 1.0, 2.0)
    q = dq_quantize(x, _t(0.25), _t(1.0), signed=False)
    torch.testing.assert_close(q, _t(0.0, 0.0, 0.0, 0.25, 0.5, 1.0, 1.0))


def test_forward_matches_formula_on_random_inputs() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g, dtype=torch.float64) * 2
    d, q_max = _t(0.13), _t(1.7)
    for signed, x_min in ((True, -1.7), (False, 0.0)):
        ref = d * torch.round(x.clamp(x_min, 1.7) / d)
        torch.testing.assert_close(dq_quantize(x, d, q_max, signed), ref)


# ---------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("signed", [True, False])
def test_gradients_match_dq_formulas(signed: bool) -> None:
    x = _t(-3.0, -1.0, -0.7, -0.2, 0.0, 0.3, 0.55, 1.0, 1.2, 4.0).requires_grad_(True)
    d = _t(0.3).requires_grad_(True)
    q_max = _t(1.0).requires_grad_(True)
    upstream = torch.linspace(0.5, 2.0, x.numel(), dtype=torch.float64)
    out = dq_quantize(x, d, q_max, signed)
    gx, gd, gq = torch.autograd.grad((out * upstream).sum(), (x, d, q_max))

    xv = x.detach()
    x_min = -1.0 if signed else 0.0
    inside = (xv >= x_min) & (xv <= 1.0)
    exp_gx = inside.double() * upstream
    exp_gd = (torch.where(inside, (out.detach() - xv) / 0.3, 0.0) * upstream).sum()
    if signed:
        sign_out = torch.where(inside, 0.0, torch.sign(xv))
    else:
        sign_out = (xv > 1.0).double()  # 1 above q_max, 0 below 0
    exp_gq = (sign_out * upstream).sum()
    torch.testing.assert_close(gx, exp_gx)
    torch.testing.assert_close(gd, exp_gd.reshape(1))
    torch.testing.assert_close(gq, exp_gq.reshape(1))


def test_boundary_points_count_as_inside() -> None:
    x = _t(-1.0, 1.0).requires_grad_(True)
    q_max = _t(1.0).requires_grad_(True)
    gx, gq = torch.autograd.grad(dq_quantize(x, _t(0.3), q_max, True).sum(), (x, q_max))
    torch.testing.assert_close(gx, _t(1.0, 1.0))
    torch.testing.assert_close(gq, _t(0.0))


def test_per_channel_gradients_reduce_to_parameter_shape() -> None:
    x = torch.tensor([[0.1, 5.0], [-5.0, 0.2]], dtype=torch.float64)
    d = _t(0.25, 0.5).reshape(2, 1).requires_grad_(True)
    q_max = _t(1.0, 2.0).reshape(2, 1).requires_grad_(True)
    gd, gq = torch.autograd.grad(dq_quantize(x, d, q_max, True).sum(), (d, q_max))
    assert gd.shape == (2, 1) and gq.shape == (2, 1)
    torch.testing.assert_close(gq.flatten(), _t(1.0, -1.0))
    torch.testing.assert_close(gd.flatten(), _t((0.0 - 0.1) / 0.25, (0.0 - 0.2) / 0.5))


def test_module_gradients_reach_log_parameters_by_chain_rule() -> None:
    q = _set(DQQuantizer(signed=True), d=0.25, q_max=1.0)
    x = torch.tensor([0.3, 2.0])
    q(x).sum().backward()
    assert q.log_d is not None and q.log_d.grad is not None and q.log_q_max.grad is not None
    # dQ/dd = (0.25 - 0.3)/0.25 inside; d log: times d.  dQ/dq_max = 1 outside; times q_max.
    torch.testing.assert_close(q.log_d.grad, torch.tensor(-0.05))
    torch.testing.assert_close(q.log_q_max.grad, torch.tensor(1.0))


# ---------------------------------------------------------------------------------- bit-widths
@pytest.mark.parametrize(
    ("signed", "d", "q_max", "bits"),
    [(True, 1 / 127, 1.0, 8.0), (False, 1 / 255, 1.0, 8.0), (True, 0.1, 0.7, 4.0)],
)
def test_continuous_bits_formula(signed: bool, d: float, q_max: float, bits: float) -> None:
    q = _set(DQQuantizer(signed=signed), d, q_max)
    torch.testing.assert_close(q.bits(), torch.tensor(bits))


@pytest.mark.parametrize(
    ("signed", "ratio", "readout"),
    [
        (True, 2**4.3 - 1, 6),  # b = 5.3 -> ceil 6
        (False, 2**1.2 - 1, 2),  # b = 1.2 -> min 2
        (True, 1.0, 2),  # b = 2
        (True, 2**19.5 - 1, 16),  # b = 20.5 -> max_bits 16
        (False, 255.0, 8),  # b = 8 exactly, float error must not read out 9
    ],
)
def test_readout_is_ceil_clamped(signed: bool, ratio: float, readout: int) -> None:
    q = _set(DQQuantizer(signed=signed), d=0.01, q_max=0.01 * ratio)
    assert q.readout_bits() == readout


def test_d_never_exceeds_q_max() -> None:
    q = _set(DQQuantizer(signed=True), d=3.0, q_max=1.0)
    torch.testing.assert_close(q.d(), torch.tensor(1.0))
    torch.testing.assert_close(q.bits(), torch.tensor(2.0))


#: (signed, min_bits, d, q_max, training bits without the bind, with it): a step too coarse for
#: min_bits is capped at q_max / levels(min_bits) only when the floor binds in training.
BOUND_FLOORS = [
    (True, 4, 0.5, 1.0, math.log2(3.0) + 1, 4.0),
    (False, 4, 0.5, 1.0, math.log2(3.0), 4.0),
    (True, 3, 3.0, 1.0, 2.0, 3.0),  # d > q_max: already capped at q_max without the bind
    (False, 2, 0.5, 1.0, math.log2(3.0), 2.0),
    (True, 4, 1 / 127, 1.0, 8.0, 8.0),  # above the floor: the bind changes nothing
]


@pytest.mark.parametrize(("signed", "min_bits", "d", "q_max", "free", "bound"), BOUND_FLOORS)
def test_bind_min_bits_floors_the_training_bit_width(signed: bool, min_bits: int, d: float,
                                                      q_max: float, free: float,
                                                      bound: float) -> None:
    for bind, bits in ((False, free), (True, bound)):
        q = _set(DQQuantizer(signed=signed, min_bits=min_bits, bind_min_bits=bind), d, q_max)
        torch.testing.assert_close(q.bits(), torch.tensor(bits))
        torch.testing.assert_close(q.d(), torch.tensor(min(d, q_max / levels(bits, signed))))
        assert q.readout_bits() == max(min_bits, math.ceil(bits - 1e-6))


def test_bound_floor_holds_the_bits_and_sends_the_task_gradient_to_q_max() -> None:
    q = _set(DQQuantizer(signed=True, min_bits=4, bind_min_bits=True), d=0.5, q_max=1.0)
    q.bits().backward()  # b is flat at the floor: no gradient pushes it lower
    assert q.log_d is not None and q.log_d.grad is not None and q.log_d.grad.item() == 0.0
    assert q.log_q_max.grad is not None and abs(q.log_q_max.grad.item()) < 1e-6
    q.zero_grad()
    y = q(torch.linspace(-1.2, 1.2, 25))
    assert len(torch.unique(y)) == 2 * 7 + 1  # the 4-bit grid, not the free 2.6-bit one
    (y - 0.3).square().sum().backward()
    assert q.log_d.grad.item() == 0.0 and q.log_q_max.grad.abs().item() > 0


def test_from_spec_passes_bind_min_bits() -> None:
    spec = QuantSpec(bits=8, min_bits=4, bind_min_bits=True)
    assert DQQuantizer.from_spec(spec, signed=True).bind_min_bits
    assert not DQQuantizer.from_spec(QuantSpec(min_bits=4), signed=True).bind_min_bits


def test_snapped_keeps_the_clip_range_and_refines_the_step() -> None:
    """Read-out keeps the learned q_max (the network was trained to be clipped there) and puts
    levels(ceil b) steps below it: q_max is an exact multiple of the new d."""
    q_max0 = 0.1 * (2**4.3 - 1)
    q = _set(DQQuantizer(signed=True), d=0.1, q_max=q_max0)
    d, q_max, bits = q.snapped()
    assert bits == 6
    torch.testing.assert_close(q_max, torch.tensor(q_max0))
    torch.testing.assert_close(d, torch.tensor(q_max0 / 31))
    u = _set(DQQuantizer(signed=False), d=0.1, q_max=q_max0)
    assert u.snapped().bits == 5
    torch.testing.assert_close(u.snapped().d * 31, torch.tensor(q_max0))


# --------------------------------------------------------------------------- restricted / fixed
@pytest.mark.parametrize(
    ("b", "b_prime"), [(1.5, 2), (2.0, 2), (3.1, 4), (5.3, 8), (8.0, 8), (9, 16), (20, 16)]
)
def test_restricted_rounds_up_to_allowed_bits(b: float, b_prime: int) -> None:
    q = _set(DQQuantizer(signed=True, restricted=True), d=0.01, q_max=0.01 * (2 ** (b - 1) - 1))
    assert float(q.bits().detach()) == pytest.approx(b_prime)
    assert q.readout_bits() == b_prime
    torch.testing.assert_close(q.d(), q.q_max() / (2 ** (b_prime - 1) - 1))
    d, q_max, bits = q.snapped()
    assert bits == b_prime
    torch.testing.assert_close(q_max, d * (2 ** (b_prime - 1) - 1))


def test_restricted_bits_have_straight_through_gradient() -> None:
    plain = _set(DQQuantizer(signed=False), d=0.01, q_max=0.3)
    restricted = _set(DQQuantizer(signed=False, restricted=True), d=0.01, q_max=0.3)
    plain.bits().backward()
    restricted.bits().backward()
    assert plain.log_d is not None and restricted.log_d is not None
    assert plain.log_d.grad is not None and restricted.log_d.grad is not None
    torch.testing.assert_close(restricted.log_d.grad, plain.log_d.grad)
    torch.testing.assert_close(restricted.log_q_max.grad, plain.log_q_max.grad)
    # the forward pass uses d' = q_max/(2^b'-1) and passes gradient through b' to log_d
    restricted.zero_grad()
    restricted(torch.tensor([0.1234, 0.2])).sum().backward()
    assert restricted.log_d.grad is not None and restricted.log_d.grad.abs() > 0


@pytest.mark.parametrize(("signed", "bits"), [(True, 8), (True, 4), (False, 4)])
def test_fixed_bits_ties_d_to_q_max(signed: bool, bits: int) -> None:
    q = _set(DQQuantizer(signed=signed, init_bits=bits, fixed_bits=True), d=0.0, q_max=2.0)
    assert q.log_d is None
    torch.testing.assert_close(q.d(), torch.tensor(2.0 / levels(bits, signed)))
    assert float(q.bits()) == bits and q.readout_bits() == bits
    q(torch.tensor([0.77, 3.0])).sum().backward()
    assert q.log_q_max.grad is not None and q.log_q_max.grad != 0


# ------------------------------------------------------------------------------ calibration
def test_calibration_sets_q_max_and_d_from_observed_range() -> None:
    q = DQQuantizer(signed=True, init_bits=4)
    x1, x2 = torch.tensor([-0.5, 0.2]), torch.tensor([1.5, -3.0])
    assert torch.equal(q(x1), x1) and torch.equal(q(x2), x2)  # observers pass data through
    q.finish_calibration()
    assert not q.calibrating
    torch.testing.assert_close(q.q_max(), torch.tensor(3.0))
    torch.testing.assert_close(q.d(), torch.tensor(3.0 / 7))
    assert q.readout_bits() == 4

    u = DQQuantizer(signed=False, init_bits=8)
    u.observe(torch.tensor([-1.0, 0.0, 2.0]))
    u.finish_calibration()
    torch.testing.assert_close(u.q_max(), torch.tensor(2.0))
    torch.testing.assert_close(u.d(), torch.tensor(2.0 / 255))


def test_per_channel_calibration_and_forward() -> None:
    q = DQQuantizer(signed=True, init_bits=2, per_tensor=False, n_channels=2, channel_dim=1)
    q(torch.tensor([[0.5, -4.0], [-1.0, 2.0]]))
    q.finish_calibration()
    torch.testing.assert_close(q.q_max(), torch.tensor([1.0, 4.0]))
    out = q(torch.tensor([[0.6, 1.9], [-0.2, 9.0]]))
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
    with pytest.raises(QuantizationError, match="per-channel"):
        q(torch.zeros(2, 3))


def test_percentile_observer_ignores_outliers() -> None:
    q = DQQuantizer(signed=False, observer="percentile", percentile=99.0)
    x = torch.cat([torch.linspace(0, 1, 1000), torch.tensor([100.0])])
    q.observe(x)
    q.finish_calibration()
    assert 0.95 < float(q.q_max().detach()) <= 1.0


def test_calibration_errors() -> None:
    with pytest.raises(QuantizationError, match="observed no data"):
        DQQuantizer(signed=True).finish_calibration()
    q = _set(DQQuantizer(signed=True), 0.1, 1.0)
    with pytest.raises(QuantizationError, match="start_calibration"):
        q.observe(torch.ones(3))
    q.start_calibration()
    q.observe(torch.tensor([0.0, math.nan]))
    with pytest.raises(QuantizationError, match="not finite"):
        q.finish_calibration()


def test_output_keeps_input_dtype() -> None:
    q = _set(DQQuantizer(signed=True), 0.25, 1.0)
    out = q(torch.tensor([0.3, -2.0], dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert out.tolist() == [0.25, -1.0]


def test_disabled_is_identity_and_check_finite_names_quantizer() -> None:
    q = _set(DQQuantizer(signed=True), 0.5, 1.0)
    x = torch.tensor([0.3, 7.0])
    q.enabled = False
    assert torch.equal(q(x), x)
    q.check_finite("layer1.conv.weight_quant")
    with torch.no_grad():
        q.log_q_max.fill_(math.nan)
    with pytest.raises(QuantizationError, match="layer1.conv.weight_quant"):
        q.check_finite("layer1.conv.weight_quant")


# --------------------------------------------------------------------------------- learn_t
def test_learn_t_identity_at_t1_and_companded_grid() -> None:
    plain = _set(DQQuantizer(signed=True), 0.1, 1.0)
    comp = _set(DQQuantizer(signed=True, learn_t=True), 0.1, 1.0)
    x = torch.linspace(-1.5, 1.5, 31)
    torch.testing.assert_close(comp(x), plain(x))
    assert comp.log_t is not None
    with torch.no_grad():
        comp.log_t.fill_(math.log(0.5))
    torch.testing.assert_close(comp.bits(), torch.log2(torch.tensor(1.0**0.5 / 0.1 + 1)) + 1)
    out = comp(x)
    grid = torch.sign(out) * out.abs() ** 0.5 / 0.1
    torch.testing.assert_close(grid, grid.round(), atol=1e-4, rtol=0)
    out.sum().backward()
    assert comp.log_t.grad is not None and torch.isfinite(comp.log_t.grad)


# -------------------------------------------------------------------------- construction
def test_from_spec_and_bad_arguments() -> None:
    q = DQQuantizer.from_spec(QuantSpec(bits=4, learn_bits=False), signed=False)
    assert q.fixed_bits and not q.signed and q.init_bits == 4
    with pytest.raises(ConfigError, match="signed"):
        DQQuantizer.from_spec(QuantSpec())
    for kwargs in (
        {"init_bits": 1},
        {"min_bits": 1},
        {"min_bits": 8, "max_bits": 4},
        {"allowed_bits": (2, 3)},
        {"allowed_bits": (8, 4)},
        {"per_tensor": False},
        {"observer": "mse"},
        {"init_q_max": 0.0},
    ):
        with pytest.raises(ConfigError):
            DQQuantizer(signed=True, **kwargs)


# -------------------------------------------------------------------------------- property
@settings(max_examples=60, deadline=None)
@given(
    xs=st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=20),
    d=st.floats(1e-3, 10.0),
    k=st.integers(1, 200),
    extra=st.floats(0.0, 0.999),
    signed=st.booleans(),
)
def test_q_lies_on_grid_and_in_range(
    xs: list[float], d: float, k: int, extra: float, signed: bool
) -> None:
    x = torch.tensor(xs, dtype=torch.float64)
    q_max = d * (k + extra)
    out = dq_quantize(
        x, torch.tensor(d, dtype=torch.float64), torch.tensor(q_max, dtype=torch.float64), signed
    )
    steps = out / d
    torch.testing.assert_close(steps, steps.round(), atol=1e-6, rtol=0)
    lo = -q_max if signed else 0.0
    assert bool((out >= lo - d / 2 - 1e-9).all() and (out <= q_max + d / 2 + 1e-9).all())
    if extra == 0.0:  # snapped: q_max is a multiple of d, so Q stays inside [x_min, q_max]
        assert bool((out >= lo - 1e-9).all() and (out <= q_max + 1e-9).all())


def test_backward_survives_inplace_op_on_the_output() -> None:
    """A ReLU(inplace=True) after a quantizer (model zoos do this) must not break backward."""
    q = DQQuantizer(signed=True, init_bits=4, calibrating=False)
    x = torch.randn(16, requires_grad=True)
    y = q(x)
    torch.nn.functional.relu(y, inplace=True).sum().backward()
    assert x.grad is not None and q.log_d.grad is not None
