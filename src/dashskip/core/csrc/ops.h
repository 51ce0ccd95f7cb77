// The extension's ops: each defined and documented in the file named beside it, bound to Python in one place
// (fused_layer.cpp, which also runs a whole decoder layer with them). The kernel files include only ATen, not
// torch/extension.h: its Python bindings take ~20 s to compile per file, which was most of the one-time build.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

// small_gemm.cpp
bool has_int8();
at::Tensor pack(const at::Tensor& weight);
at::Tensor linear(const at::Tensor& x_in, const at::Tensor& panels, int64_t out_features);
std::vector<at::Tensor> pack_int8(const at::Tensor& weight, const at::Tensor& scales);
at::Tensor linear_int8(const at::Tensor& x_in, const at::Tensor& panels, const at::Tensor& scales,
                       int64_t out_features);
// layer_ops.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor rope_and_cache(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& keys,
                          const at::Tensor& values, int64_t heads, int64_t start);
at::Tensor causal_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, int64_t start,
                            double scale, const at::Tensor& begins, int64_t window);
at::Tensor silu_mul(const at::Tensor& gate_up);
std::vector<int64_t> decide(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                            const at::Tensor& b2, const at::Tensor& w3, const at::Tensor& b3, double eps);
// int_dot.cpp
bool has_vnni();
std::vector<at::Tensor> pack_int8_vnni(const at::Tensor& weight, const at::Tensor& scales);
at::Tensor linear_int8_vnni(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& comp,
                            const at::Tensor& wscale, int64_t out_features, bool far);
std::vector<at::Tensor> pack_int4_vnni(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& minima);
at::Tensor linear_int4_vnni(const at::Tensor& x_in, const at::Tensor& nibbles, const at::Tensor& scales,
                            const at::Tensor& minima, int64_t out_features, bool far);
