// Fused multi-head self-attention over the F field tokens of each row (AutoInt), CPU.
//
// One (row, head) problem is tiny: F x F scores from F x d_h queries and keys (F ~ 15-45,
// d_h 4-32). ATen runs it as B·H batched GEMMs of that size plus a softmax over whole
// B x H x F x F tensors, each pass streaming the scores through memory. Here eight rows
// are one problem, each row a lane of a vector register: every operation of the
// attention (dot products, max, exp, sums) is lane-wise, so nothing is reduced across a
// register and no shape needs padding; the eight rows' scores stay in cache from the dot
// products to the weighted sum of values, four queries per pass over the keys. A group's
// rows are read once, whole and in order, and transposed in registers (8 x 8 blocks). The
// backward recomputes the probabilities from the saved log-sum-exp (as FlashAttention
// does) instead of storing B x H x F x F of them. Groups of eight rows run in parallel on
// ATen's thread pool; each group is computed by one thread in a fixed order, so results
// do not depend on the thread count.
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
  x = x < floor_x ? floor_x : x;  // (a NaN fails the test and propagates, as in expf)
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
  return p * (vfloat)bits;  // a vector cast reinterprets the bits
}

// Two-vector shuffle: clang and GCC >= 12 have __builtin_shufflevector; older GCC spells
// it __builtin_shuffle with a mask vector.
#if defined(__clang__) || __GNUC__ >= 12
#define MTREC_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define MTREC_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, vint{__VA_ARGS__})
#endif

// In-register transpose of an 8 x 8 block: r[l][k] -> r[k][l].
inline void transpose8(vfloat* r) {
  vfloat t[8], u[8];
  for (int p = 0; p < 8; p += 2) {
    t[p] = MTREC_SHUFFLE(r[p], r[p + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[p + 1] = MTREC_SHUFFLE(r[p], r[p + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int p = 0; p < 8; p += 4)
    for (int q = 0; q < 2; ++q) {
      u[p + 2 * q] = MTREC_SHUFFLE(t[p + q], t[p + q + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[p + 2 * q + 1] =
          MTREC_SHUFFLE(t[p + q], t[p + q + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  for (int k = 0; k < 4; ++k) {
    r[k] = MTREC_SHUFFLE(u[k], u[k + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    r[k + 4] = MTREC_SHUFFLE(u[k], u[k + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

inline vfloat load8(const float* p) {
  vfloat v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

inline void store8(float* p, vfloat v) { __builtin_memcpy(p, &v, sizeof(v)); }

// Moves between eight rows of a B x F x C tensor (row l at src + l·C·F) and F x C
// lane-interleaved vectors (vector [j * C + col] holds column col of token j of the eight
// rows): whole rows, read and written once, in order; full groups go through 8 x 8
// register transposes, the last group (rows < 8, or C not a multiple of 8) float by float,
// its missing rows as zero.
inline void gather_rows(const float* src, int64_t rows, int64_t f, int64_t c, vfloat* dst) {
  const int64_t stride = f * c;
  if (rows == kLanes && c % kLanes == 0) {
    vfloat r[kLanes];
    for (int64_t x = 0; x < stride; x += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) r[l] = load8(src + l * stride + x);
      transpose8(r);
      for (int64_t k = 0; k < kLanes; ++k) dst[x + k] = r[k];
    }
    return;
  }
  for (int64_t x = 0; x < stride; ++x) {
    vfloat v{};
    for (int64_t l = 0; l < rows; ++l) v[l] = src[l * stride + x];
    dst[x] = v;
  }
}

inline void scatter_rows(const vfloat* src, int64_t rows, int64_t f, int64_t c, float* dst) {
  const int64_t stride = f * c;
  if (rows == kLanes && c % kLanes == 0) {
    vfloat r[kLanes];
    for (int64_t x = 0; x < stride; x += kLanes) {
      for (int64_t k = 0; k < kLanes; ++k) r[k] = src[x + k];
      transpose8(r);
      for (int64_t l = 0; l < kLanes; ++l) store8(dst + l * stride + x, r[l]);
    }
    return;
  }
  for (int64_t l = 0; l < rows; ++l)
    for (int64_t x = 0; x < stride; ++x) dst[l * stride + x] = src[x][l];
}

// Queries per pass: each key / value vector loaded is used for kRows queries, and the
// kRows x 2 dot products in flight hide the multiply-add latency.
constexpr int64_t kRows = 4;

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// s[r * f + j] = q_r . k_j for kRows queries (row r at q + r·qs) and all F keys (key j at
// k + j·ks), eight rows of the batch per vector.
template <int DH>
inline void dots(const vfloat* q, int64_t qs, const vfloat* k, int64_t ks, int64_t f,
                 vfloat* s) {
  int64_t j = 0;
  for (; j + 2 <= f; j += 2) {
    const vfloat* k0 = k + j * ks;
    const vfloat* k1 = k0 + ks;
    vfloat a[kRows][2] = {};
    for (int d = 0; d < DH; ++d) {
      const vfloat x0 = k0[d], x1 = k1[d];
      for (int64_t r = 0; r < kRows; ++r) {
        a[r][0] += q[r * qs + d] * x0;
        a[r][1] += q[r * qs + d] * x1;
      }
    }
    for (int64_t r = 0; r < kRows; ++r) {
      s[r * f + j] = a[r][0];
      s[r * f + j + 1] = a[r][1];
    }
  }
  if (j < f) {
    const vfloat* k0 = k + j * ks;
    vfloat a[kRows] = {};
    for (int d = 0; d < DH; ++d)
      for (int64_t r = 0; r < kRows; ++r) a[r] += q[r * qs + d] * k0[d];
    for (int64_t r = 0; r < kRows; ++r) s[r * f + j] = a[r];
  }
}

// out[r * os + d] = scale · sum_j w[r * f + j] · x[j * xs + d]: kRows weighted sums of the
// F rows of x, two columns at a time (kRows x 2 accumulators in registers).
template <int DH>
inline void weighted_sums(const vfloat* w, const vfloat* x, int64_t xs, int64_t f,
                          const vfloat* scale, vfloat* out, int64_t os, int64_t rows_out) {
  constexpr int W = DH < 2 ? DH : 2;
  for (int d0 = 0; d0 < DH; d0 += W) {
    vfloat acc[kRows][W] = {};
    for (int64_t j = 0; j < f; ++j) {
      const vfloat* xj = x + j * xs + d0;
      for (int64_t r = 0; r < kRows; ++r) {
        const vfloat wr = w[r * f + j];
        for (int d = 0; d < W; ++d) acc[r][d] += wr * xj[d];
      }
    }
    for (int64_t r = 0; r < rows_out; ++r)
      for (int d = 0; d < W; ++d) out[r * os + d0 + d] = acc[r][d] * scale[r];
  }
}

// Per-thread scratch of one group of eight rows: their qkv (F x 3A vectors, then kRows
// zero rows so the last pass of queries may run past F), output or output gradient
// (F x A, same padding), and qkv's gradient.
struct Scratch {
  std::vector<vfloat> t, g, dt, s, dp;
  Scratch(int64_t f, int64_t a)
      : t((f + kRows) * 3 * a), g((f + kRows) * a), dt(f * 3 * a), s(kRows * f), dp(kRows * f) {}
};

template <int DH>
void forward_group(const float* qkv, const int64_t rows, int64_t f, int64_t a, int64_t heads,
                   float scale, float* out, float* lse, Scratch& w) {
  const int64_t c = 3 * a;
  vfloat* t = w.t.data();
  vfloat* o = w.g.data();
  gather_rows(qkv, rows, f, c, t);
  for (int64_t j = 0; j < f; ++j)
    for (int64_t x = 0; x < a; ++x) t[j * c + x] *= scale;  // the queries carry the scale
  vfloat* s = w.s.data();
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t off = h * DH;
    const vfloat* k = t + a + off;
    const vfloat* v = t + 2 * a + off;
    for (int64_t i0 = 0; i0 < f; i0 += kRows) {
      dots<DH>(t + i0 * c + off, c, k, c, f, s);
      vfloat m[kRows], inv[kRows];
      for (int64_t r = 0; r < kRows; ++r) {
        vfloat* sr = s + r * f;
        vfloat mr = sr[0];
        for (int64_t j = 1; j < f; ++j) mr = sr[j] > mr ? sr[j] : mr;
        vfloat total{};
        for (int64_t j = 0; j < f; ++j) {
          sr[j] = exp_nonpositive(sr[j] - mr);
          total += sr[j];
        }
        m[r] = mr;
        inv[r] = 1.0f / total;
      }
      const int64_t live = std::min(kRows, f - i0);
      weighted_sums<DH>(s, v, c, f, inv, o + i0 * a + off, a, live);
      for (int64_t r = 0; r < live; ++r)
        for (int64_t l = 0; l < rows; ++l)  // log-sum-exp = m + log(total) = m - log(inv)
          lse[(l * heads + h) * f + i0 + r] = m[r][l] - std::log(inv[r][l]);
    }
  }
  scatter_rows(o, rows, f, a, out);
}

template <int DH>
void backward_group(const float* qkv, const float* grad, const float* lse, int64_t rows,
                    int64_t f, int64_t a, int64_t heads, float scale, float* gqkv, Scratch& w) {
  const int64_t c = 3 * a;
  vfloat* t = w.t.data();
  vfloat* g = w.g.data();
  vfloat* dt = w.dt.data();
  gather_rows(qkv, rows, f, c, t);
  gather_rows(grad, rows, f, a, g);
  for (int64_t j = 0; j < f; ++j)
    for (int64_t x = 0; x < a; ++x) t[j * c + x] *= scale;
  for (auto& x : w.dt) x = vfloat{};
  vfloat* p = w.s.data();
  vfloat* dp = w.dp.data();
  vfloat scales[kRows];
  for (int64_t r = 0; r < kRows; ++r) scales[r] = splat(scale);
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t off = h * DH;
    const vfloat* k = t + a + off;
    const vfloat* v = t + 2 * a + off;
    vfloat* dk = dt + a + off;
    vfloat* dv = dt + 2 * a + off;
    for (int64_t i0 = 0; i0 < f; i0 += kRows) {
      const vfloat* q = t + i0 * c + off;
      const vfloat* gi = g + i0 * a + off;
      dots<DH>(q, c, k, c, f, p);
      dots<DH>(gi, a, v, c, f, dp);  // dP_rj = g_r . v_j
      for (int64_t r = 0; r < kRows; ++r) {
        vfloat li{};  // padded query rows: 0 (their g is zero, so they add nothing)
        if (i0 + r < f)
          for (int64_t l = 0; l < rows; ++l) li[l] = lse[(l * heads + h) * f + i0 + r];
        vfloat* pr = p + r * f;
        vfloat* dpr = dp + r * f;
        vfloat dot{};  // sum_j P_j dP_j (= g . out_i)
        for (int64_t j = 0; j < f; ++j) {
          pr[j] = exp_nonpositive(pr[j] - li);  // the probabilities, recomputed
          dot += pr[j] * dpr[j];
        }
        for (int64_t j = 0; j < f; ++j) dpr[j] = pr[j] * (dpr[j] - dot);  // dS
      }
      // dQ = scale · dS K (q in t carries the scale; its gradient takes it once more)
      weighted_sums<DH>(dp, k, c, f, scales, dt + i0 * c + off, c, std::min(kRows, f - i0));
      for (int64_t j = 0; j < f; ++j) {
        vfloat ds[kRows], pj[kRows];
        for (int64_t r = 0; r < kRows; ++r) {
          ds[r] = dp[r * f + j];
          pj[r] = p[r * f + j];
        }
        vfloat* dkj = dk + j * c;
        vfloat* dvj = dv + j * c;
        for (int d = 0; d < DH; ++d) {
          vfloat sk = dkj[d], sv = dvj[d];
          for (int64_t r = 0; r < kRows; ++r) {
            sk += ds[r] * q[r * c + d];  // dK = dSᵀ (scale · Q)
            sv += pj[r] * gi[r * a + d];  // dV = Pᵀ G
          }
          dkj[d] = sk;
          dvj[d] = sv;
        }
      }
    }
  }
  scatter_rows(dt, rows, f, c, gqkv);
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

// fn(head-dim tag, first row, rows in the group, scratch) for every group of eight rows
// (the last may be shorter), groups split over ATen's threads, one scratch per thread.
template <typename Fn>
void for_each_group(int64_t b, int64_t f, int64_t a, int64_t dh, Fn&& fn) {
  const int64_t groups = (b + kLanes - 1) / kLanes;
  dispatch_head_dim(dh, [&](auto tag) {
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      Scratch w(f, a);
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t r = idx * kLanes;
        fn(tag, r, std::min(kLanes, b - r), w);
      }
    });
  });
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
  for_each_group(b, f, a, dh, [&](auto tag, int64_t r, int64_t rows, Scratch& w) {
    forward_group<decltype(tag)::value>(src + r * f * 3 * a, rows, f, a, heads, sc,
                                        dst + r * f * a, lsep + r * heads * f, w);
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
  for_each_group(b, f, a, dh, [&](auto tag, int64_t r, int64_t rows, Scratch& w) {
    backward_group<decltype(tag)::value>(src + r * f * 3 * a, g + r * f * a,
                                         lsep + r * heads * f, rows, f, a, heads, sc,
                                         dst + r * f * 3 * a, w);
  });
  return gqkv;
}

}  // namespace

TORCH_LIBRARY(mtrec_field_attention, m) {
  m.def("forward(Tensor qkv, int heads, float scale) -> (Tensor, Tensor)", &attention_forward);
  m.def("backward(Tensor grad_out, Tensor qkv, Tensor lse, int heads, float scale) -> Tensor",
        &attention_backward);
}
