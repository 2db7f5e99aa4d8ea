"""The backend gate: every torchvision classification model that converts also builds with TVM
(x86, bit-exact with the integer reference) and exports to ONNX (<= 1 LSB per op in
onnxruntime), and fake-quant agrees with the integer model to <= 1 LSB per op.

Models are random-init (``weights=None``) at a small input with ~40 % of every gate group
closed (``djpq_compiler.testing.backend_zoo``). A sample runs by default (CI included); the
whole zoo takes hours on 2 cores, so it runs only with ``DJPQ_FULL_ZOO=1`` (and ``slow``), or as
``benchmarks/torchvision_zoo/backends.py``. No stage may raise anything but a ``DjpqError``,
known failure or not. Known failures are listed with the stage that fails and why; a listed
model that passes fails the test, so the table stays true. Full-zoo results:
``benchmarks/torchvision_zoo/BACKENDS.md``.
"""

from __future__ import annotations

import os

import pytest
import torch

from djpq_compiler.testing.backend_zoo import check_backends, zoo_input

tv = pytest.importorskip("torchvision")
pytest.importorskip("tvm")
pytest.importorskip("onnxruntime")

STAGES = ("convert", "agreement", "tvm", "onnx")

#: model -> why it does not pass every stage yet.
_DRIFT = ("tvm: builds and runs; its float islands (attention, layer norms) flip codes by 1 LSB "
          "at their outputs (TVM's float math), and in this random-init net the flips grow "
          "downstream (swin_t up to 6 LSB, maxvit_t up to 15; "
          "benchmarks/torchvision_zoo/island_flips.py); TVM has no per-op (teacher-forced) check "
          "to separate them yet")
KNOWN_FAILURES: dict[str, str] = {"swin_t": _DRIFT, "swin_v2_t": _DRIFT, "maxvit_t": _DRIFT}

SAMPLE = ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_1",
          "regnet_y_400mf", "efficientnet_b0"]
#: Too large to convert and build at every test run (see benchmarks/torchvision_zoo/backends.py).
HEAVY = {"vit_h_14", "regnet_y_128gf", "vit_l_16", "vit_l_32", "regnet_y_32gf", "regnet_y_16gf",
         "regnet_x_32gf", "vit_b_16", "vit_b_32"}
ALL = tv.models.list_models(module=tv.models)
FULL = os.environ.get("DJPQ_FULL_ZOO") == "1"


def _param(name: str) -> object:
    return pytest.param(name, marks=[] if name in SAMPLE else [pytest.mark.slow], id=name)


@pytest.mark.parametrize(
    "name", [_param(n) for n in (ALL if FULL else SAMPLE) if n not in HEAVY])
def test_backends(name: str) -> None:
    torch.manual_seed(0)  # the random init (the pruning is seeded in check_backends)
    model = tv.models.get_model(name, weights=None).eval()
    result = check_backends(name, model, zoo_input(name))
    assert not result.crashes, {s: result.stages[s].detail for s in result.crashes}
    failing = {s: f"{o.status}: {o.detail}" for s, o in result.stages.items() if not o.ok}
    if name in KNOWN_FAILURES:
        assert failing, f"{name} passes every stage now: remove it from KNOWN_FAILURES"
        pytest.xfail(KNOWN_FAILURES[name])
    assert result.passed(*STAGES), failing


def test_sample_and_known_failures_are_zoo_models() -> None:
    assert set(SAMPLE) <= set(ALL) and set(KNOWN_FAILURES) <= set(ALL)
