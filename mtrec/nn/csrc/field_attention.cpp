// Fused multi-head self-attention over the F field tokens of each row (AutoInt), CPU.
//
// One (row, head) problem is tiny: F x F scores from F x d_h queries and keys (F ~ 15-45,
// d_h 4-32). ATen runs it as B·H batched GEMMs of that size plus a softmax over whole
// B x H x F x F tensors, each pass streaming the scores through memory. Here eight rows
// are one problem, each row a lane of a vector register: every operation of the
// attention (dot products, max, exp, sums) is lane-wise, so nothing is reduced across a
// register and no shape needs padding; the eight rows' scores stay in cache from the dot
// products to the weighted sum of values. The backward recomputes the probabilities from
// the saved log-sum-exp (as FlashAttention does) instead of storing B x H x F x F of them.
// Groups of eight rows x heads run in parallel on ATen's thread pool; each group is
// computed by one thread in a fixed order, so results do not depend on the thread count.
//
// Layout: qkv is B x F x 3A (A = H d_h; columns [0, A) queries, [A, 2A) keys, [2A, 3A)
// values, head h owning [h d_h, (h + 1) d_h) of each): the output of one Linear(in, 3A).
// Queries are multiplied by `scale` (1 / sqrt(d_h)) here.
//
//   forward(qkv, heads, scale)                  -> (out B x F x A, lse B x H x F)
//   backward(grad_out, qkv, lse, heads, scale)  -> grad_qkv B x F x 3A

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kLanes = 8;  // rows per problem: one 256-bit register of floats
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline vfloat splat(float x) { return vfloat{} + x; }

// exp(x) lane-wise for x <= 0 (scores minus their row maximum or log-sum-exp): Cody-Waite
// range reduction x = n ln 2 + r, |r| <= ln 2 / 2, a degree-6 polynomial for e^r (Cephes'
// expf coefficients, relative error ~1e-7) and 2^n built in the exponent bits.
inline vfloat exp_nonpositive(vfloat x) {
  const vfloat floor_x = splat(-87.0f);  // below: e^x < 1.7e-38, flushed to 2^-126 · p
  x = x > floor_x ? x : floor_x;
  const vfloat t = x * 1.44269504088896341f;                // x / ln 2 (<= 0)
  const vint n = -__builtin_convertvector(0.5f - t, vint);  // round(t): truncation of >= 0
  const vfloat nf = __builtin_convertvector(n, vfloat);
  vfloat r = x - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  vfloat p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vint bits = (n + 127) << 23;
  return p * reinterpret_cast<const vfloat&>(bits);
}

// In-register transpose of an 8 x 8 block: r[l][k] -> r[k][l].
inline void transpose8(vfloat* r) {
  vfloat t[8], u[8];
  for (int p = 0; p < 8; p += 2) {
    t[p] = __builtin_shufflevector(r[p], r[p + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[p + 1] = __builtin_shufflevector(r[p], r[p + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int p = 0; p < 8; p += 4)
    for (int q = 0; q < 2; ++q) {
      u[p + 2 * q] = __builtin_shufflevector(t[p + q], t[p + q + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[p + 2 * q + 1] =
          __builtin_shufflevector(t[p + q], t[p + q + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  for (int k = 0; k < 4; ++k) {
    r[k] = __builtin_shufflevector(u[k], u[k + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    r[k + 4] = __builtin_shufflevector(u[k], u[k + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

inline vfloat load8(const float* p) {
  vfloat v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

inline void store8(float* p, vfloat v) { __builtin_memcpy(p, &v, sizeof(v)); }

// Gathers / scatters between eight rows of a B x F x C tensor (row l at src + l·row_stride)
// and lane-interleaved F x DH vectors; a full group moves 8 x 8 blocks through registers,
// the last group (rows < 8, and d_h = 4) goes float by float, its missing rows as zero.
template <int DH>
inline void gather(const float* src, int64_t rows, int64_t row_stride, int64_t f, int64_t c,
                   int64_t col, float scale, vfloat* dst) {
  if constexpr (DH % kLanes == 0) {
    if (rows == kLanes) {
      vfloat r[kLanes];
      for (int64_t j = 0; j < f; ++j)
        for (int d0 = 0; d0 < DH; d0 += kLanes) {
          for (int64_t l = 0; l < kLanes; ++l)
            r[l] = load8(src + l * row_stride + j * c + col + d0) * scale;
          transpose8(r);
          for (int k = 0; k < kLanes; ++k) dst[j * DH + d0 + k] = r[k];
        }
      return;
    }
  }
  for (int64_t j = 0; j < f; ++j)
    for (int d = 0; d < DH; ++d) {
      vfloat v{};
      for (int64_t l = 0; l < rows; ++l) v[l] = src[l * row_stride + j * c + col + d] * scale;
      dst[j * DH + d] = v;
    }
}

// dst row l, token j, columns [col, col + DH) <- src[j * DH + d][l] * scale[l].
template <int DH>
inline void scatter_row(const vfloat* src, vfloat scale, int64_t rows, int64_t row_stride,
                        int64_t c, int64_t col, float* dst) {
  if constexpr (DH % kLanes == 0) {
    if (rows == kLanes) {
      vfloat r[kLanes];
      for (int d0 = 0; d0 < DH; d0 += kLanes) {
        for (int k = 0; k < kLanes; ++k) r[k] = src[d0 + k] * scale;
        transpose8(r);
        for (int64_t l = 0; l < kLanes; ++l) store8(dst + l * row_stride + col + d0, r[l]);
      }
      return;
    }
  }
  for (int64_t l = 0; l < rows; ++l)
    for (int d = 0; d < DH; ++d) dst[l * row_stride + col + d] = src[d][l] * scale[l];
}

template <int DH>
inline void scatter(const vfloat* src, int64_t rows, int64_t row_stride, int64_t f, int64_t c,
                    int64_t col, float* dst) {
  for (int64_t j = 0; j < f; ++j)
    scatter_row<DH>(src + j * DH, splat(1.0f), rows, row_stride, c, col, dst + j * c);
}

// s[j] = q_i . k_j for all j (eight rows at once). Four keys at a time: four independent
// multiply-add chains hide the FMA latency that one chain over d_h would wait on.
template <int DH>
inline void dots(const vfloat* qi, const vfloat* k, int64_t f, vfloat* s) {
  int64_t j = 0;
  for (; j + 4 <= f; j += 4) {
    const vfloat* k0 = k + j * DH;
    vfloat a0{}, a1{}, a2{}, a3{};
    for (int d = 0; d < DH; ++d) {
      const vfloat qd = qi[d];
      a0 += qd * k0[d];
      a1 += qd * k0[DH + d];
      a2 += qd * k0[2 * DH + d];
      a3 += qd * k0[3 * DH + d];
    }
    s[j] = a0;
    s[j + 1] = a1;
    s[j + 2] = a2;
    s[j + 3] = a3;
  }
  for (; j < f; ++j) {
    const vfloat* kj = k + j * DH;
    vfloat acc{};
    for (int d = 0; d < DH; ++d) acc += qi[d] * kj[d];
    s[j] = acc;
  }
}

struct Scratch {
  std::vector<vfloat> q, k, v, dk, dv, s, dp;
  Scratch(int64_t f, int64_t dh)
      : q(f * dh), k(f * dh), v(f * dh), dk(f * dh), dv(f * dh), s(f), dp(f) {}
};

template <int DH>
void forward_group(const float* qkv, const int64_t rows, int64_t f, int64_t a, int64_t h,
                   float scale, float* out, float* lse, int64_t heads, Scratch& w) {
  const int64_t c = 3 * a, off = h * DH;
  gather<DH>(qkv, rows, f * c, f, c, off, scale, w.q.data());
  gather<DH>(qkv, rows, f * c, f, c, a + off, 1.0f, w.k.data());
  gather<DH>(qkv, rows, f * c, f, c, 2 * a + off, 1.0f, w.v.data());
  vfloat* s = w.s.data();
  for (int64_t i = 0; i < f; ++i) {
    dots<DH>(w.q.data() + i * DH, w.k.data(), f, s);
    vfloat m = s[0];
    for (int64_t j = 1; j < f; ++j) m = s[j] > m ? s[j] : m;
    vfloat total{};
    for (int64_t j = 0; j < f; ++j) {
      s[j] = exp_nonpositive(s[j] - m);
      total += s[j];
    }
    // the weighted sum of values, eight columns at a time (the accumulators stay in registers)
    constexpr int W = DH < kLanes ? DH : kLanes;
    vfloat acc[DH];
    for (int d0 = 0; d0 < DH; d0 += W) {
      vfloat part[W] = {};
      for (int64_t j = 0; j < f; ++j) {
        const vfloat pj = s[j];
        const vfloat* vj = w.v.data() + j * DH + d0;
        for (int d = 0; d < W; ++d) part[d] += pj * vj[d];
      }
      for (int d = 0; d < W; ++d) acc[d0 + d] = part[d];
    }
    scatter_row<DH>(acc, 1.0f / total, rows, f * a, a, off, out + i * a);
    for (int64_t l = 0; l < rows; ++l)
      lse[(l * heads + h) * f + i] = m[l] + std::log(total[l]);
  }
}

template <int DH>
void backward_group(const float* qkv, const float* grad, const float* lse, int64_t rows,
                    int64_t f, int64_t a, int64_t h, float scale, float* gqkv, int64_t heads,
                    Scratch& w) {
  const int64_t c = 3 * a, off = h * DH;
  gather<DH>(qkv, rows, f * c, f, c, off, scale, w.q.data());
  gather<DH>(qkv, rows, f * c, f, c, a + off, 1.0f, w.k.data());
  gather<DH>(qkv, rows, f * c, f, c, 2 * a + off, 1.0f, w.v.data());
  for (auto& x : w.dk) x = vfloat{};
  for (auto& x : w.dv) x = vfloat{};
  vfloat* p = w.s.data();
  vfloat* dp = w.dp.data();
  for (int64_t i = 0; i < f; ++i) {
    const vfloat* qi = w.q.data() + i * DH;
    vfloat li{}, gi[DH];
    for (int64_t l = 0; l < rows; ++l) li[l] = lse[(l * heads + h) * f + i];
    gather<DH>(grad + i * a, rows, f * a, 1, a, off, 1.0f, gi);
    dots<DH>(qi, w.k.data(), f, p);
    for (int64_t j = 0; j < f; ++j) p[j] = exp_nonpositive(p[j] - li);  // probabilities
    dots<DH>(gi, w.v.data(), f, dp);                                     // dP_j = g . v_j
    vfloat dot{};  // sum_j P_j dP_j (= g . out_i)
    for (int64_t j = 0; j < f; ++j) dot += p[j] * dp[j];
    for (int64_t j = 0; j < f; ++j) dp[j] = p[j] * (dp[j] - dot);  // dS: the scores' gradient
    constexpr int W = DH < kLanes ? DH : kLanes;
    vfloat dq[DH];
    for (int d0 = 0; d0 < DH; d0 += W) {
      vfloat part[W] = {};
      for (int64_t j = 0; j < f; ++j) {
        const vfloat ds = dp[j];
        const vfloat* kj = w.k.data() + j * DH + d0;
        for (int d = 0; d < W; ++d) part[d] += ds * kj[d];
      }
      for (int d = 0; d < W; ++d) dq[d0 + d] = part[d];
    }
    for (int64_t j = 0; j < f; ++j) {
      const vfloat ds = dp[j], pj = p[j];
      vfloat* dkj = w.dk.data() + j * DH;
      vfloat* dvj = w.dv.data() + j * DH;
      for (int d = 0; d < DH; ++d) {
        dkj[d] += ds * qi[d];  // qi carries the scale already
        dvj[d] += pj * gi[d];
      }
    }
    scatter_row<DH>(dq, splat(scale), rows, f * c, c, off, gqkv + i * c);
  }
  scatter<DH>(w.dk.data(), rows, f * c, f, c, a + off, gqkv);
  scatter<DH>(w.dv.data(), rows, f * c, f, c, 2 * a + off, gqkv);
}

void check_qkv(const at::Tensor& qkv, int64_t heads) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.scalar_type() == at::kFloat,
              "field_attention: qkv must be a float32 CPU tensor, got ", qkv.scalar_type(),
              " on ", qkv.device());
  TORCH_CHECK(heads > 0 && qkv.dim() == 3 && qkv.size(2) % (3 * heads) == 0,
              "field_attention: qkv must be B x F x 3A with A divisible by heads=", heads,
              ", got ", qkv.sizes());
}

template <typename Fn>
void dispatch_head_dim(int64_t dh, Fn&& fn) {
  switch (dh) {
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 8: fn(std::integral_constant<int, 8>{}); break;
    case 16: fn(std::integral_constant<int, 16>{}); break;
    case 32: fn(std::integral_constant<int, 32>{}); break;
    default: TORCH_CHECK(false, "field_attention: head dim ", dh, " is not one of 4, 8, 16, 32");
  }
}

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& qkv_in, int64_t heads,
                                                     double scale) {
  check_qkv(qkv_in, heads);
  const at::Tensor qkv = qkv_in.contiguous();
  const int64_t b = qkv.size(0), f = qkv.size(1), a = qkv.size(2) / 3, dh = a / heads;
  at::Tensor out = at::empty({b, f, a}, qkv.options());
  at::Tensor lse = at::empty({b, heads, f}, qkv.options());
  const float* src = qkv.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  float* lsep = lse.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const int64_t groups = (b + kLanes - 1) / kLanes;
  dispatch_head_dim(dh, [&](auto tag) {
    constexpr int DH = decltype(tag)::value;
    at::parallel_for(0, groups * heads, 1, [&](int64_t begin, int64_t end) {
      Scratch w(f, DH);
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t r = idx / heads * kLanes, h = idx % heads;
        forward_group<DH>(src + r * f * 3 * a, std::min(kLanes, b - r), f, a, h, sc,
                          dst + r * f * a, lsep + r * heads * f, heads, w);
      }
    });
  });
  return {out, lse};
}

at::Tensor attention_backward(const at::Tensor& grad_in, const at::Tensor& qkv_in,
                              const at::Tensor& lse_in, int64_t heads, double scale) {
  check_qkv(qkv_in, heads);
  const at::Tensor qkv = qkv_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const int64_t b = qkv.size(0), f = qkv.size(1), a = qkv.size(2) / 3, dh = a / heads;
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({b, f, a}) && grad.scalar_type() == at::kFloat,
              "field_attention: grad_out must be float32 B x F x A, got ", grad.sizes());
  at::Tensor gqkv = at::empty_like(qkv);
  const float* src = qkv.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  const float* lsep = lse.data_ptr<float>();
  float* dst = gqkv.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const int64_t groups = (b + kLanes - 1) / kLanes;
  dispatch_head_dim(dh, [&](auto tag) {
    constexpr int DH = decltype(tag)::value;
    at::parallel_for(0, groups * heads, 1, [&](int64_t begin, int64_t end) {
      Scratch w(f, DH);
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t r = idx / heads * kLanes, h = idx % heads;
        backward_group<DH>(src + r * f * 3 * a, g + r * f * a, lsep + r * heads * f,
                           std::min(kLanes, b - r), f, a, h, sc, dst + r * f * 3 * a, heads, w);
      }
    });
  });
  return gqkv;
}

}  // namespace

TORCH_LIBRARY(mtrec_field_attention, m) {
  m.def("forward(Tensor qkv, int heads, float scale) -> (Tensor, Tensor)", &attention_forward);
  m.def("backward(Tensor grad_out, Tensor qkv, Tensor lse, int heads, float scale) -> Tensor",
        &attention_backward);
}
