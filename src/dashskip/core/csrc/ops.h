// The extension's ops that one source file calls from another (fused_layer.cpp runs a whole decoder layer with
// them); each is defined and documented in the file named beside it.
#pragma once
#include <torch/extension.h>

// small_gemm.cpp
torch::Tensor linear(const torch::Tensor& x_in, const torch::Tensor& panels, int64_t out_features);
// layer_ops.cpp
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);
torch::Tensor rope_and_cache(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                             const torch::Tensor& keys, const torch::Tensor& values, int64_t heads, int64_t start);
torch::Tensor causal_attention(const torch::Tensor& q, const torch::Tensor& keys, const torch::Tensor& values,
                               int64_t start, double scale, const torch::Tensor& begins);
torch::Tensor silu_mul(const torch::Tensor& gate_up);
// int_dot.cpp
torch::Tensor linear_int8_vnni(const torch::Tensor& x_in, const torch::Tensor& packed, const torch::Tensor& comp,
                               const torch::Tensor& wscale, int64_t out_features, bool far);
torch::Tensor linear_int4_vnni(const torch::Tensor& x_in, const torch::Tensor& nibbles, const torch::Tensor& scales,
                               const torch::Tensor& minima, int64_t out_features, bool far);
