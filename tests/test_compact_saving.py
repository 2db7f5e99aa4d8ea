"""Compact saved tensors (``djpq_compiler.modules.saved``): exact, and active only where meant."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

import djpq_compiler as djpq
from djpq_compiler.modules import DQQuantizer, VIBGate, saved
from djpq_compiler.workflows import zoo


def _quantizer(signed: bool, bits: int = 4) -> DQQuantizer:
    q = DQQuantizer(signed, init_bits=bits, calibrating=False)
    with torch.no_grad():
        q.log_q_max.fill_(0.0)  # q_max = 1
        assert q.log_d is not None
        q.log_d.fill_(-torch.log(torch.tensor(float(2 ** (bits - (1 if signed else 0)) - 1))))
    return q


def _x(n: int = 8192, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 1.2).requires_grad_(True)


@pytest.mark.parametrize("signed", [True, False])
def test_quantizer_output_packs_to_exact_one_byte_codes(signed: bool) -> None:
    q = _quantizer(signed)(_x())
    packed = saved._pack(q)
    assert isinstance(packed, saved._Codes)
    assert packed.codes.dtype == (torch.int8 if signed else torch.uint8)
    assert torch.equal(saved._unpack(packed), q)


def test_codes_follow_an_inplace_relu_and_refuse_other_inplace_ops() -> None:
    q = _quantizer(True)(_x())
    r = torch.relu_(q)
    packed = saved._pack(r)
    assert isinstance(packed, saved._Codes)
    assert torch.equal(saved._unpack(packed), r)
    s = _quantizer(True)(_x(seed=1))
    s.mul_(1.5)
    assert saved._pack(s) is s  # unknown change: saved as it is


def test_no_codes_for_wide_grids_small_tensors_or_other_dtypes() -> None:
    assert saved._pack(_quantizer(True, bits=9)(_x())) is not None
    assert not isinstance(saved._pack(_quantizer(True, bits=9)(_x())), saved._Codes)
    assert isinstance(saved._pack(_quantizer(False, bits=8)(_x())), saved._Codes)  # 255 levels
    assert not isinstance(saved._pack(_quantizer(True)(_x(n=100))), saved._Codes)
    half = _quantizer(True)(_x().detach().bfloat16())
    assert not isinstance(saved._pack(half), saved._Codes)


def test_gate_output_packs_to_an_exact_recipe() -> None:
    gate = VIBGate(4, log_sigma2_init=-2.0)
    x = torch.randn(16, 4, 16, 16, requires_grad=True)
    y = gate(x)
    packed = saved._pack(y)
    assert isinstance(packed, saved._Recipe)
    assert torch.equal(saved._unpack(packed), y)
    r = torch.relu_(gate(x))
    packed = saved._pack(r)
    assert isinstance(packed, saved._Recipe) and packed.relu
    assert torch.equal(saved._unpack(packed), r)
    other = gate(x)
    other.add_(1.0)
    assert saved._pack(other) is other


def test_recipe_refuses_a_base_changed_in_place() -> None:
    gate = VIBGate(4)
    base = torch.randn(16, 4, 16, 16)
    packed = saved._pack(gate(base))
    base.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved._unpack(packed)


@functools.cache
def _prepared_once(bits: int) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    x = torch.randn(8, 1, 28, 28)
    config = djpq.DJPQConfig(weight=djpq.QuantSpec(bits=bits), activation=djpq.QuantSpec(bits=bits))
    # a small resnet (two blocks per stage) keeps the test fast; 28x28 keeps tensors above
    # saved.MIN_NUMEL in the first two stages
    p = djpq.prepare(zoo.resnet20(widths=(8, 16, 16), blocks=2).eval(), x, config)
    with torch.no_grad():  # make gates noisy so the gate gradients are non-trivial
        for _, gate in djpq.prepared.gates(p):
            gate.log_sigma2.fill_(-3.0)
    return p.train()


def _prepared(bits: int = 4) -> torch.fx.GraphModule:
    return copy.deepcopy(_prepared_once(bits))


def _grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    torch.manual_seed(1)  # the same gate noise
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(x), y) + djpq.djpq_loss(model)
    loss.backward()
    assert x.grad is not None
    return [x.grad] + [p.grad for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("bits", [4, 8])
def test_prepared_model_gradients_are_bitwise_the_plain_ones(bits: int) -> None:
    """A training step with compact saving gives exactly the gradients of plain saving."""
    model = _prepared(bits)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
    compact = _grads(model, x, y)
    original, calls = saved._pack, []
    saved._pack = lambda t: calls.append(t) or original(t)  # type: ignore[assignment]
    try:
        with torch.autograd.graph.disable_saved_tensors_hooks("plain saving for the reference"):
            plain = _grads(model, x, y)
    finally:
        saved._pack = original  # type: ignore[assignment]
    assert not calls
    assert len(compact) == len(plain) > 40
    for a, b in zip(compact, plain, strict=True):
        assert torch.equal(a, b)


def test_prepared_model_saves_less_and_only_inside_its_forward() -> None:
    model = _prepared()
    x = torch.randn(8, 1, 28, 28)
    kinds: list[str] = []
    original = saved._pack

    def spy(t: torch.Tensor) -> object:
        out = original(t)
        kinds.append(type(out).__name__)
        return out

    saved._pack = spy  # type: ignore[assignment]
    try:
        out = model(x)
    finally:
        saved._pack = original  # type: ignore[assignment]
    assert kinds.count("_Codes") >= 19 and kinds.count("_Recipe") >= 19
    assert saved._ACTIVE.stack == []
    out.sum().backward()
    with torch.no_grad():  # eval / no-grad forward passes push nothing
        model.eval()(x)
    assert saved._ACTIVE.stack == []


def test_hooks_are_left_when_the_forward_raises() -> None:
    model = _prepared()
    with pytest.raises(RuntimeError):
        model(torch.randn(8, 3, 28, 28))  # wrong channel count
    assert saved._ACTIVE.stack == []


def test_deepcopy_and_state_dict_keys_unchanged() -> None:
    model = _prepared()
    clone = copy.deepcopy(model)  # GraphModule.__deepcopy__ drops forward hooks: re-attached
    assert list(clone._forward_pre_hooks.values()) == list(model._forward_pre_hooks.values())
    assert list(clone.state_dict()) == list(model.state_dict())
    assert not any("saved" in k for k in model.state_dict())
    clone(torch.randn(8, 1, 28, 28)).sum().backward()


def test_converted_copy_saves_plainly() -> None:
    model = _prepared()
    converted = djpq.convert(model, integer=False)
    assert not converted._forward_pre_hooks and not converted._forward_hooks
    assert not converted._deepcopy_hooks and model._forward_pre_hooks  # the original keeps its
    calls: list[torch.Tensor] = []
    original = saved._pack
    saved._pack = lambda t: calls.append(t) or original(t)  # type: ignore[assignment]
    try:
        converted.train()(torch.randn(8, 1, 28, 28)).sum().backward()
    finally:
        saved._pack = original  # type: ignore[assignment]
    assert not calls and saved._ACTIVE.stack == []


def test_no_marks_without_autograd() -> None:
    """Inference keeps no codes or gate inputs alive through its outputs."""
    with torch.no_grad():
        q = _quantizer(True)(_x())
        y = VIBGate(4)(torch.randn(16, 4, 16, 16))
    assert not hasattr(q, saved._ATTR) and not hasattr(y, saved._ATTR)
