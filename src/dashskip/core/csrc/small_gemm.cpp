// Weight-only products for few rows of x (decode, batched verification, small batches) on x86-64 CPUs:
// fp32 weights (AVX + FMA) and INT8 weights (AVX-512, chosen at run time).
//
// With 2 to ~16 rows, BLAS's fp32 GEMM packs the weight on every call and then computes; its one-row path reads
// the weight well below the memory bandwidth. Here the weight is packed once into panels of 16 output columns
// (K x 16, contiguous), and each panel is streamed once per call while up to 6 rows accumulate in registers
// (benchmarks/small_gemm.py: all 210 linears of SmolLM2 for one row in ~16 ms against BLAS's ~31 ms). With 3 or
// more rows the loop is compute-heavy enough that the hardware prefetcher falls behind: a software prefetch
// 32 steps ahead made five rows ~1.4x faster.
// Panels are split over torch's intra-op threads. An INT4 version (nibbles widened to fp32 in registers) was
// written and measured: no faster than torch's INT4 kernel (instruction-bound), so it was dropped.
#include "ops.h"
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kPanel = 16;  // output columns per panel: two AVX registers
constexpr int64_t kRows = 6;    // rows per pass: 12 accumulators + 2 weight registers + 1 broadcast < 16 registers

template <int R>
void panel_rows(const float* x, int64_t k, const float* panel, float* y, int64_t ldy) {
  __m256 lo[R], hi[R];
  for (int r = 0; r < R; ++r) {
    lo[r] = _mm256_setzero_ps();
    hi[r] = _mm256_setzero_ps();
  }
  for (int64_t i = 0; i < k; ++i) {
    if constexpr (R > 2) _mm_prefetch(reinterpret_cast<const char*>(panel + (i + 32) * kPanel), _MM_HINT_T0);
    const __m256 w0 = _mm256_loadu_ps(panel + i * kPanel);
    const __m256 w1 = _mm256_loadu_ps(panel + i * kPanel + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 b = _mm256_broadcast_ss(x + r * k + i);
      lo[r] = _mm256_fmadd_ps(b, w0, lo[r]);
      hi[r] = _mm256_fmadd_ps(b, w1, hi[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(y + r * ldy, lo[r]);
    _mm256_storeu_ps(y + r * ldy + 8, hi[r]);
  }
}

// Rows 0..m of a panel in passes of at most R rows, each by the kernel compiled for its row count.
template <int R, typename Kernel>
void passes(int64_t m, Kernel&& kernel) {
  for (int64_t r = 0; r < m; r += R) {
    const int64_t rows = std::min<int64_t>(R, m - r);
    if (rows == R) kernel(std::integral_constant<int, R>{}, r);
    else if constexpr (R > 1) {
      passes<R - 1>(rows, [&](auto count, int64_t offset) { kernel(count, r + offset); });
    }
  }
}

// INT8 weights (panels of 16 columns, K x 16 bytes), fp32 rows, per-column scales: y = (x @ q^T) * scale.
// Each weight byte is widened to fp32 in a register (AVX-512: 16 at a time) and used by up to 4 rows; 4 k-chains
// of accumulators hide the FMA latency at one row. Compiled for AVX-512 only, chosen at run time.
constexpr int64_t kInt8Rows = 4;

// fp32 -> the nearest bf16 (ties to even), kept in an fp32: the INT8 state computes on bf16 activations and
// gives bf16 outputs, as torch's weight-only kernel does, so a row's result does not depend on which of the two
// kernels ran it (the number of rows in the call) beyond the order of the fp32 sums.
inline float round_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000u;
  std::memcpy(&value, &bits, sizeof bits);
  return value;
}
constexpr int64_t kChains = 4;

template <int R>
__attribute__((target("avx512f"))) void int8_panel_rows(const float* x, int64_t k, const int8_t* panel,
                                                         const float* scale, float* y, int64_t ldy) {
  __m512 acc[R][kChains];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kChains; ++c) acc[r][c] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + kChains <= k; i += kChains) {
    for (int c = 0; c < kChains; ++c) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(panel + (i + c) * kPanel));
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
      for (int r = 0; r < R; ++r) acc[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * k + i + c]), w, acc[r][c]);
    }
  }
  for (; i < k; ++i) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(panel + i * kPanel));
    const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
    for (int r = 0; r < R; ++r) acc[r][0] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * k + i]), w, acc[r][0]);
  }
  const __m512 s = _mm512_loadu_ps(scale);
  for (int r = 0; r < R; ++r) {
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3]));
    _mm512_storeu_ps(y + r * ldy, _mm512_mul_ps(sum, s));
    for (int c = 0; c < kPanel; ++c) y[r * ldy + c] = round_bf16(y[r * ldy + c]);
  }
}

// Every (panel, pass of at most R rows) of an m-row product over `count` panels, panels split over torch's threads.
template <int R, typename Kernel>
void each_panel(int64_t m, int64_t count, Kernel&& kernel) {
  at::parallel_for(0, count, 4, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) passes<R>(m, [&](auto rows, int64_t r) { kernel(rows, p, r); });
  });
}

// weight (N, K) of any dtype and layout -> (ceil(N / 16), K, 16) contiguous, zero-padded past N.
at::Tensor to_panels(const at::Tensor& weight) {
  const int64_t n = weight.size(0), k = weight.size(1), panels = (n + kPanel - 1) / kPanel;
  auto padded = at::zeros({panels * kPanel, k}, weight.options());
  padded.narrow(0, 0, n).copy_(weight);
  return padded.view({panels, kPanel, k}).transpose(1, 2).contiguous();
}

}  // namespace

bool has_int8() { return __builtin_cpu_supports("avx512f"); }

// weight (N, K) int8, scales (N,) -> (panels (ceil(N / 16), K, 16) int8, scales (ceil(N / 16) * 16,) float32).
std::vector<at::Tensor> pack_int8(const at::Tensor& weight, const at::Tensor& scales) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar, "pack_int8: need a 2-D int8 weight");
  auto panels = to_panels(weight);
  auto padded_scales = at::zeros({panels.size(0) * kPanel}, scales.options().dtype(at::kFloat));
  padded_scales.narrow(0, 0, weight.size(0)).copy_(scales);
  return {panels, padded_scales};
}

// x (M, K) float32, panels and scales from pack_int8() -> (M, out_features) float32.
at::Tensor linear_int8(const at::Tensor& x_in, const at::Tensor& panels, const at::Tensor& scales,
                          int64_t out_features) {
  TORCH_CHECK(has_int8(), "linear_int8: this CPU has no AVX-512");
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "linear_int8: need 2-D float32 rows");
  TORCH_CHECK(panels.dim() == 3 && panels.size(1) == x_in.size(1) && panels.size(2) == kPanel &&
                  panels.is_contiguous() && panels.scalar_type() == at::kChar,
              "linear_int8: panels do not match the rows' width");
  const auto x = x_in.contiguous();
  const int64_t m = x.size(0), k = x.size(1), count = panels.size(0), width = count * kPanel;
  auto y = at::empty({m, width}, x.options());
  std::vector<float> rounded(x.data_ptr<float>(), x.data_ptr<float>() + m * k);
  for (float& v : rounded) v = round_bf16(v);
  const float* xp = rounded.data();
  const int8_t* pp = panels.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  each_panel<kInt8Rows>(m, count, [&](auto rows, int64_t p, int64_t r) {
    int8_panel_rows<decltype(rows)::value>(xp + r * k, k, pp + p * k * kPanel, sp + p * kPanel,
                                           yp + r * width + p * kPanel, width);
  });
  return width == out_features ? y : y.narrow(1, 0, out_features).contiguous();
}

// weight (N, K) float32 -> panels (ceil(N / 16), K, 16), zero-padded past N.
at::Tensor pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat, "pack: need a 2-D float32 weight");
  return to_panels(weight);  // any layout in: the column-major weights of the engine too
}

// x (M, K) float32, panels from pack() -> (M, out_features).
at::Tensor linear(const at::Tensor& x_in, const at::Tensor& panels, int64_t out_features) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "linear: need 2-D float32 rows");
  TORCH_CHECK(panels.dim() == 3 && panels.size(1) == x_in.size(1) && panels.size(2) == kPanel &&
                  panels.is_contiguous(), "linear: panels do not match the rows' width");
  const auto x = x_in.contiguous();
  const int64_t m = x.size(0), k = x.size(1), count = panels.size(0), width = count * kPanel;
  auto y = at::empty({m, width}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* pp = panels.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  each_panel<kRows>(m, count, [&](auto rows, int64_t p, int64_t r) {
    panel_rows<decltype(rows)::value>(xp + r * k, k, pp + p * k * kPanel, yp + r * width + p * kPanel, width);
  });
  return width == out_features ? y : y.narrow(1, 0, out_features).contiguous();
}

