// Fused CPU kernels of the DQ quantizer (djpq_compiler/modules/quantizers.py, _DQRound).
//
// Forward, one pass: q = d * nearbyint(clamp(x, lo, hi) / d), and optionally the 1-byte grid
// indices nearbyint(clamp(x, lo, hi) / d). Bitwise what the unfused torch ops compute (clamp,
// div, round half to even, mul, each in the tensor's dtype).
// Backward, one pass: the input gradient (grad inside [lo, hi], 0 outside) and the two
// per-tensor sums of the DQ gradients: sum(g_in * (round(x/d) - x/d)) for d and
// sum(grad * side) for q_max (side = +1 above hi, -1 below lo; unsigned grids count only
// "above"), accumulated in double.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kGrain = 32768;

template <typename scalar_t, typename code_t>
void forward_kernel(const scalar_t* x, scalar_t* q, code_t* codes, int64_t n, scalar_t lo,
                    scalar_t hi, scalar_t step) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      scalar_t v = x[i] < lo ? lo : x[i];  // NaN stays NaN, as in torch.clamp
      v = v > hi ? hi : v;
      const scalar_t k = std::nearbyint(v / step);
      q[i] = k * step;
      if (codes != nullptr) codes[i] = static_cast<code_t>(k);
    }
  });
}

// One backward chunk, scalar: adds to acc = {sum g_in*(round(t)-t), sum grad*side}.
template <typename scalar_t>
void backward_chunk(const scalar_t* px, const scalar_t* pg, scalar_t* po, int64_t begin,
                    int64_t end, scalar_t l, scalar_t h, scalar_t s, bool is_signed,
                    std::array<double, 2>& acc) {
  const scalar_t sign_below = is_signed ? scalar_t(-1) : scalar_t(0);
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t xi = px[i];
    const scalar_t gi = pg[i];
    const bool above = xi > h;
    const bool below = xi < l;
    const scalar_t t = xi / s;
    const scalar_t gin = (above || below) ? scalar_t(0) : gi;
    acc[0] += static_cast<double>(gin * (std::nearbyint(t) - t));
    acc[1] += static_cast<double>(above ? gi : (below ? sign_below * gi : scalar_t(0)));
    if (po != nullptr) po[i] = gin;
  }
}

#if defined(__AVX2__)
// The same for float32, 8 lanes at a time; lane sums in double, added in a fixed order.
void backward_chunk_avx2(const float* px, const float* pg, float* po, int64_t begin,
                         int64_t end, float l, float h, float s, bool is_signed,
                         std::array<double, 2>& acc) {
  const __m256 vl = _mm256_set1_ps(l), vh = _mm256_set1_ps(h), vs = _mm256_set1_ps(s);
  const __m256 flip = _mm256_set1_ps(is_signed ? -0.0f : 0.0f);  // xor: -g below if signed
  const __m256 keep_below = is_signed ? _mm256_castsi256_ps(_mm256_set1_epi32(-1))
                                      : _mm256_setzero_ps();
  __m256d d0 = _mm256_setzero_pd(), d1 = _mm256_setzero_pd();
  __m256d q0 = _mm256_setzero_pd(), q1 = _mm256_setzero_pd();
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    const __m256 x = _mm256_loadu_ps(px + i);
    const __m256 g = _mm256_loadu_ps(pg + i);
    const __m256 above = _mm256_cmp_ps(x, vh, _CMP_GT_OQ);
    const __m256 below = _mm256_cmp_ps(x, vl, _CMP_LT_OQ);
    const __m256 gin = _mm256_andnot_ps(_mm256_or_ps(above, below), g);
    const __m256 t = _mm256_div_ps(x, vs);
    const __m256 r = _mm256_sub_ps(
        _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), t);
    const __m256 prod = _mm256_mul_ps(gin, r);
    const __m256 side = _mm256_or_ps(
        _mm256_and_ps(above, g),
        _mm256_and_ps(_mm256_and_ps(below, keep_below), _mm256_xor_ps(g, flip)));
    d0 = _mm256_add_pd(d0, _mm256_cvtps_pd(_mm256_castps256_ps128(prod)));
    d1 = _mm256_add_pd(d1, _mm256_cvtps_pd(_mm256_extractf128_ps(prod, 1)));
    q0 = _mm256_add_pd(q0, _mm256_cvtps_pd(_mm256_castps256_ps128(side)));
    q1 = _mm256_add_pd(q1, _mm256_cvtps_pd(_mm256_extractf128_ps(side, 1)));
    if (po != nullptr) _mm256_storeu_ps(po + i, gin);
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(d0, d1));
  acc[0] += (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  _mm256_store_pd(lanes, _mm256_add_pd(q0, q1));
  acc[1] += (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  backward_chunk<float>(px, pg, po, i, end, l, h, s, is_signed, acc);
}
#endif

template <typename scalar_t>
void backward_any(const scalar_t* px, const scalar_t* pg, scalar_t* po, int64_t begin,
                  int64_t end, scalar_t l, scalar_t h, scalar_t s, bool is_signed,
                  std::array<double, 2>& acc) {
  backward_chunk<scalar_t>(px, pg, po, begin, end, l, h, s, is_signed, acc);
}

#if defined(__AVX2__)
template <>
void backward_any<float>(const float* px, const float* pg, float* po, int64_t begin,
                         int64_t end, float l, float h, float s, bool is_signed,
                         std::array<double, 2>& acc) {
  backward_chunk_avx2(px, pg, po, begin, end, l, h, s, is_signed, acc);
}
#endif

}  // namespace

std::vector<torch::Tensor> dq_forward(const torch::Tensor& x_in, double lo, double hi,
                                      double step, bool want_codes, bool is_signed) {
  TORCH_CHECK(x_in.device().is_cpu(), "dq_forward: CPU tensors only");
  const torch::Tensor x = x_in.contiguous();
  torch::Tensor q = torch::empty_like(x, at::MemoryFormat::Contiguous);
  torch::Tensor codes;
  if (want_codes) {
    codes = torch::empty(x.sizes(), x.options().dtype(is_signed ? torch::kInt8 : torch::kUInt8));
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dq_forward", [&] {
    const auto l = static_cast<scalar_t>(lo);
    const auto h = static_cast<scalar_t>(hi);
    const auto s = static_cast<scalar_t>(step);
    if (!want_codes) {
      forward_kernel<scalar_t, int8_t>(x.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), nullptr,
                                       x.numel(), l, h, s);
    } else if (is_signed) {
      forward_kernel<scalar_t, int8_t>(x.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(),
                                       codes.data_ptr<int8_t>(), x.numel(), l, h, s);
    } else {
      forward_kernel<scalar_t, uint8_t>(x.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(),
                                        codes.data_ptr<uint8_t>(), x.numel(), l, h, s);
    }
  });
  return {q, codes};
}

std::vector<torch::Tensor> dq_backward(const torch::Tensor& x_in, const torch::Tensor& grad_in,
                                       double lo, double hi, double step, bool need_x,
                                       bool is_signed) {
  TORCH_CHECK(x_in.device().is_cpu() && grad_in.device().is_cpu(), "dq_backward: CPU only");
  TORCH_CHECK(x_in.sizes() == grad_in.sizes(), "dq_backward: x and grad shapes differ");
  const torch::Tensor x = x_in.contiguous();
  const torch::Tensor grad = grad_in.to(x.scalar_type()).contiguous();
  torch::Tensor g_in;
  if (need_x) g_in = torch::empty_like(x, at::MemoryFormat::Contiguous);
  std::array<double, 2> sums{0.0, 0.0};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dq_backward", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t* pg = grad.data_ptr<scalar_t>();
    scalar_t* po = need_x ? g_in.data_ptr<scalar_t>() : nullptr;
    const auto l = static_cast<scalar_t>(lo);
    const auto h = static_cast<scalar_t>(hi);
    const auto s = static_cast<scalar_t>(step);
    sums = at::parallel_reduce(
        0, x.numel(), kGrain, std::array<double, 2>{0.0, 0.0},
        [&](int64_t begin, int64_t end, std::array<double, 2> acc) {
          backward_any<scalar_t>(px, pg, po, begin, end, l, h, s, is_signed, acc);
          return acc;
        },
        [](std::array<double, 2> a, const std::array<double, 2>& b) {
          a[0] += b[0];
          a[1] += b[1];
          return a;
        });
  });
  auto opts = torch::TensorOptions().dtype(torch::kFloat64);
  return {g_in, torch::tensor(sums[0], opts), torch::tensor(sums[1], opts)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dq_forward", &dq_forward, "DQ quantizer forward (fused)");
  m.def("dq_backward", &dq_backward, "DQ quantizer backward (fused)");
}
