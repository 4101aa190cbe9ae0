// Geometry and sampling shared by the native deformable convolution's CPU kernels
// (deform_conv_cpu.cpp: the column kernels; deform_conv_packed.cpp: the fused passes). Layouts
// and semantics are described in deform_conv_cpu.cpp.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <optional>
#include <vector>

// The fused passes' hot loops are compiled for AVX2+FMA (they run only where the CPU has them,
// see cpu_has_avx2_fma); everything else for the baseline x86-64 (SSE2).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DCNV2_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define DCNV2_TARGET_AVX2
#endif

namespace dcnv2 {

constexpr int64_t kBlock = 64;         // output positions per task
constexpr int64_t kChannelAlign = 16;  // channel blocks of the input gradient: whole vectors

// Float buffers aligned to 64 bytes (whole cache lines; the register tiles load aligned panels).
struct Free {
  void operator()(float* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<float, Free>;

inline Buffer allocate(int64_t floats) {
  const size_t bytes = ((static_cast<size_t>(std::max<int64_t>(floats, 1)) * 4 + 63) / 64) * 64;
  return Buffer(static_cast<float*>(std::aligned_alloc(64, bytes)));
}

// gemm_cpu.cpp
bool cpu_has_avx2_fma();
void tile_6x16(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, int64_t m,
               int64_t n, bool accumulate);

struct Geometry {
  int64_t n, channels, height, width, kh, kw, sh, sw, ph, pw, dh, dw, out_h, out_w, dg, groups;
  int64_t p_begin, p_end;
  int64_t taps() const { return kh * kw; }
  int64_t all_positions() const { return out_h * out_w; }
  int64_t positions() const { return p_end - p_begin; }
  int64_t dg_channels() const { return channels / dg; }
  int64_t group_channels() const { return channels / groups; }
  int64_t row() const { return taps() * channels; }  // one position's columns
  int64_t padded_width() const { return width + 2; }
  int64_t image() const { return (height + 2) * (width + 2) * channels; }
};

inline Geometry make_geometry(const at::Tensor& xp, const at::Tensor& offset, at::IntArrayRef kernel,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       int64_t dg, int64_t groups, int64_t p_begin, int64_t p_end) {
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 &&
                  dilation.size() == 2,
              "kernel, stride, padding, dilation must be pairs");
  const Geometry g{xp.size(0),     xp.size(3),     xp.size(1) - 2, xp.size(2) - 2, kernel[0],
                   kernel[1],      stride[0],      stride[1],      padding[0],     padding[1],
                   dilation[0],    dilation[1],    offset.size(2), offset.size(3), dg,
                   groups,         p_begin,        p_end};
  TORCH_CHECK(0 <= p_begin && p_begin < p_end && p_end <= g.all_positions(), "position range");
  TORCH_CHECK(dg > 0 && groups > 0 && g.channels % dg == 0 && g.channels % groups == 0,
              "channels divisible by the groups");
  TORCH_CHECK(offset.size(0) == g.n && offset.size(1) == 2 * dg * g.taps(), "offset shape");
  return g;
}

// Where one tap of one output position samples.
template <typename T>
struct Tap {
  bool inside;
  int64_t index;  // element offset of the top-left corner in the padded image
  T lh, lw, m;    // fractional parts h - floor(h), w - floor(w); modulation (1 for DCNv1)
};

template <typename T>
Tap<T> make_tap(const Geometry& g, const T* offset, const T* mask, int64_t b, int64_t d,
                int64_t k, int64_t p) {
  const int64_t all = g.all_positions(), K = g.taps();
  const int64_t ho = p / g.out_w, wo = p % g.out_w;
  // Offset channels of a deformable group: (dy, dx) for tap 0, then tap 1, ...
  const T* off = offset + ((b * g.dg + d) * K + k) * 2 * all + p;
  const T h = static_cast<T>(ho * g.sh - g.ph + (k / g.kw) * g.dh) + off[0];
  const T w = static_cast<T>(wo * g.sw - g.pw + (k % g.kw) * g.dw) + off[all];
  Tap<T> t{false, 0, T(0), T(0), T(0)};
  if (h > -1 && w > -1 && h < g.height && w < g.width) {  // false for NaN too
    const T hf = std::floor(h), wf = std::floor(w);
    t.inside = true;
    t.index = ((static_cast<int64_t>(hf) + 1) * g.padded_width() + static_cast<int64_t>(wf) + 1) *
              g.channels;
    t.lh = h - hf;
    t.lw = w - wf;
    t.m = mask ? mask[((b * g.dg + d) * K + k) * all + p] : T(1);
  }
  return t;
}

// The offset gradients (dy at go[0], dx at go[P]) when go is given and, when gm is given, the mask gradient of an
// inside tap t from s_q, the sums over its channels of grad_col * corner value q (q = 00, 01, 10,
// 11): the mask gradient is the bilinear value's, sum_q w_q s_q (detectron2: grad_col *
// dmcn_im2col_bilinear); the offset gradients are the slopes with floor(h), floor(w) fixed
// (dmcn_get_coordinate_weight) times the mask.
template <typename T>
void offset_mask_gradients(const Tap<T>& t, T s00, T s01, T s10, T s11, T* go, int64_t P,
                           T* gm) {
  const T hh = 1 - t.lh, hw = 1 - t.lw;
  if (go) {
    go[0] = (hw * (s10 - s00) + t.lw * (s11 - s01)) * t.m;
    go[P] = (hh * (s01 - s00) + t.lh * (s11 - s10)) * t.m;
  }
  if (gm) *gm = hh * hw * s00 + hh * t.lw * s01 + t.lh * hw * s10 + t.lh * t.lw * s11;
}

// Calls fn(c0, c1, column) for the runs of channels [c0, c1) within [begin, end) that lie in
// one convolution group; column is where channel c0 of tap k sits in a position's row.
template <typename Fn>
void for_each_run(const Geometry& g, int64_t k, int64_t begin, int64_t end, Fn fn) {
  const int64_t cg = g.group_channels();
  for (int64_t c0 = begin; c0 < end;) {
    const int64_t grp = c0 / cg, c1 = std::min(end, (grp + 1) * cg);
    fn(c0, c1, (grp * g.taps() + k) * cg + (c0 - grp * cg));
    c0 = c1;
  }
}

// Calls fn(b, p, p_local) for every output position of the range, in parallel blocks.
template <typename Fn>
void for_each_position(const Geometry& g, Fn fn) {
  const int64_t P = g.positions(), blocks = (P + kBlock - 1) / kBlock;
  at::parallel_for(0, g.n * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, p0 = (task % blocks) * kBlock;
      for (int64_t q = p0; q < std::min(P, p0 + kBlock); ++q) fn(b, g.p_begin + q, q);
    }
  });
}

// detectron2's dmcn_im2col_bilinear for channels [0, len) of the four corners, times the mask.
template <typename T>
void sample(const T* __restrict v, int64_t C, int64_t wp, const Tap<T>& t, int64_t len,
            T* __restrict col) {
  const T hh = 1 - t.lh, hw = 1 - t.lw;
  const T w00 = hh * hw, w01 = hh * t.lw, w10 = t.lh * hw, w11 = t.lh * t.lw, m = t.m;
  const T *v01 = v + C, *v10 = v + wp * C, *v11 = v + (wp + 1) * C;
#pragma omp simd
  for (int64_t c = 0; c < len; ++c)
    col[c] = (w00 * v[c] + w01 * v01[c] + w10 * v10[c] + w11 * v11[c]) * m;
}

// Channel blocks of the input gradient's split: one block per thread for each image (more,
// narrower blocks are slower: each recomputes every tap), each a whole
// number of vectors. Returns the block width.
inline int64_t channel_block(const Geometry& g) {
  const int64_t want = std::max<int64_t>(1, (at::get_num_threads() + g.n - 1) / g.n);
  const int64_t width = (g.channels + want - 1) / want;
  return std::min(g.channels, (width + kChannelAlign - 1) / kChannelAlign * kChannelAlign);
}

inline void check_inputs(const at::Tensor& xp, const at::Tensor& offset,
                  const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(xp.device().is_cpu() && xp.is_contiguous() && xp.dim() == 4,
              "xp: contiguous (n, H+2, W+2, C) CPU tensor");
  TORCH_CHECK(offset.is_contiguous() && offset.scalar_type() == xp.scalar_type(),
              "offset: contiguous, same dtype as xp");
  TORCH_CHECK(!mask || (mask->is_contiguous() && mask->scalar_type() == xp.scalar_type()),
              "mask: contiguous, same dtype as xp");
}

template <typename T>
const T* mask_ptr(const std::optional<at::Tensor>& mask) {
  return mask ? mask->data_ptr<T>() : nullptr;
}

}  // namespace dcnv2
