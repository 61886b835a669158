// Residual sum, LayerNorm and ReLU of an interacting layer's output in one pass, CPU.
//
//   y = relu(LN(a + r)),   LN(s) = (s - mean(s)) / sqrt(var(s) + eps) * weight + bias
//
// over the last dim A of N = B·F rows. ATen runs it as three passes forward (add,
// layer_norm, relu) and two backward (threshold, layer_norm backward), each streaming the
// B x F x A tensor through memory in rows of A = 8-32 floats, where its per-row set-up
// costs about as much as the arithmetic. Here each row is read once forward and once
// backward. Rows run in fixed blocks of kBlock on ATen's thread pool; the weight and bias
// gradients are summed per block, then over blocks in order, so results do not depend on
// the thread count.
//
//   norm_relu_forward(a, r, weight, bias, eps)          -> (y N x A, xhat N x A, rstd N)
//   norm_relu_backward(grad_y, xhat, rstd, weight, bias) -> (grad_s N x A, grad_weight A,
//                                                            grad_bias A)
//
// grad_s is the gradient of both a and r. ReLU follows ATen: y = 0 where the normalised
// value is < 0 (NaN propagates), and the gradient passes where it is > 0 or NaN.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kBlock = 256;  // rows per block (fixed: the reduction order)
constexpr int64_t kLanes = 8;
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));

inline vfloat splat(float x) { return vfloat{} + x; }
inline vfloat load(const float* p) {
  vfloat v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, vfloat v) { __builtin_memcpy(p, &v, sizeof(v)); }
inline float hsum(vfloat v) {
  float s = 0.0f;
  for (int64_t k = 0; k < kLanes; ++k) s += v[k];
  return s;
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() >= 1,
              "residual_norm: ", name, " must be a float32 CPU tensor, got ", t.scalar_type(),
              " on ", t.device());
}

void check_affine(const at::Tensor& weight, const at::Tensor& bias, int64_t a) {
  check_rows(weight, "weight");
  check_rows(bias, "bias");
  TORCH_CHECK(weight.numel() == a && bias.numel() == a,
              "residual_norm: weight and bias must have the last dim's ", a, " values, got ",
              weight.numel(), " and ", bias.numel());
}

// V > 0: rows of V vectors (A = 8 V), in registers; V = 0: any A, scalar loops.
template <int V>
void forward_rows(const float* ap, const float* rp, const float* w, const float* bp, float e,
                  int64_t width, int64_t begin, int64_t end, float* xp, float* yp, float* sp) {
  const float inv_width = 1.0f / static_cast<float>(width);
  if constexpr (V > 0) {
    vfloat wv[V], bv[V];
    for (int j = 0; j < V; ++j) wv[j] = load(w + j * kLanes), bv[j] = load(bp + j * kLanes);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t o = i * width;
      vfloat s[V], acc = splat(0.0f);
      for (int j = 0; j < V; ++j) {
        s[j] = load(ap + o + j * kLanes) + load(rp + o + j * kLanes);
        acc += s[j];
      }
      const float mean = hsum(acc) * inv_width;
      acc = splat(0.0f);
      for (int j = 0; j < V; ++j) {
        s[j] -= mean;
        acc += s[j] * s[j];
      }
      const float rs = 1.0f / std::sqrt(hsum(acc) * inv_width + e);
      for (int j = 0; j < V; ++j) {
        const vfloat xh = s[j] * rs;
        const vfloat z = xh * wv[j] + bv[j];
        store(xp + o + j * kLanes, xh);
        store(yp + o + j * kLanes, z < 0.0f ? splat(0.0f) : z);
      }
      sp[i] = rs;
    }
  } else {
    std::vector<float> s(width);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t o = i * width;
      float sum = 0.0f;
      for (int64_t k = 0; k < width; ++k) {
        s[k] = ap[o + k] + rp[o + k];
        sum += s[k];
      }
      const float mean = sum * inv_width;
      float sq = 0.0f;
      for (int64_t k = 0; k < width; ++k) {
        s[k] -= mean;
        sq += s[k] * s[k];
      }
      const float rs = 1.0f / std::sqrt(sq * inv_width + e);
      for (int64_t k = 0; k < width; ++k) {
        const float xh = s[k] * rs;
        const float z = xh * w[k] + bp[k];
        xp[o + k] = xh;
        yp[o + k] = z < 0.0f ? 0.0f : z;
      }
      sp[i] = rs;
    }
  }
}

// One block of rows backward; adds the block's weight and bias gradients to dw, db.
template <int V>
void backward_rows(const float* gp, const float* xp, const float* sp, const float* w,
                   const float* bp, int64_t width, int64_t begin, int64_t end, float* op,
                   float* dw, float* db) {
  const float inv_width = 1.0f / static_cast<float>(width);
  if constexpr (V > 0) {
    vfloat wv[V], bv[V], dwv[V], dbv[V];
    for (int j = 0; j < V; ++j) {
      wv[j] = load(w + j * kLanes), bv[j] = load(bp + j * kLanes);
      dwv[j] = splat(0.0f), dbv[j] = splat(0.0f);
    }
    for (int64_t i = begin; i < end; ++i) {
      const int64_t o = i * width;
      vfloat xh[V], gx[V], m1 = splat(0.0f), m2 = splat(0.0f);
      for (int j = 0; j < V; ++j) {
        xh[j] = load(xp + o + j * kLanes);
        const vfloat z = xh[j] * wv[j] + bv[j];
        // (NaN: the gradient passes, as in ATen's threshold backward)
        const vfloat dz = z <= 0.0f ? splat(0.0f) : load(gp + o + j * kLanes);
        dwv[j] += dz * xh[j];
        dbv[j] += dz;
        gx[j] = dz * wv[j];
        m1 += gx[j];
        m2 += gx[j] * xh[j];
      }
      const float mean1 = hsum(m1) * inv_width, mean2 = hsum(m2) * inv_width, rs = sp[i];
      for (int j = 0; j < V; ++j) store(op + o + j * kLanes, rs * (gx[j] - mean1 - xh[j] * mean2));
    }
    for (int j = 0; j < V; ++j) store(dw + j * kLanes, dwv[j]), store(db + j * kLanes, dbv[j]);
  } else {
    std::vector<float> gx(width);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t o = i * width;
      float m1 = 0.0f, m2 = 0.0f;
      for (int64_t k = 0; k < width; ++k) {
        const float z = xp[o + k] * w[k] + bp[k];
        const float dz = z <= 0.0f ? 0.0f : gp[o + k];
        dw[k] += dz * xp[o + k];
        db[k] += dz;
        gx[k] = dz * w[k];
        m1 += gx[k];
        m2 += gx[k] * xp[o + k];
      }
      m1 *= inv_width;
      m2 *= inv_width;
      for (int64_t k = 0; k < width; ++k) op[o + k] = sp[i] * (gx[k] - m1 - xp[o + k] * m2);
    }
  }
}

template <typename Fn>
void dispatch_width(int64_t width, Fn&& fn) {
  switch (width) {
    case 8: fn(std::integral_constant<int, 1>{}); break;
    case 16: fn(std::integral_constant<int, 2>{}); break;
    case 24: fn(std::integral_constant<int, 3>{}); break;
    case 32: fn(std::integral_constant<int, 4>{}); break;
    default: fn(std::integral_constant<int, 0>{});
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_relu_forward(
    const at::Tensor& a_in, const at::Tensor& r_in, const at::Tensor& weight_in,
    const at::Tensor& bias_in, double eps) {
  check_rows(a_in, "a");
  check_rows(r_in, "r");
  TORCH_CHECK(a_in.sizes() == r_in.sizes(), "residual_norm: a and r differ in shape: ",
              a_in.sizes(), " vs ", r_in.sizes());
  const at::Tensor a = a_in.contiguous(), r = r_in.contiguous();
  const int64_t width = a.size(-1), rows = a.numel() / width;
  check_affine(weight_in, bias_in, width);
  const at::Tensor weight = weight_in.contiguous(), bias = bias_in.contiguous();
  at::Tensor y = at::empty_like(a), xhat = at::empty_like(a);
  at::Tensor rstd = at::empty({rows}, a.options());
  const float *ap = a.data_ptr<float>(), *rp = r.data_ptr<float>();
  const float *w = weight.data_ptr<float>(), *bp = bias.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *xp = xhat.data_ptr<float>(), *sp = rstd.data_ptr<float>();
  const float e = static_cast<float>(eps);
  dispatch_width(width, [&](auto tag) {
    at::parallel_for(0, rows, kBlock, [&](int64_t begin, int64_t end) {
      forward_rows<decltype(tag)::value>(ap, rp, w, bp, e, width, begin, end, xp, yp, sp);
    });
  });
  return {y, xhat, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_relu_backward(
    const at::Tensor& grad_in, const at::Tensor& xhat_in, const at::Tensor& rstd_in,
    const at::Tensor& weight_in, const at::Tensor& bias_in) {
  check_rows(grad_in, "grad_y");
  check_rows(xhat_in, "xhat");
  TORCH_CHECK(grad_in.sizes() == xhat_in.sizes(), "residual_norm: grad_y and xhat differ: ",
              grad_in.sizes(), " vs ", xhat_in.sizes());
  const at::Tensor g = grad_in.contiguous(), xhat = xhat_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  const int64_t width = xhat.size(-1), rows = xhat.numel() / width;
  check_affine(weight_in, bias_in, width);
  TORCH_CHECK(rstd.numel() == rows, "residual_norm: rstd must have ", rows, " values");
  const at::Tensor weight = weight_in.contiguous(), bias = bias_in.contiguous();
  at::Tensor gs = at::empty_like(xhat);
  const int64_t blocks = (rows + kBlock - 1) / kBlock;
  // per block: the weight gradient's partial sums, then the bias gradient's
  at::Tensor partial = at::zeros({blocks, 2 * width}, xhat.options());
  const float *gp = g.data_ptr<float>(), *xp = xhat.data_ptr<float>();
  const float *sp = rstd.data_ptr<float>(), *w = weight.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  float *op = gs.data_ptr<float>(), *pp = partial.data_ptr<float>();
  dispatch_width(width, [&](auto tag) {
    at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
      for (int64_t blk = first; blk < last; ++blk) {
        float* dw = pp + blk * 2 * width;
        backward_rows<decltype(tag)::value>(gp, xp, sp, w, bp, width, blk * kBlock,
                                            std::min(rows, (blk + 1) * kBlock), op, dw,
                                            dw + width);
      }
    });
  });
  at::Tensor gw = at::zeros({width}, xhat.options()), gb = at::zeros({width}, xhat.options());
  float *gwp = gw.data_ptr<float>(), *gbp = gb.data_ptr<float>();
  for (int64_t blk = 0; blk < blocks; ++blk) {  // in block order, on one thread
    const float* dw = pp + blk * 2 * width;
    for (int64_t k = 0; k < width; ++k) {
      gwp[k] += dw[k];
      gbp[k] += dw[width + k];
    }
  }
  return {gs, gw.reshape(weight_in.sizes()), gb.reshape(bias_in.sizes())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtrec_field_attention, m) {
  m.def("norm_relu_forward(Tensor a, Tensor r, Tensor weight, Tensor bias, float eps) -> "
        "(Tensor, Tensor, Tensor)",
        &norm_relu_forward);
  m.def("norm_relu_backward(Tensor grad_y, Tensor xhat, Tensor rstd, Tensor weight, "
        "Tensor bias) -> (Tensor, Tensor, Tensor)",
        &norm_relu_backward);
}
