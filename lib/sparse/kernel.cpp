// Bitmask-packed sparse Linear kernels (see format.py for the layout). fp32 accumulation for every value dtype.
//
// One extension, three instruction sets chosen at run time (the `isa` argument of every entry point; kernels.py
// picks the best the CPU has, ATP_SPARSE_ISA forces one): 2 = AVX-512 (F, BW, VL, DQ + BMI2; bf16/fp16 values also
// need VBMI2, else they take AVX2), 1 = AVX2 (+FMA, F16C, BMI2), 0 = portable C++. The file is compiled for the
// baseline x86-64 (no -march=native); the SIMD code sits in regions compiled for their instruction set
// (function-level target attributes), so one build runs on any CPU. The AVX-512 region may use VBMI2 only in code
// for 16-bit values.
//
// decode:  y[t, r] = sum_j W[r, j] x[t, j] for a few tokens: one pass over each packed row, the expanded weights
//          reused for up to 4 tokens at a time (more tokens: the row is re-read from L1). grouped_decode_into runs
//          several matrices (a mixture-of-experts layer's routed experts) in one call.
// tiled:   many tokens (prefill): per nonzero, its value times a vector of 16-token tiles of inputs (inputs
//          transposed, tiles grouped: see tile_inputs); the SIMD kernels decode each row's columns once per group
//          of tiles (AVX-512 up to 8, AVX2 up to 4) and column block. bf16 weights and bf16 inputs on AVX512_BF16:
//          on the dot products, each two consecutive nonzeros of a row together against their two columns'
//          inputs interleaved at run time (pair_item); their decode from 5 tokens, up to 8 in one pass over the
//          weight (dot_decode_rows), more in column blocks with rows three at a time (dot_block_item).
// densify: the dense weight, for the dense-GEMM path of large batches.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <type_traits>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define ATP_X86 1
#include <immintrin.h>
#else
#define ATP_X86 0
#endif
// AMX intrinsics arrived in GCC 11 and clang 12: an older compiler builds everything but the AMX path.
#if ATP_X86 && defined(__x86_64__) && defined(__linux__) && \
    (defined(__clang__) ? __clang_major__ >= 12 : __GNUC__ >= 11)
#define ATP_AMX 1  // AMX tiles need the kernel's permission (arch_prctl), asked for once per process
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define ATP_AMX 0
#endif

// AVX512_BF16 intrinsics (vdpbf16ps) arrived in GCC 10 and clang 9.
#if ATP_X86 && (defined(__clang__) ? __clang_major__ >= 9 : __GNUC__ >= 10)
#define ATP_BF16_DOT 1
#include <cpuid.h>
#else
#define ATP_BF16_DOT 0
#endif

#if ATP_X86 && defined(__clang__)
#define ATP_PRAGMA(x) _Pragma(#x)
#define ATP_TARGET_BEGIN(features) ATP_PRAGMA(clang attribute push(__attribute__((target(features))), apply_to = function))
#define ATP_TARGET_END _Pragma("clang attribute pop")
#elif ATP_X86
#define ATP_PRAGMA(x) _Pragma(#x)
#define ATP_TARGET_BEGIN(features) _Pragma("GCC push_options") ATP_PRAGMA(GCC target(features))
#define ATP_TARGET_END _Pragma("GCC pop_options")
#endif

namespace {

enum Isa : int64_t { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

// How far ahead of the packed values the decode loops prefetch, into L1 and into L2 (0: off). Measured on the
// 7B block at 70% (Xeon, AVX-512, 2 threads): 512 B into L1 alone gave 1.83x dense, 2 KiB 1.97x, 2 KiB + 16 KiB
// into L2 2.10x, + 32 KiB about the same; the AVX2 loop went from 1.27x to 1.89x. One row's values are ~5 KiB
// at 4096 columns, so the far prefetch runs into the next rows (consecutive in memory).
#ifndef ATP_PREFETCH_BYTES
#define ATP_PREFETCH_BYTES 2048
#endif
#ifndef ATP_PREFETCH_L2
#define ATP_PREFETCH_L2 32768
#endif

#ifndef DECODE1_PREFETCH_L1  // batch-1 decode (rows4_*): how far ahead in each row's values, into L1
#define DECODE1_PREFETCH_L1 1024
#endif
#ifndef DECODE1_L2_GROUPS  // and how many groups of four rows ahead into L2 (0: none)
#define DECODE1_L2_GROUPS 1
#endif
constexpr int TILE = 16;       // tokens per tile of the tiled kernels
constexpr int DECODE_NT = 4;   // tokens per pass of the decode kernels
constexpr int64_t ROW_CHUNK = 16;
// Decode work (rows x mask words x tokens) below which the decode runs on the calling thread alone: there,
// forking the team costs more than the work it would split.
constexpr int64_t PARALLEL_MIN_WORK = 1024;
constexpr int GROUP_TILES = 8;       // AVX-512 tiled kernel: tiles per group (128 tokens)
constexpr int GROUP_TILES_AVX2 = 4;  // AVX2: 4 tiles (64 tokens) are 8 accumulators of its 16 vector registers
// The packed-pairs kernel (bf16 on AVX512_BF16, pair_item): its inputs in chunks of 32 tokens, in groups of up to 8
// chunks (16 accumulators). Groups of 256 tokens against 128 (the AVX-512 kernel's), 4096x4096 at 70%, Zen 5, in one
// process: 3-7% less time at 256-1024 tokens (half the passes over the weight, half the column decoding per token).
constexpr int PAIR_CHUNK = 32;
constexpr int64_t PAIR_CHUNKS = 8;
constexpr int64_t PAIR_GROUP = PAIR_CHUNK * PAIR_CHUNKS;
#ifndef ATP_TILED_ROWS  // tiled kernels: rows per work item (AVX2's standard items; tall and short items of
#define ATP_TILED_ROWS 96   // both), and the L1 bytes partial sums and one block of inputs share (tiled_block_cols)
#endif
#ifndef ATP_TILED_L1
#define ATP_TILED_L1 65536
#endif
constexpr int64_t TILED_ROWS = ATP_TILED_ROWS;
// The tiled kernels' tall items (tiled_rows): twice the rows. AVX-512: their partial sums left to L2 and 32 KiB of
// inputs per column block at 128 tokens.
constexpr int64_t TILED_TALL_ROWS = 2 * TILED_ROWS;
constexpr int64_t TILED_TALL_BYTES = 2 * ATP_TILED_L1;
// The AVX2 kernel's budgets (its groups are half as wide, 64 tokens): 96-row items in 96-column blocks (24 KiB of
// partial sums + 24 KiB of inputs at 64 tokens), tall items in 64-column blocks (48 + 16 KiB). Tuned (tiled_rows)
// on a Xeon's 48 KiB L1d; a Zen 3 has 32 KiB (not measured there).
constexpr int64_t TILED_L1_AVX2 = 48 * 1024;
constexpr int64_t TILED_TALL_BYTES_AVX2 = 64 * 1024;
// The AVX-512 kernel's standard items: 64 rows, in 64-column blocks at 128 tokens (32 KiB of partial sums + 32 KiB
// of inputs). Against 96 rows in 32-column blocks (tuned on a Sapphire Rapids VM), on an Emerald Rapids VM (48 KiB
// L1d, 2 threads, fp32, 128-2048 tokens): the 7B shapes' sparse time 2-16% lower at 50% and 10-21% at 70%,
// SmolLM2's layers 3-28% at 50%; 32 or 48 rows, or 48- or 80-column blocks, were no better. Not re-measured on the
// Sapphire Rapids VM (same L1d and L2). (With 96-row items, prefetching the next block into L1 was 3-9% slower; with
// these, into L2, faster: prefetch_block_share.)
#ifndef ATP_TILED_ROWS_AVX512
#define ATP_TILED_ROWS_AVX512 64
#endif
constexpr int64_t TILED_ROWS_AVX512 = ATP_TILED_ROWS_AVX512;
// Both kernels' short items: a call of one token group of at most 96 tokens on a weight wider than 2048 columns,
// in 48-row items whose partial sums and inputs share 48 KiB (tiled_rows).
constexpr int64_t TILED_SHORT_TILES = 6;
constexpr int64_t TILED_SHORT_ROWS = TILED_ROWS / 2;
constexpr int64_t TILED_SHORT_BYTES = 48 * 1024;
inline int64_t group_tiles(int64_t isa) { return isa == ISA_AVX512 ? GROUP_TILES : GROUP_TILES_AVX2; }

// Work item i of tile_inputs_avx512 / tile_inputs_avx2 (groups x column blocks of `width` columns): its group's
// tokens (`w` of them from t0, in `tiles` tiles of 16) and its first column c0.
struct InputBlock {
  int64_t c0, t0, tiles, w;
};
inline InputBlock input_block(int64_t i, int64_t blocks, int64_t width, int64_t per, int64_t ntiles) {
  const int64_t g = i / blocks, tiles = std::min(per, ntiles - g * per);
  return {i % blocks * width, g * per * TILE, tiles, tiles * TILE};
}

// Columns per block of the tiled kernels. Each work item streams its group's inputs once, block by block, so more
// rows per item mean less input traffic (128 tokens x 11008 columns are 5.6 MB, more than L2): measured on 2048
// rows at 512-1024 tokens (1 thread, fp32, 70%, AVX-512), 16 rows per item ran at 0.71-0.97x dense, 48 rows
// 1.0-1.2x, 96 rows with 32-column blocks (48 KiB of partial sums + 16 KiB of inputs for 128 tokens) 1.06-1.7x.
// Fewer tokens: wider blocks.
inline int64_t tiled_block_cols(int G, int64_t rows = TILED_ROWS, int64_t budget = ATP_TILED_L1) {
  const int64_t slab = budget - rows * G * 64;
  return std::min<int64_t>(2048, std::max<int64_t>(16, slab / (G * 64) / 16 * 16));
}

// Rows per work item of the tiled kernels, and the L1 budget that sets their column blocks. Every item pays a start
// (its partial sums zeroed, its inputs streamed block by block, its sums written out). Three kinds:
// - standard: AVX2 96 rows per token group in 96-column blocks (TILED_L1_AVX2), AVX-512 64 rows in 64-column blocks
//   (TILED_ROWS_AVX512).
// - tall: a weight of at most TILED_TALL_ROWS rows and 2048 columns (SmolLM2's 192x576 k/v projections) in one item
//   per token group, where every thread still gets two items (else one sits idle: 192x576 at 128 tokens 0.92 ->
//   0.62x); 96 rows could not spread the start.
// - short: one token group of at most 96 tokens on a weight wider than 2048 columns, 48 rows in 48 KiB.
// Measured against dense, 2 threads, Xeon (fp32; AVX2 as an AVX2-only process against an AVX2-capped dense GEMM):
// tall, AVX-512, 192x576 at 512 tokens 0.74-0.78 -> 0.85-0.95x at 50% and 0.90-0.94 -> 1.09-1.26x at 70% (576- and
// 1536-row layers in 192-row items: -4% to +5%); tall, AVX2, 192x576 and 192x1536 at 512-2048 tokens 0.90-0.98 ->
// 1.05-1.10x at 50%, 1.16-1.28 -> 1.37-1.46x at 70% (in 64-column blocks; 32 or 128 were slower). AVX2 standard
// items in 96-column blocks instead of 160: the 7B shapes with 11008 rows or columns at 64-1024 tokens, 70%, +13-20%
// (11008x4096 at 256 tokens 1.32-1.38 -> 1.54-1.57x), +3-8% at 50%; 4096x4096 and SmolLM2's layers +-3%. Short, on
// 11008x4096 and 4096x11008: AVX-512 at 32-96 tokens 0.94-1.17x -> 1.03-1.39x at 50% (mostly 1.2-1.3x), 1.40-1.81x
// -> 1.66-2.19x at 70%, 4096x4096 +-5% at 70% and +0-25% at 50%; AVX2 at 32-64 tokens 0.87-1.09x -> 1.11-1.38x and
// 1.36-1.90x -> 1.93-2.13x. They were 6% slower at 112 tokens (70%), mixed at 16, no better on SmolLM2's weights.
struct TiledItems {
  int64_t rows, l1_budget;  // rows per item; bytes its partial sums and one block of inputs share (tiled_block_cols)
};
inline TiledItems tiled_rows(int64_t rows, int64_t cols, int64_t ntiles, int64_t threads, int64_t isa) {
  const int64_t per = group_tiles(isa), groups = (ntiles + per - 1) / per;
  if (cols > 2048 && ntiles <= std::min(TILED_SHORT_TILES, per)) return TiledItems{TILED_SHORT_ROWS, TILED_SHORT_BYTES};
  const bool tall = rows <= TILED_TALL_ROWS && cols <= 2048 && groups >= 2 * threads;
  if (isa == ISA_AVX2)
    return tall ? TiledItems{TILED_TALL_ROWS, TILED_TALL_BYTES_AVX2} : TiledItems{TILED_ROWS, TILED_L1_AVX2};
  return tall ? TiledItems{TILED_TALL_ROWS, TILED_TALL_BYTES} : TiledItems{TILED_ROWS_AVX512, ATP_TILED_L1};
}

// What one call works on. Pointers are raw; the kernels below never allocate (except per-thread scratch).
struct Op {
  const int64_t* mask;
  const void* vals;
  const int64_t* off;
  const float* x;  // decode: [ntok][cpad]; tiled: tile_inputs' layout
  float* y;        // [ntok][rows]
  int64_t rows, words, ntok;
  int64_t nvals = 0;  // values' length: kernels read whole vectors of them up to here (see expand32)
  // The packed-pairs kernel only: y as bf16 [ntok][rows] with bias (fp32, or none) added, written instead of y.
  at::BFloat16* ybf16 = nullptr;
  const float* bias = nullptr;
};

// f(std::integral_constant<int, NT>(), t0) for each pass of the decode over ntok tokens, at most DECODE_NT from t0:
// the decode kernels take their token count as a template parameter (one accumulator set per token, in registers).
template <typename F>
inline void for_token_passes(int64_t ntok, F&& f) {
  static_assert(DECODE_NT == 4, "one case per token count");
  for (int64_t t0 = 0; t0 < ntok; t0 += DECODE_NT) {
    switch (std::min<int64_t>(DECODE_NT, ntok - t0)) {
      case 1: f(std::integral_constant<int, 1>(), t0); break;
      case 2: f(std::integral_constant<int, 2>(), t0); break;
      case 3: f(std::integral_constant<int, 3>(), t0); break;
      default: f(std::integral_constant<int, 4>(), t0); break;
    }
  }
}

// f(std::integral_constant<int, n>()) for a count n of 1 to 8 known only at run time (the tiled kernels' tiles per
// group, the dot-product decode's tokens per pass); more than 8 counts as 8.
template <typename F>
inline void with_count_up_to_8(int64_t n, F&& f) {
  switch (n) {
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    case 4: f(std::integral_constant<int, 4>()); break;
    case 5: f(std::integral_constant<int, 5>()); break;
    case 6: f(std::integral_constant<int, 6>()); break;
    case 7: f(std::integral_constant<int, 7>()); break;
    default: f(std::integral_constant<int, 8>()); break;
  }
}

template <typename T> inline float to_f(T v) { return static_cast<float>(v); }
// The bits of a 16-bit value (bf16, fp16), for the broadcasts.
inline short raw16(const void* v) {
  short raw;
  std::memcpy(&raw, v, 2);
  return raw;
}

// A tiled work item's start: each row's first packed value, and its partial sums part[row][token] at zero.
template <typename T>
inline void start_tiled_item(const Op& op, int64_t r0, int64_t nrows, int64_t W, float* part, const T** cur) {
  const T* vals = static_cast<const T*>(op.vals);
  for (int64_t i = 0; i < nrows; ++i) cur[i] = vals + op.off[r0 + i];
  std::fill(part, part + nrows * W, 0.f);
}

// Row i's share (of nrows) of the next column block's inputs, `bytes` from `next`, into L2 (prefetcht1). A block's
// first row otherwise waits on L3 for its inputs in the order its nonzeros pick, which no hardware prefetcher follows.
// AVX-512 items (64 x 64), Emerald Rapids VM, 2 threads: 3-6% less time at 256-2048 tokens on the 7B shapes at 50%,
// 3-9% at 70%, SmolLM2's layers and 32-128 tokens within noise; into L1 (prefetcht0) a little less, two blocks ahead
// no better. The AVX2 kernel (96 x 96, 64-token groups) ran 10-20% slower with it.
inline void prefetch_block_share(const void* next, int64_t bytes, int64_t i, int64_t nrows) {
  const char* p = static_cast<const char*>(next);
  const int64_t lines = bytes / 64, per = (lines + nrows - 1) / nrows;
  for (int64_t l = i * per, end = std::min(lines, l + per); l < end; ++l) __builtin_prefetch(p + l * 64, 0, 2);
}

// A tiled work item's sums, part[row][token] (W tokens per row), into y[token][row] for the tokens that exist.
inline void store_tiled_sums(const Op& op, const float* part, int64_t W, int64_t t0, int64_t r0, int64_t nrows) {
  const int64_t cnt = std::min<int64_t>(W, op.ntok - t0);
  for (int64_t j = 0; j < cnt; ++j) {
    float* y = op.y + (t0 + j) * op.rows + r0;
    for (int64_t i = 0; i < nrows; ++i) y[i] = part[i * W + j];
  }
}

// ------------------------------------------------------------------------------------------ portable C++
template <typename T>
void decode_rows_scalar(const Op& op, int64_t r0, int64_t r1) {
  const T* vals = static_cast<const T*>(op.vals);
  const int64_t cpad = op.words * 64;
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t t0 = 0; t0 < op.ntok; t0 += DECODE_NT) {
      const int64_t nt = std::min<int64_t>(DECODE_NT, op.ntok - t0);
      float acc[DECODE_NT] = {0.f, 0.f, 0.f, 0.f};
      const T* v = vals + op.off[r];
      for (int64_t w = 0; w < op.words; ++w) {
        uint64_t bits = static_cast<uint64_t>(op.mask[r * op.words + w]);
        while (bits) {
          const int j = __builtin_ctzll(bits);
          bits &= bits - 1;
          const float wv = to_f(*v++);
          for (int64_t t = 0; t < nt; ++t) acc[t] += wv * op.x[(t0 + t) * cpad + w * 64 + j];
        }
      }
      for (int64_t t = 0; t < nt; ++t) op.y[(t0 + t) * op.rows + r] = acc[t];
    }
  }
}

template <typename T>
void tiled_rows_scalar(const Op& op, int64_t tile, int64_t r0, int64_t r1) {
  const T* vals = static_cast<const T*>(op.vals);
  const int64_t cpad = op.words * 64;
  const float* xb = op.x + tile * cpad * TILE;
  for (int64_t r = r0; r < r1; ++r) {
    float acc[TILE] = {};
    const T* v = vals + op.off[r];
    for (int64_t w = 0; w < op.words; ++w) {
      uint64_t bits = static_cast<uint64_t>(op.mask[r * op.words + w]);
      while (bits) {
        const int j = __builtin_ctzll(bits);
        bits &= bits - 1;
        const float wv = to_f(*v++);
        const float* xp = xb + (w * 64 + j) * TILE;
        for (int i = 0; i < TILE; ++i) acc[i] += wv * xp[i];
      }
    }
    const int64_t t0 = tile * TILE;
    for (int i = 0; i < TILE && t0 + i < op.ntok; ++i) op.y[(t0 + i) * op.rows + r] = acc[i];
  }
}

template <typename T>
void densify_rows_scalar(const Op& op, T* out, int64_t cols, int64_t r0, int64_t r1) {
  const T* vals = static_cast<const T*>(op.vals);
  for (int64_t r = r0; r < r1; ++r) {
    T* o = out + r * cols;
    std::memset(static_cast<void*>(o), 0, sizeof(T) * cols);
    const T* v = vals + op.off[r];
    for (int64_t w = 0; w < op.words; ++w) {
      uint64_t bits = static_cast<uint64_t>(op.mask[r * op.words + w]);
      while (bits) {
        const int j = __builtin_ctzll(bits);
        bits &= bits - 1;
        o[w * 64 + j] = *v++;
      }
    }
  }
}

// How the AVX2 batch-1 decode expands fp32 and bf16 values (rows4_avx2_halves says why there are two ways): chosen
// by kernels.py from a measurement on this CPU (set_avx2_expand). The result is the same either way.
enum Avx2Expand : int64_t { EXPAND_PERMUTE = 0, EXPAND_HALVES = 1 };
int64_t avx2_expand_fp32 = EXPAND_PERMUTE, avx2_expand_bf16 = EXPAND_PERMUTE;

#if ATP_X86
// ------------------------------------------------------------------------------------------ row groups
// The decode's group of four consecutive rows (rows4_avx2, rows4_avx512): their value streams, their mask words,
// and the prefetches that keep the four streams ahead (rows4_avx512 says why).
template <typename T>
struct RowGroup {
  static constexpr int R = 4;
  const uint64_t* mask;
  int64_t words;
  const T* v[R];
  int64_t next_group;  // bytes from a value to the same position one group of rows on (the mean row, times R)
  RowGroup(const Op& op, int64_t r) : mask(reinterpret_cast<const uint64_t*>(op.mask + r * op.words)), words(op.words) {
    const T* vals = static_cast<const T*>(op.vals);
    for (int j = 0; j < R; ++j) v[j] = vals + op.off[r + j];
    next_group = (v[R - 1] - v[0]) * static_cast<int64_t>(sizeof(T)) * R / (R - 1);
  }
  // Mask word w (64 columns) of each row into k, and the prefetches that keep the eight streams (four of values,
  // four of masks) ahead: each row's values into L1 a little ahead and into L2 one group on (two lines, since a
  // word's values span 1.2 lines on average at 70%), and once per line of mask words the next group's mask line
  // into L1. The mask prefetch mattered most: without it the loop waited on the mask streams, which the hardware
  // prefetchers left short (7B block at 70%, fp32, 2 threads: 2.35x dense without, 2.6-2.8x with both).
  inline void next_word(int64_t w, uint64_t* k) const {
    for (int j = 0; j < R; ++j) {
      k[j] = mask[j * words + w];
      const char* at = reinterpret_cast<const char*>(v[j]);
      _mm_prefetch(at + DECODE1_PREFETCH_L1, _MM_HINT_T0);
      if (DECODE1_L2_GROUPS) {
        _mm_prefetch(at + DECODE1_L2_GROUPS * next_group, _MM_HINT_T1);
        _mm_prefetch(at + DECODE1_L2_GROUPS * next_group + 64, _MM_HINT_T1);
      }
      if ((w & 7) == 0) _mm_prefetch(reinterpret_cast<const char*>(mask + (j + R) * words + w), _MM_HINT_T0);
    }
  }
};

// ------------------------------------------------------------------------------------------ AVX2 + FMA
ATP_TARGET_BEGIN("avx2,fma,f16c,popcnt,bmi,bmi2")
// Tables in this region are constexpr: a constructor here is compiled for AVX2 and would run when the extension
// loads, on every CPU (SIGILL without AVX2; tests/sparse/test_sparse_portability.py runs one without).

// Expansion tables, one row per mask byte b: idx[i] = 8 + packed value number popcount(b & ((1 << i) - 1)) when bit
// i is set, else 0. vpermps reads only the low 3 bits of idx (the value's number); vpsignd then keeps a lane whose
// entry is positive and zeroes one whose entry is 0, so the same row places the values and zeroes the other lanes.
// int32 rows load straight into the permute's index (byte rows cost a widening shuffle per 8 columns on the same
// port as the permute; int32 rows with the zeroing of the time, a shift and an and-not, took 5-7% fewer cycles per
// 8 columns in cache). 64-byte rows also hold popcount(b) after idx, so the value pointer moves on by a load from
// the row already addressed instead of a popcnt. With the rotate below and 64-bit offsets (no register copies),
// two instructions fewer per 8 columns (fp32 10 -> 8, bf16 12 -> 10): the bf16 decode ran faster, the fp32 one no
// faster, and slower with 64-byte rows than with the 32-byte rows' half-size table beside its inputs in L1, so fp32
// keeps those and its popcnt. (7B block, 70%, AVX2 kernel, 2 threads, Emerald Rapids, medians: bf16 11.5-12.9 ->
// 10.5-11.4 ms, in L2 2.76 -> 2.46 cycles per 8 columns; fp32 9.7-10.2 ms before and after, 11.5-13.1 with 64-byte
// rows.)
template <int RowBytes>
struct SelectTable {
  static_assert(RowBytes == 32 || RowBytes == 64, "a row is idx, or idx then the count");
  static constexpr bool holds_counts = RowBytes == 64;
  static constexpr int row_shift = RowBytes == 64 ? 6 : 5;
  alignas(64) int32_t rows[256][RowBytes / 4] = {};
  constexpr SelectTable() {
    for (int b = 0; b < 256; ++b) {
      int k = 0;
      for (int i = 0; i < 8; ++i) rows[b][i] = ((b >> i) & 1) ? 8 + k++ : 0;
      if (holds_counts) rows[b][8] = k;
    }
  }
  // Byte i of a mask word times the row size, its row's byte offset: one rotate (BMI2's rorx, which leaves the word
  // in its register where a shift needs a copy first) and one and; 64-bit, so the row's loads take it as an index
  // with no zero-extension. (Extracting the byte and scaling it took three or four instructions: the 7B block's
  // decode as on an AVX2-only CPU 9.8-10.3 -> 9.6-10.0 ms fp32, 11.2 -> 10.6 ms bf16, 2 threads, Emerald Rapids.)
  static uint64_t offset(uint64_t word, int i) {
    const int right = (8 * i + 64 - row_shift) & 63;  // byte i to bits row_shift and up (byte 0: a left rotate)
    return ((word >> right) | (word << (64 - right))) & (uint64_t{0xFF} << row_shift);
  }
  __m256i row(uint64_t offset) const {
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(reinterpret_cast<const char*>(rows) + offset));
  }
  __m256i row_of(unsigned b) const { return _mm256_load_si256(reinterpret_cast<const __m256i*>(rows[b])); }
  int64_t count(uint64_t offset) const {  // popcount of the byte
    if constexpr (holds_counts)
      return *reinterpret_cast<const int32_t*>(reinterpret_cast<const char*>(rows) + offset + 32);
    else
      return __builtin_popcountll(offset);
  }
};
constexpr SelectTable<32> SELECT_ROWS32{};
constexpr SelectTable<64> SELECT_ROWS64{};
template <typename T>
constexpr const auto& select_table() {
  if constexpr (sizeof(T) == 4)
    return SELECT_ROWS32;
  else
    return SELECT_ROWS64;
}

// Eight packed values placed by `idx` (a SelectTable row), zeros where the mask bit is clear: a permute and one vpsignd
// (one micro-op on Intel cores since Haswell and AMD's since Zen 2). It replaced a shift + and-not on Intel (the 7B
// block's decode as on an AVX2-only CPU 10.5-11.0 -> 9.7-10.5 ms, 2 threads, Emerald Rapids) and a vblendvps on
// AMD (one micro-op there too: not measured on AMD).
inline __m256 expand8(__m256 vals, __m256i idx) {
  const __m256 placed = _mm256_permutevar8x32_ps(vals, idx);
  return _mm256_castsi256_ps(_mm256_sign_epi32(_mm256_castps_si256(placed), idx));
}

template <typename T> inline __m256 load8(const T* p);
template <> inline __m256 load8<float>(const float* p) { return _mm256_loadu_ps(p); }
template <> inline __m256 load8<at::BFloat16>(const at::BFloat16* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
template <> inline __m256 load8<at::Half>(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline float hsum8(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// One row against NT tokens. Per 8 columns: a table row, 8 packed values, one permute and the zeroing (expand8: the
// expanded weights), then one FMA per token. Mask bytes come out of one 64-bit word by shifts, the value pointer
// advances by popcount. U accumulators per token keep the FMA chains independent.
template <typename T, int NT>
inline void row_avx2(const uint8_t* m, const T* v, const float* x, int64_t ldx, int64_t nbytes, float* out,
                     int64_t ostride) {
  constexpr int U = NT == 1 ? 4 : (NT == 2 ? 2 : 1);
  const auto& table = select_table<T>();
  __m256 acc[NT][U];
  for (int t = 0; t < NT; ++t)
    for (int u = 0; u < U; ++u) acc[t][u] = _mm256_setzero_ps();
  for (int64_t g = 0; g < nbytes; g += 8) {  // one 64-bit mask word (64 columns) per iteration
    uint64_t word;
    std::memcpy(&word, m + g, 8);
    if (ATP_PREFETCH_BYTES) _mm_prefetch(reinterpret_cast<const char*>(v) + ATP_PREFETCH_BYTES, _MM_HINT_T0);
    if (ATP_PREFETCH_L2) {
      _mm_prefetch(reinterpret_cast<const char*>(v) + ATP_PREFETCH_L2, _MM_HINT_T1);
      if ((g & 24) == 0) _mm_prefetch(reinterpret_cast<const char*>(m + g) + ATP_PREFETCH_L2 / 8, _MM_HINT_T1);
    }
    const float* xg = x + g * 8;
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      const auto o = table.offset(word, i);
      const __m256 w = expand8(load8(v), table.row(o));
      for (int t = 0; t < NT; ++t) acc[t][i % U] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xg + t * ldx + 8 * i), acc[t][i % U]);
      v += table.count(o);
    }
  }
  for (int t = 0; t < NT; ++t) {
    __m256 s = acc[t][0];
    for (int u = 1; u < U; ++u) s = _mm256_add_ps(s, acc[t][u]);
    out[t * ostride] = hsum8(s);
  }
}

// Batch-1 decode, four consecutive rows at a time (as rows4_avx512, which says why).
template <typename T>
inline void rows4_avx2(RowGroup<T> g, const float* x, float* out) {
  constexpr int R = RowGroup<T>::R;
  const auto& table = select_table<T>();
  __m256 acc[R];
  for (int j = 0; j < R; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t w = 0; w < g.words; ++w) {
    uint64_t k[R];
    g.next_word(w, k);
    const float* xw = x + 64 * w;
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      const __m256 xv = _mm256_loadu_ps(xw + 8 * i);
#pragma GCC unroll 4
      for (int j = 0; j < R; ++j) {
        const auto o = table.offset(k[j], i);
        const __m256 wv = expand8(load8(g.v[j]), table.row(o));
        acc[j] = _mm256_fmadd_ps(wv, xv, acc[j]);
        g.v[j] += table.count(o);
      }
    }
  }
  for (int j = 0; j < R; ++j) out[j] = hsum8(acc[j]);
}

// The batch-1 decode's second way to expand eight packed values: in two 128-bit halves with in-lane byte shuffles
// (vpshufb) instead of one cross-lane permute. Cores that run 256-bit operations as two 128-bit halves (AMD Zen 1
// and Zen+) take several micro-ops and cycles for vpermps; there the halves took two thirds of the time or less
// (EPYC family 23 model 1, one thread, ns per 8 columns of a row at 70%, 64 x 4096 fp32 in L2: permute 2.16, halves
// 1.36, a bare load and FMA 0.78; the 7B block from memory, 2 threads: fp32 37.8 -> 22.9 ms, bf16 1.85x faster).
// Where the permute is one micro-op (Intel since Haswell) the halves need twice the shuffles, loads and FMAs.
// kernels.py times both on the CPU it runs on and keeps the faster (set_avx2_expand); the sums are the same bits
// either way (the same FMA per lane, in the same order).
//
// Per mask byte b, 32 bytes of vpshufb control: the low half's four lanes (columns 0-3) and the high half's (4-7),
// each placing its values' bytes in the lanes whose bits are set and zeroing the rest (0x80). fp32: the low half
// reads the 4 values at v; the high half the 4 that end where the byte's values end (v + popcount(b) - 4), so its
// popcount(b >> 4) values are the last of those four and the address comes from the pointer's advance, which is
// computed anyway (reading after the low half's popcount instead cost an and and a popcount more per byte: 3-5%
// slower). That read starts up to 4 values before the byte's own, so the first rows of a matrix, with fewer than 4
// values before them, take the permute (decode_rows_avx2). bf16: both halves read the same 8 values at v (16 bytes)
// and put each value's two bytes at the top of its lane, which makes it the fp32 of that value.
struct HalvesTable {
  alignas(64) uint8_t ctl[256][32] = {};
  constexpr explicit HalvesTable(int value_bytes) {
    for (int b = 0; b < 256; ++b)
      for (int half = 0; half < 2; ++half) {
        // the position of this half's first value in the 16 bytes it reads
        int k = value_bytes == 4 ? (half ? 4 - __builtin_popcount(b >> 4) : 0)
                                 : __builtin_popcount(b & (half ? 15 : 0));
        for (int i = 0; i < 4; ++i) {
          const bool set = (b >> (4 * half + i)) & 1;
          for (int y = 0; y < 4; ++y) {
            const int from = value_bytes == 4 ? 4 * k + y : (y < 2 ? -1 : 2 * k + y - 2);  // bf16: low 2 bytes 0
            ctl[b][16 * half + 4 * i + y] = set && from >= 0 ? static_cast<uint8_t>(from) : 0x80;
          }
          k += set;
        }
      }
  }
  const __m128i* half(uint64_t offset, int h) const {
    return reinterpret_cast<const __m128i*>(reinterpret_cast<const char*>(ctl) + offset + 16 * h);
  }
};
constexpr HalvesTable HALVES_FP32{4};
constexpr HalvesTable HALVES_BF16{2};

// The byte at `offset` (SelectTable<32>::offset: the byte times 32) of a row whose values are at v, expanded as two
// halves of fp32 lanes; `next` is v advanced past the byte's values.
template <typename T> inline void expand_halves(const T* v, const T* next, uint64_t offset, __m128& low, __m128& high);
template <>
inline void expand_halves<float>(const float* v, const float* next, uint64_t offset, __m128& low, __m128& high) {
  low = _mm_castsi128_ps(_mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)),
                                          _mm_load_si128(HALVES_FP32.half(offset, 0))));
  high = _mm_castsi128_ps(_mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(next - 4)),
                                           _mm_load_si128(HALVES_FP32.half(offset, 1))));
}
template <>
inline void expand_halves<at::BFloat16>(const at::BFloat16* v, const at::BFloat16*, uint64_t offset, __m128& low,
                                        __m128& high) {
  const __m128i vals = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v));
  low = _mm_castsi128_ps(_mm_shuffle_epi8(vals, _mm_load_si128(HALVES_BF16.half(offset, 0))));
  high = _mm_castsi128_ps(_mm_shuffle_epi8(vals, _mm_load_si128(HALVES_BF16.half(offset, 1))));
}

// rows4_avx2 with the halves expansion (fp32 and bf16 values): each row's sum in two 128-bit accumulators, the
// low and high halves of rows4_avx2's one.
template <typename T>
inline void rows4_avx2_halves(RowGroup<T> g, const float* x, float* out) {
  constexpr int R = RowGroup<T>::R;
  __m128 low[R], high[R];
  for (int j = 0; j < R; ++j) low[j] = high[j] = _mm_setzero_ps();
  for (int64_t w = 0; w < g.words; ++w) {
    uint64_t k[R];
    g.next_word(w, k);
    const float* xw = x + 64 * w;
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      const __m128 xl = _mm_loadu_ps(xw + 8 * i), xh = _mm_loadu_ps(xw + 8 * i + 4);
#pragma GCC unroll 4
      for (int j = 0; j < R; ++j) {
        const auto o = SelectTable<32>::offset(k[j], i);
        const T* next = g.v[j] + __builtin_popcountll(o);
        __m128 wl, wh;
        expand_halves(g.v[j], next, o, wl, wh);
        low[j] = _mm_fmadd_ps(wl, xl, low[j]);
        high[j] = _mm_fmadd_ps(wh, xh, high[j]);
        g.v[j] = next;
      }
    }
  }
  for (int j = 0; j < R; ++j) out[j] = hsum8(_mm256_set_m128(high[j], low[j]));
}

template <typename T>
void decode_rows_avx2(const Op& op, int64_t r0, int64_t r1) {
  const T* vals = static_cast<const T*>(op.vals);
  const int64_t ldx = op.words * 64, nbytes = op.words * 8;
  int64_t r = r0;
  if (op.ntok == 1)
    for (; r + RowGroup<T>::R <= r1; r += RowGroup<T>::R)
      if constexpr (std::is_same<T, at::Half>::value)  // fp16: the permute only (no halves written for it)
        rows4_avx2<T>(RowGroup<T>(op, r), op.x, op.y + r);
      else if ((std::is_same<T, float>::value ? avx2_expand_fp32 : avx2_expand_bf16) == EXPAND_HALVES &&
               (!std::is_same<T, float>::value || op.off[r] >= 4))  // fp32: 4 values before (expand_halves)
        rows4_avx2_halves<T>(RowGroup<T>(op, r), op.x, op.y + r);
      else
        rows4_avx2<T>(RowGroup<T>(op, r), op.x, op.y + r);
  for (; r < r1; ++r) {
    const uint8_t* m = reinterpret_cast<const uint8_t*>(op.mask + r * op.words);
    const T* v = vals + op.off[r];
    for_token_passes(op.ntok, [&](auto nt, int64_t t0) {
      row_avx2<T, decltype(nt)::value>(m, v, op.x + t0 * ldx, ldx, nbytes, op.y + t0 * op.rows + r, op.rows);
    });
  }
}

// pshufb controls for 16-bit values, one row per mask byte: lane i <- packed value number popcount(b & ((1 << i) - 1))
// when bit i is set, else zero (0x80 in both bytes).
struct SelectTable16 {
  uint8_t ctl[256][16] = {};
  constexpr SelectTable16() {
    for (int b = 0; b < 256; ++b) {
      int k = 0;
      for (int i = 0; i < 8; ++i) {
        const bool set = (b >> i) & 1;
        ctl[b][2 * i] = set ? static_cast<uint8_t>(2 * k) : 0x80;
        ctl[b][2 * i + 1] = set ? static_cast<uint8_t>(2 * k + 1) : 0x80;
        k += set;
      }
    }
  }
};
constexpr SelectTable16 SELECT16{};

// The next popcount(b) packed values placed into the 8 lanes mask byte b selects (zeros elsewhere), in T's bits.
template <typename T> inline void expand8_store(uint8_t b, const T* v, T* out);
template <> inline void expand8_store<float>(uint8_t b, const float* v, float* out) {
  _mm256_storeu_ps(out, expand8(_mm256_loadu_ps(v), SELECT_ROWS32.row_of(b)));
}
template <typename T> inline void expand8_store(uint8_t b, const T* v, T* out) {  // bf16, fp16: 16-bit lanes
  const __m128i ctl = _mm_loadu_si128(reinterpret_cast<const __m128i*>(SELECT16.ctl[b]));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                   _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)), ctl));
}

// The dense rows [r0, r1) (the dense path's unpacking), 8 columns per mask byte; a partial last group goes through
// a small buffer so nothing is written past the row.
template <typename T>
void densify_rows_avx2(const Op& op, T* out, int64_t cols, int64_t r0, int64_t r1) {
  const T* vals = static_cast<const T*>(op.vals);
  const int64_t full = cols / 8, groups = (cols + 7) / 8;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = reinterpret_cast<const uint8_t*>(op.mask + r * op.words);
    const T* v = vals + op.off[r];
    T* o = out + r * cols;
    for (int64_t g = 0; g < full; ++g) {
      expand8_store<T>(m[g], v, o + 8 * g);
      v += __builtin_popcount(m[g]);
    }
    if (groups > full) {
      T tail[8];
      expand8_store<T>(m[full], v, tail);
      std::memcpy(static_cast<void*>(o + 8 * full), tail, sizeof(T) * (cols - 8 * full));
    }
  }
}

// Positions of the set bits of each mask byte, in order (the rest 0): the AVX2 tiled kernel's column offsets,
// eight per byte, stored whole and advanced by popcount (AVX2 has no compress).
struct BitPositions {
  int8_t pos[256][8] = {};
  constexpr BitPositions() {
    for (int b = 0; b < 256; ++b) {
      int k = 0;
      for (int i = 0; i < 8; ++i) pos[b][i] = 0;
      for (int i = 0; i < 8; ++i)
        if ((b >> i) & 1) pos[b][k++] = static_cast<int8_t>(i);
    }
  }
};
constexpr BitPositions BIT_POSITIONS{};

template <typename T> inline __m256 bcast8(const T* v);
template <> inline __m256 bcast8<float>(const float* v) { return _mm256_broadcast_ss(v); }
template <> inline __m256 bcast8<at::BFloat16>(const at::BFloat16* v) {
  return _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(raw16(v)) << 16)));
}
template <> inline __m256 bcast8<at::Half>(const at::Half* v) { return _mm256_cvtph_ps(_mm_set1_epi16(raw16(v))); }

// One tile (16 tokens, a group of G = 1), rows [r0, r1): each row walks its set bits and reads its inputs from
// the whole tile (L2). With a single tile this beats the blocked item below (8-16 tokens on the 7B shapes: 9.7
// against 12.5 ms for 11008x4096, Xeon, AVX2, 2 threads): per nonzero there are only two FMAs, too few to pay
// for decoding the column indices first.
template <typename T>
void tiled_tile_avx2(const Op& op, int64_t tile, int64_t r0, int64_t r1) {
  const T* vals = static_cast<const T*>(op.vals);
  const int64_t cpad = op.words * 64;
  const float* xb = op.x + tile * cpad * TILE;
  for (int64_t r = r0; r < r1; ++r) {
    const T* v = vals + op.off[r];
    const int64_t* m = op.mask + r * op.words;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps();
    for (int64_t w = 0; w < op.words; ++w) {
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
    alignas(32) float acc[TILE];
    _mm256_store_ps(acc, _mm256_add_ps(a0, c0));
    _mm256_store_ps(acc + 8, _mm256_add_ps(a1, c1));
    const int64_t t0 = tile * TILE;
    for (int i = 0; i < TILE && t0 + i < op.ntok; ++i) op.y[(t0 + i) * op.rows + r] = acc[i];
  }
}

// The AVX-512 tiled kernel's structure (tiled_item_avx512 says why) in AVX2: rows [r0, r1) against a group of G
// tiles, column block by column block; each row's nonzeros in the block are decoded into column indices (a table
// row of bit positions per mask byte, no branches), then every nonzero costs one broadcast and 2G FMAs whose
// inputs come from L1. The earlier AVX2 kernel walked the set bits with a data-dependent loop per 64 columns and
// one tile of inputs per pass (from L2): 0.9-1.0x an AVX2-only dense GEMM from 128 tokens; it stays for G = 1.
template <typename T, int G>
void tiled_item_avx2(const Op& op, const float* xg, int64_t t0, int64_t r0, int64_t r1, int64_t KB) {
  constexpr int W = G * TILE;  // floats per column in this group
  constexpr int V = 2 * G;     // 8-float vectors per column
  constexpr int S = V >= 6 ? 1 : 2;
  const int64_t cpad = op.words * 64, nrows = r1 - r0;
  alignas(32) float part[TILED_TALL_ROWS][W];
  alignas(32) int32_t cols[2048 + 8];
  const T* cur[TILED_TALL_ROWS];
  start_tiled_item(op, r0, nrows, W, &part[0][0], cur);
  const __m256i eight = _mm256_set1_epi32(8);
  for (int64_t c0 = 0; c0 < cpad; c0 += KB) {
    const int64_t nbytes = std::min(KB, cpad - c0) / 8;
    const float* slab = xg + c0 * W;
    for (int64_t i = 0; i < nrows; ++i) {
      const uint8_t* m = reinterpret_cast<const uint8_t*>(op.mask + (r0 + i) * op.words) + c0 / 8;
      int64_t n = 0;
      __m256i base = _mm256_setzero_si256();
      for (int64_t q = 0; q < nbytes; ++q) {
        const unsigned b = m[q];
        const __m256i pos = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(BIT_POSITIONS.pos[b])));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(cols + n), _mm256_add_epi32(pos, base));
        n += __builtin_popcount(b);
        base = _mm256_add_epi32(base, eight);
      }
      const T* v = cur[i];
      cur[i] = v + n;
      // S nonzeros per step, each into its own accumulators: 8 independent FMA chains cover the FMA latency
      __m256 a[S][V];
      for (int k = 0; k < V; ++k) a[0][k] = _mm256_load_ps(part[i] + 8 * k);
      for (int u = 1; u < S; ++u)
        for (int k = 0; k < V; ++k) a[u][k] = _mm256_setzero_ps();
      int64_t j = 0;
      for (; j + S <= n; j += S) {
        for (int u = 0; u < S; ++u) {
          const __m256 wv = bcast8<T>(v + j + u);
          const float* xp = slab + static_cast<int64_t>(cols[j + u]) * W;
          for (int k = 0; k < V; ++k) a[u][k] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp + 8 * k), a[u][k]);
        }
      }
      for (; j < n; ++j) {
        const __m256 wv = bcast8<T>(v + j);
        const float* xp = slab + static_cast<int64_t>(cols[j]) * W;
        for (int k = 0; k < V; ++k) a[0][k] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp + 8 * k), a[0][k]);
      }
      for (int u = 1; u < S; ++u)
        for (int k = 0; k < V; ++k) a[0][k] = _mm256_add_ps(a[0][k], a[u][k]);
      for (int k = 0; k < V; ++k) _mm256_store_ps(part[i] + 8 * k, a[0][k]);
    }
  }
  store_tiled_sums(op, &part[0][0], W, t0, r0, nrows);
}

template <typename T>
void tiled_item_avx2_g(const Op& op, const float* xg, int64_t G, int64_t t0, int64_t r0, int64_t r1, int64_t kb) {
  switch (G) {
    case 1: tiled_tile_avx2<T>(op, t0 / TILE, r0, r1); break;  // xg is that tile's [cpad][16] inputs
    case 2: tiled_item_avx2<T, 2>(op, xg, t0, r0, r1, kb); break;
    case 3: tiled_item_avx2<T, 3>(op, xg, t0, r0, r1, kb); break;
    default: tiled_item_avx2<T, 4>(op, xg, t0, r0, r1, kb); break;
  }
}

// 8 x 8 transpose of fp32 lanes in registers (unpack pairs, then quads, then 128-bit halves).
inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// tile_inputs_avx512's layout with AVX2: 8 tokens x 8 columns at a time through transpose8, groups and column
// blocks over the threads. Each block in a function of its own: clang outlines an OpenMP loop's body into a function
// without this region's target, where the intrinsics would not compile (GCC keeps it).
void tile_input_block_avx2(const float* x, int64_t n, int64_t cols, int64_t cpad, int64_t per, int64_t ntiles,
                           int64_t blocks, int64_t i, float* out) {
  const auto [c0, t0, tiles, w] = input_block(i, blocks, 8, per, ntiles);
  const int64_t have = std::max<int64_t>(0, std::min<int64_t>(8, cols - c0));
  const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(have)),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  float* dst = out + t0 * cpad + c0 * w;
  for (int64_t j = 0; j < w; j += 8) {  // 8 tokens at a time
    __m256 v[8];
    for (int k = 0; k < 8; ++k) {
      const int64_t t = t0 + j + k;
      v[k] = t < n && have ? _mm256_maskload_ps(x + t * cols + c0, keep) : _mm256_setzero_ps();
    }
    transpose8(v);
    for (int k = 0; k < 8; ++k) _mm256_storeu_ps(dst + k * w + j, v[k]);
  }
}

void tile_inputs_avx2(const float* x, int64_t n, int64_t cols, int64_t cpad, int64_t per, float* out) {
  const int64_t ntiles = (n + TILE - 1) / TILE, groups = (ntiles + per - 1) / per, blocks = cpad / 8;
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t i = 0; i < groups * blocks; ++i) tile_input_block_avx2(x, n, cols, cpad, per, ntiles, blocks, i, out);
}

ATP_TARGET_END

// ------------------------------------------------------------------------------------------ AVX-512
ATP_TARGET_BEGIN("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,bmi,bmi2,popcnt,avx2,fma,f16c")

// 16 mask bits -> the next popcount(k) packed values expanded into the lanes whose bit is set (zeros elsewhere),
// as fp32. fp16: expanded as 16-bit words, then converted. (bf16 values take the pairs decode, pairs_step.)
template <typename T> inline __m512 expand16(__mmask16 k, const T* v);
template <> inline __m512 expand16<float>(__mmask16 k, const float* v) { return _mm512_maskz_expandloadu_ps(k, v); }
template <> inline __m512 expand16<at::Half>(__mmask16 k, const at::Half* v) {
  return _mm512_cvtph_ps(_mm256_maskz_expandloadu_epi16(k, v));
}

// One row against NT tokens: per 16 columns one expand-load (the mask's 16 bits say where the next popcount
// values go), one FMA per token, the value pointer advanced by popcount. U accumulators per token.
template <typename T, int NT>
inline void row_avx512(const uint16_t* m, const T* v, const float* x, int64_t ldx, int64_t nq, float* out,
                       int64_t ostride) {
  constexpr int U = NT == 1 ? 4 : (NT == 2 ? 2 : 1);
  __m512 acc[NT][U];
  for (int t = 0; t < NT; ++t)
    for (int u = 0; u < U; ++u) acc[t][u] = _mm512_setzero_ps();
  for (int64_t q = 0; q < nq; q += 4) {  // 64 columns (one mask word) per iteration
    if (ATP_PREFETCH_BYTES) _mm_prefetch(reinterpret_cast<const char*>(v) + ATP_PREFETCH_BYTES, _MM_HINT_T0);
    if (ATP_PREFETCH_L2) {
      _mm_prefetch(reinterpret_cast<const char*>(v) + ATP_PREFETCH_L2, _MM_HINT_T1);
      if ((q & 12) == 0) _mm_prefetch(reinterpret_cast<const char*>(m + q) + ATP_PREFETCH_L2 / 8, _MM_HINT_T1);
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      const unsigned k = m[q + i];
      const __m512 w = expand16<T>(static_cast<__mmask16>(k), v);
      for (int t = 0; t < NT; ++t)
        acc[t][i % U] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + t * ldx + 16 * (q + i)), acc[t][i % U]);
      v += __builtin_popcount(k);
    }
  }
  for (int t = 0; t < NT; ++t) {
    __m512 s = acc[t][0];
    for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, acc[t][u]);
    out[t * ostride] = _mm512_reduce_add_ps(s);
  }
}

// Batch-1 decode, four consecutive rows at a time: four value streams instead of one and each input vector loaded
// once for the four rows. One stream per thread left the prefetchers short of misses in flight (every software
// prefetch holds an L1 fill buffer until its line arrives); four streams keep the hardware L2 streamer busy, and each
// stream is also prefetched into L2 one group (four rows) ahead, at the same position in its row. Measured on the 7B
// block at 70% (Xeon, 2 threads, fp32): one row at a time 1.88-2.0x dense, four rows 2.3-2.4x (eight rows no better).
template <typename T, int NT>
inline void rows4_avx512(RowGroup<T> g, const float* x, int64_t ldx, float* out, int64_t ostride) {
  constexpr int R = RowGroup<T>::R;
  __m512 acc[R][NT];
  for (int j = 0; j < R; ++j)
    for (int t = 0; t < NT; ++t) acc[j][t] = _mm512_setzero_ps();
  for (int64_t w = 0; w < g.words; ++w) {
    uint64_t k[R];
    g.next_word(w, k);
    const float* xw = x + 64 * w;
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      __m512 xv[NT];
      for (int t = 0; t < NT; ++t) xv[t] = _mm512_loadu_ps(xw + t * ldx + 16 * i);
#pragma GCC unroll 4
      for (int j = 0; j < R; ++j) {
        const unsigned bits = (k[j] >> (16 * i)) & 0xFFFFu;
        const __m512 wv = expand16<T>(static_cast<__mmask16>(bits), g.v[j]);
        for (int t = 0; t < NT; ++t) acc[j][t] = _mm512_fmadd_ps(wv, xv[t], acc[j][t]);
        g.v[j] += __builtin_popcount(bits);
      }
    }
  }
  for (int j = 0; j < R; ++j)
    for (int t = 0; t < NT; ++t) out[t * ostride + j] = _mm512_reduce_add_ps(acc[j][t]);
}

// bf16 values, two columns to a 32-bit lane: one expand-load places 32 columns' values in the 16-bit lanes their
// mask bits select (column order), a shift makes the even columns' fp32 values and an and the odd ones', and two FMAs
// meet them with the inputs laid out as pairs (pairs_layout: per 32 columns the 16 even ones, then the 16 odd). The
// former bf16 decode expanded each value into the high half of a 32-bit lane, 16 columns per expand-load (plus a
// pdep): the 7B block's bf16 decode at 70%, 2 threads, Emerald Rapids VM, 8.0-8.2 -> 6.4-6.8 ms (torch 2.15's bf16
// matvec, at memory speed: 1.80x -> 2.14-2.20x). vdpbf16ps (AVX512-BF16) in place of the shift, the and and the FMAs
// ran the block no faster and, in L1, slower (5.3 cycles per 32 columns against 4.2; likely sharing the shuffle port
// with the expand-load). The expand-load's ~3 cycles per 32 columns keep the bf16 decode below memory speed.
template <int NT>
inline void pairs_step(uint32_t bits, const at::BFloat16*& v, const __m512* even, const __m512* odd, __m512* acc) {
  const __m512i w = _mm512_maskz_expandloadu_epi16(static_cast<__mmask32>(bits), v);
  const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  for (int t = 0; t < NT; ++t) acc[t] = _mm512_fmadd_ps(wo, odd[t], _mm512_fmadd_ps(we, even[t], acc[t]));
  v += __builtin_popcount(bits);
}

// Inputs as pairs for half h (32 columns) of mask word w, for NT tokens.
template <int NT>
inline void pairs_inputs(const float* x, int64_t ldx, int64_t w, int h, __m512* even, __m512* odd) {
  for (int t = 0; t < NT; ++t) {
    even[t] = _mm512_loadu_ps(x + t * ldx + 64 * w + 32 * h);
    odd[t] = _mm512_loadu_ps(x + t * ldx + 64 * w + 32 * h + 16);
  }
}

// Four rows (as rows4_avx512) of bf16 values against inputs as pairs.
template <int NT>
inline void rows4_pairs_avx512(RowGroup<at::BFloat16> g, const float* x, int64_t ldx, float* out, int64_t ostride) {
  constexpr int R = RowGroup<at::BFloat16>::R;
  __m512 acc[R][NT];
  for (int j = 0; j < R; ++j)
    for (int t = 0; t < NT; ++t) acc[j][t] = _mm512_setzero_ps();
  for (int64_t w = 0; w < g.words; ++w) {
    uint64_t k[R];
    g.next_word(w, k);
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      __m512 even[NT], odd[NT];
      pairs_inputs<NT>(x, ldx, w, h, even, odd);
#pragma GCC unroll 4
      for (int j = 0; j < R; ++j) pairs_step<NT>(static_cast<uint32_t>(k[j] >> (32 * h)), g.v[j], even, odd, acc[j]);
    }
  }
  for (int j = 0; j < R; ++j)
    for (int t = 0; t < NT; ++t) out[t * ostride + j] = _mm512_reduce_add_ps(acc[j][t]);
}

// One row of bf16 values against inputs as pairs (a matrix's last rows when they are not four).
template <int NT>
inline void row_pairs_avx512(const uint64_t* m, const at::BFloat16* v, const float* x, int64_t ldx, int64_t words,
                             float* out, int64_t ostride) {
  __m512 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t w = 0; w < words; ++w)
    for (int h = 0; h < 2; ++h) {
      __m512 even[NT], odd[NT];
      pairs_inputs<NT>(x, ldx, w, h, even, odd);
      pairs_step<NT>(static_cast<uint32_t>(m[w] >> (32 * h)), v, even, odd, acc);
    }
  for (int t = 0; t < NT; ++t) out[t * ostride] = _mm512_reduce_add_ps(acc[t]);
}

// The bf16 decode on AVX-512: op.x holds the inputs as pairs (pairs_layout). A template only so that its name says
// it is for bf16 values (the tests check that VBMI2 instructions sit in functions for 16-bit values).
template <typename T>
void decode_rows_pairs_avx512(const Op& op, int64_t r0, int64_t r1) {
  static_assert(std::is_same<T, at::BFloat16>::value, "bf16 values only");
  const int64_t ldx = op.words * 64;
  int64_t r = r0;
  for (; r + RowGroup<T>::R <= r1; r += RowGroup<T>::R) {
    const RowGroup<T> group(op, r);
    for_token_passes(op.ntok, [&](auto nt, int64_t t0) {
      rows4_pairs_avx512<decltype(nt)::value>(group, op.x + t0 * ldx, ldx, op.y + t0 * op.rows + r, op.rows);
    });
  }
  for (; r < r1; ++r) {
    const uint64_t* m = reinterpret_cast<const uint64_t*>(op.mask + r * op.words);
    const T* v = static_cast<const T*>(op.vals) + op.off[r];
    for_token_passes(op.ntok, [&](auto nt, int64_t t0) {
      row_pairs_avx512<decltype(nt)::value>(m, v, op.x + t0 * ldx, ldx, op.words, op.y + t0 * op.rows + r, op.rows);
    });
  }
}

template <typename T>
void decode_rows_avx512(const Op& op, int64_t r0, int64_t r1) {
  const T* vals = static_cast<const T*>(op.vals);
  const int64_t ldx = op.words * 64, nq = op.words * 4;
  int64_t r = r0;
  for (; r + RowGroup<T>::R <= r1; r += RowGroup<T>::R) {
    const RowGroup<T> group(op, r);
    for_token_passes(op.ntok, [&](auto nt, int64_t t0) {
      rows4_avx512<T, decltype(nt)::value>(group, op.x + t0 * ldx, ldx, op.y + t0 * op.rows + r, op.rows);
    });
  }
  for (; r < r1; ++r) {
    const uint16_t* m = reinterpret_cast<const uint16_t*>(op.mask + r * op.words);
    const T* v = vals + op.off[r];
    for_token_passes(op.ntok, [&](auto nt, int64_t t0) {
      row_avx512<T, decltype(nt)::value>(m, v, op.x + t0 * ldx, ldx, nq, op.y + t0 * op.rows + r, op.rows);
    });
  }
}

// A Lanes x Lanes transpose in registers (16 lanes of 32 bits, or 32 of 16 bits): log2(Lanes) rounds, each
// swapping one bit of the row index with the same bit of the column index (two two-source permutes per pair of
// rows). Its permutes' lane indices per round (bit d = 1 << round), built at compile time.
template <int Lanes>
struct TransposeIndex {
  using Index = std::conditional_t<Lanes == 16, int32_t, int16_t>;
  static constexpr int ROUNDS = Lanes == 16 ? 4 : 5;
  alignas(64) Index lo[ROUNDS][Lanes] = {};
  alignas(64) Index hi[ROUNDS][Lanes] = {};
  constexpr TransposeIndex() {
    for (int round = 0; round < ROUNDS; ++round)
      for (int c = 0; c < Lanes; ++c) {
        const int d = 1 << round;
        lo[round][c] = static_cast<Index>((c & d) ? Lanes + c - d : c);  // row i keeps its columns without bit d,
        hi[round][c] = static_cast<Index>((c & d) ? Lanes + c : c + d);  // takes row i + d's others
      }
  }
};
template <int Lanes>
constexpr TransposeIndex<Lanes> TRANSPOSE_INDEX{};

template <int Lanes>
inline void transpose_lanes(__m512i* r) {
  static_assert(Lanes == 16 || Lanes == 32, "32- or 16-bit lanes");
  constexpr const TransposeIndex<Lanes>& index = TRANSPOSE_INDEX<Lanes>;
  for (int round = 0, d = 1; round < TransposeIndex<Lanes>::ROUNDS; ++round, d <<= 1) {
    const __m512i lo_idx = _mm512_load_si512(index.lo[round]);
    const __m512i hi_idx = _mm512_load_si512(index.hi[round]);
    for (int i = 0; i < Lanes; ++i) {
      if (i & d) continue;
      const __m512i a = r[i], b = r[i + d];
      if constexpr (Lanes == 16) {
        r[i] = _mm512_permutex2var_epi32(a, lo_idx, b);
        r[i + d] = _mm512_permutex2var_epi32(a, hi_idx, b);
      } else {
        r[i] = _mm512_permutex2var_epi16(a, lo_idx, b);
        r[i + d] = _mm512_permutex2var_epi16(a, hi_idx, b);
      }
    }
  }
}

// 16 x 16 of 32-bit lanes: lays out the tiled kernel's fp32 inputs (tile_inputs_avx512), the tiled kernels' sums
// (store_tiled_sums_avx512) and, on the AMX path, the B tiles (pairs of bf16 columns) and [rows][tokens] results.
inline void transpose16(__m512i r[16]) { transpose_lanes<16>(r); }

// The tiled kernels' fp32 inputs in their grouped layout (see tiled_item_avx512): for each group of up to `per` tiles
// (w = 16 x tiles tokens from token t0), [cpad][w] at out + t0 * cpad, zero past `cols` and past the last token.
// 16 tokens x 16 columns at a time through the register transpose, groups and column blocks over the threads (torch's
// pad + transposing copy ran on one thread, the other waiting: 13% of SmolLM2's 192x576 layer at 512 tokens).
// Blocks in a function of their own, for clang (see tile_input_block_avx2).
void tile_input_block_avx512(const float* x, int64_t n, int64_t cols, int64_t cpad, int64_t per, int64_t ntiles,
                             int64_t blocks, int64_t i, float* out) {
  const auto [c0, t0, tiles, w] = input_block(i, blocks, 16, per, ntiles);
  const __mmask16 keep = cols - c0 >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << std::max<int64_t>(0, cols - c0)) - 1);
  float* dst = out + t0 * cpad + c0 * w;
  for (int64_t j = 0; j < tiles; ++j) {
    __m512i v[16];
    for (int k = 0; k < 16; ++k) {
      const int64_t t = t0 + j * TILE + k;
      v[k] = t < n ? _mm512_castps_si512(_mm512_maskz_loadu_ps(keep, x + t * cols + c0)) : _mm512_setzero_si512();
    }
    transpose16(v);
    for (int k = 0; k < 16; ++k) _mm512_storeu_si512(dst + k * w + j * TILE, v[k]);
  }
}

void tile_inputs_avx512(const float* x, int64_t n, int64_t cols, int64_t cpad, int64_t per, float* out) {
  const int64_t ntiles = (n + TILE - 1) / TILE, groups = (ntiles + per - 1) / per, blocks = cpad / 16;
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t i = 0; i < groups * blocks; ++i) tile_input_block_avx512(x, n, cols, cpad, per, ntiles, blocks, i, out);
}

template <typename T> inline __m512 bcast(const T* v);
template <> inline __m512 bcast<float>(const float* v) { return _mm512_set1_ps(*v); }
template <> inline __m512 bcast<at::BFloat16>(const at::BFloat16* v) {
  return _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(raw16(v)) << 16)));
}
template <> inline __m512 bcast<at::Half>(const at::Half* v) { return _mm512_cvtph_ps(_mm256_set1_epi16(raw16(v))); }

// f(k, rows, token j0 + k's sums of rows i0.. (a vector), the mask of the rows that exist) for every block of 16
// rows and 16 tokens of part[row][token] (W tokens per row) that exist.
template <typename F>
inline void for_transposed_sums(const Op& op, const float* part, int64_t W, int64_t t0, int64_t nrows, F&& f) {
  const int64_t cnt = std::min<int64_t>(W, op.ntok - t0);
  for (int64_t i0 = 0; i0 < nrows; i0 += 16) {
    const int64_t rows = std::min<int64_t>(16, nrows - i0);
    const __mmask16 keep = static_cast<__mmask16>(rows == 16 ? 0xFFFFu : (1u << rows) - 1u);
    for (int64_t j0 = 0; j0 < cnt; j0 += 16) {
      const __mmask16 tokens = static_cast<__mmask16>(W - j0 >= 16 ? 0xFFFFu : (1u << (W - j0)) - 1u);
      __m512i r[16];  // r[i]: tokens j0.. of row i0 + i (any W: the decode's passes hold multiples of 8)
      for (int i = 0; i < 16; ++i)
        r[i] = i < rows ? _mm512_castps_si512(_mm512_maskz_loadu_ps(tokens, part + (i0 + i) * W + j0))
                        : _mm512_setzero_si512();
      transpose16(r);  // r[k]: token j0 + k's sums of the 16 rows
      for (int64_t k = 0, end = std::min<int64_t>(16, cnt - j0); k < end; ++k)
        f(t0 + j0 + k, i0, _mm512_castsi512_ps(r[k]), keep);
    }
  }
}

// store_tiled_sums through the register transpose: the scalar copy had taken 11% of the bf16 tiled kernel's time on
// a 576x576 weight at 1024 tokens (Zen 5), 5.5% of the fp32 one's (SmolLM2's three shapes in fp32 at 50%, in one
// process against the scalar copy: 2-12% less time at 256 tokens, -1 to +8% at 1024).
inline void store_tiled_sums_avx512(const Op& op, const float* part, int64_t W, int64_t t0, int64_t r0, int64_t nrows) {
  for_transposed_sums(op, part, W, t0, nrows, [&](int64_t token, int64_t i0, __m512 sums, __mmask16 keep) {
    _mm512_mask_storeu_ps(op.y + token * op.rows + r0 + i0, keep, sums);
  });
}

// One work item: rows [r0, r1) against one group of G tiles, its inputs stored column-major with the G*16 tokens
// adjacent ([cpad][G*16] fp32, zero padded: tile_inputs), so that one nonzero's inputs are G*64 contiguous bytes.
// Column block by column block, each row's nonzeros in the block are decoded into byte offsets (compress of a
// column ramp by the 16 mask bits), then every nonzero costs one broadcast and G FMAs whose inputs come from L1.
// Partial sums live in `part` between blocks.
template <typename T, int G>
void tiled_item_avx512(const Op& op, const float* xg, int64_t t0, int64_t r0, int64_t r1, int64_t KB) {
  constexpr int W = G * TILE;  // floats per column in this group
  const int64_t cpad = op.words * 64, nrows = r1 - r0;
  alignas(64) float part[TILED_TALL_ROWS][W];
  alignas(64) int32_t offs[2048 + 16];
  const T* cur[TILED_TALL_ROWS];
  start_tiled_item(op, r0, nrows, W, &part[0][0], cur);
  const __m512i step = _mm512_set1_epi32(16 * W * 4);
  const __m512i ramp = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(W * 4));
  for (int64_t c0 = 0; c0 < cpad; c0 += KB) {
    const int64_t nq = std::min(KB, cpad - c0) / 16;
    const char* slab = reinterpret_cast<const char*>(xg + c0 * W);
    for (int64_t i = 0; i < nrows; ++i) {
      const uint16_t* m = reinterpret_cast<const uint16_t*>(op.mask + (r0 + i) * op.words) + c0 / 16;
      int64_t n = 0;
      __m512i col = ramp;
      for (int64_t q = 0; q < nq; ++q) {
        const unsigned k = m[q];
        _mm512_storeu_si512(offs + n, _mm512_maskz_compress_epi32(static_cast<__mmask16>(k), col));
        n += __builtin_popcount(k);
        col = _mm512_add_epi32(col, step);
      }
      if (c0 + KB < cpad) prefetch_block_share(slab + KB * W * 4, std::min(KB, cpad - c0 - KB) * W * 4, i, nrows);
      const T* v = cur[i];
      cur[i] = v + n;
      __m512 a[G];
      for (int g = 0; g < G; ++g) a[g] = _mm512_load_ps(part[i] + 16 * g);
      if (G >= 4) {
        for (int64_t j = 0; j < n; ++j) {
          const __m512 b = bcast<T>(v + j);
          const float* xp = reinterpret_cast<const float*>(slab + offs[j]);
          for (int g = 0; g < G; ++g) a[g] = _mm512_fmadd_ps(b, _mm512_loadu_ps(xp + 16 * g), a[g]);
        }
      } else {  // few tiles: two nonzeros per step, two sets of accumulators
        __m512 c[G];
        for (int g = 0; g < G; ++g) c[g] = _mm512_setzero_ps();
        int64_t j = 0;
        for (; j + 2 <= n; j += 2) {
          const __m512 b0 = bcast<T>(v + j), b1 = bcast<T>(v + j + 1);
          const float* x0 = reinterpret_cast<const float*>(slab + offs[j]);
          const float* x1 = reinterpret_cast<const float*>(slab + offs[j + 1]);
          for (int g = 0; g < G; ++g) {
            a[g] = _mm512_fmadd_ps(b0, _mm512_loadu_ps(x0 + 16 * g), a[g]);
            c[g] = _mm512_fmadd_ps(b1, _mm512_loadu_ps(x1 + 16 * g), c[g]);
          }
        }
        if (j < n) {
          const __m512 b0 = bcast<T>(v + j);
          const float* x0 = reinterpret_cast<const float*>(slab + offs[j]);
          for (int g = 0; g < G; ++g) a[g] = _mm512_fmadd_ps(b0, _mm512_loadu_ps(x0 + 16 * g), a[g]);
        }
        for (int g = 0; g < G; ++g) a[g] = _mm512_add_ps(a[g], c[g]);
      }
      for (int g = 0; g < G; ++g) _mm512_store_ps(part[i] + 16 * g, a[g]);
    }
  }
  store_tiled_sums_avx512(op, &part[0][0], W, t0, r0, nrows);
}

template <typename T>
void tiled_item_avx512_g(const Op& op, const float* xg, int64_t G, int64_t t0, int64_t r0, int64_t r1, int64_t kb) {
  with_count_up_to_8(G, [&](auto g) { tiled_item_avx512<T, decltype(g)::value>(op, xg, t0, r0, r1, kb); });
}

// The `count` packed 16-bit values at v placed in the 32 lanes whose bits of k are set, zeros elsewhere: a load of
// 32 values (the expand takes the first `count`) and the expand in registers; within 32 values of the end of the
// values (end), a masked load of exactly `count`, which reads nothing past them. The masked load everywhere cost
// the bf16 tiled kernel 5-12% more time at 64-256 tokens on Zen 5 (2 threads, 70%, 4096x4096 and 4096x11008).
template <typename T>  // bf16 or fp16 (a template, so that its name says so: VBMI2 only in code for 16-bit values)
inline __m512i expand32(uint32_t k, int count, const T* v, const T* end) {
  static_assert(sizeof(T) == 2, "16-bit values");
  const __m512i packed = end - v >= 32 ? _mm512_loadu_si512(v)
                                       : _mm512_maskz_loadu_epi16(static_cast<__mmask32>(_bzhi_u32(~0u, count)), v);
  return _mm512_maskz_expand_epi16(static_cast<__mmask32>(k), packed);
}

// Rows [r0, r1) of the dense weight. The values are placed by a masked load of exactly a block's packed values and
// an expand in registers, 32 columns at a time for 16-bit values: with expand-loads from memory (vpexpandw with a
// memory operand, 16 columns at a time) a 4096x4096 bf16 weight at 70% took 1.6-1.8 ms on 2 threads on Zen 5, this
// 1.1 ms (the dense path unpacks before every GEMM). fp32 the same way (no clear change there: 2.3-3.8 ms either way
// on that noisy machine).
template <typename T>
void densify_rows_avx512(const Op& op, T* out, int64_t cols, int64_t r0, int64_t r1) {
  constexpr int B = 64 / sizeof(T);  // columns per 512-bit block: 16 fp32, 32 bf16 / fp16
  const T* vals = static_cast<const T*>(op.vals);
  const T* vend = vals + op.nvals;
  const int64_t nq = (cols + B - 1) / B;
  for (int64_t r = r0; r < r1; ++r) {
    const T* v = vals + op.off[r];
    T* o = out + r * cols;
    for (int64_t q = 0; q < nq; ++q) {
      const int64_t c = q * B, left = cols - c;
      if constexpr (B == 16) {
        const unsigned k = reinterpret_cast<const uint16_t*>(op.mask + r * op.words)[q];
        const int count = __builtin_popcount(k);
        const __m512 packed = _mm512_maskz_loadu_ps(static_cast<__mmask16>(_bzhi_u32(0xFFFFu, count)), v);
        const __mmask16 store = static_cast<__mmask16>(left >= 16 ? 0xFFFFu : (1u << left) - 1u);
        _mm512_mask_storeu_ps(reinterpret_cast<float*>(o) + c, store,
                              _mm512_maskz_expand_ps(static_cast<__mmask16>(k), packed));
        v += count;
      } else {
        const uint32_t k = reinterpret_cast<const uint32_t*>(op.mask + r * op.words)[q];
        const int count = __builtin_popcount(k);
        const __mmask32 store = static_cast<__mmask32>(left >= 32 ? ~0u : (1u << left) - 1u);
        _mm512_mask_storeu_epi16(o + c, store, expand32(k, count, v, vend));
        v += count;
      }
    }
  }
}

ATP_TARGET_END
#endif  // ATP_X86

#if ATP_BF16_DOT
// ------------------------------------------------------------------------------------------ AVX-512 BF16 dot products
// The tiled kernel for bf16 weights and bf16 inputs on CPUs with AVX512_BF16 (vdpbf16ps: per 32-bit lane, the sum of
// two bf16 x bf16 products added to an fp32 accumulator), where torch's dense bf16 GEMM runs on that instruction at
// close to its peak (two per cycle on Zen 5) and is several times faster than its fp32 GEMM: the fp32 tiled kernel
// (one FMA per nonzero per 16 tokens) ran the 7B block in bf16 at 0.61-0.68x of dense at 16-32 tokens (AMD EPYC
// Zen 5, 2 threads, 70%).
//
// Packed pairs: each two consecutive packed values of a row are paired, whatever their columns, so that every dot
// product does two nonzeros' work. The two columns' inputs are interleaved at run time: the inputs lie column-major
// (column_inputs: per group of up to PAIR_GROUP tokens, each column's tokens side by side in chunks of 32), and
// vpunpcklwd / vpunpckhwd of two columns' chunks give the 16 pairs of tokens 0-15 and of 16-31 (column_inputs
// orders each chunk so that they come out in that order). Per pair of nonzeros and 32 tokens: two loads, two
// unpacks, two dot products, against the value pair broadcast straight from the packed values. An odd count leaves
// one value, taken against zeros. Per row and column block, the columns of its nonzeros come from the mask words
// by one vpcompressw each. The previous kernel paired adjacent columns instead (inputs as pairs of columns; a pair
// with one nonzero of two cost a whole dot product, 1.2 nonzeros per dot product at 70%, and the pairs had to be
// gathered): 4096x4096 at 70%, 2 threads, Zen 5, against dense, 0.60-1.01x at 16-128 tokens and 0.74-0.95x at
// 256-1024, now 0.97-1.44x and 1.2-1.33x; at 50% 0.52-0.60x, now 0.65-0.93x.
ATP_TARGET_BEGIN("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,avx512bf16,bmi,bmi2,popcnt,avx2,fma,f16c")

constexpr int64_t DOT_MAX_BLOCK = 2048;  // columns per block at most (the column buffer of pair_item)
// How many rows ahead pair_item fetches a row's values and mask words of the block into L1: a row's first use of
// them otherwise waits on memory (64 or more rows are more streams than the hardware prefetchers follow; 4096x4096 at
// 70% and 512 tokens, Zen 5: one row ahead 1.14x dense, three 1.28x, 6-12 no better). As many lines of values as a
// row has in a block on average, and one more: a fixed three lines had left the wider blocks of few tokens waiting
// (32 / 64 tokens, 512- / 256-column blocks: 1.00x / 1.27x dense, then 1.18x / 1.32x).
constexpr int64_t PAIR_PREFETCH_ROWS = 3;

// The sums as bf16 with the bias added (op.ybf16, op.bias), rounded as torch rounds fp32 to bf16 (to nearest even):
// the fp32 result written first and converted after had cost its own allocation, which above glibc's 32 MiB mmap
// threshold faults its pages in on every call (11008 rows x 1024 tokens: 45 MB, about 11 ms of a 95 ms call).
inline void store_tiled_sums_bf16(const Op& op, const float* part, int64_t W, int64_t t0, int64_t r0, int64_t nrows) {
  for_transposed_sums(op, part, W, t0, nrows, [&](int64_t token, int64_t i0, __m512 sums, __mmask16 keep) {
    if (op.bias) sums = _mm512_add_ps(sums, _mm512_maskz_loadu_ps(keep, op.bias + r0 + i0));
    _mm256_mask_storeu_epi16(op.ybf16 + token * op.rows + r0 + i0, keep, (__m256i)_mm512_cvtneps_pbh(sums));
  });
}

// T: at::BFloat16 (VBMI2 only in code for 16-bit values); NC: chunks of 32 tokens; HALF: the last chunk holds at
// most 16 tokens, all in its vpunpcklwd half (column_inputs' slot order), so its vpunpckhwd half is skipped.
// (4096x4096 at 70%, against dense, in one process: 48 tokens 1.14x -> 1.21x, 16 tokens 1.02x -> 1.14x.)
template <typename T, int NC, bool HALF>
void pair_item(const Op& op, const at::BFloat16* xg, int64_t t0, int64_t r0, int64_t r1, int64_t KB) {
  constexpr int W = NC * PAIR_CHUNK;  // tokens per row of partial sums
  constexpr int64_t CB = W * 2;       // bytes of inputs per column
  static_assert(std::is_same<T, at::BFloat16>::value, "bf16 values (vdpbf16ps)");
  const int64_t cpad = op.words * 64, nrows = r1 - r0;
  alignas(64) float part[TILED_TALL_ROWS][W];
  alignas(64) uint16_t cols_of[DOT_MAX_BLOCK + 32];  // the block's columns holding this row's nonzeros, in order
  const T* cur[TILED_TALL_ROWS];
  start_tiled_item(op, r0, nrows, W, &part[0][0], cur);
  const __m512i ramp = _mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12,
                                        11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i step = _mm512_set1_epi16(32);
  const int64_t ahead_lines = (2 * KB * op.nvals / std::max<int64_t>(1, op.rows * cpad) + 63) / 64 + 1;
  for (int64_t c0 = 0; c0 < cpad; c0 += KB) {
    const int64_t nq = std::min(KB, cpad - c0) / 32;
    const char* slab = reinterpret_cast<const char*>(xg + c0 * W);
    for (int64_t i = 0; i < nrows; ++i) {
      const uint32_t* m = reinterpret_cast<const uint32_t*>(op.mask + (r0 + i) * op.words) + c0 / 32;
      int64_t n = 0;
      __m512i col = ramp;
      for (int64_t q = 0; q < nq; ++q) {
        const uint32_t k = m[q];
        _mm512_storeu_si512(cols_of + n, _mm512_maskz_compress_epi16(static_cast<__mmask32>(k), col));
        n += __builtin_popcount(k);
        col = _mm512_add_epi16(col, step);
      }
      if (i + PAIR_PREFETCH_ROWS < nrows) {
        const char* ahead = reinterpret_cast<const char*>(cur[i + PAIR_PREFETCH_ROWS]);
        for (int64_t l = 0; l < ahead_lines; ++l) _mm_prefetch(ahead + 64 * l, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(op.mask + (r0 + i + PAIR_PREFETCH_ROWS) * op.words + c0 / 64),
                     _MM_HINT_T0);
      }
      if (c0 + KB < cpad) prefetch_block_share(slab + KB * CB, std::min(KB, cpad - c0 - KB) * CB, i, nrows);
      const T* v = cur[i];
      // values v[j], v[j + 1] of columns cols_of[j], cols_of[j + 1] into the accumulators acc
      auto pair_step = [&](__m512* acc, int64_t j) __attribute__((always_inline)) {
        uint32_t both;
        std::memcpy(&both, v + j, 4);
        const __m512bh b = (__m512bh)_mm512_set1_epi32(static_cast<int>(both));
        const char* x1 = slab + cols_of[j] * CB;
        const char* x2 = slab + cols_of[j + 1] * CB;
#pragma GCC unroll 8
        for (int q = 0; q < NC; ++q) {
          const __m512i c1 = _mm512_loadu_si512(x1 + 64 * q);
          __m512i c2 = _mm512_loadu_si512(x2 + 64 * q);
          asm("" : "+v"(c2));  // one load each: GCC folded c2's load into both unpacks (12 loads per 8 products)
          acc[2 * q] = _mm512_dpbf16_ps(acc[2 * q], b, (__m512bh)_mm512_unpacklo_epi16(c1, c2));
          if (!(HALF && q == NC - 1))
            acc[2 * q + 1] = _mm512_dpbf16_ps(acc[2 * q + 1], b, (__m512bh)_mm512_unpackhi_epi16(c1, c2));
        }
      };
      __m512 a[2 * NC];
      for (int g = 0; g < 2 * NC; ++g) a[g] = _mm512_load_ps(part[i] + 16 * g);
      int64_t j = 0;
      // up to 4 chunks, two accumulator sets: one set's 2 * NC chains would wait on the dot product's latency
      // (more sets for 1-2 chunks measured no faster)
      if (NC <= 4 && n >= 4) {
        __m512 b[2 * NC];
        for (int g = 0; g < 2 * NC; ++g) b[g] = _mm512_setzero_ps();
        for (; j + 4 <= n; j += 4) {
          pair_step(a, j);
          pair_step(b, j + 2);
        }
        for (int g = 0; g < 2 * NC; ++g) a[g] = _mm512_add_ps(a[g], b[g]);
      }
      for (; j + 2 <= n; j += 2) pair_step(a, j);
      if (j < n) {  // an odd count: the last value, paired with a zero, against zeros
        const __m512bh b = (__m512bh)_mm512_set1_epi32(static_cast<int>(static_cast<uint16_t>(raw16(v + j))));
        const char* x1 = slab + cols_of[j] * CB;
        const __m512i zero = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int q = 0; q < NC; ++q) {
          const __m512i c1 = _mm512_loadu_si512(x1 + 64 * q);
          a[2 * q] = _mm512_dpbf16_ps(a[2 * q], b, (__m512bh)_mm512_unpacklo_epi16(c1, zero));
          if (!(HALF && q == NC - 1))
            a[2 * q + 1] = _mm512_dpbf16_ps(a[2 * q + 1], b, (__m512bh)_mm512_unpackhi_epi16(c1, zero));
        }
      }
      for (int g = 0; g < 2 * NC; ++g) _mm512_store_ps(part[i] + 16 * g, a[g]);
      cur[i] = v + n;
    }
  }
  if (op.ybf16) store_tiled_sums_bf16(op, &part[0][0], W, t0, r0, nrows);
  else store_tiled_sums_avx512(op, &part[0][0], W, t0, r0, nrows);
}

// column_inputs' unit: the chunk of 32 tokens from token0 (zeros from token n on) of the 32 columns from c0 (zeros
// from column `cols` on) of x [n][cols] (bf16 bits), as 32 rows of 32 tokens in column_inputs' slot order, row c at
// out + c * width: the tokens loaded as rows in slot order, transposed in registers (transpose_lanes). (Per element,
// one scalar load and store before: 12% of a 576x576 layer's time at 512 tokens.)
__attribute__((noinline)) void transpose_chunk(const uint16_t* x, int64_t n, int64_t cols, int64_t token0, int64_t c0,
                                               uint16_t* out, int64_t width) {
  __m512i r[32];
  const __mmask32 live = c0 + 32 <= cols ? ~0u : (c0 >= cols ? 0u : (1u << (cols - c0)) - 1u);
  for (int slot = 0; slot < 32; ++slot) {
    const int l = slot / 8, w = slot % 8;
    const int64_t token = token0 + (w < 4 ? 4 * l + w : 16 + 4 * l + w - 4);
    r[slot] = token < n ? _mm512_maskz_loadu_epi16(live, x + token * cols + c0) : _mm512_setzero_si512();
  }
  transpose_lanes<32>(r);
  for (int c = 0; c < 32; ++c) _mm512_storeu_si512(out + c * width, r[c]);
}

template <typename T, int NC>
void pair_item_h(const Op& op, const at::BFloat16* xg, bool half, int64_t t0, int64_t r0, int64_t r1, int64_t kb) {
  if (half) pair_item<T, NC, true>(op, xg, t0, r0, r1, kb);
  else pair_item<T, NC, false>(op, xg, t0, r0, r1, kb);
}

// nc chunks of 32 tokens, the last with at most 16 tokens if half
template <typename T>
void pair_item_n(const Op& op, const at::BFloat16* xg, int64_t nc, bool half, int64_t t0, int64_t r0, int64_t r1,
                 int64_t kb) {
  switch (nc) {
    case 1: pair_item_h<T, 1>(op, xg, half, t0, r0, r1, kb); break;
    case 2: pair_item_h<T, 2>(op, xg, half, t0, r0, r1, kb); break;
    case 3: pair_item_h<T, 3>(op, xg, half, t0, r0, r1, kb); break;
    case 4: pair_item_h<T, 4>(op, xg, half, t0, r0, r1, kb); break;
    case 5: pair_item_h<T, 5>(op, xg, half, t0, r0, r1, kb); break;
    case 6: pair_item_h<T, 6>(op, xg, half, t0, r0, r1, kb); break;
    case 7: pair_item_h<T, 7>(op, xg, half, t0, r0, r1, kb); break;
    default: pair_item_h<T, 8>(op, xg, half, t0, r0, r1, kb); break;
  }
}

// The decode for 5 to DOT_DECODE_NT bf16 tokens against bf16 weights on AVX512_BF16, in one pass over the weight
// (the fp32 decode takes four per pass; more tokens: dot_block_item). Per 32 columns, the row's values expanded
// once into 16 pairs, then one dot product per token against that token's 32 columns (16 pairs as they lie in a
// bf16 row). x: [ntok][ldx] bf16, zero padded to the mask's width. 4096x4096 at 70%, 2 threads, Zen 5, against
// dense: with 16 tokens per pass 1.9x / 1.3x / 0.8x / 0.5x at 5 / 8 / 12 / 16 tokens (16 accumulators, and 16 loads
// of inputs per 32 columns, mostly from L2), with 8 per pass 2.0x / 1.5x / 1.1x / 0.9x (the fp32 decode 1.3x / 1.3x
// / 1.0x / 0.8x); rows in pairs sharing each load of inputs were no faster. Up to 7 tokens: at 8 the column-blocked
// decode below is faster (8 tokens' inputs, 64 KiB for 4096 columns, leave L1 here; v37, one process against dense:
// 4096x4096 1.34-1.38x -> 1.81-1.86x, 4096x11008 1.76x -> 1.96x, 11008x4096 1.33-1.35x -> 1.34-1.48x, SmolLM2's
// shapes 1.22-1.73x -> 1.39-1.96x); at 7 the two are mixed (11008x4096 1.62-1.73x here, 1.34-1.53x there).
constexpr int DOT_DECODE_NT = 7;

template <typename T, int NT>
inline void dot_decode_row(const uint32_t* m, const T* v, const T* vend, const T* x, int64_t ldx, int64_t nq,
                           float* out, int64_t ostride) {
  __m512 acc[NT];
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t q = 0; q < nq; ++q) {
    const uint32_t k = m[q];
    const int count = __builtin_popcount(k);
    const __m512bh w = (__m512bh)expand32(k, count, v, vend);
    v += count;
    if (ATP_PREFETCH_BYTES) _mm_prefetch(reinterpret_cast<const char*>(v) + ATP_PREFETCH_BYTES, _MM_HINT_T0);
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t)
      acc[t] = _mm512_dpbf16_ps(acc[t], w, (__m512bh)_mm512_loadu_si512(x + t * ldx + 32 * q));
  }
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t) out[t * ostride] = _mm512_reduce_add_ps(acc[t]);
}

template <typename T, int NT>
void dot_decode_rows(const Op& op, const T* x, int64_t r0, int64_t r1) {
  const T* vals = static_cast<const T*>(op.vals);
  const int64_t ldx = op.words * 64, nq = op.words * 2;
  for (int64_t r = r0; r < r1; ++r)
    dot_decode_row<T, NT>(reinterpret_cast<const uint32_t*>(op.mask + r * op.words), vals + op.off[r],
                          vals + op.nvals, x, ldx, nq, op.y + r, op.rows);
}

// The decode from 8 tokens on the dot products (dot_block_item): blocks of columns, so that the inputs a block takes
// stay in L1 while every row of a work item passes over them; rows DOT_BLOCK_RB at a time, so that each load of
// inputs feeds that many dot products; and each row's block expanded once, for the first group of 8 tokens, into
// dense bf16 that the other groups load back (DOT_KEPT) instead of expanding it again. The decode above reloads
// every token's inputs per row from L2 (4096 columns of 8 tokens are 64 KiB), which left it below dense from 12
// tokens. 4096x4096 / 11008x4096 / 4096x11008 at 70%, 2 threads, Zen 5, against dense (each paired with it in one
// process): 16 tokens 0.83-1.03x -> 1.21-1.39x, 32 tokens 0.57-0.67x -> 1.01-1.18x, 64 tokens 0.41-0.48x ->
// 0.76-0.88x without the kept expansion; with it (in one process, the same shapes) 16 tokens 1.20-1.44x ->
// 1.42-1.55x, 32 tokens 0.93-1.10x -> 1.16-1.33x, 64 tokens 0.74-0.86x -> 1.05-1.15x, and 128 tokens 0.90-1.03x
// where the tiled kernel ran 0.80-0.93x. At 5 tokens the decode above (2.3-2.5x) beats this one (1.4-1.7x: a group
// of 8 tokens is then partly padding). 512- or 2048-column blocks and 12-, 24- or 96-row items: no better.
constexpr int64_t DOT_BLOCK_COLS = 1024;  // 8 tokens' inputs of a block: 16 KiB
constexpr int64_t DOT_BLOCK_RB = 3;       // 24 accumulators, 3 expanded rows and one input in 32 registers
constexpr int64_t DOT_BLOCK_ROWS = 48;    // rows per work item, a multiple of DOT_BLOCK_RB
constexpr int64_t DOT_BLOCK_TOKENS = 128;  // tokens per pass over the weight (the partial sums' size)
constexpr int DOT_BLOCK_NT = 8;            // tokens per group
// How dot_block_rows gets a row's weights of a 32-column step: expanded from the packed values (a single group of
// tokens), expanded and kept in the item's dense copy of the block (the first of several groups), or loaded back
// from that copy (the others).
constexpr int DOT_EXPAND = 0, DOT_EXPAND_AND_KEEP = 1, DOT_KEPT = 2;

// Lane t of the result: the sum of the 16 lanes of a[t], for t < NT (8 or 16; with 8, lanes 8-15 repeat 0-7).
template <int NT>
inline __m512 lane_sums(const __m512* a) {
  static_assert(NT == 8 || NT == 16, "8 or 16 accumulators");
  __m512 s[NT / 2], u[NT / 4], v[NT / 8];
#pragma GCC unroll 8
  for (int j = 0; j < NT / 2; ++j)  // per 128-bit lane: a[2j] in elements 0 and 2, a[2j + 1] in 1 and 3
    s[j] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * j], a[2 * j + 1]), _mm512_unpackhi_ps(a[2 * j], a[2 * j + 1]));
#pragma GCC unroll 4
  for (int m = 0; m < NT / 4; ++m)  // per 128-bit lane: tokens 4m .. 4m + 3
    u[m] = _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(s[2 * m]), _mm512_castps_pd(s[2 * m + 1]))),
        _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(s[2 * m]), _mm512_castps_pd(s[2 * m + 1]))));
#pragma GCC unroll 2
  for (int p = 0; p < NT / 8; ++p)  // 128-bit lanes: tokens 8p .. 8p + 3 twice, then 8p + 4 .. 8p + 7 twice
    v[p] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * p], u[2 * p + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(u[2 * p], u[2 * p + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 hi = v[NT / 8 - 1];
  return _mm512_add_ps(_mm512_shuffle_f32x4(v[0], hi, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(v[0], hi, _MM_SHUFFLE(3, 1, 3, 1)));
}

// The inputs as dot_block_item reads them: per group of 8 tokens, per 32 columns, the group's tokens' 32 columns one
// after another (64 bytes each: one pointer and constant offsets reach every token of a 32-column step). x: bf16
// [n][ldx], zero padded to ldx columns; out: [ceil(n / 8) * 8][ldx] in that order, the padding tokens zero.
inline void dot_block_inputs(const at::BFloat16* x, int64_t n, int64_t ldx, at::BFloat16* out) {
  const int64_t np = (n + DOT_BLOCK_NT - 1) / DOT_BLOCK_NT * DOT_BLOCK_NT, nq = ldx / 32;
  for (int64_t t0 = 0; t0 < np; t0 += DOT_BLOCK_NT) {
    at::BFloat16* g = out + t0 * ldx;
    for (int64_t q = 0; q < nq; ++q)
      for (int64_t t = 0; t < DOT_BLOCK_NT; ++t) {
        const __m512i row = t0 + t < n ? _mm512_loadu_si512(x + (t0 + t) * ldx + 32 * q) : _mm512_setzero_si512();
        _mm512_storeu_si512(g + (q * DOT_BLOCK_NT + t) * 32, row);
      }
  }
}

// R rows (masks m + r * mstride, values from v[r], advanced unless MODE is DOT_KEPT; their dense copy at
// ws + r * DOT_BLOCK_COLS) against one group of tokens over nq 32-column steps of xq (dot_block_inputs), each row's
// sums added into p + r * pstride.
template <typename T, int R, int MODE>
inline void dot_block_rows(const uint32_t* m, int64_t mstride, const T** v, const T* vend, const T* xq, int64_t nq,
                           float* p, int64_t pstride, T* ws) {
  constexpr int NT = DOT_BLOCK_NT;
  __m512 acc[R][NT];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t q = 0; q < nq; ++q, xq += NT * 32) {
    __m512bh w[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      if (MODE == DOT_KEPT) {
        w[r] = (__m512bh)_mm512_load_si512(ws + r * DOT_BLOCK_COLS + q * 32);
        continue;
      }
      const uint32_t k = m[r * mstride + q];
      const int count = __builtin_popcount(k);
      w[r] = (__m512bh)expand32(k, count, v[r], vend);
      if (MODE == DOT_EXPAND_AND_KEEP) _mm512_store_si512(ws + r * DOT_BLOCK_COLS + q * 32, (__m512i)w[r]);
      v[r] += count;
    }
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      const __m512bh x = (__m512bh)_mm512_loadu_si512(xq + 32 * t);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], w[r], x);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const __m256 sums = _mm512_castps512_ps256(lane_sums<NT>(acc[r]));
    _mm256_storeu_ps(p + r * pstride, _mm256_add_ps(_mm256_loadu_ps(p + r * pstride), sums));
  }
}

// A row's nq mask words from m and its `count` values from v into L2. Into L1 they pushed the block's inputs out
// (16 tokens on 4096x4096: 2.8 ms prefetched into L1, 2.1 ms into L2).
template <typename T>
inline void prefetch_row_block(const uint32_t* m, int64_t nq, const T* v, int64_t count) {
  for (const char* b = reinterpret_cast<const char*>(v), *e = b + count * sizeof(T); b < e; b += 64)
    _mm_prefetch(b, _MM_HINT_T1);
  for (const char* b = reinterpret_cast<const char*>(m), *e = b + nq * 4; b < e; b += 64)
    _mm_prefetch(b, _MM_HINT_T1);
}

// Rows [r0, r1) (at most DOT_BLOCK_ROWS) against np tokens (a multiple of DOT_BLOCK_NT, at most DOT_BLOCK_TOKENS) of
// xb (dot_block_inputs), y's tokens from t0: per column block, per group of tokens, the rows DOT_BLOCK_RB at a time;
// each row's values of a block are expanded for the first group (kept for the others), the next block's prefetched
// during the first group, the first block's requested for all rows at the start.
template <typename T>
void dot_block_item(const Op& op, const T* xb, int64_t np, int64_t t0, int64_t r0, int64_t r1) {
  const int64_t ldx = op.words * 64, nrows = r1 - r0, mstride = op.words * 2;
  alignas(64) float part[DOT_BLOCK_ROWS * DOT_BLOCK_TOKENS];
  alignas(64) T expanded[DOT_BLOCK_ROWS * DOT_BLOCK_COLS];  // the block's rows as dense bf16 (96 KiB: in L2)
  const T* cur[DOT_BLOCK_ROWS];
  const T* next[DOT_BLOCK_ROWS];
  const T* vend = static_cast<const T*>(op.vals) + op.nvals;
  const uint32_t* mrows = reinterpret_cast<const uint32_t*>(op.mask + r0 * op.words);
  start_tiled_item(op, r0, nrows, np, part, cur);
  const int64_t nq0 = std::min(DOT_BLOCK_COLS, ldx) / 32;
  for (int64_t i = 0; i < nrows; ++i) {
    const uint32_t* m = mrows + i * mstride;
    int64_t count = 0;
    for (int64_t q = 0; q < nq0; ++q) count += __builtin_popcount(m[q]);
    prefetch_row_block(m, nq0, cur[i], count);
  }
  for (int64_t c0 = 0; c0 < ldx; c0 += DOT_BLOCK_COLS) {
    const int64_t nq = std::min(DOT_BLOCK_COLS, ldx - c0) / 32;
    for (int64_t g = 0; g < np; g += DOT_BLOCK_NT) {
      const T* xq = xb + g * ldx + c0 * DOT_BLOCK_NT;
      for (int64_t i = 0; i < nrows; i += DOT_BLOCK_RB) {
        const int64_t R = std::min(DOT_BLOCK_RB, nrows - i);
        const uint32_t* m = mrows + i * mstride + c0 / 32;
        const T* v[DOT_BLOCK_RB];
        for (int64_t r = 0; r < R; ++r) v[r] = cur[i + r];
        float* p = part + i * np + g;
        static_assert(DOT_BLOCK_RB == 3, "one case per count of rows");
        T* ws = expanded + i * DOT_BLOCK_COLS;
        const int mode = np == DOT_BLOCK_NT ? DOT_EXPAND : (g == 0 ? DOT_EXPAND_AND_KEEP : DOT_KEPT);
        auto run = [&](auto mc) {
          constexpr int MC = decltype(mc)::value;
          if (R == 3) dot_block_rows<T, 3, MC>(m, mstride, v, vend, xq, nq, p, np, ws);
          else if (R == 2) dot_block_rows<T, 2, MC>(m, mstride, v, vend, xq, nq, p, np, ws);
          else dot_block_rows<T, 1, MC>(m, mstride, v, vend, xq, nq, p, np, ws);
        };
        if (mode == DOT_EXPAND) run(std::integral_constant<int, DOT_EXPAND>());
        else if (mode == DOT_EXPAND_AND_KEEP) run(std::integral_constant<int, DOT_EXPAND_AND_KEEP>());
        else run(std::integral_constant<int, DOT_KEPT>());
        if (g == 0)
          for (int64_t r = 0; r < R; ++r) {
            if (c0 + DOT_BLOCK_COLS < ldx)  // the next block holds about as many values as this one
              prefetch_row_block(m + r * mstride + nq, std::min(DOT_BLOCK_COLS, ldx - c0 - DOT_BLOCK_COLS) / 32,
                                 v[r], v[r] - cur[i + r]);
            next[i + r] = v[r];
          }
      }
    }
    std::copy(next, next + nrows, cur);
  }
  store_tiled_sums_avx512(op, part, np, t0, r0, nrows);
}

ATP_TARGET_END
#endif  // ATP_BF16_DOT

// ------------------------------------------------------------------------------------- the AMX path's plan
// (amx_block says what the choices mean; they are plain arithmetic, outside the AMX code)
// Most rows per block of the AMX path through whole rows (fewer where AMX_TILE_BYTES holds fewer: 128 at 4096
// columns). Every block reads all the inputs, so narrow weights want many rows per block: SmolLM2's layers (576 and
// 1536 columns) at 1024 / 2048 tokens went 1.23-1.29x / 0.87-0.93x -> 1.33-1.44x / 1.09-1.13x of dense from 128
// to 512 rows (1024 rows: no better).
constexpr int64_t AMX_ROWS = 512;
// Rows per block in K chunks of AMX_TILE_BYTES / (AMX_CHUNK_ROWS * 64) 32-column blocks (2048 columns): each block
// reads all of the inputs, so more rows per block read them less often, while narrower chunks carry more partial
// sums. The down projection (4096x11008) in bf16 at 1024-2048 tokens: 0.96-1.01x / 0.91-0.93x of dense with 128
// rows and 4096-column chunks, 1.05-1.12x / 0.96-1.00x with 256 and 2048 (384 or 512 rows: slower).
constexpr int64_t AMX_CHUNK_ROWS = 256;
constexpr int64_t AMX_TILE_BYTES = 1 << 20;  // decoded tiles per block (reused for every token)
// From this many tokens, weights wider than one K chunk go in K chunks (amx_block). In bf16, whole rows against K
// chunks: 4096x11008 at 32 tokens 3.2 / 3.5 ms, 48 3.9 / 3.8, 64 5.5-6.0 / 4.9-5.4, 128 9.7 / 8.0-8.4; 4096x4096 at
// 48 1.4 / 1.5, 64-128 equal, 256-2048 1.02-1.10x faster in chunks (256 tokens and wider than 4096 columns until
// the partial sums were stored per unit and prefetched).
constexpr int64_t AMX_CHUNK_TOKENS = 64;
// Most tokens per pass over the weight (each pass decodes the whole weight once). Two passes of 1024 tokens were
// faster at 2048 while the K chunks' partial sums were strided through a [tokens][rows] array (4096x11008: 139 ms
// in one pass, 2 x 55 ms in two); with each unit's sums in one prefetched 4 KiB piece (amx_block), one pass is
// faster (85-87 ms against 90-91 ms in two).
constexpr int64_t AMX_SLICE_TOKENS = 2048;
// Tokens as A from n >= min(rows, columns) / AMX_TOKENS_AS_A_DIV tokens, weights through whole rows. Measured with
// each rule paired against dense: the 7B block gains from 1024 tokens (0.98x -> 1.05x, and 0.94x -> 0.99x at 2048)
// and loses 3% at 512; SmolLM2's 192-1536-wide layers gain from 64-256 tokens.
#ifndef AMX_TOKENS_AS_A_DIV
#define AMX_TOKENS_AS_A_DIV 4
#endif

struct AmxPlan {
  bool chunked;           // K chunks (a wide weight, enough tokens)
  bool tokens_as_a;       // which operand the A tiles hold
  int64_t block_rows;     // rows per block, a multiple of 32
  int64_t blocks;         // a multiple of the threads where the rows allow
  int64_t chunk_kb;       // 32-column blocks per K chunk (all of them without chunks)
};

AmxPlan amx_plan(int64_t n, int64_t rows, int64_t cols, int threads) {
  AmxPlan plan;
  const int64_t cpad = (cols + 63) / 64 * 64;
  // the whole width with as many rows as fit in AMX_TILE_BYTES (at least 32), or AMX_CHUNK_ROWS rows in K chunks
  const int64_t whole = std::max<int64_t>(32, std::min<int64_t>(AMX_ROWS, AMX_TILE_BYTES / (cpad * 2) / 32 * 32));
  const int64_t chunk_kb = std::max<int64_t>(1, AMX_TILE_BYTES / (AMX_CHUNK_ROWS * 64));
  plan.chunked = n >= AMX_CHUNK_TOKENS && cpad / 32 > chunk_kb;
  // In K chunks the weights stay A: the inputs, laid out once as B tiles, are then read block after block as
  // contiguous 1 KiB tiles instead of 16 rows far apart (4096x11008 at 1024 / 2048 tokens: 1.19-1.22x / 1.01-1.13x
  // of dense with tokens as A, 1.29-1.30x / 1.11-1.18x with weights as A; 11008x4096 at 2048, tokens as A through
  // whole rows 1.07x, weights as A in chunks 1.18x).
  plan.tokens_as_a = !plan.chunked && n * AMX_TOKENS_AS_A_DIV >= std::min(rows, cols);
  // blocks of one size, as many per thread: 576 rows on 2 threads are 2 x 288, not 512 + 64; 320 rows in K chunks
  // 2 x 160, not 256 + 64
  const int64_t most = plan.chunked ? AMX_CHUNK_ROWS : whole;
  const int64_t even = ((rows + most - 1) / most + threads - 1) / threads * threads;
  plan.block_rows = ((rows + even - 1) / even + 31) / 32 * 32;
  plan.blocks = (rows + plan.block_rows - 1) / plan.block_rows;
  plan.chunk_kb = plan.chunked ? chunk_kb : cpad / 32;
  return plan;
}

bool amx_tokens_as_a(int64_t n, int64_t rows, int64_t cols) { return amx_plan(n, rows, cols, 1).tokens_as_a; }

// Rows per work item the tiled kernel takes for this call (tiled_rows; for the tests).
int64_t tiled_item_rows(int64_t ntok, int64_t rows, int64_t cols, int64_t threads, int64_t isa) {
  const int64_t ntiles = (ntok + TILE - 1) / TILE;
  return tiled_rows(rows, (cols + 63) / 64 * 64, ntiles, threads, isa).rows;
}

#if ATP_AMX
// ------------------------------------------------------------------------------------------ AMX (bf16 x bf16)
// bf16 weights and bf16 inputs on CPUs with AMX (Intel Sapphire Rapids and later), where torch's dense bf16 GEMM
// runs on the tile unit and no vector code keeps up with it above a few tokens. Rows are decoded into dense A
// tiles (16 rows x 32 columns, expand-loads of 32 packed values per 32 mask bits: the bitmask decides where each
// value lands, zeros elsewhere), inputs are laid out once per call as B tiles (pairs of columns interleaved per
// token, the tile unit's bf16 layout), and the tile unit multiplies: 2x2 tiles of 16 rows x 16 tokens in flight.
// That is four 1 KiB tile loads per four multiplies, so the tile unit waits on the loads unless they hit L1. (A
// software prefetch of the next step's tiles into L1 once gained 5-10%; with the scratch on huge pages and the
// deferred writes it cost 2-8% at every token count: 64 prefetches per step, mostly of lines already in L2.)
// What this saves against dense is the weight traffic (0.36x the bytes at 70%) and oneDNN's per-call weight
// reorder; the multiply itself is dense.
ATP_TARGET_BEGIN("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512vbmi2,bmi,bmi2,popcnt")

struct TileConfig {
  uint8_t palette, start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};



// 32 fp32 results (two vectors of 16 rows) into y's dtype, one token's 32 consecutive outputs, stored under mask
// `keep` (rows inside the matrix): one 64-byte store for bf16 and fp16, so the two halves of a line are not written
// at different times. bf16 as torch rounds it: to nearest even, NaN -> 0x7FC0.
inline __m256i to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}
inline void store32(float* y, __m512 lo, __m512 hi, __mmask32 keep) {
  _mm512_mask_storeu_ps(y, static_cast<__mmask16>(keep), lo);
  _mm512_mask_storeu_ps(y + 16, static_cast<__mmask16>(keep >> 16), hi);
}
inline void store32(at::BFloat16* y, __m512 lo, __m512 hi, __mmask32 keep) {
  _mm512_mask_storeu_epi16(y, keep, _mm512_inserti64x4(_mm512_castsi256_si512(to_bf16(lo)), to_bf16(hi), 1));
}
inline void store32(at::Half* y, __m512 lo, __m512 hi, __mmask32 keep) {
  constexpr int round = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  _mm512_mask_storeu_epi16(y, keep, _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtps_ph(lo, round)),
                                                       _mm512_cvtps_ph(hi, round), 1));
}

// Where the tile unit's finished sums go: y [n][rows] in O (fp32, bf16 or fp16), plus bias (fp32, or none).
struct AmxOut {
  void* y;
  int64_t n;
  const float* bias;
  torch::ScalarType dtype;
};

// A finished unit (32 rows x 32 tokens) into y's rows, bias added; tokens past n and rows past the matrix are left
// alone. `c` holds its sums as amx_block stores them: tiles 0, 1, 2, 3 at 0, 256, 512, 768 (a lone token tile: the
// two that exist at 0 and 256). Weights as A: tile 0 rows r.. x tokens t.., 1 rows r.. x tokens t+16.., 2 rows
// r+16.. x tokens t.., 3 both; each [row][token], so transposed on the way. Tokens as A: 0 tokens t.. x rows r..,
// 1 tokens t.. x rows r+16.., 2 tokens t+16.. x rows r.., 3 both; each [token][row], as y is.
template <typename O, bool TokensAsA>
void write_tiles(const AmxOut& out, int64_t rows, const float* c, bool pair, int64_t r, int64_t t) {
  if (r >= rows) return;
  O* y = static_cast<O*>(out.y);
  const __mmask32 keep = rows - r >= 32 ? ~0u : static_cast<__mmask32>((1ull << (rows - r)) - 1);
  const __m512 bias_lo = out.bias ? _mm512_maskz_loadu_ps(static_cast<__mmask16>(keep), out.bias + r)
                                  : _mm512_setzero_ps();
  const __m512 bias_hi = out.bias ? _mm512_maskz_loadu_ps(static_cast<__mmask16>(keep >> 16), out.bias + r + 16)
                                  : _mm512_setzero_ps();
  for (int h = 0; h < (pair ? 2 : 1); ++h) {  // tokens t + 16h..
    const float* lo_tile = c + (TokensAsA ? 2 * h : (pair ? h : 0)) * 256;       // rows r..
    const float* hi_tile = c + (TokensAsA ? 2 * h + 1 : (pair ? 2 + h : 1)) * 256;  // rows r + 16..
    __m512i lo[16], hi[16];
    for (int i = 0; i < 16; ++i) {
      lo[i] = _mm512_loadu_si512(lo_tile + 16 * i);
      hi[i] = _mm512_loadu_si512(hi_tile + 16 * i);
    }
    if (!TokensAsA) {
      transpose16(lo);
      transpose16(hi);
    }
    const int64_t t0 = t + 16 * h;
    for (int j = 0; j < 16 && t0 + j < out.n; ++j)
      store32(y + (t0 + j) * rows + r, _mm512_add_ps(_mm512_castsi512_ps(lo[j]), bias_lo),
              _mm512_add_ps(_mm512_castsi512_ps(hi[j]), bias_hi), keep);
  }
}

// Rows [r0, r0 + RB), 32-column blocks [kb0, kb1), decoded into wbuf as dense bf16 tiles, [RB / 16][kb1 - kb0][16]
// [32] (rows past the matrix are zero); cur[i] is row r0 + i's next packed value, advanced past the chunk. As A tiles
// (Transposed false) each tile row is one weight row's 32 columns; as B tiles (true) the 16 x 16 block of column
// pairs is transposed, so tile row j holds column pair j of the 16 rows (the tile unit's bf16 B layout). Sixteen
// rows are decoded side by side, so the stores run sequentially through each 1 KiB tile and the tile loads read
// contiguous tiles. (Decoding one row at a time into this layout put a row's consecutive stores 8 KiB apart, all in
// one L1 set, at 2-3x the cost; decoding rows into a row-major buffer made the decoding cheap but the strided tile
// loads slower once there are more than a few token tiles.)
template <bool Transposed>
inline void amx_decode_rows(const Op& op, int64_t r0, int64_t RB, int64_t kb0, int64_t kb1,
                            const at::BFloat16** cur, uint16_t* wbuf) {
  constexpr int R = 16;
  const int64_t nk = kb1 - kb0;
  for (int64_t g = 0; g < RB; g += R) {
    const uint32_t* m[R];
    const at::BFloat16* v[R];
    const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(R, op.rows - (r0 + g)));
    for (int i = 0; i < R; ++i) {
      const int64_t row = std::min(r0 + g + i, op.rows - 1);  // rows past the end: any real row, mask forced to 0
      m[i] = reinterpret_cast<const uint32_t*>(op.mask + row * op.words);
      v[i] = cur[g + i];
    }
    uint16_t* dst = wbuf + g * nk * 32;
    for (int64_t kb = kb0; kb < kb1; ++kb) {
      uint16_t* tile = dst + (kb - kb0) * R * 32;
      if (Transposed) {
        __m512i block[R];
        for (int i = 0; i < R; ++i) {
          const uint32_t k = i < valid ? m[i][kb] : 0u;
          block[i] = _mm512_maskz_expandloadu_epi16(k, v[i]);
          v[i] += __builtin_popcount(k);
        }
        transpose16(block);
        for (int j = 0; j < R; ++j) _mm512_storeu_si512(tile + j * 32, block[j]);
      } else {
        for (int i = 0; i < R; ++i) {
          const uint32_t k = i < valid ? m[i][kb] : 0u;
          _mm512_storeu_si512(tile + i * 32, _mm512_maskz_expandloadu_epi16(k, v[i]));
          v[i] += __builtin_popcount(k);
        }
      }
    }
    for (int i = 0; i < R; ++i) cur[g + i] = v[i];
  }
}

// One block of RB rows (a multiple of 32: at most AMX_ROWS, or AMX_CHUNK_ROWS in K chunks) against every token, in
// units of 32 rows x 32 tokens (2 x 2 tiles). The columns go in chunks of KC 32-column blocks, each decoded once and
// multiplied by every token, the partial sums carried in yT (this thread's, for one block at a time) between
// chunks: each unit's four tiles in one 4 KiB piece, the pieces in the order the units run (token pair, 32 rows),
// so that the next unit's piece can be prefetched while this one multiplies. (Tiles strided through a
// [tokens][rows] array put each of their 16 rows on another page, missed at every chunk: the down projection at
// 2048 tokens spent a fifth of its time there.) From AMX_CHUNK_TOKENS tokens a weight wider than one chunk (2048
// columns) goes in K chunks with more rows per block than whole rows would fit (32 of the down projection's 11008
// columns), so its inputs are read less often (4096x11008 bf16 at 256-512 tokens, 128 rows: 22.3 -> 19.2 and
// 42.7 -> 34.8 ms; AMX_CHUNK_ROWS says why 256 now); with fewer tokens the decoding dominates and the partial sums'
// traffic does not pay.
//
// Which operand is A (amx_plan chooses): weights as A (TokensAsA false) decode rows straight into A tiles, the
// inputs are laid out as B tiles (amx_inputs: a transpose per 16 tokens x 32 columns) and every finished unit is
// transposed into y; tokens as A (true) read the inputs as they are (x itself, or a row-major copy where a tile load
// would read past x's rows or its row stride is a multiple of 4 KiB: amx_linear), transpose
// each decoded 16 x 32 block of weights into a B tile instead, and write finished units into y row by row. The
// first transposes per token, the second per weight: the second wins once the tokens outnumber about a quarter of
// the weight's smaller side, except in K chunks (amx_plan).
//
// A unit's sums are written into y only after the next unit's multiplies are issued, so the vector work of the
// write runs while the tile unit works (SmolLM2-sized layers 12-15% faster).
template <bool TokensAsA>
void amx_block(const Op& op, const uint16_t* xv, int64_t ldx, const uint16_t* tail, int64_t ntb, float* yT,
               int64_t r0, int64_t RB, int64_t KC, uint16_t* wbuf, const AmxOut& out) {
  alignas(64) float done[2][4 * 256];  // two units' finished sums, on their way from the tiles to y
  struct Finished {
    const float* sums = nullptr;
    bool pair = false;
    int64_t r = 0, t = 0;
  } pending;
  const auto write_pending = [&]() {
    if (!pending.sums) return;
    const Finished f = pending;
    switch (out.dtype) {
      case torch::kBFloat16: write_tiles<at::BFloat16, TokensAsA>(out, op.rows, f.sums, f.pair, f.r, f.t); break;
      case torch::kHalf: write_tiles<at::Half, TokensAsA>(out, op.rows, f.sums, f.pair, f.r, f.t); break;
      default: write_tiles<float, TokensAsA>(out, op.rows, f.sums, f.pair, f.r, f.t); break;
    }
    pending.sums = nullptr;
  };
  int unit = 0;
  const int64_t nkb = op.words * 2, cpad = op.words * 64, strips = RB / 32;
  const at::BFloat16* vals = static_cast<const at::BFloat16*>(op.vals);
  const at::BFloat16* cur[std::max(AMX_ROWS, AMX_CHUNK_ROWS)];
  for (int64_t i = 0; i < RB; ++i) cur[i] = vals + op.off[std::min(r0 + i, op.rows - 1)];
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
  // Tiles: 4 and 5 the A operands, 6 and 7 the B operands; sums 0 = (A 4, B 6), 1 = (4, 7), 2 = (5, 6), 3 = (5, 7).
  // Weights as A: 4/5 rows s../s+16.., 6/7 tokens t../t+16..; tokens as A: 4/5 tokens t../t+16.., 6/7 rows s../s+16...
  // A lone last token tile leaves out the second token tile and its two sums.
  for (int64_t kb0 = 0; kb0 < nkb; kb0 += KC) {
    const int64_t kb1 = std::min(nkb, kb0 + KC), nk = kb1 - kb0;
    amx_decode_rows<TokensAsA>(op, r0, RB, kb0, kb1, cur, wbuf);
    for (int64_t tb = 0; tb < ntb; tb += 2) {
      const bool pair = tb + 1 < ntb;  // an odd last token tile (up to 16 tokens in all, say) goes alone
      // the token tiles' first step, and the distance between steps and between rows of a tile (bytes)
      // (tokens as A: token tile i is rows 16i.. of xv, row stride ldx, except a partial last one, padded in `tail`)
      const auto token_rows = [&](int64_t i) { return tail && i == ntb - 1 ? tail : xv + i * 16 * ldx; };
      const uint16_t* x0 = TokensAsA ? token_rows(tb) + kb0 * 32 : xv + tb * cpad * 16 + kb0 * 512;
      const uint16_t* x1 = TokensAsA ? (pair ? token_rows(tb + 1) + kb0 * 32 : x0) : x0 + cpad * 16;
      constexpr int64_t x_step = TokensAsA ? 32 : 512;
      const int64_t x_stride = TokensAsA ? ldx * 2 : 64;
      // In K chunks (weights as A: amx_plan) every block reads all the inputs, so each pair's first strip read
      // them from memory: the next pair's input tiles for this chunk (or the first pair's for the next chunk) go
      // into L2 while this pair's strips run, spread over all their steps (4096x11008 at 1024-2048 tokens: 5-10%)
      const char* next_x[2] = {nullptr, nullptr};
      int64_t next_x_lines = 0;  // 64-byte lines per token tile
      if (!TokensAsA && yT && (tb + 2 < ntb || kb1 < nkb)) {
        const bool same_chunk = tb + 2 < ntb;
        const int64_t t = same_chunk ? tb + 2 : 0, k = same_chunk ? kb0 : kb1;
        next_x[0] = reinterpret_cast<const char*>(xv + t * cpad * 16 + k * 512);
        if (t + 1 < ntb) next_x[1] = next_x[0] + cpad * 32;
        next_x_lines = (same_chunk ? nk : std::min(KC, nkb - kb1)) * 16;
      }
      const int64_t x_lines_per_step = (2 * next_x_lines + strips * nk - 1) / (strips * nk);
      for (int64_t s = 0; s < RB; s += 32) {
        // this unit's partial sums (K chunks only): sums 0-3 at 0, 256, 512, 768
        float* c = !yT ? nullptr : yT + ((tb / 2) * strips + s / 32) * 1024;
        // and the next unit's, on their way into L1 while this one multiplies (none after the block's last)
        const char* next_c = c && (tb + 2 < ntb || s + 32 < RB) ? reinterpret_cast<const char*>(c + 1024) : nullptr;
        const int64_t lines_per_step = (64 + nk - 1) / nk;
        const uint16_t* w0 = wbuf + s * nk * 32;  // rows s.. and s + 16.., each [nk][16][32]
        const uint16_t* w1 = w0 + 16 * nk * 32;
        const uint16_t* a0 = TokensAsA ? x0 : w0;
        const uint16_t* a1 = TokensAsA ? x1 : w1;
        const uint16_t* b0 = TokensAsA ? w0 : x0;
        const uint16_t* b1 = TokensAsA ? w1 : x1;
        const int64_t a_step = TokensAsA ? x_step : 512, b_step = TokensAsA ? 512 : x_step;
        const int64_t a_stride = TokensAsA ? x_stride : 64, b_stride = TokensAsA ? 64 : x_stride;
        const bool use_a1 = !TokensAsA || pair, use_b1 = TokensAsA || pair;
        if (kb0 == 0) {
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
        } else {
          _tile_loadd(0, c, 64);
          if (use_b1) _tile_loadd(1, c + 256, 64);
          if (use_a1) _tile_loadd(2, c + 512, 64);
          if (pair) _tile_loadd(3, c + 768, 64);
        }
        for (int64_t kb = 0; kb < nk; ++kb) {
          if (next_c)
            for (int64_t line = kb * lines_per_step; line < std::min<int64_t>(64, (kb + 1) * lines_per_step); ++line)
              _mm_prefetch(next_c + line * 64, _MM_HINT_T0);
          if (next_x_lines) {
            const int64_t first = ((s / 32) * nk + kb) * x_lines_per_step;
            for (int64_t l = first; l < std::min(2 * next_x_lines, first + x_lines_per_step); ++l) {
              const bool second = l >= next_x_lines;
              if (next_x[second]) _mm_prefetch(next_x[second] + (l - second * next_x_lines) * 64, _MM_HINT_T1);
            }
          }
          _tile_loadd(4, a0 + kb * a_step, a_stride);
          _tile_loadd(6, b0 + kb * b_step, b_stride);
          _tile_dpbf16ps(0, 4, 6);
          if (use_b1) {
            _tile_loadd(7, b1 + kb * b_step, b_stride);
            _tile_dpbf16ps(1, 4, 7);
          }
          if (use_a1) {
            _tile_loadd(5, a1 + kb * a_step, a_stride);
            _tile_dpbf16ps(2, 5, 6);
          }
          if (pair) _tile_dpbf16ps(3, 5, 7);
        }
        write_pending();  // the previous unit's sums, while this unit's multiplies run
        if (kb1 < nkb) {  // partial sums, carried to the next chunk
          _tile_stored(0, c, 64);
          if (use_b1) _tile_stored(1, c + 256, 64);
          if (use_a1) _tile_stored(2, c + 512, 64);
          if (pair) _tile_stored(3, c + 768, 64);
        } else {  // finished: into `done` (write_tiles' layout), written into y after the next unit's multiplies
          float* sums = done[unit++ & 1];
          _tile_stored(0, sums, 64);
          if (use_b1) _tile_stored(1, sums + 256, 64);
          if (use_a1) _tile_stored(2, sums + (use_b1 ? 512 : 256), 64);
          if (pair) _tile_stored(3, sums + 768, 64);
          pending = {sums, pair, r0 + s, tb * 16};
        }
      }
    }
  }
  write_pending();
  _tile_release();
}

// The inputs as B tiles, [token tile][32-column block][16 column pairs][16 tokens][2] bf16, zero padded: per token
// tile and column block, 16 rows of 32 values loaded and transposed as pairs (torch's 3-D transpose of the same took
// 4.5 ms for 1024 x 4096, as long as a third of the multiply). Blocks in a function of their own, for clang (see
// tile_input_block_avx2).
void amx_input_block(const at::BFloat16* x, int64_t n, int64_t cols, int64_t nkb, int64_t i, uint16_t* xv) {
  const int64_t tb = i / nkb, kb = i % nkb, c0 = kb * 32;
  const __mmask32 keep = cols - c0 >= 32 ? ~0u : static_cast<__mmask32>((1ull << std::max<int64_t>(0, cols - c0)) - 1);
  __m512i v[16];
  for (int t = 0; t < 16; ++t) {
    const int64_t tok = tb * 16 + t;
    v[t] = tok < n ? _mm512_maskz_loadu_epi16(keep, x + tok * cols + c0) : _mm512_setzero_si512();
  }
  transpose16(v);
  uint16_t* dst = xv + (tb * nkb + kb) * 512;
  for (int j = 0; j < 16; ++j) _mm512_storeu_si512(dst + 32 * j, v[j]);
}

void amx_inputs(const at::BFloat16* x, int64_t n, int64_t cols, int64_t nkb, uint16_t* xv) {
  const int64_t ntb = (n + TILE - 1) / TILE;
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t i = 0; i < ntb * nkb; ++i) amx_input_block(x, n, cols, nkb, i, xv);
}

// The inputs as A tiles for tokens as A: x's rows copied into [tpad][ld] bf16 (ld = the padded width + 32),
// zero padded past `cols` and past the last token. The tile loads then never read past x, and the extra 64 bytes
// per row keep the 16 rows of a tile out of one L1 set (at 4096 columns, rows 8 KiB apart all map to one set).
void amx_input_rows(const at::BFloat16* x, int64_t n, int64_t cols, int64_t ld, int64_t tpad, uint16_t* xa) {
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t t = 0; t < tpad; ++t) {
    uint16_t* dst = xa + t * ld;
    const int64_t have = t < n ? cols : 0;
    if (have) std::memcpy(dst, x + t * cols, have * 2);
    std::memset(dst + have, 0, (ld - have) * 2);
  }
}

ATP_TARGET_END
#endif  // ATP_AMX

// ------------------------------------------------------------------------------------------ dispatch
int64_t detect_isa() {
#if ATP_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma"))
    return ISA_AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt") &&
      __builtin_cpu_supports("bmi2"))
    return ISA_AVX2;
#endif
  return ISA_SCALAR;
}

const int64_t BEST_ISA = detect_isa();

// VBMI2's 16-bit expand-loads (Ice Lake, Zen 4 and later; not Skylake-SP / Cascade Lake): the AVX-512 kernels
// need them for bf16 and fp16 values only (fp32 expands with AVX-512 F). Without them those values take the AVX2
// kernels: widening the values to expand them as 32-bit lanes instead ran the bf16 decode at 1.51x dense against
// 2.43x (7B shapes, 70%). set_avx512_vbmi2(false) lets the tests run this CPU as one without.
bool cpu_vbmi2() {
#if ATP_X86
  __builtin_cpu_init();
  return BEST_ISA == ISA_AVX512 && __builtin_cpu_supports("avx512vbmi2");
#else
  return false;
#endif
}
bool use_vbmi2 = cpu_vbmi2();

// AVX512_BF16 (Cooper Lake, Sapphire Rapids, Zen 4 and later) beside VBMI2: the tiled kernel and the decode of 5+
// tokens for bf16 weights and bf16 inputs run on its dot products (pair_item, dot_decode_rows).
// set_avx512_bf16(false) lets the tests and the benchmark run the fp32 kernels on such a CPU instead.
bool cpu_bf16_dot() {
#if ATP_BF16_DOT
  if (!cpu_vbmi2()) return false;
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 5) & 1u);
#else
  return false;
#endif
}
bool use_bf16_dot = cpu_bf16_dot();

// AMX-TILE + AMX-BF16 reported by the CPU and the tile state granted to this process by Linux (asked once).
bool amx_ready() {
#if ATP_AMX
  static const bool ready = [] {
    if (!cpu_vbmi2()) return false;  // the row decode uses VBMI2's 16-bit expand-loads
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 22) & 1u) || !((d >> 24) & 1u)) return false;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
  }();
  return ready;
#else
  return false;
#endif
}

// The instruction set a call on these values runs: the one asked for, except 16-bit values on AVX-512 without
// VBMI2, which take AVX2.
int64_t checked_isa(int64_t isa, const torch::Tensor& values) {
  TORCH_CHECK(isa >= ISA_SCALAR && isa <= ISA_AVX512, "isa must be 0 (C++), 1 (AVX2) or 2 (AVX-512)");
  TORCH_CHECK(isa <= BEST_ISA, "this CPU does not support the requested instruction set (best: ", BEST_ISA, ")");
  if (isa == ISA_AVX512 && values.element_size() == 2 && !use_vbmi2) return ISA_AVX2;
  return isa;
}

using DecodeRows = void (*)(const Op&, int64_t, int64_t);

// Whether a decode of these values on this (checked) instruction set reads its inputs as pairs (pairs_layout).
bool decodes_pairs(const torch::Tensor& values, int64_t isa) {
  return ATP_X86 && isa == ISA_AVX512 && values.scalar_type() == torch::kBFloat16;
}

// The decode's inputs (fp32 [n, cpad], cpad a multiple of 64) for decode_rows_pairs_avx512: per 32 columns the 16
// even columns, then the 16 odd ones.
torch::Tensor pairs_layout(const torch::Tensor& x) {
  const int64_t n = x.size(0), cpad = x.size(1);
  return x.view({n, cpad / 32, 16, 2}).transpose(2, 3).contiguous().view({n, cpad});
}

template <typename T>
DecodeRows decode_rows_for(int64_t isa) {
#if ATP_X86
  if (isa == ISA_AVX512) {
    if constexpr (std::is_same<T, at::BFloat16>::value) return decode_rows_pairs_avx512<T>;
    else return decode_rows_avx512<T>;
  }
  if (isa == ISA_AVX2) return decode_rows_avx2<T>;
#endif
  return decode_rows_scalar<T>;
}

template <typename T>
void decode_run(const Op& op, int64_t isa) {
  const DecodeRows fn = decode_rows_for<T>(isa);
  const int64_t chunks = (op.rows + ROW_CHUNK - 1) / ROW_CHUNK;
  const int nt = at::get_num_threads();
  // static: each thread one contiguous share of the rows (sequential streams for the prefetchers)
#pragma omp parallel for schedule(static) num_threads(nt) if (op.rows * op.words * op.ntok >= PARALLEL_MIN_WORK)
  for (int64_t c = 0; c < chunks; ++c) fn(op, c * ROW_CHUNK, std::min(op.rows, (c + 1) * ROW_CHUNK));
}

// Several packed matrices, each times its own few tokens, in one parallel region. A mixture-of-experts decode step
// multiplies 16 matrices of 2-4 MB per layer; one call each streamed them at about half the rate one matrix of the
// same bytes gets (every call forks its team and restarts its threads' row streams). Each thread takes one
// contiguous share of the matrices' rows, weighted by the rows' work, so it streams whole matrices in a row.
template <typename T>
void grouped_decode_run(const std::vector<Op>& ops, int64_t isa) {
  const DecodeRows fn = decode_rows_for<T>(isa);
  std::vector<int64_t> first_work;  // per matrix: the work before it (rows x words x passes of 4 tokens)
  int64_t total = 0;
  for (const Op& op : ops) {
    first_work.push_back(total);
    total += op.rows * op.words * ((op.ntok + DECODE_NT - 1) / DECODE_NT);
  }
  const int nt = at::get_num_threads();
#pragma omp parallel num_threads(nt) if (total >= PARALLEL_MIN_WORK)
  {
#ifdef _OPENMP
    const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
#else
    const int64_t t = 0, n = 1;
#endif
    const int64_t lo = total * t / n, hi = total * (t + 1) / n;
    // this thread's rows of matrix i: those whose work starts in [lo, hi), cut at multiples of 4 (row groups)
    auto rows_of = [&](size_t i) {
      const Op& op = ops[i];
      const int64_t per_row = op.words * ((op.ntok + DECODE_NT - 1) / DECODE_NT);
      auto row_at = [&](int64_t work) {
        const int64_t r = (std::max<int64_t>(work - first_work[i], 0) + per_row - 1) / per_row;
        return std::min(op.rows, (r + 3) / 4 * 4);
      };
      return per_row ? std::make_pair(row_at(lo), row_at(hi)) : std::make_pair(int64_t(0), int64_t(0));
    };
    for (size_t i = 0; i < ops.size(); ++i) {
      const auto [r0, r1] = rows_of(i);
      if (r0 >= r1) continue;
      fn(ops[i], r0, r1);
    }
  }
}

#if ATP_BF16_DOT
// Rows per work item of the packed-pairs kernel (pair_item). A weight with many rows: DOT_ROWS rows per item in
// column blocks whose inputs take DOT_SLAB_BYTES (pair_block_cols). With that kernel, 4096x4096 bf16 at 70%, 2
// threads, Zen 5, against dense at 256 / 1024 tokens: 64 or 192 rows as fast as 128; 16 / 24 / 32 / 48 / 64 KiB of
// inputs 1.08 / 1.20 / 1.28 / 1.30 / 1.24x at 256 tokens, 1.08 / 1.19 / 1.27 / 1.31 / 1.19x at 1024, 128 KiB 1.02x
// (at 50% 32 KiB a little ahead of 48). (The adjacent-pairs kernel before it had measured its 128-row items
// against 32 rows: 0.88-0.95x against 0.75-0.85x at 128 tokens.) Fewer rows than 4 such items per thread keep half
// the AVX-512 kernel's standard items, for balance; tall and short items as the AVX-512 kernel's.
constexpr int64_t DOT_ROWS = 128;
constexpr int64_t DOT_SLAB_BYTES = 32 * 1024;
inline int64_t dot_item_rows(int64_t plan_rows, int64_t rows, int64_t threads) {
  if (plan_rows != TILED_ROWS_AVX512) return plan_rows;
  return rows >= DOT_ROWS * 4 * threads ? DOT_ROWS : plan_rows / 2;
}
// Columns per block for nc chunks of 32 tokens (2 bytes per token per column, a multiple of 32 columns): DOT_SLAB_BYTES
// of inputs, for items of any size (their partial sums stay in L2). Tall items had taken the AVX-512 kernel's L1
// budget, which 192 rows of 256 tokens' sums overrun (32-column blocks): 192x576 at 512-1024 tokens, Zen 5, 0.84-0.85x
// -> 0.90-0.91x of dense; SmolLM2's other layers within noise.
inline int64_t pair_block_cols(int64_t nc) {
  return std::min(DOT_MAX_BLOCK, std::max<int64_t>(32, DOT_SLAB_BYTES / (nc * 64) / 32 * 32));
}
#endif  // ATP_BF16_DOT

// dot: bf16 values against bf16 inputs laid out by column_inputs, on AVX512_BF16 (pair_item).
template <typename T>
void tiled_run(const Op& op, int64_t isa, bool dot = false) {
  const int64_t ntiles = (op.ntok + TILE - 1) / TILE, cpad = op.words * 64;
  const int nt = at::get_num_threads();
  const int64_t chunks = (op.rows + ROW_CHUNK - 1) / ROW_CHUNK;
#if ATP_X86
  if (isa == ISA_AVX512 || isa == ISA_AVX2) {  // op.x: the grouped layout (tile_inputs)
    const int64_t per = dot ? PAIR_GROUP / TILE : group_tiles(isa), groups = (ntiles + per - 1) / per;  // tiles
    const TiledItems plan = tiled_rows(op.rows, cpad, ntiles, nt, isa);
#if ATP_BF16_DOT
    const int64_t R = dot ? dot_item_rows(plan.rows, op.rows, nt) : plan.rows;
#else
    const int64_t R = plan.rows;
#endif
    const int64_t items = (op.rows + R - 1) / R;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t i = 0; i < groups * items; ++i) {
      const int64_t g = i / items, c = i % items;
      const int64_t G = std::min<int64_t>(per, ntiles - g * per);
      const float* xg = op.x + g * per * TILE * cpad;
      const int64_t t0 = g * per * TILE, r0 = c * R, r1 = std::min(op.rows, (c + 1) * R);
      const int64_t kb = tiled_block_cols(static_cast<int>(G), R, plan.l1_budget);
#if ATP_BF16_DOT
      if constexpr (std::is_same<T, at::BFloat16>::value)
        if (dot) {  // the group's inputs column-major (column_inputs), in chunks of 32 tokens
          const int64_t nc = (G * TILE + PAIR_CHUNK - 1) / PAIR_CHUNK;
          const auto* xc = reinterpret_cast<const at::BFloat16*>(op.x) + g * PAIR_GROUP * cpad;
          pair_item_n<T>(op, xc, nc, G % 2 == 1, t0, r0, r1, pair_block_cols(nc));
          continue;
        }
#endif
      if (isa == ISA_AVX512) tiled_item_avx512_g<T>(op, xg, G, t0, r0, r1, kb);
      else tiled_item_avx2_g<T>(op, xg, G, t0, r0, r1, kb);
    }
    return;
  }
#endif
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t i = 0; i < ntiles * chunks; ++i) {
    const int64_t tile = i / chunks, c = i % chunks;
    tiled_rows_scalar<T>(op, tile, c * ROW_CHUNK, std::min(op.rows, (c + 1) * ROW_CHUNK));
  }
}

template <typename T>
void densify_run(const Op& op, T* out, int64_t cols, int64_t isa) {
  void (*fn)(const Op&, T*, int64_t, int64_t, int64_t) = densify_rows_scalar<T>;
#if ATP_X86
  if (isa == ISA_AVX512) fn = densify_rows_avx512<T>;
  else if (isa == ISA_AVX2) fn = densify_rows_avx2<T>;
#endif
  const int64_t chunks = (op.rows + ROW_CHUNK - 1) / ROW_CHUNK;
  const int nt = at::get_num_threads();
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t c = 0; c < chunks; ++c) fn(op, out, cols, c * ROW_CHUNK, std::min(op.rows, (c + 1) * ROW_CHUNK));
}

void check(const torch::Tensor& mask, const torch::Tensor& vals, const torch::Tensor& off) {
  TORCH_CHECK(mask.dtype() == torch::kInt64 && mask.dim() == 2 && mask.is_contiguous(), "mask: int64 2-D contiguous");
  TORCH_CHECK(off.dtype() == torch::kInt64 && off.numel() == mask.size(0) + 1 && off.is_contiguous(), "row_offsets");
  TORCH_CHECK(vals.dim() == 1 && vals.is_contiguous(), "values: 1-D contiguous");
  TORCH_CHECK(mask.device().is_cpu() && vals.device().is_cpu() && off.device().is_cpu(), "CPU tensors only");
}

Op make_op(const torch::Tensor& mask, const torch::Tensor& vals, const torch::Tensor& off, const float* x, float* y,
           int64_t ntok) {
  return Op{mask.data_ptr<int64_t>(), vals.data_ptr(), off.data_ptr<int64_t>(), x, y, mask.size(0), mask.size(1),
            ntok, vals.numel()};
}

#define ATP_DISPATCH(VALS, FN, ...)                                                            \
  switch (VALS.scalar_type()) {                                                                \
    case torch::kFloat: FN<float>(__VA_ARGS__); break;                                         \
    case torch::kBFloat16: FN<at::BFloat16>(__VA_ARGS__); break;                               \
    case torch::kHalf: FN<at::Half>(__VA_ARGS__); break;                                       \
    default: TORCH_CHECK(false, "values dtype must be float32, bfloat16 or float16");           \
  }

}  // namespace

int64_t best_isa() { return BEST_ISA; }

// x [n, in_features] contiguous and zero padded to cpad columns, in its own dtype.
torch::Tensor padded_columns(const torch::Tensor& x, int64_t cpad) {
  return cpad > x.size(1) ? at::constant_pad_nd(x, {0, cpad - x.size(1)}) : x.contiguous();
}

// Inputs [n, in_features] as the decode kernels read them: fp32, contiguous, zero padded to cpad columns.
torch::Tensor decode_inputs(torch::Tensor x, int64_t cpad) {
  return padded_columns(x.scalar_type() == torch::kFloat ? x : x.to(torch::kFloat), cpad);
}

namespace {
bool tiles_dot(const torch::Tensor& values, const torch::Tensor& x, int64_t isa);
torch::Tensor spmv_dot(const torch::Tensor& mask, const torch::Tensor& values, const torch::Tensor& row_offsets,
                       const torch::Tensor& x);
}  // namespace

// x: [ntok, words*64] fp32 contiguous, zero padded (decode_inputs), or bf16 [ntok, in_features]; returns y
// [ntok, rows] fp32. bf16 inputs with bf16 values take the dot-product decode from 5 tokens where it runs
// (spmv_dot: 5 to 7 tokens in one pass over the weight, more in column blocks; 1 to 4 keep the fp32 decode, which
// reads the weight once for them too); otherwise they are read as fp32.
torch::Tensor spmv(torch::Tensor mask, torch::Tensor values, torch::Tensor row_offsets, torch::Tensor x,
                   int64_t isa) {
  check(mask, values, row_offsets);
  isa = checked_isa(isa, values);
  if (x.scalar_type() == torch::kBFloat16) {
    TORCH_CHECK(x.dim() == 2 && x.size(1) <= mask.size(1) * 64, "x: bf16 [ntok, in_features]");
    if (x.size(0) > DECODE_NT && tiles_dot(values, x, isa)) return spmv_dot(mask, values, row_offsets, x);
    x = decode_inputs(x, mask.size(1) * 64);
  }
  TORCH_CHECK(x.dtype() == torch::kFloat && x.dim() == 2 && x.is_contiguous() && x.size(1) == mask.size(1) * 64,
              "x: fp32 [ntok, words*64] contiguous");
  auto y = torch::empty({x.size(0), mask.size(0)}, x.options());
  const torch::Tensor xin = decodes_pairs(values, isa) ? pairs_layout(x) : x;
  const Op op = make_op(mask, values, row_offsets, xin.data_ptr<float>(), y.data_ptr<float>(), x.size(0));
  ATP_DISPATCH(values, decode_run, op, isa);
  return y;
}

// Matrix g times rows [starts[g], starts[g] + counts[g]) of x into the same rows of y, for every g, in one
// parallel region (grouped_decode_run). x: [N, in_features] of any float dtype; y: [N, rows] fp32 contiguous,
// written only in the listed rows; every matrix has the same shape and values dtype.
void grouped_decode_into(const torch::Tensor& x, torch::Tensor y, const std::vector<int64_t>& starts,
                         const std::vector<int64_t>& counts, const std::vector<torch::Tensor>& masks,
                         const std::vector<torch::Tensor>& values, const std::vector<torch::Tensor>& row_offsets,
                         int64_t in_features, int64_t isa) {
  const size_t groups = masks.size();
  TORCH_CHECK(starts.size() == groups && counts.size() == groups && values.size() == groups &&
                  row_offsets.size() == groups, "grouped: one start, count, mask, values and row_offsets per matrix");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features, "grouped: x must be [N, in_features]");
  TORCH_CHECK(y.dim() == 2 && y.is_contiguous() && y.scalar_type() == torch::kFloat && y.size(0) == x.size(0),
              "grouped: y must be fp32 [N, rows] contiguous");
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), "grouped: CPU tensors only");
  if (groups == 0) return;
  const int64_t words = masks[0].size(1), cpad = words * 64;
  TORCH_CHECK(in_features <= cpad, "grouped: in_features exceeds the mask's columns");
  for (size_t g = 0; g < groups; ++g) {
    check(masks[g], values[g], row_offsets[g]);
    TORCH_CHECK(masks[g].size(0) == y.size(1) && masks[g].size(1) == words, "grouped: every matrix [rows, words]");
    TORCH_CHECK(values[g].scalar_type() == values[0].scalar_type(), "grouped: one values dtype for every matrix");
    TORCH_CHECK(starts[g] >= 0 && counts[g] >= 0 && starts[g] + counts[g] <= x.size(0), "grouped: rows out of x");
    // disjoint rows in order: two threads must never write one row of y
    TORCH_CHECK(g == 0 || starts[g] >= starts[g - 1] + counts[g - 1], "grouped: rows must be ascending, disjoint");
  }
  isa = checked_isa(isa, values[0]);
  const auto x2 = decodes_pairs(values[0], isa) ? pairs_layout(decode_inputs(x, cpad)) : decode_inputs(x, cpad);
  const float* xp = x2.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  std::vector<Op> ops;
  for (size_t g = 0; g < groups; ++g)
    if (counts[g])
      ops.push_back(make_op(masks[g], values[g], row_offsets[g], xp + starts[g] * cpad, yp + starts[g] * y.size(1),
                            counts[g]));
  ATP_DISPATCH(values[0], grouped_decode_run, ops, isa);
}

namespace {
// The tiled kernels' input layout, zero padded to whole tiles and to cpad columns: for the SIMD kernels groups of
// up to group_tiles(isa) tiles, each [cpad][G*16] (see tiled_item_avx512); the portable path [ntiles][cpad][16].
torch::Tensor tile_inputs(const torch::Tensor& x2, int64_t cpad, int64_t isa) {
  const int64_t n = x2.size(0), pad = cpad - x2.size(1), ntiles = (n + TILE - 1) / TILE;
  if (isa != ISA_AVX512 && isa != ISA_AVX2) {
    return at::constant_pad_nd(x2, {0, pad, 0, ntiles * TILE - n}).view({ntiles, TILE, cpad}).transpose(1, 2)
        .contiguous();
  }
  const int64_t per = group_tiles(isa);
  auto out = torch::empty({ntiles * TILE * cpad}, x2.options());
#if ATP_X86
  if (isa == ISA_AVX512) {
    tile_inputs_avx512(x2.data_ptr<float>(), n, x2.size(1), cpad, per, out.data_ptr<float>());
    return out;
  }
  if (isa == ISA_AVX2) {
    tile_inputs_avx2(x2.data_ptr<float>(), n, x2.size(1), cpad, per, out.data_ptr<float>());
    return out;
  }
#endif
  for (int64_t t0 = 0; t0 < n; t0 += per * TILE) {
    const int64_t w = std::min<int64_t>(per, ntiles - t0 / TILE) * TILE, rows = std::min(w, n - t0);
    auto part = at::constant_pad_nd(x2.narrow(0, t0, rows), {0, pad, 0, w - rows});
    out.narrow(0, t0 * cpad, w * cpad).view({cpad, w}).copy_(part.t());
  }
  return out;
}
}  // namespace

bool has_bf16_dot() { return use_bf16_dot && use_vbmi2; }

// Returns the previous setting; only switches the dot-product kernel off on a CPU that has it.
bool set_avx512_bf16(bool on) {
  const bool before = use_bf16_dot;
  use_bf16_dot = on && cpu_bf16_dot();
  return before;
}

namespace {
// Whether a tiled call with these values and inputs on this instruction set runs on AVX512_BF16's dot products.
bool tiles_dot(const torch::Tensor& values, const torch::Tensor& x, int64_t isa) {
  return isa == ISA_AVX512 && has_bf16_dot() && values.scalar_type() == torch::kBFloat16 &&
         x.scalar_type() == torch::kBFloat16;
}

// The packed-pairs kernel's inputs (pair_item): bf16 [n, in_features] -> per group of PAIR_GROUP tokens (the last
// may have fewer chunks of 32), [cpad][chunks * 32] bf16, zero padded. Within a chunk, slot 8 * l + w holds token
// 4 * l + w and slot 8 * l + 4 + w token 16 + 4 * l + w (l < 4, w < 4): vpunpcklwd of two columns' chunks then pairs
// tokens 0-15 in order, vpunpckhwd tokens 16-31 (each works within 128-bit lanes: lane l holds slots 8l-8l+7).
torch::Tensor column_inputs(const torch::Tensor& x, int64_t cpad) {
  const auto xb = x.contiguous();
  const int64_t n = xb.size(0), cols = xb.size(1), groups = (n + PAIR_GROUP - 1) / PAIR_GROUP;
  auto out = torch::empty({groups * PAIR_GROUP * cpad}, xb.options());
  const uint16_t* src = reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>());
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  constexpr int64_t CBLK = 64;  // columns per work item (cpad is a multiple)
  const int64_t cblocks = cpad / CBLK;
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t item = 0; item < groups * cblocks; ++item) {
    const int64_t g = item / cblocks, c0 = item % cblocks * CBLK;
    const int64_t tg = g * PAIR_GROUP, nc = std::min<int64_t>(PAIR_CHUNKS, (n - tg + PAIR_CHUNK - 1) / PAIR_CHUNK);
    const int64_t width = nc * PAIR_CHUNK;
    uint16_t* base = dst + tg * cpad;
#if ATP_BF16_DOT
    for (int64_t c = c0; c < c0 + CBLK; c += 32)
      for (int64_t q = 0; q < nc; ++q)
        transpose_chunk(src, n, cols, tg + q * PAIR_CHUNK, c, base + c * width + q * PAIR_CHUNK, width);
#else
    (void)base;
#endif
  }
  return out;
}

// The decode on AVX512_BF16: x bf16 [ntok, in_features] (5 or more tokens); returns y [ntok, rows] fp32.
// Up to DOT_DECODE_NT tokens dot_decode_rows, more dot_block_item.
torch::Tensor spmv_dot(const torch::Tensor& mask, const torch::Tensor& values, const torch::Tensor& row_offsets,
                       const torch::Tensor& x) {
  const int64_t ntok = x.size(0), cpad = mask.size(1) * 64;
  auto y = torch::empty({ntok, mask.size(0)}, x.options().dtype(torch::kFloat));
  if (ntok == 0) return y;
  const auto xb = padded_columns(x, cpad);
#if ATP_BF16_DOT
  using B16 = at::BFloat16;
  if (ntok > DOT_DECODE_NT) {  // in passes of up to DOT_BLOCK_TOKENS tokens (dot_block_item)
    const int64_t np_all = (ntok + DOT_BLOCK_NT - 1) / DOT_BLOCK_NT * DOT_BLOCK_NT;
    auto xr = torch::empty({np_all * cpad}, xb.options());
    dot_block_inputs(xb.data_ptr<B16>(), ntok, cpad, xr.data_ptr<B16>());
    const Op op = make_op(mask, values, row_offsets, nullptr, y.data_ptr<float>(), ntok);
    const int64_t items = (op.rows + DOT_BLOCK_ROWS - 1) / DOT_BLOCK_ROWS;
    for (int64_t t0 = 0; t0 < np_all; t0 += DOT_BLOCK_TOKENS) {
      const int64_t np = std::min(DOT_BLOCK_TOKENS, np_all - t0);
      const B16* xp = xr.data_ptr<B16>() + t0 * cpad;
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
      for (int64_t i = 0; i < items; ++i)
        dot_block_item<B16>(op, xp, np, t0, i * DOT_BLOCK_ROWS, std::min(op.rows, (i + 1) * DOT_BLOCK_ROWS));
    }
    return y;
  }
  // 5 to DOT_DECODE_NT tokens: one pass over the weight (dot_decode_rows)
  const Op op = make_op(mask, values, row_offsets, nullptr, y.data_ptr<float>(), ntok);
  void (*fn)(const Op&, const B16*, int64_t, int64_t) = nullptr;
  static_assert(DOT_DECODE_NT <= 8, "with_count_up_to_8");
  with_count_up_to_8(ntok, [&](auto nt) { fn = dot_decode_rows<B16, decltype(nt)::value>; });
  const int64_t chunks = (op.rows + ROW_CHUNK - 1) / ROW_CHUNK;
  const B16* xp = xb.data_ptr<B16>();
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t c = 0; c < chunks; ++c) fn(op, xp, c * ROW_CHUNK, std::min(op.rows, (c + 1) * ROW_CHUNK));
#endif
  return y;
}

// The tiled kernels' laid-out inputs in one buffer up to this size: glibc maps a larger allocation afresh on every call
// (its mmap threshold, 32 MiB at most) and the kernel then faults its pages in. Past it, passes of whole token groups
// filling half of it. The bf16 packed-pairs kernel on 4096x11008 at 70%, 2048 tokens (45 MB of inputs), one process
// against dense: 1.12x / 1.20x in one buffer, 1.23x / 1.28x in passes of 2 groups; at 1024 tokens (22.5 MB) one
// buffer 1.33x against 1.25-1.29x in passes; SmolLM2's 576-column layers 3-6% slower in passes. The fp32 kernel on the
// same weight (Zen 5, where torch's fp32 GEMM is slow): 1024 / 2048 tokens (45 / 90 MB) 2.50x / 2.39x -> 2.69x / 2.55x.
constexpr int64_t TILED_INPUTS_MAX_BYTES = int64_t{32} << 20;
inline int64_t tokens_per_pass(int64_t ntok, int64_t group, int64_t bytes_per_token) {
  const int64_t groups = (ntok + group - 1) / group;
  if (groups * group * bytes_per_token <= TILED_INPUTS_MAX_BYTES) return ntok;
  return group * std::max<int64_t>(1, TILED_INPUTS_MAX_BYTES / 2 / (group * bytes_per_token));
}

// The tiled kernel on AVX512_BF16: x bf16 [ntok, in_features]; returns y [ntok, rows] fp32.
// bf16_out: y bf16 with `bias` (fp32 [rows], or nullptr) added, else fp32 without.
torch::Tensor spmm_dot(const torch::Tensor& mask, const torch::Tensor& values, const torch::Tensor& row_offsets,
                       const torch::Tensor& x, bool bf16_out = false, const float* bias = nullptr) {
  const int64_t ntok = x.size(0), rows = mask.size(0);
  auto y = torch::empty({ntok, rows}, x.options().dtype(bf16_out ? torch::kBFloat16 : torch::kFloat));
  if (ntok == 0) return y;
  const auto xs = x.contiguous();
  const int64_t pass = tokens_per_pass(ntok, PAIR_GROUP, mask.size(1) * 64 * 2);  // column_inputs: bf16
  for (int64_t t0 = 0; t0 < ntok; t0 += pass) {
    const int64_t n = std::min(pass, ntok - t0);
    const auto xc = column_inputs(xs.narrow(0, t0, n), mask.size(1) * 64);
    Op op = make_op(mask, values, row_offsets, reinterpret_cast<const float*>(xc.data_ptr<at::BFloat16>()),
                    bf16_out ? nullptr : y.data_ptr<float>() + t0 * rows, n);
    if (bf16_out) {
      op.ybf16 = y.data_ptr<at::BFloat16>() + t0 * rows;
      op.bias = bias;
    }
    tiled_run<at::BFloat16>(op, ISA_AVX512, true);
  }
  return y;
}
}  // namespace

// x: [ntok, in_features] fp32, or bf16 (in_features <= words*64); returns y [ntok, rows] fp32. bf16 inputs with
// bf16 values take the dot-product kernel where it runs (tiles_dot); otherwise they are read as fp32.
torch::Tensor spmm(torch::Tensor mask, torch::Tensor values, torch::Tensor row_offsets, torch::Tensor x,
                   int64_t isa) {
  check(mask, values, row_offsets);
  TORCH_CHECK((x.dtype() == torch::kFloat || x.dtype() == torch::kBFloat16) && x.dim() == 2 &&
                  x.size(1) <= mask.size(1) * 64, "x: fp32 or bf16 [ntok, in_features]");
  isa = checked_isa(isa, values);
  if (tiles_dot(values, x, isa)) return spmm_dot(mask, values, row_offsets, x);
  const int64_t ntok = x.size(0), rows = mask.size(0), cpad = mask.size(1) * 64;
  auto y = torch::empty({ntok, rows}, x.options().dtype(torch::kFloat));
  if (ntok == 0) return y;
  const auto xs = x.contiguous();
  // tile_inputs: fp32, in groups of group_tiles(isa) tiles
  const int64_t pass = tokens_per_pass(ntok, group_tiles(isa) * TILE, cpad * 4);
  for (int64_t t0 = 0; t0 < ntok; t0 += pass) {
    const int64_t n = std::min(pass, ntok - t0);
    auto xt = tile_inputs(xs.narrow(0, t0, n).to(torch::kFloat).contiguous(), cpad, isa);
    const Op op = make_op(mask, values, row_offsets, xt.data_ptr<float>(), y.data_ptr<float>() + t0 * rows, n);
    ATP_DISPATCH(values, tiled_run, op, isa);
  }
  return y;
}

bool has_amx() { return amx_ready() && use_vbmi2; }

bool has_vbmi2() { return use_vbmi2; }

// Returns the previous setting; only switches VBMI2 off on a CPU that has it (on one without it stays off).
bool set_avx512_vbmi2(bool on) {
  const bool before = use_vbmi2;
  use_vbmi2 = on && cpu_vbmi2();
  return before;
}

// The AMX path's inputs laid out as tiles and its partial sums (45 MB and 4 MB for 2048 tokens on the 7B block's
// down projection), kept across calls on transparent huge pages where Linux offers them: a fresh buffer per call
// paid its page faults every time, and on 4 KiB pages the tile loads walked the page tables every 4 KiB (the 7B
// block in bf16 at 1024-2048 tokens: 3-4% faster). It only grows; release_scratch() frees it. A call that finds
// it in use by another thread allocates its own.
class Scratch {
 public:
  // A buffer of at least `bytes`, 64-byte aligned, held until the caller's guard is released; nullptr if busy.
  void* acquire(size_t bytes, std::unique_lock<std::mutex>& guard) {
    guard = std::unique_lock<std::mutex>(lock_, std::try_to_lock);
    if (!guard.owns_lock()) return nullptr;
    if (bytes > size_) {
      free_locked();
#if defined(__linux__)
      // whole huge pages from a 2 MiB boundary: map one more, start at the boundary (the slack is never touched)
      const size_t huge = size_t(2) << 20;
      const size_t size = (bytes + huge - 1) / huge * huge;
      void* p = mmap(nullptr, size + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) return nullptr;
      map_ = p;
      map_bytes_ = size + huge;
      base_ = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(p) + huge - 1) & ~(uintptr_t(huge) - 1));
      madvise(base_, size, MADV_HUGEPAGE);  // advice only: refused, the buffer works on small pages
#else
      const size_t size = (bytes + 63) / 64 * 64;
      base_ = std::aligned_alloc(64, size);
      if (!base_) return nullptr;
#endif
      size_ = size;
    }
    return base_;
  }
  size_t size() {
    std::lock_guard<std::mutex> g(lock_);
    return size_;
  }
  void release() {
    std::lock_guard<std::mutex> g(lock_);
    free_locked();
  }

 private:
  void free_locked() {
    if (!base_) return;
#if defined(__linux__)
    munmap(map_, map_bytes_);
#else
    std::free(base_);
#endif
    base_ = nullptr;
    size_ = 0;
  }
  std::mutex lock_;
  void* base_ = nullptr;  // the buffer handed out
  size_t size_ = 0;
  void* map_ = nullptr;  // Linux: the mapping around it
  size_t map_bytes_ = 0;
};
Scratch amx_input_scratch, amx_sum_scratch;

int64_t scratch_bytes() { return static_cast<int64_t>(amx_input_scratch.size() + amx_sum_scratch.size()); }
void release_scratch() {
  amx_input_scratch.release();
  amx_sum_scratch.release();
}

// bf16 weights x bf16 inputs on the tile unit (see amx_block): y [ntok, rows] = x [ntok, in_features] W^T + bias,
// written in y's dtype (fp32, bf16 or fp16) straight from the tiles.
void amx_linear(const torch::Tensor& mask, const torch::Tensor& values, const torch::Tensor& row_offsets,
                const torch::Tensor& x, const float* bias, torch::Tensor& y) {
  check(mask, values, row_offsets);
  TORCH_CHECK(has_amx(), "AMX is not available on this CPU (or not granted by the OS)");
  TORCH_CHECK(values.scalar_type() == torch::kBFloat16 && x.dim() == 2 && x.size(1) <= mask.size(1) * 64,
              "amx: bf16 values, x [ntok, in_features]");
  const int64_t n = x.size(0), rows = mask.size(0), cpad = mask.size(1) * 64;
  TORCH_CHECK(y.is_contiguous() && y.dim() == 2 && y.size(0) == n && y.size(1) == rows, "amx: y [ntok, rows]");
  if (n == 0 || rows == 0) return;
  if (n > AMX_SLICE_TOKENS) {  // one slice of tokens after the other (AMX_SLICE_TOKENS says why)
    for (int64_t t0 = 0; t0 < n; t0 += AMX_SLICE_TOKENS) {
      const int64_t nn = std::min(AMX_SLICE_TOKENS, n - t0);
      auto slice = y.narrow(0, t0, nn);  // whole rows of y: contiguous
      amx_linear(mask, values, row_offsets, x.narrow(0, t0, nn), bias, slice);
    }
    return;
  }
#if ATP_AMX
  const int64_t ntb = (n + TILE - 1) / TILE, tpad = ntb * TILE, nkb = cpad / 32;
  const auto xb = x.to(torch::kBFloat16).contiguous();
  const int nt = at::get_num_threads();
  const AmxPlan plan = amx_plan(n, rows, x.size(1), nt);
  const bool tokens_as_a = plan.tokens_as_a;
  // Tokens as A read x itself when its rows are whole 32-column blocks and their stride is not a multiple of 4 KiB
  // (then the 16 rows of a tile would share one L1 set); a partial last token tile goes through `tail`, padded with
  // zeros to 16 rows. Otherwise a copy, padded, with 64 more bytes per row (SmolLM2's 576-wide layers at 512
  // tokens: the copy and its parallel region were 15% of the call).
  const int64_t cols = x.size(1);
  const bool direct = tokens_as_a && cols == cpad && (cols * 2) % 4096 != 0;
  const int64_t ldx = direct ? cols : cpad + 32;
  const int64_t input_elems = direct ? 0 : tokens_as_a ? tpad * ldx : ntb * nkb * 512;
  torch::Tensor tail;
  if (direct && n % TILE) {
    tail = torch::zeros({TILE, ldx}, xb.options());
    tail.narrow(0, 0, n % TILE).copy_(xb.narrow(0, n - n % TILE, n % TILE));
  }
  const uint16_t* tailp = tail.defined() ? reinterpret_cast<const uint16_t*>(tail.data_ptr<at::BFloat16>()) : nullptr;
  std::unique_lock<std::mutex> input_guard, sum_guard;
  torch::Tensor own_inputs, own_sums;  // only when the shared scratch is busy
  auto* xvp = direct ? const_cast<uint16_t*>(reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>()))
                     : static_cast<uint16_t*>(amx_input_scratch.acquire(input_elems * 2, input_guard));
  if (!xvp) {
    own_inputs = torch::empty({input_elems}, x.options().dtype(torch::kBFloat16));
    xvp = reinterpret_cast<uint16_t*>(own_inputs.data_ptr<at::BFloat16>());
  }
  if (tokens_as_a && !direct)
    amx_input_rows(xb.data_ptr<at::BFloat16>(), n, x.size(1), ldx, tpad, xvp);
  else if (!tokens_as_a)
    amx_inputs(xb.data_ptr<at::BFloat16>(), n, x.size(1), nkb, xvp);
  const int64_t RB = plan.block_rows, KC = plan.chunk_kb, blocks = plan.blocks;
  // partial sums between K chunks, 4 KiB per unit of 32 rows x 32 tokens (amx_block), a block's worth per thread
  // (one per block held 90 MB for 11008x4096 at 2048 tokens)
  float* yTp = nullptr;
  const int64_t block_sums = RB * ((ntb + 1) / 2 * 32);
  if (KC < nkb) {
    const int64_t sum_elems = nt * block_sums;
    yTp = static_cast<float*>(amx_sum_scratch.acquire(sum_elems * 4, sum_guard));
    if (!yTp) {
      own_sums = torch::empty({sum_elems}, x.options().dtype(torch::kFloat));
      yTp = own_sums.data_ptr<float>();
    }
  }
  const Op op = make_op(mask, values, row_offsets, nullptr, nullptr, n);
  const AmxOut out{y.data_ptr(), n, bias, y.scalar_type()};
#pragma omp parallel num_threads(nt)
  {
    // kept per thread across calls: a fresh megabyte each call cost its page faults every time (amx_decode_rows
    // writes every element, so it needs no clearing). Tiles start on a cache line: a megabyte from malloc sits 16
    // bytes past a page, and then every 64-byte tile row straddles two lines.
    static thread_local std::vector<uint16_t> abuf;
    const int64_t chunk = RB * std::min(nkb, KC) * 32;
    if (abuf.size() < static_cast<size_t>(chunk + 32)) abuf.resize(chunk + 32);
    uint16_t* tiles = reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(abuf.data()) + 63) & ~uintptr_t(63));
#ifdef _OPENMP
    const int slot = omp_get_thread_num();
#else
    const int slot = 0;
#endif
    float* sums = yTp ? yTp + slot * block_sums : nullptr;  // this thread's partial sums, one block at a time
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < blocks; ++b) {
      if (tokens_as_a)
        amx_block<true>(op, xvp, ldx, tailp, ntb, sums, b * RB, RB, KC, tiles, out);
      else
        amx_block<false>(op, xvp, 0, nullptr, ntb, sums, b * RB, RB, KC, tiles, out);
    }
  }
#endif
}

// The whole SparseLinear forward on the kernel paths in one call (the per-call Python glue it replaces cost
// ~25 us, as much as a small layer's matvec): x [..., in_features] of any float dtype -> [..., rows] in x's dtype.
// path: 0 the decode kernel, 1 the tiled kernel, 2 the tile unit (bf16 values, AMX); fp32 accumulation, bias
// added in fp32.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& mask, const torch::Tensor& values,
                     const torch::Tensor& row_offsets, const c10::optional<torch::Tensor>& bias, int64_t in_features,
                     int64_t path, int64_t isa) {
  TORCH_CHECK(x.size(-1) == in_features, "x: last dimension must be in_features");
  TORCH_CHECK(path >= 0 && path <= 2, "path: 0 decode, 1 tiled, 2 amx");
  const int64_t n = in_features ? x.numel() / in_features : 0, cpad = mask.size(1) * 64;
  auto x2 = x.reshape({n, in_features});
  torch::Tensor y;
  auto sizes = x.sizes().vec();
  sizes.back() = mask.size(0);
  if (path == 2) {  // straight from the tiles into x's dtype, row-major, bias added
    TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16 ||
                x.scalar_type() == torch::kHalf, "x dtype must be float32, bfloat16 or float16");
    const auto b = bias.has_value() && bias->defined() ? bias->to(torch::kFloat).contiguous() : torch::Tensor();
    auto out = torch::empty({n, mask.size(0)}, x.options());
    amx_linear(mask, values, row_offsets, x2, b.defined() ? b.data_ptr<float>() : nullptr, out);
    return out.view(sizes);
  } else {
    if (path == 0) {
      y = spmv(mask, values, row_offsets, x2.scalar_type() == torch::kBFloat16 ? x2 : decode_inputs(x2, cpad), isa);
    } else if (x2.scalar_type() == torch::kBFloat16 && tiles_dot(values, x2, checked_isa(isa, values))) {
      // straight into bf16, bias added (store_tiled_sums_bf16)
      check(mask, values, row_offsets);
      TORCH_CHECK(x2.size(1) <= mask.size(1) * 64, "x: [ntok, in_features]");
      const auto b = bias.has_value() && bias->defined() ? bias->to(torch::kFloat).contiguous() : torch::Tensor();
      TORCH_CHECK(!b.defined() || b.numel() == mask.size(0), "bias: one per row");
      return spmm_dot(mask, values, row_offsets, x2.contiguous(), true, b.defined() ? b.data_ptr<float>() : nullptr)
          .view(sizes);
    } else {
      const bool as_is = x2.scalar_type() == torch::kFloat || x2.scalar_type() == torch::kBFloat16;
      y = spmm(mask, values, row_offsets, as_is ? x2 : x2.to(torch::kFloat), isa);
    }
  }
  if (bias.has_value() && bias->defined()) y.add_(bias->to(torch::kFloat));
  // x's dtype, row-major: one pass, no copy when both already hold
  y = y.to(y.options().dtype(x.scalar_type()), false, false, at::MemoryFormat::Contiguous);
  return y.view(sizes);
}

torch::Tensor densify_into(torch::Tensor mask, torch::Tensor values, torch::Tensor row_offsets, torch::Tensor out,
                           int64_t isa) {
  check(mask, values, row_offsets);
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(0) == mask.size(0) &&
                  out.size(1) <= mask.size(1) * 64 && out.scalar_type() == values.scalar_type(),
              "out: contiguous [rows, cols] of the values' dtype");
  isa = checked_isa(isa, values);
  const int64_t cols = out.size(1);
  const Op op = make_op(mask, values, row_offsets, nullptr, nullptr, 0);
  switch (values.scalar_type()) {
    case torch::kFloat: densify_run<float>(op, out.data_ptr<float>(), cols, isa); break;
    case torch::kBFloat16: densify_run<at::BFloat16>(op, out.data_ptr<at::BFloat16>(), cols, isa); break;
    case torch::kHalf: densify_run<at::Half>(op, out.data_ptr<at::Half>(), cols, isa); break;
    default: TORCH_CHECK(false, "values dtype must be float32, bfloat16 or float16");
  }
  return out;
}

int64_t set_avx2_expand(const std::string& dtype, int64_t way) {
  TORCH_CHECK(way == EXPAND_PERMUTE || way == EXPAND_HALVES, "way must be 0 (permute) or 1 (halves)");
  TORCH_CHECK(dtype == "float32" || dtype == "bfloat16", "dtype must be float32 or bfloat16");
  int64_t& setting = dtype == "float32" ? avx2_expand_fp32 : avx2_expand_bf16;
  const int64_t previous = setting;
  setting = way;
  return previous;
}

torch::Tensor densify(torch::Tensor mask, torch::Tensor values, torch::Tensor row_offsets, int64_t cols,
                      int64_t isa) {
  return densify_into(mask, values, row_offsets, torch::empty({mask.size(0), cols}, values.options()), isa);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("best_isa", &best_isa, "the best instruction set this CPU runs: 2 AVX-512, 1 AVX2, 0 portable C++");
  m.def("spmv", &spmv, "bitmask sparse matrix x few vectors (fp32 accumulation; x fp32 padded, or bf16)", py::arg("mask"),
        py::arg("values"), py::arg("row_offsets"), py::arg("x"), py::arg("isa"));
  m.def("grouped_decode_into", &grouped_decode_into, "several bitmask sparse matrices, each times its own few rows "
        "of x, into y (fp32) in one parallel region", py::arg("x"), py::arg("y"), py::arg("starts"),
        py::arg("counts"), py::arg("masks"), py::arg("values"), py::arg("row_offsets"), py::arg("in_features"),
        py::arg("isa"));
  m.def("spmm", &spmm, "bitmask sparse matrix x many vectors, tiled (fp32 accumulation; x fp32 or bf16)", py::arg("mask"),
        py::arg("values"), py::arg("row_offsets"), py::arg("x"), py::arg("isa"));
  m.def("linear", &linear, "SparseLinear forward on the kernel paths (x of any float dtype)", py::arg("x"),
        py::arg("mask"), py::arg("values"), py::arg("row_offsets"), py::arg("bias"), py::arg("in_features"),
        py::arg("path"), py::arg("isa"));
  m.def("scratch_bytes", &scratch_bytes, "bytes the AMX path keeps between calls (inputs as tiles, partial sums)");
  m.def("release_scratch", &release_scratch, "free the AMX path's scratch (the next call allocates it again)");
  m.def("has_vbmi2", &has_vbmi2, "AVX-512 VBMI2 in use (bf16/fp16 values on the AVX-512 kernels; else AVX2)");
  m.def("set_avx512_vbmi2", &set_avx512_vbmi2, "switch VBMI2 off (or back on where the CPU has it); returns the "
        "previous setting", py::arg("on"));
  m.def("set_avx2_expand", &set_avx2_expand, "how the AVX2 batch-1 decode expands values of a dtype ('float32', "
        "'bfloat16'): 0 one 256-bit permute, 1 two 128-bit shuffles (same results); returns the previous way",
        py::arg("dtype"), py::arg("way"));
  m.def("has_bf16_dot", &has_bf16_dot, "the tiled kernel and the decode of 5+ tokens for bf16 weights and inputs on "
        "AVX512_BF16's dot products (this CPU has them, and they are switched on)");
  m.def("set_avx512_bf16", &set_avx512_bf16, "switch the AVX512_BF16 kernels off (or back on where the CPU has "
        "them); returns the previous setting", py::arg("on"));
  m.def("has_amx", &has_amx, "AMX-BF16 usable here (CPU support and the OS's permission)");
  m.def("densify", &densify, "dense weight of a bitmask-packed matrix", py::arg("mask"), py::arg("values"),
        py::arg("row_offsets"), py::arg("cols"), py::arg("isa"));
  m.def("densify_into", &densify_into, "dense weight of a bitmask-packed matrix, written into `out`",
        py::arg("mask"), py::arg("values"), py::arg("row_offsets"), py::arg("out"), py::arg("isa"));
  m.attr("TILE") = TILE;
  m.attr("DECODE_NT") = DECODE_NT;
  m.def("tiled_item_rows", &tiled_item_rows, "rows per work item of the tiled kernel for this call",
        py::arg("ntok"), py::arg("rows"), py::arg("cols"), py::arg("threads"), py::arg("isa"));
#if ATP_AMX
  m.def("amx_tokens_as_a", &amx_tokens_as_a, "whether the AMX path puts the tokens in the A tiles for this call",
        py::arg("tokens"), py::arg("rows"), py::arg("cols"));
  m.attr("AMX_SLICE_TOKENS") = AMX_SLICE_TOKENS;
  m.attr("AMX_CHUNK_TOKENS") = AMX_CHUNK_TOKENS;
#endif
}
