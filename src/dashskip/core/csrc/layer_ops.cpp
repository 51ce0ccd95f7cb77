// The small ops of a Llama-family decoder layer for few rows (decode, a lossless verification step), each one
// call instead of the 5-15 torch ops it takes otherwise: RMS norm, rope on q and k with the K/V cache write,
// causal attention over the cache with grouped heads, SiLU-and-multiply. At one row torch spends ~2-40 us per
// op in dispatch and allocation, ~5 ms of a ~29 ms SmolLM2 decode step; the arithmetic is tiny. Same formulas as
// transformers' modules, fp32 throughout; sums run in a different order, so results agree to float rounding.
// The K/V cache may store 16 bits (bf16 or fp16, core/cache.py KVCacheDtype): written rounded to nearest even, as
// torch's copy rounds, and widened to fp32 eight values at a time where attention reads it.
#include "ops.h"
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <vector>

namespace {

void check_rows(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu(),
              what, ": need a contiguous float32 CPU tensor");
}

// A cache of float32, bfloat16 or float16 values (T) as the float32 the arithmetic runs in: eight at a time.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {  // bf16 is fp32's upper half: each value shifted into place
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), zero = _mm_setzero_si128();
  return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_castsi128_ps(_mm_unpacklo_epi16(zero, raw))),
                              _mm_castsi128_ps(_mm_unpackhi_epi16(zero, raw)), 1);
}
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// Calls body(T{}) with T the cache's element type.
template <typename Body>
decltype(auto) with_cache_type(const at::Tensor& keys, const at::Tensor& values, Body&& body) {
  for (const at::Tensor* t : {&keys, &values})
    TORCH_CHECK(t->is_contiguous() && t->device().is_cpu() && t->scalar_type() == keys.scalar_type(),
                "the K/V cache: need contiguous CPU keys and values of one dtype");
  switch (keys.scalar_type()) {
    case at::kFloat: return body(float{});
    case at::kBFloat16: return body(at::BFloat16{});
    case at::kHalf: return body(at::Half{});
    default: TORCH_CHECK(false, "the K/V cache must be float32, bfloat16 or float16, not ", keys.scalar_type());
  }
}

// Dot product and y += w * x over one head (Dh values), 8 lanes at a time: the compiler keeps float sums in order
// and would not vectorize them by itself.
template <typename T>
float dot(const float* a, const T* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  for (; i < n; ++i) sum += a[i] * static_cast<float>(b[i]);
  return sum;
}

template <typename T>
void axpy(float w, const T* x, float* y, int64_t n) {
  const __m256 wv = _mm256_set1_ps(w);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(wv, load8(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += w * static_cast<float>(x[i]);
}

// The eight sums of eight vectors, as one vector (lane u = the sum of a[u]'s lanes).
inline __m256 sums_of_8(const __m256* a) {
  const __m256 low = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 high = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(low, high, 0x20), _mm256_permute2f128_ps(low, high, 0x31));
}

// exp of 8 values <= 0 (softmax's shifted scores): 2^n * p(f) with Cephes' degree-6 polynomial, within ~2 ulp of
// std::exp; below -87 (a weight of < 1e-38 against the top one's 1) it gives ~1e-38 instead of less.
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  f = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), f);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(f, f), _mm256_add_ps(f, _mm256_set1_ps(1.f)));
  // 2^n from the exponent bits, in two 128-bit halves: 256-bit integer ops need AVX2, which this file does not ask
  const __m256i whole = _mm256_cvtps_epi32(n);
  const auto power = [](__m128i half) { return _mm_slli_epi32(_mm_add_epi32(half, _mm_set1_epi32(127)), 23); };
  const __m256i bits = _mm256_insertf128_si256(_mm256_castsi128_si256(power(_mm256_castsi256_si128(whole))),
                                               power(_mm256_extractf128_si256(whole, 1)), 1);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// One query row against keys [from, seen) of its head: softmax(q k^T * scale) v into out (Dh), `weights` as
// scratch. With Dh a multiple of 8 (every model seen): scores eight keys at a time (one reduction per eight), exp
// eight at a time, and the output summed in registers 64 values at a time instead of read and written per key.
template <typename T>
void attend_row(const float* q, const T* k, const T* v, int64_t from, int64_t seen, int64_t dh, float scale,
                float* weights, float* out) {
  float top = -INFINITY;
  int64_t j = from;
  if (dh % 8 == 0) {
    for (; j + 8 <= seen; j += 8) {
      __m256 acc[8];
      for (auto& a : acc) a = _mm256_setzero_ps();
      for (int64_t i = 0; i < dh; i += 8) {
        const __m256 qv = _mm256_loadu_ps(q + i);
        for (int u = 0; u < 8; ++u) acc[u] = _mm256_fmadd_ps(qv, load8(k + (j + u) * dh + i), acc[u]);
      }
      _mm256_storeu_ps(weights + j, _mm256_mul_ps(sums_of_8(acc), _mm256_set1_ps(scale)));
    }
  }
  for (; j < seen; ++j) weights[j] = dot(q, k + j * dh, dh) * scale;
  for (j = from; j < seen; ++j) top = std::max(top, weights[j]);
  float total = 0.f;
  j = from;
  for (; j + 8 <= seen; j += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(weights + j), _mm256_set1_ps(top)));
    _mm256_storeu_ps(weights + j, e);
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, e);
    for (const float l : lanes) total += l;
  }
  for (; j < seen; ++j) total += (weights[j] = std::exp(weights[j] - top));
  const float inv = 1.f / total;
  if (dh % 8 != 0) {
    std::fill_n(out, dh, 0.f);
    for (j = from; j < seen; ++j) axpy(weights[j] * inv, v + j * dh, out, dh);
    return;
  }
  for (int64_t c = 0; c < dh; c += 64) {  // 64 output values (8 registers) at a time
    const int64_t width = std::min<int64_t>(64, dh - c), vecs = width / 8;
    __m256 acc[8];
    for (auto& a : acc) a = _mm256_setzero_ps();
    for (j = from; j < seen; ++j) {
      const __m256 w = _mm256_set1_ps(weights[j]);
      const T* row = v + j * dh + c;
      for (int64_t u = 0; u < vecs; ++u) acc[u] = _mm256_fmadd_ps(w, load8(row + 8 * u), acc[u]);
    }
    for (int64_t u = 0; u < vecs; ++u) _mm256_storeu_ps(out + c + 8 * u, _mm256_mul_ps(acc[u], _mm256_set1_ps(inv)));
  }
}

}  // namespace

// x (..., D), weight (D) -> weight * x / sqrt(mean(x^2) + eps), row by row.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "rms_norm");
  check_rows(weight, "rms_norm weight");
  const int64_t d = x.size(-1), rows = x.numel() / d;
  TORCH_CHECK(weight.numel() == d, "rms_norm: weight does not match the rows' width");
  auto y = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = xp + r * d;
    float sum = 0.f;
    for (int64_t j = 0; j < d; ++j) sum += row[j] * row[j];
    const float inv = 1.f / std::sqrt(sum / d + static_cast<float>(eps));
    for (int64_t j = 0; j < d; ++j) yp[r * d + j] = wp[j] * (row[j] * inv);
  }
  return y;
}

// qkv (B, T, (H + 2 KV) * Dh) from the fused projection, cos/sin (B, T, Dh); keys/values (B, KV, capacity, Dh).
// Rotates q and k (rotate-half convention), writes k and v at positions start..start+T of the cache and returns
// q as (B, H, T, Dh).
at::Tensor rope_and_cache(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                             const at::Tensor& keys, const at::Tensor& values, int64_t heads,
                             int64_t start) {
  for (const at::Tensor* t : {&qkv, &cos, &sin}) check_rows(*t, "rope_and_cache");
  const int64_t b = qkv.size(0), t = qkv.size(1), kv = keys.size(1), cap = keys.size(2), dh = keys.size(3);
  TORCH_CHECK(qkv.size(2) == (heads + 2 * kv) * dh && cos.size(-1) == dh && start + t <= cap,
              "rope_and_cache: shapes do not match");
  auto q = at::empty({b, heads, t, dh}, qkv.options());
  const int64_t half = dh / 2, width = qkv.size(2);
  const float *src = qkv.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  with_cache_type(keys, values, [&](auto tag) {
    using T = decltype(tag);
    T *kp = keys.data_ptr<T>(), *vp = values.data_ptr<T>();
    auto rotate = [&](const float* in, const float* c, const float* s, auto* out) {
      for (int64_t j = 0; j < half; ++j) out[j] = in[j] * c[j] + (-in[j + half]) * s[j];
      for (int64_t j = half; j < dh; ++j) out[j] = in[j] * c[j] + in[j - half] * s[j];
    };
    for (int64_t bi = 0; bi < b; ++bi) {
      for (int64_t ti = 0; ti < t; ++ti) {
        const float* row = src + (bi * t + ti) * width;
        const float *c = cp + (bi * t + ti) * dh, *s = sp + (bi * t + ti) * dh;
        for (int64_t h = 0; h < heads; ++h) rotate(row + h * dh, c, s, qp + ((bi * heads + h) * t + ti) * dh);
        for (int64_t h = 0; h < kv; ++h) {
          const int64_t slot = ((bi * kv + h) * cap + start + ti) * dh;
          rotate(row + (heads + h) * dh, c, s, kp + slot);
          const float* value = row + (heads + kv + h) * dh;
          for (int64_t j = 0; j < dh; ++j) vp[slot + j] = static_cast<T>(value[j]);
        }
      }
    }
  });
  return q;
}

// q (B, H, T, Dh) for cache slots start..start+T; keys/values (B, KV, capacity, Dh) filled up to start+T. Causal
// softmax(q k^T * scale) v, query head h reading kv head h / (H / KV). Returns (B, T, H * Dh), o_proj's input.
// begins (B,) int64, or empty: row b's keys before slot begins[b] are left padding, seen by no query.
// window > 0: a sliding window (Gemma's local layers, Mistral's): the query in slot s sees slots s - window + 1..s,
// as transformers' mask has it (kv > q - window); 0: every slot from the row's first.
at::Tensor causal_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                               int64_t start, double scale, const at::Tensor& begins, int64_t window) {
  check_rows(q, "causal_attention");
  TORCH_CHECK(begins.numel() == 0 || (begins.scalar_type() == at::kLong && begins.numel() == q.size(0) &&
                                      begins.is_contiguous()), "causal_attention: begins must be (B,) int64");
  const int64_t* bp = begins.numel() ? begins.data_ptr<int64_t>() : nullptr;
  const int64_t b = q.size(0), heads = q.size(1), t = q.size(2), dh = q.size(3);
  const int64_t kv = keys.size(1), cap = keys.size(2), group = heads / kv;
  TORCH_CHECK(heads % kv == 0 && start + t <= cap && keys.size(3) == dh, "causal_attention: shapes do not match");
  auto out = at::empty({b, t, heads * dh}, q.options());
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  with_cache_type(keys, values, [&](auto tag) {
    using T = decltype(tag);
    const T *kp = keys.data_ptr<T>(), *vp = values.data_ptr<T>();
    at::parallel_for(0, b * heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> weights(start + t);
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t bi = bh / heads, h = bh % heads, first = bp ? bp[bi] : 0;
        const T* kh = kp + (bi * kv + h / group) * cap * dh;
        const T* vh = vp + (bi * kv + h / group) * cap * dh;
        for (int64_t ti = 0; ti < t; ++ti) {
          const float* qrow = qp + (bh * t + ti) * dh;
          const int64_t seen = start + ti + 1;
          int64_t from = first < seen ? first : 0;  // a padding query sees everything rather than nothing
          if (window > 0 && seen - window > from) from = seen - window;  // a sliding window: the last `window`
          attend_row(qrow, kh, vh, from, seen, dh, static_cast<float>(scale), weights.data(),
                     op + (bi * t + ti) * heads * dh + h * dh);
        }
      }
    });
  });
  return out;
}

// gate_up (..., 2I) from the fused projection -> silu(gate) * up, (..., I).
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "silu_mul");
  const int64_t width = gate_up.size(-1), inter = width / 2, rows = gate_up.numel() / width;
  auto sizes = gate_up.sizes().vec();
  sizes.back() = inter;
  auto y = at::empty(sizes, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // rows split across threads from 8 on (a batched decode step: ~4 ms of a 32-row step on one thread)
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float *g = gp + r * width, *u = g + inter;
      for (int64_t j = 0; j < inter; ++j) yp[r * inter + j] = g[j] / (1.f + std::exp(-g[j])) * u[j];
    }
  });
  return y;
}

// The DASH policy's greedy decision, folded as policy.GreedyScorer folds it: for each row h,
// a = gelu(b1 + (h @ w1) / max(||h||, eps)), b = gelu(b2 + a @ w2), state index = argmax(b3 + b @ w3).
// w1 (D, H1), w2 (H1, H2), w3 (H2, S) stored input-major, each product one pass over its weights (matvec).
// One call instead of ~12 torch ops (~150 us inside a decode step, 28 times per token on SmolLM2).
// y (n) = x (k) @ w (k, n), w row-major: 64 outputs at a time stay in 8 registers over all of k, so each weight
// is loaded once and y is stored once (y += w * x row by row would load and store y k times). Each output sums
// over k in order, as before.
void matvec(const float* x, int64_t k, const float* w, int64_t n, float* y) {
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    __m256 acc[8];
    for (auto& a : acc) a = _mm256_setzero_ps();
    for (int64_t i = 0; i < k; ++i) {
      const __m256 b = _mm256_broadcast_ss(x + i);
      const float* row = w + i * n + j;
      for (int c = 0; c < 8; ++c) acc[c] = _mm256_fmadd_ps(b, _mm256_loadu_ps(row + 8 * c), acc[c]);
    }
    for (int c = 0; c < 8; ++c) _mm256_storeu_ps(y + j + 8 * c, acc[c]);
  }
  for (; j < n; ++j) {
    float sum = 0.f;
    for (int64_t i = 0; i < k; ++i) sum += x[i] * w[i * n + j];
    y[j] = sum;
  }
}

// The folded DASH scorer (policy.GreedyScorer) for few rows: the chosen output index of each row, as Python ints
// (no tensor to allocate and read back: at one row the decision runs 28 times per SmolLM2 token).
std::vector<int64_t> decide(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                            const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& w3,
                            const at::Tensor& b3, double eps) {
  for (const at::Tensor* t : {&x, &w1, &b1, &w2, &b2, &w3, &b3}) check_rows(*t, "decide");
  const int64_t d = x.size(-1), rows = x.numel() / d, h1 = w1.size(1), h2 = w2.size(1), states = w3.size(1);
  // b3: one bias row for every row, or (rows, states): a row's own (its previous state and its cost bias), so a
  // batch of requests is decided in one call, each row exactly as it would be alone.
  TORCH_CHECK(w1.size(0) == d && w2.size(0) == h1 && w3.size(0) == h2 && b1.numel() == h1 && b2.numel() == h2 &&
                  (b3.numel() == states || b3.numel() == rows * states), "decide: weights do not match");
  const int64_t b3_stride = b3.numel() == states ? 0 : states;
  std::vector<int64_t> out(rows);
  std::vector<float> a(h1), b(h2);
  const auto gelu = [](float v) { return 0.5f * v * (1.f + std::erf(v * static_cast<float>(M_SQRT1_2))); };
  for (int64_t r = 0; r < rows; ++r) {
    const float* h = x.data_ptr<float>() + r * d;
    const float norm = std::max(std::sqrt(dot(h, h, d)), static_cast<float>(eps));
    matvec(h, d, w1.data_ptr<float>(), h1, a.data());
    for (int64_t j = 0; j < h1; ++j) a[j] = gelu(b1.data_ptr<float>()[j] + a[j] / norm);
    matvec(a.data(), h1, w2.data_ptr<float>(), h2, b.data());
    for (int64_t j = 0; j < h2; ++j) b[j] = gelu(b2.data_ptr<float>()[j] + b[j]);
    int64_t best = 0;
    float top = -INFINITY;
    for (int64_t k = 0; k < states; ++k) {
      float score = 0.f;
      for (int64_t i = 0; i < h2; ++i) score += b[i] * w3.data_ptr<float>()[i * states + k];
      score += b3.data_ptr<float>()[r * b3_stride + k];
      if (score > top) top = score, best = k;  // the first of equal maxima, as torch.argmax
    }
    out[r] = best;
  }
  return out;
}

