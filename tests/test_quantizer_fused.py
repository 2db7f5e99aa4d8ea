"""The fast DQ quantizer and gate autograd paths against straightforward reference formulations.

Each test runs twice: with the compiled one-pass kernels (``djpq_compiler.modules.fused``) and
with the plain torch ops.

The production paths (``dq_quantize``, ``VIBGate``) are written for few elementwise passes and
small saved state; here every output and every gradient (input, step, clip, exponent ``t``, gate
``mu``/``log_sigma2``) is compared with a formulation that follows REFERENCE.md literally, on
random inputs with values below, inside, above and exactly on the clip range.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from djpq_compiler.modules import DQQuantizer, VIBGate, dq_quantize, saved
from djpq_compiler.modules.fused import fused_kernels, set_fused_kernels
from djpq_compiler.modules.quantizers import _signed_pow


@pytest.fixture(params=["fused", "unfused"], autouse=True)
def kernel_path(request: pytest.FixtureRequest) -> Any:
    """Every test runs on the compiled one-pass kernels and on the plain torch ops."""
    set_fused_kernels(request.param == "fused")
    if request.param == "fused" and fused_kernels() is None:
        set_fused_kernels(None)
        pytest.skip("the fused DQ kernels cannot be built here (no C++ compiler or ninja)")
    yield request.param
    set_fused_kernels(None)


class _RefDQ(torch.autograd.Function):
    """REFERENCE §1 literally: masks for inside/above/below, one formula per gradient."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, d: torch.Tensor, q_max: torch.Tensor, signed: bool
    ) -> torch.Tensor:
        lo = -q_max if signed else torch.zeros_like(q_max)
        ctx.save_for_backward(x, d, q_max)
        ctx.signed = signed
        return torch.round(torch.clamp(x, lo, q_max) / d) * d

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, d, q_max = ctx.saved_tensors
        lo = -q_max if ctx.signed else torch.zeros_like(q_max)
        above, below = x > q_max, x < lo
        inside = ~(above | below)
        q = torch.round(torch.clamp(x, lo, q_max) / d) * d
        zero = torch.zeros_like(grad)
        gx = torch.where(inside, grad, zero)
        # dQ/dd = (Q(x) - x)/d inside, written as round(x/d) - x/d (the same number, better rounded)
        del q
        gd = torch.where(inside, grad * (torch.round(x / d) - x / d), zero).sum_to_size(d.shape)
        sign = above.to(grad.dtype) - (below.to(grad.dtype) if ctx.signed else 0.0)
        gq = (grad * sign).sum_to_size(q_max.shape)
        return gx, gd, gq, None


def _ref_quantize(q: DQQuantizer, x: torch.Tensor) -> torch.Tensor:
    """``DQQuantizer.quantize`` with the reference round instead of the production one."""
    d, q_grid = q._shaped(q.d(), x), q._shaped(q.q_grid(), x)
    t = q.t()
    if t is None:
        out: torch.Tensor = _RefDQ.apply(x, d, q_grid, q.signed)
        return out
    y = _RefDQ.apply(_signed_pow(x, t), d, q_grid, q.signed)
    return _signed_pow(y, 1.0 / t)


def _inputs(dtype: torch.dtype, q_max: float, d: float, shape: tuple[int, ...]) -> torch.Tensor:
    """Random values over [-2 q_max, 2 q_max] plus exact boundaries, ties and zeros."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(shape, generator=g, dtype=torch.float64) * 4 - 2) * q_max
    flat = x.view(-1)
    special = [q_max, -q_max, 0.0, 0.5 * d, 1.5 * d, -2.5 * d, q_max + d, -q_max - d, 1e-30]
    flat[: len(special)] = torch.tensor(special, dtype=torch.float64)
    return x.to(dtype)


def _grads(out: torch.Tensor, leaves: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    return list(torch.autograd.grad(out, leaves, upstream))


def _tol(dtype: torch.dtype) -> dict[str, float]:
    # reductions (sum vs dot) are ordered differently: float rounding only
    return {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-9}


#: Small tensors take the plain path; large ones (>= saved.MIN_NUMEL) keep 1-byte grid codes.
SHAPES = [(4, 3, 5, 7), (8, 3, 16, 16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("per_tensor", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_dq_quantize_matches_reference(
    dtype: torch.dtype, signed: bool, per_tensor: bool, shape: tuple[int, ...]
) -> None:
    x = _inputs(dtype, 1.3, 0.1, shape).requires_grad_(True)
    pshape = () if per_tensor else (1, 3, 1, 1)
    d = torch.full(pshape, 0.1, dtype=dtype)
    q_max = torch.full(pshape, 1.3, dtype=dtype)
    if not per_tensor:
        d = d * torch.tensor([1.0, 0.5, 2.0], dtype=dtype).reshape(1, 3, 1, 1)
    d.requires_grad_(True)
    q_max.requires_grad_(True)
    out = dq_quantize(x, d, q_max, signed)
    ref = _RefDQ.apply(x, d, q_max, signed)
    assert torch.equal(out, ref)  # same ops in the same order: bitwise
    coded = per_tensor and x.numel() >= saved.MIN_NUMEL
    assert isinstance(getattr(out, saved._ATTR, None), saved._Grid) == coded
    got, want = _grads(out, [x, d, q_max], 1), _grads(ref, [x, d, q_max], 1)
    assert torch.equal(got[0], want[0])  # dQ/dx is grad or 0: exact
    torch.testing.assert_close(got[1], want[1], **_tol(dtype))
    torch.testing.assert_close(got[2], want[2], **_tol(dtype))


@pytest.mark.parametrize("signed", [True, False])
def test_dq_quantize_partial_needs(signed: bool) -> None:
    """Only some inputs need gradients: the others get none, the rest are still right."""
    x = _inputs(torch.float32, 1.0, 0.2, (8192,))
    d = torch.tensor(0.2, requires_grad=True)
    q_max = torch.tensor(1.0, requires_grad=True)
    for leaves in ([q_max], [d], [x.requires_grad_(True)]):
        got = torch.autograd.grad(dq_quantize(x, d, q_max, signed).sum(), leaves)
        want = torch.autograd.grad(_RefDQ.apply(x, d, q_max, signed).sum(), leaves)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _module(kind: str, signed: bool, per_tensor: bool, bits: int = 4) -> DQQuantizer:
    q = DQQuantizer(
        signed,
        init_bits=bits,
        per_tensor=per_tensor,
        n_channels=None if per_tensor else 3,
        channel_dim=1,
        restricted=kind == "restricted",
        fixed_bits=kind == "fixed",
        learn_t=kind == "learn_t",
        calibrating=False,
    )
    levels = 2 ** (bits - 1 if signed else bits) - 1
    with torch.no_grad():
        q.log_q_max.copy_(torch.log(torch.tensor([1.1, 0.7, 1.6][: q.log_q_max.numel()])).reshape(
            q.log_q_max.shape))
        if q.log_d is not None:
            q.log_d.copy_(q.log_q_max - math.log(levels - 0.7))  # b a bit below ``bits``
        if q.log_t is not None:
            q.log_t.fill_(math.log(0.8))
    return q


@pytest.mark.parametrize("kind", ["learned", "restricted", "fixed", "learn_t"])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("per_tensor", [True, False])
@pytest.mark.parametrize("bits", [4, 8, 9])
def test_quantizer_module_matches_reference(
    kind: str, signed: bool, per_tensor: bool, bits: int
) -> None:
    """Every mode of ``DQQuantizer`` (with and without 1-byte codes): outputs and the gradients
    of x and all parameters."""
    q = _module(kind, signed, per_tensor, bits)
    x = _inputs(torch.float32, 1.1, 1.1 / 6.3, (8, 3, 16, 16)).requires_grad_(True)
    leaves = [x, *q.parameters()]
    out, ref = q(x), _ref_quantize(q, x)
    assert torch.equal(out, ref)
    for got, want in zip(_grads(out, leaves, 2), _grads(ref, leaves, 2), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_inplace_op_after_quantizer_does_not_change_gradients() -> None:
    """The grid is recomputed in backward: an in-place ReLU on the output is harmless."""
    q = _module("learned", True, True)
    x = _inputs(torch.float32, 1.1, 0.17, (8192,)).requires_grad_(True)
    leaves = [x, *q.parameters()]
    out = torch.relu_(q(x))
    ref = torch.relu(_ref_quantize(q, x))
    for got, want in zip(_grads(out, leaves, 3), _grads(ref, leaves, 3), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(8, 6, 5, 5), (8, 6)])
@pytest.mark.parametrize("indexed", [False, True])
def test_gate_matches_reference(training: bool, shape: tuple[int, ...], indexed: bool) -> None:
    """``VIBGate`` output and gradients (x, mu, log_sigma2) against ``x * z`` written out."""
    torch.manual_seed(0)
    n_atoms = 3 if indexed else 6
    gate = VIBGate(n_atoms, log_sigma2_init=-2.0)
    with torch.no_grad():
        gate.mu[0] = 0.05  # one atom closed in eval mode
    gate.train(training)
    index = torch.tensor([0, 1, 2, 2, 1, 0]) if indexed else None
    x = torch.randn(shape, dtype=torch.float32).requires_grad_(True)
    torch.manual_seed(7)
    out = gate(x, index)
    torch.manual_seed(7)
    if training:
        z = gate.mu + torch.randn(shape[0], n_atoms) * torch.exp(0.5 * gate.log_sigma2)
    else:
        keep = (torch.log(gate.mu**2) - gate.log_sigma2 > 0).float()
        z = (gate.mu * keep).expand(shape[0], n_atoms)
    z = z if index is None else z[:, index]
    ref = x * z.reshape(shape[:2] + (1,) * (len(shape) - 2))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    leaves = [x, gate.mu, gate.log_sigma2]
    got = torch.autograd.grad(out, leaves, torch.ones_like(out) * 0.3, allow_unused=True)
    want = torch.autograd.grad(ref, leaves, torch.ones_like(ref) * 0.3, allow_unused=True)
    for a, b in zip(got, want, strict=True):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
