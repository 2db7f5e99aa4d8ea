"""Integer linears on token tensors ``(N, T, C)`` / ``(N, H, W, C)``: channels on the last dim.

``IntLinear`` treats every leading position as one row of a 2-D layer, so its bias, per-channel
requantization and float finish apply along the last dim at any rank (they used to broadcast
along dim 1, which is the channel dim only for 2-D inputs). ``convert`` lowers such linears
(transformer MLPs, MLP-mixer token/channel mixing, ConvNeXt's channels-last MLP) to
``IntLinear``; TVM is bit-exact with the reference and onnxruntime within 1 LSB per op.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import fx, nn

import djpq_compiler as djpq
from djpq_compiler.convert import convert
from djpq_compiler.errors import QuantizationError
from djpq_compiler.ir import modules as im
from djpq_compiler.records import converted_record
from djpq_compiler.verify import integer_agreement


def _layer(out_scale: float | None) -> im.IntLinear:
    """A 3-in, 2-out layer with different multipliers, shifts and biases per output channel."""
    weight = torch.tensor([[1, -2, 3], [4, 0, -1]])
    return im.IntLinear(weight=weight, bias=torch.tensor([5, -7]),
                        w_scale=torch.tensor([0.5, 0.25], dtype=torch.float64), in_scale=0.1,
                        w_bits=4, out_scale=out_scale, out_bits=8, out_signed=True, clip=None,
                        m=torch.tensor([3, 5]), shift=torch.tensor([2, 3]))


def test_tokens_requantize_along_the_last_dim_golden() -> None:
    """Hand-computed: acc = x @ w.T + bias, out_c = floor((acc_c * m_c + 2^(s_c-1)) / 2^s_c)."""
    x = torch.tensor([[[1, 2, 3], [0, -1, 4]], [[2, 2, 2], [-3, 1, 0]]])  # (N=2, T=2, C=3)
    # acc channel 0: x.(1,-2,3)+5; channel 1: x.(4,0,-1)-7
    acc = torch.tensor([[[11, -6], [19, -11]], [[9, -1], [0, -19]]])
    m, s = torch.tensor([3, 5]), torch.tensor([2, 3])
    want = torch.div(acc * m + (1 << (s - 1)), 2**s, rounding_mode="floor")
    assert want.tolist() == [[[8, -4], [14, -7]], [[7, -1], [0, -12]]]
    assert torch.equal(_layer(1.0)(x), want)


@pytest.mark.parametrize("out_scale", [1.0, None])
def test_tokens_equal_rows_of_the_2d_layer(out_scale: float | None) -> None:
    """Any rank gives what the 2-D layer gives on the flattened rows (integer or float out)."""
    layer = _layer(out_scale)
    x = torch.randint(-8, 8, (2, 5, 4, 3))
    rows = layer(x.reshape(-1, 3))
    got = layer(x)
    assert got.shape == (2, 5, 4, 2)
    assert torch.equal(got.reshape(-1, 2), rows)
    assert torch.equal(layer(x[0, 0, 0]), rows[0])  # a single (in_features,) vector too


def test_float_finish_scales_the_last_dim() -> None:
    layer = _layer(None)
    x = torch.tensor([[[1, 2, 3]]])
    acc = torch.tensor([11.0, -6.0], dtype=torch.float64)
    want = (acc * 0.1 * torch.tensor([0.5, 0.25], dtype=torch.float64)).to(torch.float32)
    assert torch.equal(layer(x).flatten(), want)


def test_wrong_feature_dim_is_refused() -> None:
    with pytest.raises(QuantizationError, match="in_features=3"):
        _layer(1.0)(torch.zeros(2, 3, 4, dtype=torch.int64))


# ------------------------------------------------------------------------------ convert


class MixerLike(nn.Module):
    """MLP-mixer-like block on ``(N, T, C)`` tokens: token mixing (linears over T, after a
    transpose), channel mixing (linears over C with a GELU), residual adds, a linear head on
    the flattened tokens. No layer norm, so every op has an integer lowering."""

    def __init__(self, c: int = 8, tokens: int = 4, hidden: int = 16) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, c, 4, stride=4)
        self.tok1, self.tok2 = nn.Linear(tokens, hidden), nn.Linear(hidden, tokens)
        self.ch1, self.ch2 = nn.Linear(c, hidden), nn.Linear(hidden, c)
        self.relu, self.gelu = nn.ReLU(), nn.GELU()
        self.head = nn.Linear(tokens * c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)  # (N, T, C)
        y = self.tok2(self.relu(self.tok1(x.transpose(1, 2)))).transpose(1, 2)
        x = x + y
        x = x + self.ch2(self.gelu(self.ch1(x)))
        return self.head(x.flatten(1))


class ChannelsLastMLP(nn.Module):
    """ConvNeXt-like: a conv, a channels-last MLP on ``(N, H, W, C)``, a conv head."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.act = nn.GELU()
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        z = self.fc2(self.act(self.fc1(y.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)
        return self.head(y + z)


class TokenClassifier(nn.Module):
    """Per-token logits: the network output is a float ``(N, T, classes)`` linear output."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, c, 2, stride=2)
        self.fc = nn.Linear(c, 2 * c)
        self.act = nn.ReLU()
        self.head = nn.Linear(2 * c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc(self.patch(x).flatten(2).transpose(1, 2))))


class TokensThenBatchNorm(nn.Module):
    """A linear on tokens read by a BatchNorm1d over the *token* dim (T == out_features):
    BN normalizes dim 1, not the linear's channels, so it cannot be folded per output channel."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.fc(x)))


MODELS = {"mixer": (MixerLike, (2, 3, 8, 8)), "channels_last": (ChannelsLastMLP, (2, 3, 6, 6)),
          "token_classifier": (TokenClassifier, (2, 3, 6, 6))}


def _prepared(make: type[nn.Module], shape: tuple[int, ...]
              ) -> tuple[fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    model = make().eval()
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm1d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    x = torch.randn(shape)
    return djpq.prepare(model, x).eval(), x


@pytest.fixture(scope="module", params=sorted(MODELS))
def token_net(request: pytest.FixtureRequest) -> tuple:
    make, shape = MODELS[request.param]
    prepared, x = _prepared(make, shape)
    return request.param, prepared, convert(prepared), x


def _token_layers(converted: fx.GraphModule) -> list[im.IntLinear]:
    return [m for m in converted.modules() if isinstance(m, im.IntLinear)]


def test_token_linears_become_integer(token_net: tuple) -> None:
    name, _, converted, _ = token_net
    assert converted_record(converted).float_ops == (), name
    layers = _token_layers(converted)
    assert len(layers) >= 2, name
    # gates/pre-activation scales give per-channel multipliers: the rank bug would show here
    assert any(m.m.numel() > 1 and int(m.m.unique().numel()) > 1 for m in layers), name


def test_token_linears_within_one_lsb_of_fake_quant(token_net: tuple) -> None:
    name, prepared, converted, x = token_net
    lsb = integer_agreement(prepared, converted, x)
    assert max(lsb.values()) <= 1, (name, lsb)


def test_token_linears_tvm_bit_exact(token_net: tuple) -> None:
    pytest.importorskip("tvm")
    tvm_backend = pytest.importorskip("djpq_compiler.backends.tvm")
    name, _, converted, x = token_net
    compiled = tvm_backend.build(converted, "x86", example_inputs=x)
    linears = [k for k in compiled.kernels if k.op == "linear"]
    assert len(linears) == len(_token_layers(converted)), name  # one choice per layer, any rank
    assert not any("-D input" in k.note for k in linears), linears  # tokens are rows: no refusal
    for seed in (0, 1):
        inp = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) * 2
        assert torch.equal(compiled(inp), converted(inp)), name


def test_token_linears_onnx_within_one_lsb(token_net: tuple, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from djpq_compiler.backends.onnx import export, verify

    name, _, converted, x = token_net
    report = verify(converted, export(converted, tmp_path / f"{name}.onnx", (x,)), (x,))
    assert report["max_lsb_per_op"] <= 1, name
    out = report["outputs"][0]  # a float output of an integer layer: within its input LSB unit
    assert out.get("max_unit_ratio", 0.0) <= 1.0, (name, out)
    if name == "token_classifier":  # (N, T, classes): the unit is per channel on the last dim
        assert "max_unit_ratio" in out, out


def test_batchnorm_after_a_token_linear_keeps_it_float() -> None:
    prepared, x = _prepared(TokensThenBatchNorm, (2, 4, 6))
    with pytest.warns(UserWarning, match="fc"):
        converted = convert(prepared)
    assert "fc" in converted_record(converted).float_ops
    assert max(integer_agreement(prepared, converted, x).values()) <= 1
    with torch.no_grad():
        want, got = prepared(x), converted(x)
    assert float((got - want).abs().max()) <= 0.1 * float(want.abs().max())
