// Bitmask-packed sparse Linear kernels (see format.py for the layout). fp32 accumulation for every value dtype.
// spmv:    y[t, r] = sum_j W[r, j] x[t, j], one pass over the packed row per token (decode, few tokens).
// spmm:    the same for a tile of 16 tokens per packed-row pass (prefill), inputs transposed to [tile][col][16].
// densify: the dense weight, for the dense fallback of large batches.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {
#ifndef ATP_PREFETCH_BYTES  // how far ahead of the packed values the decode loop prefetches (0: off); measured
#define ATP_PREFETCH_BYTES 512  // 0-5% faster than the hardware prefetcher alone, most on 7B-sized rows
#endif

// Expansion table, one 8-byte row per mask byte b: lane i <- packed value number popcount(b & ((1 << i) - 1)) when
// bit i is set, else -128 (sign bit set: the lane is zeroed by a blend; vpermps reads only the low 3 bits). Bytes,
// not int32s, keep the table at 2 KiB and let the row address fold into one load (scale 8).
struct SelectTable {
  int8_t idx[256][8];
  SelectTable() {
    for (int b = 0; b < 256; ++b) {
      int k = 0;
      for (int i = 0; i < 8; ++i) idx[b][i] = ((b >> i) & 1) ? static_cast<int8_t>(k++) : static_cast<int8_t>(-128);
    }
  }
};
const SelectTable SELECT;

template <typename T> inline float to_f(T v) { return static_cast<float>(v); }

#ifdef __AVX2__
template <typename T> inline __m256 load8(const T* p);
template <> inline __m256 load8<float>(const float* p) { return _mm256_loadu_ps(p); }
template <> inline __m256 load8<at::BFloat16>(const at::BFloat16* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
template <> inline __m256 load8<at::Half>(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline float hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
#endif

// One row's dot product with x. The loop is bound by loads and instruction count (measured on a 2-core AVX2 EPYC):
// mask bytes come out of one 64-bit word by shifts (no load per byte), the value pointer advances by popcount (no
// prefix sums), and per 8 columns there are 3 loads: table row, 8 packed values, 8 inputs.
template <typename T>
float row_dot(const uint8_t* m, const T* v, const float* x, int64_t nbytes) {
#ifdef __AVX2__
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  __m256 zero = _mm256_setzero_ps();
#ifdef __GNUC__
  asm("" : "+x"(zero));  // keeps one vblendvps per step (a known-zero operand gets rewritten into two instructions)
#endif
  for (int64_t g = 0; g < nbytes; g += 8) {  // one 64-bit mask word (64 columns) per iteration
    uint64_t word;
    std::memcpy(&word, m + g, 8);
    if (ATP_PREFETCH_BYTES) _mm_prefetch(reinterpret_cast<const char*>(v) + ATP_PREFETCH_BYTES, _MM_HINT_T0);
    const float* xg = x + g * 8;
#define ATP_STEP(I, ACC)                                                                                    \
  {                                                                                                         \
    const unsigned b = (word >> (8 * I)) & 0xFFu;                                                           \
    const __m256i idx = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(SELECT.idx[b]))); \
    const __m256 w = _mm256_blendv_ps(_mm256_permutevar8x32_ps(load8(v), idx), zero, _mm256_castsi256_ps(idx)); \
    ACC = _mm256_fmadd_ps(w, _mm256_loadu_ps(xg + 8 * I), ACC);                                             \
    v += __builtin_popcount(b);                                                                             \
  }
    ATP_STEP(0, a0) ATP_STEP(1, a1) ATP_STEP(2, a2) ATP_STEP(3, a3)
    ATP_STEP(4, a0) ATP_STEP(5, a1) ATP_STEP(6, a2) ATP_STEP(7, a3)
#undef ATP_STEP
  }
  return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#else
  float acc = 0.f;
  for (int64_t w = 0; w < nbytes / 8; ++w) {
    uint64_t bits;
    std::memcpy(&bits, m + w * 8, 8);
    while (bits) {
      int j = __builtin_ctzll(bits);
      bits &= bits - 1;
      acc += to_f(*v++) * x[w * 64 + j];
    }
  }
  return acc;
#endif
}

template <typename T>
void spmv_impl(const int64_t* mask, const T* vals, const int64_t* off, const float* x, float* y,
               int64_t rows, int64_t words, int64_t ntok) {
  const int64_t cpad = words * 64, nbytes = words * 8;
  const int nt = at::get_num_threads();
  for (int64_t t = 0; t < ntok; ++t) {
    const float* xt = x + t * cpad;
    float* yt = y + t * rows;
#pragma omp parallel for schedule(dynamic, 32) num_threads(nt) if (rows * words >= 512)
    for (int64_t r = 0; r < rows; ++r) {
      yt[r] = row_dot<T>(reinterpret_cast<const uint8_t*>(mask + r * words), vals + off[r], xt, nbytes);
    }
  }
}

constexpr int TILE = 16;

template <typename T>
void spmm_impl(const int64_t* mask, const T* vals, const int64_t* off, const float* xt, float* y,
               int64_t rows, int64_t words, int64_t ntok) {
  // xt: [ntiles][words*64][TILE] fp32 (zero padded); y: [ntok][rows]
  const int64_t cpad = words * 64, ntiles = (ntok + TILE - 1) / TILE;
  const int nt = at::get_num_threads();
#pragma omp parallel for schedule(dynamic, 8) num_threads(nt) collapse(2)
  for (int64_t tile = 0; tile < ntiles; ++tile) {
    for (int64_t r = 0; r < rows; ++r) {
      const float* xb = xt + tile * cpad * TILE;
      const T* v = vals + off[r];
      const int64_t* m = mask + r * words;
      alignas(32) float acc[TILE];
#ifdef __AVX2__
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps();
      for (int64_t w = 0; w < words; ++w) {
        uint64_t bits = static_cast<uint64_t>(m[w]);
        const float* xw = xb + w * 64 * TILE;
        while (bits) {
          int j = __builtin_ctzll(bits);
          bits &= bits - 1;
          __m256 vb = _mm256_set1_ps(to_f(*v++));
          const float* xp = xw + j * TILE;
          a0 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(xp), a0);
          a1 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(xp + 8), a1);
          if (!bits) break;
          j = __builtin_ctzll(bits);
          bits &= bits - 1;
          vb = _mm256_set1_ps(to_f(*v++));
          xp = xw + j * TILE;
          c0 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(xp), c0);
          c1 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(xp + 8), c1);
        }
      }
      _mm256_store_ps(acc, _mm256_add_ps(a0, c0));
      _mm256_store_ps(acc + 8, _mm256_add_ps(a1, c1));
#else
      for (int i = 0; i < TILE; ++i) acc[i] = 0.f;
      for (int64_t w = 0; w < words; ++w) {
        uint64_t bits = static_cast<uint64_t>(m[w]);
        while (bits) {
          int j = __builtin_ctzll(bits);
          bits &= bits - 1;
          float wv = to_f(*v++);
          const float* xp = xb + (w * 64 + j) * TILE;
          for (int i = 0; i < TILE; ++i) acc[i] += wv * xp[i];
        }
      }
#endif
      const int64_t t0 = tile * TILE;
      for (int i = 0; i < TILE && t0 + i < ntok; ++i) y[(t0 + i) * rows + r] = acc[i];
    }
  }
}

template <typename T>
void densify_impl(const int64_t* mask, const T* vals, const int64_t* off, T* out, int64_t rows, int64_t words,
                  int64_t cols) {
  const int nt = at::get_num_threads();
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t r = 0; r < rows; ++r) {
    T* o = out + r * cols;
    std::memset(static_cast<void*>(o), 0, sizeof(T) * cols);
    const T* v = vals + off[r];
    for (int64_t w = 0; w < words; ++w) {
      uint64_t bits = static_cast<uint64_t>(mask[r * words + w]);
      while (bits) {
        int j = __builtin_ctzll(bits);
        bits &= bits - 1;
        o[w * 64 + j] = *v++;
      }
    }
  }
}

void check(const torch::Tensor& mask, const torch::Tensor& vals, const torch::Tensor& off) {
  TORCH_CHECK(mask.dtype() == torch::kInt64 && mask.dim() == 2 && mask.is_contiguous(), "mask: int64 2-D contiguous");
  TORCH_CHECK(off.dtype() == torch::kInt64 && off.numel() == mask.size(0) + 1 && off.is_contiguous(), "row_offsets");
  TORCH_CHECK(vals.dim() == 1 && vals.is_contiguous(), "values: 1-D contiguous");
}

#define DISPATCH(VALS, FN, ...)                                                               \
  switch (VALS.scalar_type()) {                                                               \
    case torch::kFloat: FN<float>(__VA_ARGS__, VALS.data_ptr<float>()); break;                \
    case torch::kBFloat16: FN<at::BFloat16>(__VA_ARGS__, VALS.data_ptr<at::BFloat16>()); break; \
    case torch::kHalf: FN<at::Half>(__VA_ARGS__, VALS.data_ptr<at::Half>()); break;            \
    default: TORCH_CHECK(false, "values dtype must be float32, bfloat16 or float16");          \
  }

template <typename T>
void spmv_call(const torch::Tensor* a, const T* v) {
  const auto& mask = a[0]; const auto& off = a[1]; const auto& x = a[2]; auto& y = const_cast<torch::Tensor&>(a[3]);
  spmv_impl<T>(mask.data_ptr<int64_t>(), v, off.data_ptr<int64_t>(), x.data_ptr<float>(), y.data_ptr<float>(),
               mask.size(0), mask.size(1), x.size(0));
}
template <typename T>
void spmm_call(const torch::Tensor* a, int64_t ntok, const T* v) {
  const auto& mask = a[0]; const auto& off = a[1]; const auto& xt = a[2]; auto& y = const_cast<torch::Tensor&>(a[3]);
  spmm_impl<T>(mask.data_ptr<int64_t>(), v, off.data_ptr<int64_t>(), xt.data_ptr<float>(), y.data_ptr<float>(),
               mask.size(0), mask.size(1), ntok);
}
template <typename T>
void densify_call(const torch::Tensor* a, int64_t cols, const T* v) {
  const auto& mask = a[0]; const auto& off = a[1]; auto& out = const_cast<torch::Tensor&>(a[2]);
  densify_impl<T>(mask.data_ptr<int64_t>(), v, off.data_ptr<int64_t>(), out.data_ptr<T>(), mask.size(0),
                  mask.size(1), cols);
}

}  // namespace

// x: [ntok, words*64] fp32 contiguous, zero padded; returns y [ntok, rows] fp32
torch::Tensor spmv(torch::Tensor mask, torch::Tensor values, torch::Tensor row_offsets, torch::Tensor x) {
  check(mask, values, row_offsets);
  TORCH_CHECK(x.dtype() == torch::kFloat && x.dim() == 2 && x.is_contiguous() && x.size(1) == mask.size(1) * 64,
              "x: fp32 [ntok, words*64] contiguous");
  auto y = torch::empty({x.size(0), mask.size(0)}, x.options());
  const torch::Tensor a[4] = {mask, row_offsets, x, y};
  DISPATCH(values, spmv_call, a);
  return y;
}

// xt: [ntiles, words*64, 16] fp32 contiguous, zero padded; returns y [ntok, rows] fp32
torch::Tensor spmm(torch::Tensor mask, torch::Tensor values, torch::Tensor row_offsets, torch::Tensor xt,
                   int64_t ntok) {
  check(mask, values, row_offsets);
  TORCH_CHECK(xt.dtype() == torch::kFloat && xt.dim() == 3 && xt.is_contiguous() && xt.size(1) == mask.size(1) * 64 &&
                  xt.size(2) == TILE && xt.size(0) * TILE >= ntok,
              "xt: fp32 [ntiles, words*64, 16] contiguous");
  auto y = torch::empty({ntok, mask.size(0)}, xt.options());
  const torch::Tensor a[4] = {mask, row_offsets, xt, y};
  DISPATCH(values, spmm_call, a, ntok);
  return y;
}

// The whole SparseLinear forward for the kernel paths in one call (the per-call Python glue it replaces cost
// ~25 us, as much as a small layer's matvec): x [..., in_features] of any float dtype -> [..., rows] in x's dtype.
// Up to `spmv_max` tokens one streaming pass per token, more in 16-token tiles; fp32 accumulation, bias added in fp32.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& mask, const torch::Tensor& values,
                     const torch::Tensor& row_offsets, const c10::optional<torch::Tensor>& bias, int64_t in_features,
                     int64_t spmv_max) {
  TORCH_CHECK(x.size(-1) == in_features, "x: last dimension must be in_features");
  const int64_t n = in_features ? x.numel() / in_features : 0, cpad = mask.size(1) * 64, pad = cpad - in_features;
  auto x2 = x.reshape({n, in_features});
  if (x2.scalar_type() != torch::kFloat) x2 = x2.to(torch::kFloat);
  torch::Tensor y;
  if (n <= spmv_max) {
    x2 = pad ? at::constant_pad_nd(x2, {0, pad}) : x2.contiguous();
    y = spmv(mask, values, row_offsets, x2);
  } else {
    const int64_t tiles = (n + TILE - 1) / TILE;
    auto xt = at::constant_pad_nd(x2, {0, pad, 0, tiles * TILE - n}).view({tiles, TILE, cpad}).transpose(1, 2);
    y = spmm(mask, values, row_offsets, xt.contiguous(), n);
  }
  if (bias.has_value() && bias->defined()) y.add_(bias->to(torch::kFloat));
  if (x.scalar_type() != torch::kFloat) y = y.to(x.scalar_type());
  auto sizes = x.sizes().vec();
  sizes.back() = mask.size(0);
  return y.view(sizes);
}

torch::Tensor densify_into(torch::Tensor mask, torch::Tensor values, torch::Tensor row_offsets, torch::Tensor out) {
  check(mask, values, row_offsets);
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(0) == mask.size(0) &&
                  out.size(1) <= mask.size(1) * 64 && out.scalar_type() == values.scalar_type(),
              "out: contiguous [rows, cols] of the values' dtype");
  const int64_t cols = out.size(1);
  const torch::Tensor a[3] = {mask, row_offsets, out};
  DISPATCH(values, densify_call, a, cols);
  return out;
}

torch::Tensor densify(torch::Tensor mask, torch::Tensor values, torch::Tensor row_offsets, int64_t cols) {
  return densify_into(mask, values, row_offsets, torch::empty({mask.size(0), cols}, values.options()));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("spmv", &spmv, "bitmask sparse matrix x few vectors (fp32 accumulation)");
  m.def("spmm", &spmm, "bitmask sparse matrix x 16-token tiles (fp32 accumulation)");
  m.def("linear", &linear, "SparseLinear forward on the kernel paths (x of any float dtype)", py::arg("x"),
        py::arg("mask"), py::arg("values"), py::arg("row_offsets"), py::arg("bias"), py::arg("in_features"),
        py::arg("spmv_max"));
  m.def("densify", &densify, "dense weight of a bitmask-packed matrix");
  m.def("densify_into", &densify_into, "dense weight of a bitmask-packed matrix, written into `out`");
  m.attr("TILE") = TILE;
}
