// A float32 matrix product for the native deformable convolution's three column products
// (see native.py): C = A @ B, or C += A @ B, for strided 2-D operands.
//
// Why not only torch.mm: on some x86 CPUs MKL's sgemm runs well below oneDNN's convolution, so
// the op's products, which have the FLOPs of the dense 3x3 convolution, take longer than it.
// This is the classic packed algorithm (Goto; BLIS's loop order): blocks of B (KC x NC) and of
// A (MC x KC) are copied into contiguous panels sized for the caches, and a 6x16 register tile
// of C is accumulated with AVX2 fused multiply-adds. The Python side measures it against MKL on
// first use and keeps whichever is faster, so CPUs where MKL wins keep MKL. Compiled for
// AVX2+FMA by function attribute only; gemm_supported() says whether this CPU can run it (the
// Python side never calls gemm otherwise).
//
// Threads split C into blocks of columns (and of rows when there are few columns), each with
// its own packed panels, so no two threads write the same element.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DCNV2_AVX2 1
#include <immintrin.h>
#endif
#include <torch/library.h>

#include <algorithm>

#include "deform_conv_common.h"

namespace dcnv2 {

// Shared with the fused passes of deform_conv_packed.cpp.
constexpr int64_t kMR = 6;   // rows of C per register tile
constexpr int64_t kNR = 16;  // columns of C per register tile: two 8-float vectors

#ifdef DCNV2_AVX2

bool cpu_has_avx2_fma() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

// The register tile: C[0:m, 0:n] (+)= packed A panel (kc x kMR) times packed B panel
// (kc x kNR), for m <= kMR, n <= kNR; C's rows are ldc apart. b must be 32-byte aligned.
__attribute__((target("avx2,fma"))) void tile_6x16(int64_t kc, const float* __restrict a,
                                                    const float* __restrict b, float* c,
                                                    int64_t ldc, int64_t m, int64_t n,
                                                    bool accumulate) {
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
  __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
  __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
  __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
  __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
  __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k, a += kMR, b += kNR) {
    const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
    __m256 x = _mm256_broadcast_ss(a);
    c00 = _mm256_fmadd_ps(x, b0, c00);
    c01 = _mm256_fmadd_ps(x, b1, c01);
    x = _mm256_broadcast_ss(a + 1);
    c10 = _mm256_fmadd_ps(x, b0, c10);
    c11 = _mm256_fmadd_ps(x, b1, c11);
    x = _mm256_broadcast_ss(a + 2);
    c20 = _mm256_fmadd_ps(x, b0, c20);
    c21 = _mm256_fmadd_ps(x, b1, c21);
    x = _mm256_broadcast_ss(a + 3);
    c30 = _mm256_fmadd_ps(x, b0, c30);
    c31 = _mm256_fmadd_ps(x, b1, c31);
    x = _mm256_broadcast_ss(a + 4);
    c40 = _mm256_fmadd_ps(x, b0, c40);
    c41 = _mm256_fmadd_ps(x, b1, c41);
    x = _mm256_broadcast_ss(a + 5);
    c50 = _mm256_fmadd_ps(x, b0, c50);
    c51 = _mm256_fmadd_ps(x, b1, c51);
  }
  const __m256 acc[kMR][2] = {{c00, c01}, {c10, c11}, {c20, c21},
                              {c30, c31}, {c40, c41}, {c50, c51}};
  if (m == kMR && n == kNR) {
    for (int64_t i = 0; i < kMR; ++i) {
      float* row = c + i * ldc;
      __m256 v0 = acc[i][0], v1 = acc[i][1];
      if (accumulate) {
        v0 = _mm256_add_ps(v0, _mm256_loadu_ps(row));
        v1 = _mm256_add_ps(v1, _mm256_loadu_ps(row + 8));
      }
      _mm256_storeu_ps(row, v0);
      _mm256_storeu_ps(row + 8, v1);
    }
    return;
  }
  alignas(32) float tmp[kMR][kNR];
  for (int64_t i = 0; i < kMR; ++i) {
    _mm256_store_ps(tmp[i], acc[i][0]);
    _mm256_store_ps(tmp[i] + 8, acc[i][1]);
  }
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = (accumulate ? c[i * ldc + j] : 0.f) + tmp[i][j];
}

#else  // other CPUs (ARM, other compilers): the Python side never calls the products

bool cpu_has_avx2_fma() { return false; }

void tile_6x16(int64_t, const float*, const float*, float*, int64_t, int64_t, int64_t, bool) {
  TORCH_CHECK(false, "dcnv2: the packed products need an x86-64 CPU with AVX2 and FMA");
}

#endif

}  // namespace dcnv2

namespace {

using dcnv2::kMR;
using dcnv2::kNR;
constexpr int64_t kKC = 256;   // depth of a packed block: a B panel (kKC x kNR) fills half of L1
constexpr int64_t kMC = 144;   // rows of a packed A block (kMC x kKC, 144 KiB): within L2
constexpr int64_t kNCMax = 2048;  // columns of a packed B block (kKC x kNC, 2 MiB): within L3

using dcnv2::allocate;
using dcnv2::Buffer;

// A strided matrix view: element (i, j) at data[i * rs + j * cs].
struct View {
  const float* data;
  int64_t rs, cs;
  const float* at(int64_t i, int64_t j) const { return data + i * rs + j * cs; }
};

// Packs rows [i0, i0 + m) and depth [k0, k0 + kc) of A into panels of kMR rows: panel r holds
// dst[r * kc * kMR + k * kMR + i]; rows past m are zero.
void pack_a(const View& a, int64_t i0, int64_t m, int64_t k0, int64_t kc, float* dst) {
  for (int64_t r = 0; r < m; r += kMR) {
    const int64_t rows = std::min(kMR, m - r);
    float* panel = dst + r * kc;
    if (a.cs == 1) {
      for (int64_t i = 0; i < rows; ++i) {
        const float* src = a.at(i0 + r + i, k0);
        for (int64_t k = 0; k < kc; ++k) panel[k * kMR + i] = src[k];
      }
    } else {
      for (int64_t k = 0; k < kc; ++k)
        for (int64_t i = 0; i < rows; ++i) panel[k * kMR + i] = *a.at(i0 + r + i, k0 + k);
    }
    for (int64_t i = rows; i < kMR; ++i)
      for (int64_t k = 0; k < kc; ++k) panel[k * kMR + i] = 0.f;
  }
}

// Packs depth [k0, k0 + kc) and columns [j0, j0 + n) of B into panels of kNR columns: panel q
// holds dst[q * kc * kNR + k * kNR + j]; columns past n are zero.
void pack_b(const View& b, int64_t k0, int64_t kc, int64_t j0, int64_t n, float* dst) {
  for (int64_t q = 0; q < n; q += kNR) {
    const int64_t cols = std::min(kNR, n - q);
    float* panel = dst + q * kc;
    if (b.cs == 1 && cols == kNR) {
      for (int64_t k = 0; k < kc; ++k) std::copy_n(b.at(k0 + k, j0 + q), kNR, panel + k * kNR);
    } else if (b.rs == 1) {
      for (int64_t j = 0; j < cols; ++j) {
        const float* src = b.at(k0, j0 + q + j);
        for (int64_t k = 0; k < kc; ++k) panel[k * kNR + j] = src[k];
      }
    } else {
      for (int64_t k = 0; k < kc; ++k)
        for (int64_t j = 0; j < cols; ++j) panel[k * kNR + j] = *b.at(k0 + k, j0 + q + j);
    }
    if (cols < kNR)
      for (int64_t k = 0; k < kc; ++k)
        std::fill(panel + k * kNR + cols, panel + (k + 1) * kNR, 0.f);
  }
}

// C[i0:i1, j0:j1] (+)= A[i0:i1, :] @ B[:, j0:j1], one thread.
void block(const View& a, const View& b, float* c, int64_t ldc, int64_t depth, int64_t i0,
           int64_t i1, int64_t j0, int64_t j1, bool accumulate) {
  const int64_t n = j1 - j0;
  const int64_t n_pad = (n + kNR - 1) / kNR * kNR;
  Buffer bp = allocate(kKC * n_pad), ap = allocate(kKC * kMC);
  for (int64_t k0 = 0; k0 < depth; k0 += kKC) {
    const int64_t kc = std::min(kKC, depth - k0);
    const bool acc = accumulate || k0 > 0;
    pack_b(b, k0, kc, j0, n, bp.get());
    for (int64_t m0 = i0; m0 < i1; m0 += kMC) {
      const int64_t m = std::min(kMC, i1 - m0);
      pack_a(a, m0, m, k0, kc, ap.get());
      for (int64_t q = 0; q < n; q += kNR) {
        const float* bpanel = bp.get() + q * kc;
        for (int64_t r = 0; r < m; r += kMR)
          dcnv2::tile_6x16(kc, ap.get() + r * kc, bpanel, c + (m0 + r) * ldc + j0 + q, ldc,
               std::min(kMR, m - r), std::min(kNR, n - q), acc);
      }
    }
  }
}

// c (+)= a @ b: a (M, K), b (K, N), c (M, N) with unit column stride; float32 CPU, any other
// strides. With K == 0, c is zeroed (or left as is when accumulating).
void gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, bool accumulate) {
  TORCH_CHECK(dcnv2::cpu_has_avx2_fma(), "dcnv2_native::gemm needs a CPU with AVX2 and FMA");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2, "gemm: 2-D operands");
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
                  c.scalar_type() == at::kFloat,
              "gemm: float32 operands");
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu() && c.device().is_cpu(), "gemm: CPU");
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  TORCH_CHECK(b.size(0) == K && c.size(0) == M && c.size(1) == N, "gemm: shapes (M,K)(K,N)(M,N)");
  TORCH_CHECK(c.stride(1) == 1 || N <= 1, "gemm: c needs unit column stride");
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate) c.zero_();
    return;
  }
  const View av{a.data_ptr<float>(), a.stride(0), a.stride(1)};
  const View bv{b.data_ptr<float>(), b.stride(0), b.stride(1)};
  float* cp = c.data_ptr<float>();
  const int64_t ldc = c.stride(0);
  // Tasks: column blocks of whole tiles, at most kNCMax wide, at least one per thread when
  // there are enough columns; the rest of the threads split the rows.
  const int64_t threads = at::get_num_threads();
  const int64_t col_tiles = (N + kNR - 1) / kNR, row_tiles = (M + kMR - 1) / kMR;
  int64_t col_parts = std::min(threads, col_tiles);
  col_parts = std::max(col_parts, (col_tiles * kNR + kNCMax - 1) / kNCMax);
  const int64_t row_parts = std::min(row_tiles, std::max<int64_t>(1, threads / col_parts));
  const int64_t tiles_per_col = (col_tiles + col_parts - 1) / col_parts;
  const int64_t tiles_per_row = (row_tiles + row_parts - 1) / row_parts;
  at::parallel_for(0, col_parts * row_parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t cp_i = task / row_parts, rp_i = task % row_parts;
      const int64_t j0 = cp_i * tiles_per_col * kNR, j1 = std::min(N, j0 + tiles_per_col * kNR);
      const int64_t i0 = rp_i * tiles_per_row * kMR, i1 = std::min(M, i0 + tiles_per_row * kMR);
      if (j0 < j1 && i0 < i1) block(av, bv, cp, ldc, K, i0, i1, j0, j1, accumulate);
    }
  });
}

// (M, D) -> (ceil(M/16), D, 16): rows in panels of 16, zero-padded, as the fused forward of
// deform_conv_packed.cpp reads the weight (one panel of 16 output channels per register tile).
// A convolution weight (C_out, C, kh, kw) is packed as its rows (C_out, kh*kw*C), columns
// ordered (tap, channel) like the columns, in the same pass.
at::Tensor pack_rows16(const at::Tensor& w) {
  TORCH_CHECK((w.dim() == 2 || w.dim() == 4) && w.scalar_type() == at::kFloat &&
                  w.device().is_cpu(),
              "pack_rows16: (M, D) or (C_out, C, kh, kw) float32 CPU tensor");
  const at::Tensor src = w.contiguous();
  const int64_t M = src.size(0), C = src.size(1), K = w.dim() == 4 ? src.size(2) * src.size(3) : 1;
  const int64_t D = C * K, panels = (M + kNR - 1) / kNR;
  auto out = at::empty({panels, D, kNR}, src.options());
  const float* s = src.data_ptr<float>();
  float* d = out.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      float* panel = d + p * D * kNR;
      const int64_t rows = std::min(kNR, M - p * kNR);
      // Blocks of 32 channels: the K * 2 KiB of the panel being written stay in L1.
      for (int64_t c0 = 0; c0 < C; c0 += 32) {
        const int64_t c1 = std::min(C, c0 + 32);
        for (int64_t i = 0; i < kNR; ++i) {
          const float* r = i < rows ? s + (p * kNR + i) * D : nullptr;
          for (int64_t c = c0; c < c1; ++c)
            for (int64_t k = 0; k < K; ++k) panel[(k * C + c) * kNR + i] = r ? r[c * K + k] : 0.f;
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dcnv2_native, m) {
  m.def("gemm_supported() -> bool", &dcnv2::cpu_has_avx2_fma);
  m.def("gemm(Tensor a, Tensor b, Tensor(a!) c, bool accumulate) -> ()");
  m.def("pack_rows16(Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(dcnv2_native, CPU, m) {
  m.impl("gemm", &gemm);
  m.impl("pack_rows16", &pack_rows16);
}
