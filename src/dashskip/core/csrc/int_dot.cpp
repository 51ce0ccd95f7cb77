// Integer dot-product products for few rows (decode, lossless drafts and verification), the way llama.cpp's
// Q8_0 / Q4_0 paths run: the row is quantized to int8 on the fly, one scale per block of 64 values (llama.cpp's
// Q8_0 uses 32; one scale per whole row cost 2% WikiText-2 perplexity on SmolLM2's static INT8, outlier channels
// taking the other values' resolution), and the products run int8 x int8 -> int32 with AVX512-VNNI (`vpdpbusd`:
// 64 multiply-adds per instruction). A state so reads 1/4 (INT8) or about 1/7 (INT4) of the fp32 bytes and
// computes at integer rate instead of widening every weight to fp32. Per block the integer sum is exact; the
// blocks' sums are scaled and added in fp32.
//
// Layouts (made once per weight by pack_*): panels of 16 output columns; inside a panel, k in blocks of 64 and
// quads, so one 64-byte load holds 16 columns x 4 consecutive k, which is what one vpdpbusd consumes against one
// broadcast quad of the row.
// - INT8 (symmetric per column): vpdpbusd multiplies unsigned by signed bytes, so the row is offset by 128 to
//   unsigned and 128 x the weight's column sums per block (packed once) are subtracted.
// - INT4 (asymmetric, groups of 64 along k, w = code * scale + minimum): the codes 0..15 are the unsigned operand
//   and the int8 row the signed one; per group, y += scale * row_scale * sum(q * code) + minimum * row_scale *
//   sum(q). Two codes per byte: byte j of a 32-byte block holds codes j (low nibble) and 32 + j (high nibble).
//   Scales and minima are bf16 (4.5 bits a weight in all, Q4_0's size).
// Compiled for AVX-512 (F, BW, VNNI) only, chosen at run time; elsewhere torch's ops compute the same arithmetic
// on the same rounded rows (core/handlers.py).
//
// Each product comes in two prefetch plans, told apart by `far` and measured per shape like any other kernel
// (core/kernels.py): near, 2 KB ahead into L1; far, 4 KB ahead into L2. Which one streams faster depends on the
// CPU's prefetchers: on an AMD EPYC (Zen 4) far read INT8 weights ~20% faster and near was faster for INT4, whose
// unpacking makes it less bound by memory.
#include "ops.h"
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kCols = 16;   // output columns per panel: one zmm of int32 sums
constexpr int64_t kGroup = 64;  // INT4 group along k: 16 quads
constexpr int64_t kNear = 2048, kFar = 4096;  // software prefetch distances in bytes of weights (the two plans)
// Rows per pass: rows x chains accumulators (8x1, 4x1, 2x2, 1x4) plus 8 sums, within 32 zmm; the more rows a pass
// takes, the fewer times a panel's weights are loaded (and INT4's unpacked) for many rows.
constexpr int kMaxRows = 8;

bool cpu_has_vnni() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni");
}

// Symmetric int8 per block of 64 values of a row: q = round(x / s), s = max|x| / 127 over the block (1 for a zero
// block); q + 128 as bytes when `offset`; rows padded with q = 0 to whole blocks. Division (not a reciprocal) and
// round-half-even, as torch.round(x / s) computes it: core/handlers.quantize_rows gives the same q bit for bit.
void quantize_rows(const float* x, int64_t m, int64_t k, int64_t groups, bool offset, uint8_t* q, float* s) {
  const int64_t k_padded = groups * kGroup;
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t begin = g * kGroup, end = std::min(k, begin + kGroup);
      const float* row = x + r * k;
      float amax = 0.f;
      for (int64_t i = begin; i < end; ++i) amax = std::max(amax, std::fabs(row[i]));
      const float scale = amax > 0.f ? amax / 127.f : 1.f;
      s[r * groups + g] = scale;
      uint8_t* out = q + r * k_padded;
      for (int64_t i = begin; i < end; ++i) {
        const int v = static_cast<int>(std::nearbyint(row[i] / scale));
        out[i] = static_cast<uint8_t>(offset ? v + 128 : static_cast<int8_t>(v));
      }
      for (int64_t i = end; i < begin + kGroup; ++i) out[i] = offset ? 128 : 0;
    }
  }
}

inline int32_t quad(const uint8_t* row, int64_t i) {
  int32_t v;
  std::memcpy(&v, row + 4 * i, sizeof v);
  return v;
}

// The int32 sums of R rows (int8 codes from `q`, rows `ldq` apart) against one 64-value block of a panel, in C
// independent chains that hide vpdpbusd's latency at few rows. INT8 blocks hold 16 quads x 64 signed bytes (the
// rows, offset by 128, are the unsigned operand); INT4 blocks 16 quads x 32 bytes of nibbles (the codes are).
template <int R, bool Int4, bool Far>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) inline void block_sums(const uint8_t* q, int64_t ldq,
                                                                               const uint8_t* block, __m512i* sums) {
  constexpr int C = R == 1 ? 4 : R == 2 ? 2 : 1;
  constexpr int64_t quads = kGroup / 4, stride = Int4 ? 32 : 64;
  __m512i acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_si512();
  for (int64_t i = 0; i < quads; i += C) {
    for (int c = 0; c < C; ++c) {
      const uint8_t* at = block + (i + c) * stride;
      if (!Int4 || (i + c) % 2 == 0) {
        if constexpr (Far) _mm_prefetch(reinterpret_cast<const char*>(at + kFar), _MM_HINT_T1);
        else _mm_prefetch(reinterpret_cast<const char*>(at + kNear), _MM_HINT_T0);
      }
      __m512i w;
      if constexpr (Int4) {
        const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at));
        const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(packed), _mm256_srli_epi16(packed, 4), 1);
        w = _mm512_and_si512(both, _mm512_set1_epi8(0x0F));
      } else {
        w = _mm512_loadu_si512(at);
      }
      for (int r = 0; r < R; ++r) {
        const __m512i x = _mm512_set1_epi32(quad(q + r * ldq, i + c));
        acc[r][c] = Int4 ? _mm512_dpbusd_epi32(acc[r][c], w, x) : _mm512_dpbusd_epi32(acc[r][c], x, w);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    sums[r] = acc[r][0];
    for (int c = 1; c < C; ++c) sums[r] = _mm512_add_epi32(sums[r], acc[r][c]);
  }
}

template <int R, bool Far>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void int8_panel(const uint8_t* q, int64_t groups,
                                                                         const int8_t* panel, const int32_t* comp,
                                                                         const float* wscale, const float* xscale,
                                                                         float* y, int64_t ldy) {
  const int64_t k_padded = groups * kGroup;
  __m512 out[R];
  for (int r = 0; r < R; ++r) out[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i sums[R];
    block_sums<R, false, Far>(q + g * kGroup, k_padded, reinterpret_cast<const uint8_t*>(panel) + g * kGroup * kCols, sums);
    const __m512i c128 = _mm512_loadu_si512(comp + g * kCols);
    for (int r = 0; r < R; ++r) {
      const __m512i sum = sums[r];
      const __m512 exact = _mm512_cvtepi32_ps(_mm512_sub_epi32(sum, c128));
      out[r] = _mm512_fmadd_ps(exact, _mm512_set1_ps(xscale[r * groups + g]), out[r]);
    }
  }
  const __m512 ws = _mm512_loadu_ps(wscale);
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + r * ldy, _mm512_mul_ps(out[r], ws));
}

__attribute__((target("avx512f,avx512bw"))) inline __m512 load_bf16(const uint16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

template <int R, bool Far>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void int4_panel(const uint8_t* q, int64_t k, int64_t groups,
                                                                         const uint8_t* codes, const uint16_t* scales,
                                                                         const uint16_t* minima, const float* xscale,
                                                                         const int32_t* xsum, float* y, int64_t ldy) {
  __m512 out[R];
  for (int r = 0; r < R; ++r) out[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i sums[R];
    block_sums<R, true, Far>(q + g * kGroup, k, codes + g * kGroup * 8, sums);
    const __m512 s = load_bf16(scales + g * kCols), mn = load_bf16(minima + g * kCols);
    for (int r = 0; r < R; ++r) {
      const __m512i sum = sums[r];
      const float xs = xscale[r * groups + g];
      out[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(s, _mm512_set1_ps(xs)), out[r]);
      out[r] = _mm512_fmadd_ps(mn, _mm512_set1_ps(xs * static_cast<float>(xsum[r * groups + g])), out[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + r * ldy, out[r]);
}

// Passes of at most kMaxRows rows over one panel, each by the kernel compiled for its row count.
template <typename Kernel>
void row_passes(int64_t m, Kernel&& kernel) {
  for (int64_t r = 0; r < m; r += kMaxRows) {
    switch (std::min<int64_t>(kMaxRows, m - r)) {
      case 1: kernel(std::integral_constant<int, 1>{}, r); break;
      case 2: kernel(std::integral_constant<int, 2>{}, r); break;
      case 3: kernel(std::integral_constant<int, 3>{}, r); break;
      case 4: kernel(std::integral_constant<int, 4>{}, r); break;
      case 5: kernel(std::integral_constant<int, 5>{}, r); break;
      case 6: kernel(std::integral_constant<int, 6>{}, r); break;
      case 7: kernel(std::integral_constant<int, 7>{}, r); break;
      default: kernel(std::integral_constant<int, 8>{}, r); break;
    }
  }
}

void check_x(const at::Tensor& x, int64_t k, const char* what) {
  TORCH_CHECK(cpu_has_vnni(), what, ": this CPU has no AVX512-VNNI");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(), what,
              ": need 2-D float32 CPU rows");
  TORCH_CHECK(x.size(1) == k, what, ": the rows' width does not match the packed weight");
}

}  // namespace

bool has_vnni() { return cpu_has_vnni(); }

// weight (N, K) int8, scales (N,) -> panels (P, G, 16 quads, 16, 4) int8 with G = ceil(K / 64), 128 x the column
// sums per block (P, G, 16) int32, scales (P*16,) float32; zero-padded past N and K.
std::vector<at::Tensor> pack_int8_vnni(const at::Tensor& weight, const at::Tensor& scales) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar, "pack_int8_vnni: need a 2-D int8 weight");
  const int64_t n = weight.size(0), k = weight.size(1), panels = (n + kCols - 1) / kCols;
  const int64_t groups = (k + kGroup - 1) / kGroup;
  auto padded = at::zeros({panels * kCols, groups * kGroup}, weight.options());
  padded.narrow(0, 0, n).narrow(1, 0, k).copy_(weight);
  auto blocks = padded.view({panels, kCols, groups, kGroup / 4, 4});
  auto packed = blocks.permute({0, 2, 3, 1, 4}).contiguous();
  auto comp = blocks.to(at::kInt).sum({3, 4}).mul(128).to(at::kInt).permute({0, 2, 1}).contiguous();
  auto s = at::zeros({panels * kCols}, at::dtype(at::kFloat));
  s.narrow(0, 0, n).copy_(scales);
  return {packed, comp, s};
}

// x (M, K) float32 -> (M, out_features) = sum over blocks of (q(x) . w) * block scale, times the column scale.
at::Tensor linear_int8_vnni(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& comp,
                               const at::Tensor& wscale, int64_t out_features, bool far) {
  const int64_t panels = packed.size(0), groups = packed.size(1), k = x_in.size(1), width = panels * kCols;
  TORCH_CHECK(packed.dim() == 5 && packed.scalar_type() == at::kChar && packed.is_contiguous() &&
                  (k + kGroup - 1) / kGroup == groups,
              "linear_int8_vnni: the rows' width does not match the packed weight");
  check_x(x_in, k, "linear_int8_vnni");
  const auto x = x_in.contiguous();
  const int64_t m = x.size(0);
  std::vector<uint8_t> q(m * groups * kGroup);
  std::vector<float> xs(m * groups);
  quantize_rows(x.data_ptr<float>(), m, k, groups, true, q.data(), xs.data());
  auto y = at::empty({m, width}, x.options());
  const int8_t* pp = packed.data_ptr<int8_t>();
  const int32_t* cp = comp.data_ptr<int32_t>();
  const float* sp = wscale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, panels, 4, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      row_passes(m, [&](auto rows, int64_t r) {
        constexpr int R = decltype(rows)::value;
        const auto panel = far ? int8_panel<R, true> : int8_panel<R, false>;
        panel(q.data() + r * groups * kGroup, groups, pp + p * groups * kGroup * kCols, cp + p * groups * kCols,
              sp + p * kCols, xs.data() + r * groups, yp + r * width + p * kCols, width);
      });
  });
  return width == out_features ? y : y.narrow(1, 0, out_features).contiguous();
}

// codes (N, K) uint8 in 0..15, scales and minima (N, K/64) -> nibbles (P, K/64, 16 quads, 32) uint8, scales and
// minima (P, K/64, 16) bf16; zero-padded past N.
std::vector<at::Tensor> pack_int4_vnni(const at::Tensor& codes, const at::Tensor& scales,
                                          const at::Tensor& minima) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte, "pack_int4_vnni: need 2-D uint8 codes");
  const int64_t n = codes.size(0), k = codes.size(1), panels = (n + kCols - 1) / kCols;
  TORCH_CHECK(k % kGroup == 0, "pack_int4_vnni: in_features must be a multiple of 64");
  const int64_t groups = k / kGroup;
  auto padded = at::zeros({panels * kCols, k}, codes.options());
  padded.narrow(0, 0, n).copy_(codes);
  // (P, 16 cols, G, 16 quads, 4) -> (P, G, 16 quads, 16 cols, 4): 64 codes per quad block, cols 0-7 then 8-15
  auto blocks = padded.view({panels, kCols, groups, kGroup / 4, 4}).permute({0, 2, 3, 1, 4}).contiguous();
  auto flat = blocks.view({-1, 2, 32});
  auto nibbles = (flat.select(1, 0) | flat.select(1, 1).bitwise_left_shift(4)).contiguous();
  auto per_panel = [&](const at::Tensor& t) {
    auto out = at::zeros({panels * kCols, groups}, at::dtype(at::kBFloat16));
    out.narrow(0, 0, n).copy_(t);
    return out.view({panels, kCols, groups}).permute({0, 2, 1}).contiguous();
  };
  return {nibbles.view({panels, groups, kGroup / 4, 32}), per_panel(scales), per_panel(minima)};
}

// x (M, K) float32 -> (M, out_features) = sum over groups of row scale * (scale * q.codes + minimum * sum(q)).
at::Tensor linear_int4_vnni(const at::Tensor& x_in, const at::Tensor& nibbles, const at::Tensor& scales,
                               const at::Tensor& minima, int64_t out_features, bool far) {
  const int64_t panels = nibbles.size(0), groups = nibbles.size(1), k = groups * kGroup, width = panels * kCols;
  check_x(x_in, k, "linear_int4_vnni");
  const auto x = x_in.contiguous();
  const int64_t m = x.size(0);
  std::vector<uint8_t> q(m * k);
  std::vector<float> xs(m * groups);
  quantize_rows(x.data_ptr<float>(), m, k, groups, false, q.data(), xs.data());
  std::vector<int32_t> xsum(m * groups, 0);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t i = 0; i < k; ++i) xsum[r * groups + i / kGroup] += static_cast<int8_t>(q[r * k + i]);
  auto y = at::empty({m, width}, x.options());
  const uint8_t* cp = nibbles.data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>());
  const auto* mp = reinterpret_cast<const uint16_t*>(minima.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, panels, 4, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      row_passes(m, [&](auto rows, int64_t r) {
        constexpr int R = decltype(rows)::value;
        const auto panel = far ? int4_panel<R, true> : int4_panel<R, false>;
        panel(q.data() + r * k, k, groups, cp + p * groups * kGroup * 8, sp + p * groups * kCols,
              mp + p * groups * kCols, xs.data() + r * groups, xsum.data() + r * groups, yp + r * width + p * kCols,
              width);
      });
  });
  return width == out_features ? y : y.narrow(1, 0, out_features).contiguous();
}

