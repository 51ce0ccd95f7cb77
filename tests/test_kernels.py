"""dashskip's compiled kernels and the measured choice between them and torch's ops: each kernel equal to its
reference up to rounding, used only where it applies, the slower kernel never chosen, choices kept per host."""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch.nn import functional as F

from dashskip.core import kernels
from dashskip.core.handlers import (
    VNNI,
    FullPrecision,
    Handler,
    Int4WeightOnly,
    Int8WeightOnly,
    activations,
    int4_codes,
    quantize_int8,
    quantize_rows,
)
from dashskip.core.kernels import CHOICE, INT_DOT_ROWS, SMALL_ROWS
from dashskip.core.linear import Linear
from dashskip.errors import DashskipError


@pytest.fixture(scope="module")
def ext():
    if kernels._cpu_supports() is not None:
        pytest.skip(f"kernel not for this CPU: {kernels._cpu_supports()}")
    if kernels.mode() == "off":
        pytest.skip("the compiled kernels are hidden (DASHSKIP_SMALL_GEMM=0)")
    module = kernels.extension()
    assert module is not None, "the kernel must build where the CPU supports it (a C++ compiler and ninja)"
    return module


def test_the_kernels_split_their_work_between_threads_and_give_the_same_bits(ext):
    """Built with OpenMP: ATen's `at::parallel_for` runs its body serially in a file compiled without it (its header
    checks _OPENMP), and every kernel ran on one thread of two until 2026-12-08 (docs/speed.md). The split is over
    independent outputs, so one thread and two give the same bits."""
    assert ext.parallel
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 3, 16, generator=gen)
    keys, values = (torch.randn(2, 2, 40, 16, generator=gen) for _ in range(2))
    weight, x = torch.randn(96, 128, generator=gen), torch.randn(5, 128, generator=gen)
    threads, out = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out.append((ext.causal_attention(q, keys, values, 30, 0.25, torch.tensor([0, 4]), 0),
                        ext.linear(x, ext.pack(weight), 96)))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*out, strict=True):
        assert torch.equal(one, two)


@pytest.fixture
def fresh_choices(monkeypatch, tmp_path):
    """A kernel-choice cache of the test's own."""
    monkeypatch.setenv("DASHSKIP_CACHE", str(tmp_path))
    CHOICE.forget()
    yield tmp_path
    CHOICE.forget()


@pytest.mark.parametrize("out_features, in_features", [(100, 37), (48, 64), (16, 1)])
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 13, SMALL_ROWS])
def test_fp32_kernels_match_f_linear_for_any_shape(ext, out_features, in_features, rows):
    """dashskip's packed kernel and oneDNN's product on its reordered weight (where torch has oneDNN)."""
    torch.manual_seed(rows)
    weight, bias = torch.randn(out_features, in_features), torch.randn(out_features)
    x = torch.randn(rows, in_features)
    handler = FullPrecision()
    assert handler.kernels(x) == ["torch", "packed"] + (["onednn"] if kernels.onednn() and rows > 1 else [])
    for kernel in handler.kernels(x)[1:]:
        got = handler.run(kernel, handler.prepare(kernel, handler.quantize([weight])), x, out_features) + bias
        torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_only_torchs_ops_run_outside_the_kernels_range(ext):
    handler = FullPrecision()
    onednn = ["onednn"] if kernels.onednn() else []  # torch's too: oneDNN's product on its reordered weight
    assert handler.kernels(torch.randn(SMALL_ROWS + 1, 16)) == ["torch", *onednn]
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
    if not kernels.avx512():
        pytest.skip("the INT8 kernel needs AVX-512 (absent, or hidden by DASHSKIP_ISA=avx2)")
    return ext


@pytest.mark.parametrize("out_features, in_features", [(100, 37), (48, 64), (16, 1)])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9, SMALL_ROWS])
def test_int8_kernel_computes_what_torchs_kernel_computes(int8_ext, out_features, in_features, rows, monkeypatch):
    """bf16 activations times the INT8 codes, summed in fp32, scaled, rounded to bf16: torch's arithmetic."""
    monkeypatch.setenv("DASHSKIP_ACTIVATIONS", "bf16")
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


@pytest.fixture(scope="module")
def vnni_ext(ext):
    if not kernels.vnni():
        pytest.skip("the integer dot-product kernels need AVX512-VNNI (absent, or hidden by DASHSKIP_ISA=avx2)")
    return ext


def test_rows_round_per_block_of_64_values():
    x = torch.randn(3, 150) * torch.linspace(0.1, 10, 150)  # blocks of very different ranges
    x[1] = 0.0
    x[2, 70] = 1000.0  # an outlier costs only its own block's resolution
    q = quantize_rows(x)
    assert q.shape == x.shape and torch.equal(q[1], x[1])
    for begin in (0, 64, 128):
        block, rounded = x[:, begin : begin + 64], q[:, begin : begin + 64]
        step = block.abs().amax(dim=1, keepdim=True).clamp(min=1e-30) / 127
        assert bool(((rounded - block).abs() <= step / 2 + 1e-6).all())
        assert torch.allclose(rounded / torch.where(step > 0, step, 1), (rounded / step).round(), atol=1e-3)
    assert float((q[2, :64] - x[2, :64]).abs().max()) < 0.05  # the outlier's block is the only coarse one


def test_activation_arithmetic_is_chosen_by_name(monkeypatch):
    assert activations() == "int8"  # the default: integer products
    monkeypatch.setenv("DASHSKIP_ACTIVATIONS", "bf16")
    assert activations() == "bf16"
    monkeypatch.setenv("DASHSKIP_ACTIVATIONS", "fp8")
    with pytest.raises(DashskipError, match="DASHSKIP_ACTIVATIONS='fp8' is not one of int8, bf16"):
        activations()


def _dequantized_int8(weight):
    q, scales = quantize_int8(weight)
    return q.double() * scales.double()[:, None]


def _dequantized_int4(weight):
    codes, scales, minima = int4_codes(weight)
    n = weight.shape[0]
    s, m = scales.bfloat16().double(), minima.bfloat16().double()  # the kernel's bf16 scales and minima
    return (codes.view(n, -1, 64).double() * s[..., None] + m[..., None]).view(n, -1)


VNNI_CASES = [(Int8WeightOnly, _dequantized_int8, 100, 37), (Int8WeightOnly, _dequantized_int8, 16, 1),
              (Int8WeightOnly, _dequantized_int8, 33, 130), (Int4WeightOnly, _dequantized_int4, 100, 192),
              (Int4WeightOnly, _dequantized_int4, 17, 64)]  # fmt: skip


@pytest.mark.parametrize("handler_type, dequantized, out_features, in_features", VNNI_CASES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, SMALL_ROWS, 37, INT_DOT_ROWS])
@pytest.mark.parametrize("kernel", VNNI)
def test_vnni_kernels_compute_rounded_rows_times_the_quantized_weight(
    vnni_ext, handler_type, dequantized, out_features, in_features, rows, kernel
):
    """The integer kernels (both prefetch plans) equal the rows rounded by `quantize_rows` times the dequantized
    weight, in float64: the integer sums are exact, only the fp32 scaling rounds. Shapes off the 16-column and
    64-value tiles."""
    torch.manual_seed(rows + out_features)
    weight = torch.randn(out_features, in_features) * 0.05
    x = torch.randn(rows, in_features) * torch.linspace(0.2, 4.0, in_features)
    handler = handler_type()
    assert kernel in handler.kernels(x)
    got = handler.run(kernel, handler.prepare(kernel, handler.quantize([weight])), x, out_features)
    assert got.shape == (rows, out_features) and got.dtype == torch.float32
    exact = quantize_rows(x).double() @ dequantized(weight).T
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("handler_type", [Int8WeightOnly, Int4WeightOnly])
@pytest.mark.parametrize("rows", [1, 6, 40, INT_DOT_ROWS + 1])
def test_every_kernel_of_a_quantized_state_multiplies_the_same_rounded_rows(vnni_ext, handler_type, rows):
    """With int8 activations the kernel choice (VNNI, packed, torch's, the dequantized GEMM) moves a result only
    by float rounding (torch's kernels round to bf16), not by how the rows are quantized."""
    torch.manual_seed(rows)
    weight, x = torch.randn(96, 128) * 0.05, torch.randn(rows, 128)
    handler = handler_type()
    form = handler.quantize([weight])
    names = handler.kernels(x)
    assert ("vnni" in names) == (rows <= INT_DOT_ROWS)
    outs = {k: handler.run(k, handler.prepare(k, form), x, 96) for k in names}
    reference = handler.run("gemm", form, quantize_rows(x), 96)  # already rounded: rounding again is a no-op
    for name, out in outs.items():
        torch.testing.assert_close(out, reference, rtol=2e-2, atol=2e-2, msg=name)


def test_bf16_activations_keep_the_weight_only_arithmetic(ext, monkeypatch):
    monkeypatch.setenv("DASHSKIP_ACTIVATIONS", "bf16")
    torch.manual_seed(0)
    x = torch.randn(2, 64)
    assert "vnni" not in Int8WeightOnly().kernels(x) and "vnni" not in Int4WeightOnly().kernels(x)
    handler, weight = Int8WeightOnly(), torch.randn(32, 64)
    out = handler.run("gemm", handler.quantize([weight]), x, 32)
    exact = x.bfloat16().double() @ _dequantized_int8(weight).T  # the unrounded rows
    # bf16 products and output: errors of a few bf16 ulps of the largest terms
    torch.testing.assert_close(out.double(), exact, rtol=2e-2, atol=2e-2 * float(exact.abs().max()))


def test_speed_quality_plot_draws_every_configuration(tmp_path):
    from dashskip.eval.plots import speed_quality_plot

    path = tmp_path / "plots" / "vs.png"
    speed_quality_plot({"engine, int8": (84.0, 40.2, 2.9), "llama.cpp Q8_0": (130.0, 40.5, 3.0)}, path, "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 20])  # eight lanes at a time, and a width that is not
def test_attention_over_a_16_bit_cache_is_torchs_over_the_same_values(ext, dtype, head_dim):
    """rope_and_cache stores each key/value rounded as torch's copy rounds it (to nearest even); causal_attention
    reads the 16-bit cache as torch's attention reads it widened to fp32, grouped heads, padding and all."""
    gen = torch.Generator().manual_seed(0)
    batch, heads, kv, tokens, start, cap = 2, 4, 2, 3, 13, 32
    qkv = torch.randn(batch, tokens, (heads + 2 * kv) * head_dim, generator=gen)
    angles = torch.rand(batch, tokens, head_dim, generator=gen) * 6
    cos, sin = angles.cos(), angles.sin()
    wide = [torch.randn(batch, kv, cap, head_dim, generator=gen) for _ in range(2)]
    narrow = [t.to(dtype) for t in wide]
    q_wide = ext.rope_and_cache(qkv, cos, sin, *wide, heads, start)
    q = ext.rope_and_cache(qkv, cos, sin, *narrow, heads, start)
    assert torch.equal(q, q_wide)  # q stays fp32
    for w, n in zip(wide, narrow, strict=True):
        assert n.dtype == dtype and torch.equal(n, w.to(dtype))
    begins = torch.tensor([0, 5])
    out = ext.causal_attention(q, *narrow, start, head_dim**-0.5, begins, 0)
    keys, values = (n[:, :, : start + tokens].float().repeat_interleave(heads // kv, 1) for n in narrow)
    allowed = torch.ones(tokens, start + tokens).tril(start).bool()[None, None].repeat(batch, 1, 1, 1)
    allowed[1, :, :, :5] = False
    ref = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=head_dim**-0.5)
    assert torch.allclose(out, ref.transpose(1, 2).reshape(out.shape), atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        ext.causal_attention(q, *(n.double() for n in narrow), start, 1.0, begins, 0)
