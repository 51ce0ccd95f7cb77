// y = x @ W^T in fp32 for few rows of x (decode, batched verification, small batches) on AVX + FMA CPUs.
//
// With 2 to ~16 rows, BLAS's fp32 GEMM packs the weight on every call and then computes; its one-row path reads
// the weight well below the memory bandwidth. Here the weight is packed once into panels of 16 output columns
// (K x 16, contiguous), and each panel is streamed once per call while up to 6 rows accumulate in registers
// (benchmarks/small_gemm.py: all 210 linears of SmolLM2 for one row in 15.5 ms against BLAS's 31.4 ms; five
// rows 28.2 against 55.7).
// Panels are split over torch's intra-op threads. (INT8/INT4 versions, codes widened to fp32 in registers, were
// tried and dropped: AVX has no 256-bit integer ops, widening made them compute-bound, no faster than torch's.)
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

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

}  // namespace

// weight (N, K) float32 -> panels (ceil(N / 16), K, 16), zero-padded past N.
torch::Tensor pack(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat32, "pack: need a 2-D float32 weight");
  const int64_t n = weight.size(0), k = weight.size(1), panels = (n + kPanel - 1) / kPanel;
  auto padded = torch::zeros({panels * kPanel, k}, weight.options());
  padded.narrow(0, 0, n).copy_(weight);  // any layout in: the column-major weights of the engine too
  return padded.view({panels, kPanel, k}).transpose(1, 2).contiguous();
}

// x (M, K) float32, panels from pack() -> (M, out_features).
torch::Tensor linear(const torch::Tensor& x_in, const torch::Tensor& panels, int64_t out_features) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == torch::kFloat32, "linear: need 2-D float32 rows");
  TORCH_CHECK(panels.dim() == 3 && panels.size(1) == x_in.size(1) && panels.size(2) == kPanel &&
                  panels.is_contiguous(), "linear: panels do not match the rows' width");
  const auto x = x_in.contiguous();
  const int64_t m = x.size(0), k = x.size(1), count = panels.size(0), width = count * kPanel;
  auto y = torch::empty({m, width}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* pp = panels.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, count, 4, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      passes<kRows>(m, [&](auto rows, int64_t r) {
        panel_rows<decltype(rows)::value>(xp + r * k, k, pp + p * k * kPanel, yp + r * width + p * kPanel, width);
      });
    }
  });
  return width == out_features ? y : y.narrow(1, 0, out_features).contiguous();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack, "pack a (N, K) float32 weight into 16-column panels");
  m.def("linear", &linear, "x @ W^T for few rows, W packed by pack()");
}
