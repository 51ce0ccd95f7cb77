// A whole decoder layer for few rows in one state, as one call from Python (decode, a lossless verification
// step). The flat layer (models/layer.py) runs the same ops one Python call each: norm, q/k/v product, rope and
// cache write, attention, o product, residual, norm, gate/up product, activation, down product, residual; with
// the Python around each product (kernel lookup, form check) that was ~4 ms of a ~13 ms INT8 decode step of
// SmolLM2. Here the ops are the very same functions and kernels, in the same order, so a layer's output equals the
// op-by-op path's exactly; the products are the kernels the measured choice picked for each projection
// (core/kernels.py), handed over with their packed weights when the layer is built (core/handlers.py `native`).
// A projection whose chosen kernel has no native form here keeps the layer on the op-by-op path.
#include "ops.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/utils/pybind.h>  // the tensor casters alone: torch/extension.h compiles ~12 s longer

#include <optional>
#include <string>
#include <vector>

namespace {

enum class Kind { kTorch, kPacked, kOnednn, kInt8Vnni, kInt8VnniFar, kInt4Vnni, kInt4VnniFar };

Kind parse_kind(const std::string& name) {
  if (name == "torch") return Kind::kTorch;
  if (name == "packed") return Kind::kPacked;
  if (name == "onednn") return Kind::kOnednn;
  if (name == "int8_vnni") return Kind::kInt8Vnni;
  if (name == "int8_vnni_far") return Kind::kInt8VnniFar;
  if (name == "int4_vnni") return Kind::kInt4Vnni;
  if (name == "int4_vnni_far") return Kind::kInt4VnniFar;
  TORCH_CHECK(false, "FusedLayer: unknown projection kind '", name, "'");
}

// oneDNN's product on a weight torch reordered for it (mkldnn::_linear_pointwise, core/handlers.py "onednn"),
// called through torch's dispatcher as Python calls it.
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& reordered) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  std::vector<c10::IValue> stack{x.contiguous(), reordered, c10::IValue(), c10::IValue(std::string("none")),
                                 c10::IValue(c10::List<std::optional<at::Scalar>>()), c10::IValue()};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// x @ W^T (+ b) with the kernel chosen for it; x (..., K) -> (..., out).
struct Projection {
  Kind kind;
  std::vector<at::Tensor> tensors;
  int64_t out;
  std::optional<at::Tensor> bias;

  at::Tensor operator()(const at::Tensor& x) const {
    const auto flat = x.reshape({-1, x.size(-1)});
    at::Tensor y;
    switch (kind) {
      case Kind::kTorch:
        if (tensors.size() == 1) {
          y = at::linear(flat, tensors[0]);
        } else {
          std::vector<at::Tensor> parts;
          for (const auto& w : tensors) parts.push_back(at::linear(flat, w));
          y = at::cat(parts, -1);
        }
        break;
      case Kind::kPacked: y = ::linear(flat, tensors.at(0), out); break;
      case Kind::kOnednn: y = onednn_linear(flat, tensors.at(0)); break;
      case Kind::kInt8Vnni:
      case Kind::kInt8VnniFar:
        y = linear_int8_vnni(flat, tensors.at(0), tensors.at(1), tensors.at(2), out, kind == Kind::kInt8VnniFar);
        break;
      case Kind::kInt4Vnni:
      case Kind::kInt4VnniFar:
        y = linear_int4_vnni(flat, tensors.at(0), tensors.at(1), tensors.at(2), out, kind == Kind::kInt4VnniFar);
        break;
    }
    if (bias) y = y + *bias;
    auto sizes = x.sizes().vec();
    sizes.back() = out;
    return y.view(sizes);
  }
};

struct Norm {
  std::optional<at::Tensor> weight;
  double eps;
  explicit operator bool() const { return weight.has_value(); }
};

enum class Act { kSilu, kGeluTanh, kGelu };

Act parse_act(const std::string& name) {
  if (name == "silu" || name == "swish") return Act::kSilu;
  if (name == "gelu_pytorch_tanh") return Act::kGeluTanh;
  if (name == "gelu") return Act::kGelu;
  TORCH_CHECK(false, "FusedLayer: unsupported activation '", name, "'");
}

}  // namespace

class FusedLayer {
 public:
  // projections: q/k/v, o, gate/up, down, each (kind, tensors, out_features, bias). norms: attention, MLP, q, k,
  // post-attention, post-MLP (absent ones None), with their epsilons. window: the layer's sliding window (0: none).
  FusedLayer(const std::vector<std::string>& kinds, const std::vector<std::vector<at::Tensor>>& tensors,
             const std::vector<int64_t>& outs, const std::vector<std::optional<at::Tensor>>& biases,
             const std::vector<std::optional<at::Tensor>>& norms, const std::vector<double>& eps,
             const std::string& act, int64_t heads, int64_t kv_heads, int64_t head_dim, double scaling,
             int64_t window)
      : act_(parse_act(act)), heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim), scaling_(scaling),
        window_(window) {
    TORCH_CHECK(kinds.size() == 4 && tensors.size() == 4 && outs.size() == 4 && biases.size() == 4,
                "FusedLayer: need four projections (qkv, o, gate_up, down)");
    TORCH_CHECK(norms.size() == 6 && eps.size() == 6, "FusedLayer: need six norms (attn, mlp, q, k, post x2)");
    for (size_t i = 0; i < 4; ++i) proj_.push_back({parse_kind(kinds[i]), tensors[i], outs[i], biases[i]});
    for (size_t i = 0; i < 6; ++i) norm_.push_back({norms[i], eps[i]});
    TORCH_CHECK(norm_[0] && norm_[1], "FusedLayer: the attention and MLP norms are required");
    TORCH_CHECK(bool(norm_[2]) == bool(norm_[3]), "FusedLayer: q and k norms come together");
  }

  // x (B, T, D) contiguous; cos/sin (B, T, Dh); keys/values (B, KV, capacity, Dh), this step's slots from start.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                        const at::Tensor& keys, const at::Tensor& values, int64_t start,
                        const at::Tensor& begins) const {
    auto qkv = proj_[0](::rms_norm(x, *norm_[0].weight, norm_[0].eps));
    if (norm_[2]) norm_heads(qkv);
    const auto q = rope_and_cache(qkv, cos, sin, keys, values, heads_, start);
    const auto attended = causal_attention(q, keys, values, start, scaling_, begins, window_);
    const auto mid = x + post(proj_[1](attended), norm_[4]);
    const auto gate_up = proj_[2](::rms_norm(mid, *norm_[1].weight, norm_[1].eps));
    return mid + post(proj_[3](activate(gate_up)), norm_[5]);
  }

 private:
  static at::Tensor post(const at::Tensor& out, const Norm& norm) {
    return norm ? ::rms_norm(out, *norm.weight, norm.eps) : out;
  }

  // q and k of the fused q/k/v rows normed per head, in place (Gemma3's qk-norm), as torch's rms_norm does it.
  void norm_heads(at::Tensor& qkv) const {
    const int64_t qw = heads_ * head_dim_, kw = kv_heads_ * head_dim_;
    auto q = qkv.narrow(-1, 0, qw).unflatten(-1, {heads_, head_dim_});
    auto k = qkv.narrow(-1, qw, kw).unflatten(-1, {kv_heads_, head_dim_});
    q.copy_(at::rms_norm(q, {head_dim_}, norm_[2].weight, norm_[2].eps));
    k.copy_(at::rms_norm(k, {head_dim_}, norm_[3].weight, norm_[3].eps));
  }

  at::Tensor activate(const at::Tensor& gate_up) const {
    if (act_ == Act::kSilu) return silu_mul(gate_up);
    const auto halves = gate_up.chunk(2, -1);
    return at::gelu(halves[0], act_ == Act::kGeluTanh ? "tanh" : "none") * halves[1];
  }

  std::vector<Projection> proj_;
  std::vector<Norm> norm_;
  Act act_;
  int64_t heads_, kv_heads_, head_dim_;
  double scaling_;
  int64_t window_;
};

// The decoder layers of a step whose every layer's state was known before it ran (a fixed schedule, every layer in
// full), one after another in one call: what the Python loop between the layers did (a decider's answer, a kernel
// lookup, the states' bookkeeping: ~60 us a layer, ~15% of an INT8 decode step of SmolLM2) is not run at all, and
// the GIL is released for the whole step (a server's other threads run meanwhile). Layer i reads cos[i] / sin[i]
// (models with two rope kinds) and writes keys[i] / values[i]; each layer is the very call the Python loop makes.
at::Tensor run_layers(const std::vector<const FusedLayer*>& layers, at::Tensor x,
                         const std::vector<at::Tensor>& cos, const std::vector<at::Tensor>& sin,
                         const std::vector<at::Tensor>& keys, const std::vector<at::Tensor>& values,
                         int64_t start, const at::Tensor& begins) {
  const size_t n = layers.size();
  TORCH_CHECK(cos.size() == n && sin.size() == n && keys.size() == n && values.size() == n,
              "run_layers: need a rope, keys and values per layer");
  for (size_t i = 0; i < n; ++i) x = layers[i]->forward(x, cos[i], sin[i], keys[i], values[i], start, begins);
  return x;
}

// The extension's one Python module: every op of ops.h and the fused layer.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack, "pack a (N, K) float32 weight into 16-column panels");
  m.def("linear", &linear, "x @ W^T for few rows, W packed by pack()");
  m.def("has_int8", &has_int8, "whether this CPU runs linear_int8 (AVX-512)");
  m.def("pack_int8", &pack_int8, "pack a (N, K) int8 weight and its scales into 16-column panels");
  m.def("linear_int8", &linear_int8, "(x @ q^T) * scale for few fp32 rows, q packed by pack_int8()");
  m.def("decide", &decide, "the DASH policy's folded greedy decision for few rows");
  m.def("rms_norm", &rms_norm, "RMS norm of each row");
  m.def("rope_and_cache", &rope_and_cache, "rope on q and k of a fused q/k/v row, k and v into the cache");
  m.def("causal_attention", &causal_attention, "causal attention of few queries over the cache, grouped heads");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused gate/up row");
#ifdef _OPENMP
  m.attr("parallel") = true;  // at::parallel_for splits work between threads only in files built with OpenMP
#else
  m.attr("parallel") = false;
#endif
  m.def("has_vnni", &has_vnni, "whether this CPU runs the integer dot-product kernels (AVX512-VNNI)");
  m.def("pack_int8_vnni", &pack_int8_vnni, "pack an int8 weight for linear_int8_vnni");
  m.def("linear_int8_vnni", &linear_int8_vnni, "few rows quantized to int8 times an INT8 weight, VNNI; far: the L2 prefetch plan");
  m.def("pack_int4_vnni", &pack_int4_vnni, "pack INT4 codes, scales and minima for linear_int4_vnni");
  m.def("linear_int4_vnni", &linear_int4_vnni, "few rows quantized to int8 times an INT4 weight, VNNI; far: the L2 prefetch plan");
  pybind11::class_<FusedLayer>(m, "FusedLayer", "a decoder layer for few rows in one state, one call")
      .def(pybind11::init<const std::vector<std::string>&, const std::vector<std::vector<at::Tensor>>&,
                          const std::vector<int64_t>&, const std::vector<std::optional<at::Tensor>>&,
                          const std::vector<std::optional<at::Tensor>>&, const std::vector<double>&,
                          const std::string&, int64_t, int64_t, int64_t, double, int64_t>())
      .def("__call__", &FusedLayer::forward, "x, cos, sin, keys, values, start, begins -> the layer's output");
  m.def("run_layers", &run_layers, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "layers, x, cos[], sin[], keys[], values[], start, begins -> the output of the last layer");
}
