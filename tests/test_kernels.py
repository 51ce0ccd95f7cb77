"""The small-row fp32 kernel: equal to F.linear up to rounding, used only where it applies, rebuilt when its
weight changes, and built at all on the machines it is meant for."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from dashskip import kernels
from dashskip.kernels import SMALL_ROWS, FewRowInt8Linear, FewRowLinear, usable
from dashskip.states import quantize_int8


@pytest.fixture(scope="module")
def ext():
    if kernels._cpu_supports() is not None:
        pytest.skip(f"kernel not for this CPU: {kernels._cpu_supports()}")
    module = kernels.extension()
    assert module is not None, "the kernel must build where the CPU supports it (a C++ compiler and ninja)"
    return module


@pytest.mark.parametrize("out_features, in_features", [(100, 37), (48, 64), (16, 1)])
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 13, SMALL_ROWS])
def test_matches_f_linear_for_any_shape(ext, out_features, in_features, rows):
    torch.manual_seed(rows)
    weight = torch.randn(out_features, in_features).t().contiguous().t()  # the engine's column-major layout
    bias = torch.randn(out_features)
    x = torch.randn(1, rows, in_features)  # (batch, tokens, features), as the layers call it
    linear = FewRowLinear(weight)
    with torch.no_grad():
        got, want = linear(x, bias), F.linear(x, weight, bias)
    assert got.shape == want.shape == (1, rows, out_features)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert linear.panels is not None  # the kernel ran, not the fallback


def test_falls_back_outside_its_range(ext):
    weight = torch.randn(32, 16)
    linear = FewRowLinear(weight)
    with torch.no_grad():
        many = torch.randn(SMALL_ROWS + 1, 16)
        assert not usable(many, weight) and torch.equal(linear(many), F.linear(many, weight))
        assert not usable(many[:2].double(), weight.double())
    assert linear.panels is None
    x = torch.randn(2, 16, requires_grad=True)  # autograd: the kernel has no backward, so F.linear runs
    linear(x).sum().backward()
    torch.testing.assert_close(x.grad, weight.sum(0).expand(2, -1))


def test_repacks_when_the_weight_changes(ext):
    weight = torch.randn(32, 16)
    linear = FewRowLinear(weight)
    x = torch.randn(3, 16)
    with torch.no_grad():
        before = linear(x)
        weight.mul_(2)  # in place: the version counter moves
        torch.testing.assert_close(linear(x), 2 * before, rtol=1e-5, atol=1e-5)
        weight.data = torch.randn(32, 16)  # new storage
        torch.testing.assert_close(linear(x), F.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("DASHSKIP_SMALL_GEMM", "0")
    kernels.extension.cache_clear()
    try:
        weight = torch.randn(8, 4)
        assert kernels.extension() is None and not usable(torch.randn(1, 4), weight)
        assert torch.equal(FewRowLinear(weight)(torch.ones(1, 4)), F.linear(torch.ones(1, 4), weight))
    finally:
        monkeypatch.delenv("DASHSKIP_SMALL_GEMM")
        kernels.extension.cache_clear()


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
    weight, scales = quantize_int8(torch.randn(out_features, in_features))
    x = torch.randn(1, rows, in_features)
    linear = FewRowInt8Linear()
    got = linear(x, weight, scales)
    assert got.shape == (1, rows, out_features)
    assert torch.equal(got, got.bfloat16().float())  # bf16 values
    if in_features % 16 == 0:  # the widths torch's kernel takes
        torchs = torch._weight_int8pack_mm(x[0].bfloat16(), weight, scales).float()
        torch.testing.assert_close(got[0], torchs, rtol=8e-3, atol=1e-3)  # one bf16 rounding step apart at most
    exact = x.bfloat16().double() @ (weight.double() * scales.double()[:, None]).T
    torch.testing.assert_close(got.double(), exact, rtol=4e-3, atol=1e-3)
    assert usable(x, weight) and not usable(torch.randn(SMALL_ROWS + 1, in_features), weight)


def test_int8_kernel_repacks_when_the_codes_change(int8_ext):
    weight, scales = quantize_int8(torch.randn(32, 16))
    linear, x = FewRowInt8Linear(), torch.randn(2, 16)
    before = linear(x, weight, scales)
    weight.neg_()
    torch.testing.assert_close(linear(x, weight, scales), -before)
