"""dashskip's compiled kernels and the measured choice between them and torch's ops: each kernel equal to its
reference up to rounding, used only where it applies, the slower kernel never chosen, choices kept per host."""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch.nn import functional as F

from dashskip.core import kernels
from dashskip.core.handlers import FullPrecision, Handler, Int8WeightOnly, quantize_int8
from dashskip.core.kernels import CHOICE, SMALL_ROWS
from dashskip.core.linear import Linear


@pytest.fixture(scope="module")
def ext():
    if kernels._cpu_supports() is not None:
        pytest.skip(f"kernel not for this CPU: {kernels._cpu_supports()}")
    module = kernels.extension()
    assert module is not None, "the kernel must build where the CPU supports it (a C++ compiler and ninja)"
    return module


@pytest.fixture
def fresh_choices(monkeypatch, tmp_path):
    """A kernel-choice cache of the test's own."""
    monkeypatch.setenv("DASHSKIP_CACHE", str(tmp_path))
    CHOICE.forget()
    yield tmp_path
    CHOICE.forget()


@pytest.mark.parametrize("out_features, in_features", [(100, 37), (48, 64), (16, 1)])
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 13, SMALL_ROWS])
def test_packed_fp32_kernel_matches_f_linear_for_any_shape(ext, out_features, in_features, rows):
    torch.manual_seed(rows)
    weight, bias = torch.randn(out_features, in_features), torch.randn(out_features)
    x = torch.randn(rows, in_features)
    handler = FullPrecision()
    assert handler.kernels(x) == ["torch", "packed"]
    got = handler.run("packed", handler.prepare("packed", handler.quantize([weight])), x, out_features) + bias
    torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_only_torchs_op_runs_outside_the_kernels_range(ext):
    handler = FullPrecision()
    assert handler.kernels(torch.randn(SMALL_ROWS + 1, 16)) == ["torch"]
    assert handler.kernels(torch.randn(2, 16).double()) == ["torch"]
    x = torch.randn(2, 16, requires_grad=True)  # autograd: the kernels have no backward
    assert handler.kernels(x) == ["torch"] and Int8WeightOnly().kernels(x) == ["gemm"]
    weight = torch.randn(32, 16)
    Linear([weight])(4, x).sum().backward()
    torch.testing.assert_close(x.grad, weight.sum(0).expand(2, -1))


def test_forms_are_remade_when_the_weight_changes(ext, fresh_choices, monkeypatch):
    monkeypatch.setenv("DASHSKIP_SMALL_GEMM", "1")  # our kernel, so its packed copy is what could go stale
    weight = torch.randn(32, 16)
    linear, x = Linear([weight]), torch.randn(3, 16)
    with torch.no_grad():
        before = linear(4, x)
        assert linear.extra_bytes() > 0  # the packed copy exists
        weight.mul_(2)  # in place: the version counter moves
        torch.testing.assert_close(linear(4, x), 2 * before, rtol=1e-5, atol=1e-5)
        linear.weights[0] = torch.randn(32, 16)  # new storage
        torch.testing.assert_close(linear(4, x), F.linear(x, linear.weights[0]), rtol=1e-5, atol=1e-5)


def test_the_kernels_can_be_switched_off(monkeypatch, fresh_choices):
    monkeypatch.setenv("DASHSKIP_SMALL_GEMM", "0")
    kernels.extension.cache_clear()
    try:
        weight = torch.randn(8, 4)
        assert kernels.extension() is None and not kernels.compiled_rows(torch.randn(1, 4))
        assert torch.equal(Linear([weight])(4, torch.ones(1, 4)), F.linear(torch.ones(1, 4), weight))
    finally:
        monkeypatch.delenv("DASHSKIP_SMALL_GEMM")
        kernels.extension.cache_clear()


class Race(Handler):
    """A stand-in scheme with a deliberately slow kernel beside a fast one."""

    name = "race"

    def __init__(self, slow: str) -> None:
        self.slow, self.calls = slow, {"fast": 0, "slow": 0}

    def quantize(self, weights):
        return weights[0]

    def kernels(self, x):
        return ["slow", "fast"] if self.slow == "slow" else ["fast", "slow"]

    def run(self, kernel, prepared, x, out_features):
        self.calls[kernel] += 1
        if kernel == "slow":
            time.sleep(0.002)
        return F.linear(x, prepared)


@pytest.mark.parametrize("order", ["slow", "fast"])
def test_a_kernel_measured_slower_is_never_chosen(fresh_choices, order):
    handler = Race(order)
    linear, x = Linear([torch.randn(24, 8)]), torch.randn(1, 8)
    for _ in range(3):
        linear.run_handler(handler, x)
    measured = handler.calls["slow"]
    assert measured >= 2  # timed while choosing ...
    for _ in range(5):
        linear.run_handler(handler, x)
    assert handler.calls["slow"] == measured  # ... and never run again
    (key, chosen, ms), = [row for row in CHOICE.table() if row[0].startswith("race|")]
    assert chosen == "fast" and ms["slow"] > ms["fast"] and "rows1" in key


def test_choices_are_kept_per_host_and_reused(fresh_choices):
    handler = Race("slow")
    Linear([torch.randn(24, 8)]).run_handler(handler, torch.randn(1, 8))
    files = list((fresh_choices / "kernels").glob("choices-*.json"))
    assert [f.name for f in files] == [f"choices-{kernels.host_fingerprint()}.json"]
    saved = json.loads(files[0].read_text())
    assert saved["host"] == kernels.host_description() and any(k.startswith("race|") for k in saved["choices"])
    CHOICE.forget()  # a new process: the choice comes from the file, nothing is measured again
    again = Race("slow")
    Linear([torch.randn(24, 8)]).run_handler(again, torch.randn(1, 8))
    assert again.calls == {"fast": 1, "slow": 0}


def test_dashskip_small_gemm_1_runs_dashskips_kernels_unmeasured(fresh_choices, monkeypatch):
    monkeypatch.setenv("DASHSKIP_SMALL_GEMM", "1")
    handler = Race("slow")
    Linear([torch.randn(24, 8)]).run_handler(handler, torch.randn(1, 8))
    assert handler.calls == {"fast": 0, "slow": 1}  # the first non-torch kernel, as asked


@pytest.fixture(scope="module")
def int8_ext(ext):
    if not ext.has_int8():
        pytest.skip("the INT8 kernel needs AVX-512")
    return ext


@pytest.mark.parametrize("out_features, in_features", [(100, 37), (48, 64), (16, 1)])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9, SMALL_ROWS])
def test_int8_kernel_computes_what_torchs_kernel_computes(int8_ext, out_features, in_features, rows):
    """bf16 activations times the INT8 codes, summed in fp32, scaled, rounded to bf16: torch's arithmetic."""
    torch.manual_seed(rows)
    weight = torch.randn(out_features, in_features)
    handler = Int8WeightOnly()
    form = handler.quantize([weight])
    x = torch.randn(rows, in_features)
    assert "packed" in handler.kernels(x)
    got = handler.run("packed", handler.prepare("packed", form), x, out_features)
    assert got.shape == (rows, out_features)
    assert torch.equal(got, got.bfloat16().float())  # bf16 values
    if in_features % 16 == 0:  # the widths torch's kernel takes
        torchs = handler.run("torch", form, x, out_features)
        torch.testing.assert_close(got, torchs, rtol=8e-3, atol=1e-3)  # one bf16 rounding step apart at most
    q, scales = quantize_int8(weight)
    exact = x.bfloat16().double() @ (q.double() * scales.double()[:, None]).T
    torch.testing.assert_close(got.double(), exact, rtol=4e-3, atol=1e-3)
