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

// Rows [begin, end) forward. W > 0: rows of W floats, known when compiling, so the
// `omp simd` loops over a row unroll into vector registers (reductions in a fixed lane
// order); W = 0: any width (`cols`).
template <int W>
void forward_rows(const float* __restrict ap, const float* __restrict rp,
                  const float* __restrict w, const float* __restrict bp, float e, int64_t cols,
                  int64_t begin, int64_t end, float* __restrict xp, float* __restrict yp,
                  float* __restrict sp, float* __restrict s) {
  const int64_t width = W > 0 ? W : cols;
  const float inv_width = 1.0f / static_cast<float>(width);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t o = i * width;
    float sum = 0.0f, sq = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t k = 0; k < width; ++k) {
      s[k] = ap[o + k] + rp[o + k];
      sum += s[k];
    }
    const float mean = sum * inv_width;
#pragma omp simd reduction(+ : sq)
    for (int64_t k = 0; k < width; ++k) {
      s[k] -= mean;
      sq += s[k] * s[k];
    }
    const float rs = 1.0f / std::sqrt(sq * inv_width + e);
#pragma omp simd
    for (int64_t k = 0; k < width; ++k) {
      const float xh = s[k] * rs;
      const float z = xh * w[k] + bp[k];
      xp[o + k] = xh;
      yp[o + k] = z < 0.0f ? 0.0f : z;  // (NaN propagates, as in ATen's relu)
    }
    sp[i] = rs;
  }
}

// Rows [begin, end) backward (W as forward); adds their weight and bias gradients to
// dw, db.
template <int W>
void backward_rows(const float* __restrict gp, const float* __restrict xp,
                   const float* __restrict sp, const float* __restrict w,
                   const float* __restrict bp, int64_t cols, int64_t begin, int64_t end,
                   float* __restrict op, float* __restrict dw, float* __restrict db,
                   float* __restrict gx) {
  const int64_t width = W > 0 ? W : cols;
  const float inv_width = 1.0f / static_cast<float>(width);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t o = i * width;
    float m1 = 0.0f, m2 = 0.0f;
#pragma omp simd reduction(+ : m1, m2)
    for (int64_t k = 0; k < width; ++k) {
      const float xh = xp[o + k];
      const float z = xh * w[k] + bp[k];
      const float dz = z <= 0.0f ? 0.0f : gp[o + k];  // (NaN: passes, as ATen's threshold)
      dw[k] += dz * xh;
      db[k] += dz;
      gx[k] = dz * w[k];
      m1 += gx[k];
      m2 += gx[k] * xh;
    }
    m1 *= inv_width;
    m2 *= inv_width;
    const float rs = sp[i];
#pragma omp simd
    for (int64_t k = 0; k < width; ++k) op[o + k] = rs * (gx[k] - m1 - xp[o + k] * m2);
  }
}

// fn(width tag): W = the width where it is one of the compiled ones, else 0
template <typename Fn>
void dispatch_width(int64_t width, Fn&& fn) {
  switch (width) {
    case 8: fn(std::integral_constant<int, 8>{}); break;
    case 16: fn(std::integral_constant<int, 16>{}); break;
    case 24: fn(std::integral_constant<int, 24>{}); break;
    case 32: fn(std::integral_constant<int, 32>{}); break;
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
      std::vector<float> scratch(width);
      forward_rows<decltype(tag)::value>(ap, rp, w, bp, e, width, begin, end, xp, yp, sp,
                                         scratch.data());
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
      std::vector<float> scratch(width);
      for (int64_t blk = first; blk < last; ++blk) {
        float* dw = pp + blk * 2 * width;
        backward_rows<decltype(tag)::value>(gp, xp, sp, w, bp, width, blk * kBlock,
                                            std::min(rows, (blk + 1) * kBlock), op, dw,
                                            dw + width, scratch.data());
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
