// CPU column kernels of dcnv2's native deformable convolution (see native_cpp.py).
//
// Semantics are those of detectron2's CUDA kernels (deform_conv_cuda_kernel.cu): a tap samples
// only inside the open box -1 < h < H, -1 < w < W; bilinear weights from floor(h), floor(w);
// corners outside the image read 0; gradients are the derivatives of that formula with the floor
// held fixed. Columns are (n, C*K, P), K = kh*kw taps, P = Ho*Wo output positions.
//
// The sampling geometry (Taps) is computed once per call and reused for every channel. Work is
// split so that no two threads write the same element (no atomics): im2col by (image, deformable
// group, block of positions); backward, which computes the input, offset and mask gradients and
// the columns for the weight gradient in one pass, by ranges of (image, channel) planes, with
// per-thread sums for the offset and mask gradients.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <optional>
#include <vector>

namespace {

constexpr int64_t kBlock = 256;  // output positions per task: keeps a block's tables in L2

// Columns cover output positions [p_begin, p_end) of the flattened Ho*Wo grid.
struct Geometry {
  int64_t n, channels, height, width, kh, kw, sh, sw, ph, pw, dh, dw, out_h, out_w, dg;
  int64_t p_begin, p_end;
  int64_t taps() const { return kh * kw; }
  int64_t all_positions() const { return out_h * out_w; }
  int64_t positions() const { return p_end - p_begin; }
  int64_t group_channels() const { return channels / dg; }
  int64_t padded_width() const { return width + 2; }
  int64_t padded_plane() const { return (height + 2) * (width + 2); }
  int64_t blocks() const { return (positions() + kBlock - 1) / kBlock; }
};

// xp is the input zero-padded by one pixel on each side.
Geometry make_geometry(const at::Tensor& xp, const at::Tensor& offset, at::IntArrayRef kernel,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       int64_t dg, int64_t p_begin, int64_t p_end) {
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 &&
                  dilation.size() == 2,
              "kernel, stride, padding, dilation must be pairs");
  const Geometry g{xp.size(0),  xp.size(1),  xp.size(2) - 2, xp.size(3) - 2, kernel[0],
                   kernel[1],   stride[0],   stride[1],      padding[0],     padding[1],
                   dilation[0], dilation[1], offset.size(2), offset.size(3), dg,
                   p_begin,     p_end};
  TORCH_CHECK(0 <= p_begin && p_begin < p_end && p_end <= g.all_positions(), "position range");
  TORCH_CHECK(g.channels % dg == 0 && offset.size(1) == 2 * dg * g.taps(), "offset channels");
  return g;
}

// Where every tap samples, as arrays over (image, deformable group, tap, position in range). Indices
// point into the input zero-padded by one pixel, so that the four corners of any tap inside the
// open box -1 < h < H, -1 < w < W are in bounds and corners outside the image read the padding's
// 0 without a branch. Taps outside the box get index 0 and zero weights.
template <typename T>
struct Taps {
  std::vector<int64_t> index;  // top-left corner in the padded plane
  std::vector<T> lh, lw;       // fractional parts h - floor(h), w - floor(w)
  std::vector<T> mask;         // modulation (1 for DCNv1); 0 outside the box

  Taps(const Geometry& g, const T* offset, const T* m) {
    const int64_t K = g.taps(), P = g.positions(), rows = g.n * g.dg * K;
    index.resize(rows * P);
    lh.resize(rows * P);
    lw.resize(rows * P);
    mask.resize(rows * P);
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t k = row % K, i = k / g.kw, j = k % g.kw, b_grp = row / K;
        // Offset channels of a group: (dy, dx) for tap 0, then tap 1, ...
        const int64_t stride = g.all_positions();
        const T* off_h = offset + (b_grp * 2 * K + 2 * k) * stride + g.p_begin;
        const T* off_w = off_h + stride;
        const T* mrow = m ? m + row * stride + g.p_begin : nullptr;
        for (int64_t p = 0; p < P; ++p) {
          const int64_t ho = (p + g.p_begin) / g.out_w, wo = (p + g.p_begin) % g.out_w;
          const int64_t t = row * P + p;
          const T h = static_cast<T>(ho * g.sh - g.ph + i * g.dh) + off_h[p];
          const T w = static_cast<T>(wo * g.sw - g.pw + j * g.dw) + off_w[p];
          if (h > -1 && w > -1 && h < g.height && w < g.width) {
            const T hf = std::floor(h), wf = std::floor(w);
            index[t] = (static_cast<int64_t>(hf) + 1) * g.padded_width() + static_cast<int64_t>(wf) + 1;
            lh[t] = h - hf;
            lw[t] = w - wf;
            mask[t] = mrow ? mrow[p] : T(1);
          } else {
            index[t] = 0;
            lh[t] = lw[t] = mask[t] = T(0);
          }
        }
      }
    });
  }
};

// Calls fn(b, grp, p0, p1) for every (image, deformable group, block of positions), in parallel.
template <typename Fn>
void for_each_block(const Geometry& g, Fn fn) {
  const int64_t blocks = g.blocks();
  at::parallel_for(0, g.n * g.dg * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t blk = task % blocks, grp = (task / blocks) % g.dg, b = task / blocks / g.dg;
      const int64_t p0 = blk * kBlock;
      fn(b, grp, p0, std::min(g.positions(), p0 + kBlock));
    }
  });
}

template <typename T>
void im2col_impl(const Geometry& g, const Taps<T>& taps, const T* xp, T* cols) {
  const int64_t P = g.positions(), K = g.taps(), cg = g.group_channels(), wp = g.padded_width();
  for_each_block(g, [&](int64_t b, int64_t grp, int64_t p0, int64_t p1) {
    for (int64_t c = grp * cg; c < (grp + 1) * cg; ++c) {
      const T* plane = xp + (b * g.channels + c) * g.padded_plane();
      for (int64_t k = 0; k < K; ++k) {
        const int64_t t0 = ((b * g.dg + grp) * K + k) * P;
        const int64_t* index = taps.index.data() + t0;
        const T *lh = taps.lh.data() + t0, *lw = taps.lw.data() + t0;
        const T* m = taps.mask.data() + t0;
        T* col = cols + ((b * g.channels + c) * K + k) * P;
        for (int64_t p = p0; p < p1; ++p) {
          const T* v = plane + index[p];
          const T hh = 1 - lh[p], hw = 1 - lw[p];
          // detectron2's dmcn_im2col_bilinear, then the modulation.
          const T val = hh * hw * v[0] + hh * lw[p] * v[1] + lh[p] * hw * v[wp] +
                        lh[p] * lw[p] * v[wp + 1];
          col[p] = val * m[p];
        }
      }
    }
  });
}

// Everything backward needs from one chunk's column gradient, in a single pass over (channel,
// tap, position): the input gradient (added to grad_xp when given), the sums behind the offset
// and mask gradients (gh, gw, gm over (image, group, tap, position); when given), and the columns
// themselves for the weight gradient (when cols is given). Threads own ranges of (image,
// channel) planes, so the input gradient needs no atomics; each thread sums its planes' share of
// gh/gw/gm privately and adds it to the totals at the end. Within a range, blocks of positions go
// outermost so that a block's taps and sums stay cached.
template <typename T>
void backward_impl(const Geometry& g, const Taps<T>& taps, const T* xp, const T* grad_cols,
                   T* grad_xp, T* cols, T* gh, T* gw, T* gm) {
  const int64_t P = g.positions(), K = g.taps(), cg = g.group_channels(), wp = g.padded_width();
  const int64_t sums = g.n * g.dg * K * P;
  const bool coord = gh != nullptr;
  std::mutex total;
  at::parallel_for(0, g.n * g.channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> sh(coord ? sums : 0, T(0)), sw(coord ? sums : 0, T(0));
    std::vector<T> sm(coord ? sums : 0, T(0));
    for (int64_t p0 = 0; p0 < P; p0 += kBlock) {
      const int64_t p1 = std::min(P, p0 + kBlock);
      for (int64_t bc = begin; bc < end; ++bc) {
        const int64_t b = bc / g.channels, grp = (bc % g.channels) / cg;
        const T* plane = xp + bc * g.padded_plane();
        T* grad_plane = grad_xp ? grad_xp + bc * g.padded_plane() : nullptr;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t t0 = ((b * g.dg + grp) * K + k) * P;
          const int64_t* index = taps.index.data() + t0;
          const T *lh = taps.lh.data() + t0, *lw = taps.lw.data() + t0;
          const T* m = taps.mask.data() + t0;
          const T* top = grad_cols + (bc * K + k) * P;
          T* col = cols ? cols + (bc * K + k) * P : nullptr;
          for (int64_t p = p0; p < p1; ++p) {
            const T hh = 1 - lh[p], hw = 1 - lw[p];
            const T w00 = hh * hw, w01 = hh * lw[p], w10 = lh[p] * hw, w11 = lh[p] * lw[p];
            if (grad_plane) {
              // detectron2's modulated_deformable_col2im (dmcn_get_gradient_weight).
              const T tm = top[p] * m[p];
              T* gv = grad_plane + index[p];
              gv[0] += w00 * tm;
              gv[1] += w01 * tm;
              gv[wp] += w10 * tm;
              gv[wp + 1] += w11 * tm;
            }
            if (coord || col) {
              const T* v = plane + index[p];
              const T val = w00 * v[0] + w01 * v[1] + w10 * v[wp] + w11 * v[wp + 1];
              if (col) col[p] = val * m[p];
              if (coord) {
                // detectron2's dmcn_get_coordinate_weight: the slope with floor(h), floor(w)
                // fixed. Outside the box lh = lw = 0 and index 0 reads the padding's 0.
                sm[t0 + p] += top[p] * val;
                sh[t0 + p] += top[p] * (hw * (v[wp] - v[0]) + lw[p] * (v[wp + 1] - v[1]));
                sw[t0 + p] += top[p] * (hh * (v[1] - v[0]) + lh[p] * (v[wp + 1] - v[wp]));
              }
            }
          }
        }
      }
    }
    if (coord) {
      const std::lock_guard<std::mutex> lock(total);
      for (int64_t t = 0; t < sums; ++t) {
        gh[t] += sh[t];
        gw[t] += sw[t];
        gm[t] += sm[t];
      }
    }
  });
}

void check_inputs(const at::Tensor& xp, const at::Tensor& offset,
                  const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(xp.device().is_cpu() && xp.is_contiguous() && xp.dim() == 4,
              "xp: contiguous 4-D CPU tensor");
  TORCH_CHECK(offset.is_contiguous() && offset.scalar_type() == xp.scalar_type(),
              "offset: contiguous, same dtype as xp");
  TORCH_CHECK(!mask || (mask->is_contiguous() && mask->scalar_type() == xp.scalar_type()),
              "mask: contiguous, same dtype as xp");
}

void check_cols(const Geometry& g, const at::Tensor& xp, const at::Tensor& grad_cols) {
  TORCH_CHECK(grad_cols.is_contiguous() && grad_cols.scalar_type() == xp.scalar_type() &&
                  grad_cols.numel() == g.n * g.channels * g.taps() * g.positions(),
              "grad_cols: contiguous (n, C*kh*kw, p_end - p_begin), same dtype as xp");
}

template <typename T>
const T* mask_ptr(const std::optional<at::Tensor>& mask) {
  return mask ? mask->data_ptr<T>() : nullptr;
}

at::Tensor im2col(const at::Tensor& xp, const at::Tensor& offset,
                  const std::optional<at::Tensor>& mask, at::IntArrayRef kernel,
                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                  int64_t dg, int64_t p_begin, int64_t p_end) {
  check_inputs(xp, offset, mask);
  const Geometry g =
      make_geometry(xp, offset, kernel, stride, padding, dilation, dg, p_begin, p_end);
  auto cols = at::empty({g.n, g.channels * g.taps(), g.positions()}, xp.options());
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "dcnv2_im2col", [&] {
    const Taps<scalar_t> taps(g, offset.data_ptr<scalar_t>(), mask_ptr<scalar_t>(mask));
    im2col_impl<scalar_t>(g, taps, xp.data_ptr<scalar_t>(), cols.data_ptr<scalar_t>());
  });
  return cols;
}

// One backward pass over a chunk's columns (see backward_impl). Adds the input gradient to
// grad_xp when given (what lands on the padding belongs to corners outside the image, which
// detectron2 drops: the caller crops it). Returns the offset gradient (n, 2*dg*K, positions) and
// mask gradient (n, dg*K, positions) when need_coord (the mask one empty for DCNv1), and the
// columns (n, C*K, positions) when need_cols; empty tensors otherwise.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& xp, const at::Tensor& offset, const std::optional<at::Tensor>& mask,
    const at::Tensor& grad_cols, at::IntArrayRef kernel, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t dg, int64_t p_begin,
    int64_t p_end, const std::optional<at::Tensor>& grad_xp, bool need_coord, bool need_cols) {
  check_inputs(xp, offset, mask);
  const Geometry g =
      make_geometry(xp, offset, kernel, stride, padding, dilation, dg, p_begin, p_end);
  check_cols(g, xp, grad_cols);
  TORCH_CHECK(!grad_xp || (grad_xp->is_contiguous() && grad_xp->sizes() == xp.sizes() &&
                           grad_xp->scalar_type() == xp.scalar_type()),
              "grad_xp: contiguous, like xp");
  const int64_t K = g.taps(), P = g.positions();
  auto cols = at::empty({need_cols ? g.n : 0, g.channels * K, P}, xp.options());
  auto grad_offset = at::empty({need_coord ? g.n : 0, 2 * dg * K, P}, xp.options());
  auto grad_mask = at::empty({need_coord && mask ? g.n : 0, dg * K, P}, xp.options());
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "dcnv2_backward", [&] {
    using T = scalar_t;
    const Taps<T> taps(g, offset.data_ptr<T>(), mask_ptr<T>(mask));
    const int64_t rows = g.n * dg * K;
    std::vector<T> gh(need_coord ? rows * P : 0, T(0)), gw(gh.size(), T(0)), gm(gh.size(), T(0));
    backward_impl<T>(g, taps, xp.data_ptr<T>(), grad_cols.data_ptr<T>(),
                     grad_xp ? grad_xp->data_ptr<T>() : nullptr,
                     need_cols ? cols.data_ptr<T>() : nullptr, need_coord ? gh.data() : nullptr,
                     gw.data(), gm.data());
    if (!need_coord) return;
    T* out = grad_offset.data_ptr<T>();
    T* out_m = mask ? grad_mask.data_ptr<T>() : nullptr;
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        // Offset channels of a group: (dy, dx) for tap 0, then tap 1, ...
        const int64_t k = row % K, b_grp = row / K;
        T* out_h = out + (b_grp * 2 * K + 2 * k) * P;
        T* out_w = out_h + P;
        const T* m = taps.mask.data() + row * P;
        for (int64_t p = 0; p < P; ++p) {
          // m is 0 outside the box, where detectron2's offset gradient is 0.
          out_h[p] = gh[row * P + p] * m[p];
          out_w[p] = gw[row * P + p] * m[p];
          if (out_m) out_m[row * P + p] = gm[row * P + p];
        }
      }
    });
  });
  return {grad_offset, grad_mask, cols};
}

}  // namespace

TORCH_LIBRARY(dcnv2_native, m) {
  m.def("im2col(Tensor xp, Tensor offset, Tensor? mask, int[2] kernel, int[2] stride, "
        "int[2] padding, int[2] dilation, int dg, int p_begin, int p_end) -> Tensor");
  m.def("backward(Tensor xp, Tensor offset, Tensor? mask, Tensor grad_cols, int[2] kernel, "
        "int[2] stride, int[2] padding, int[2] dilation, int dg, int p_begin, int p_end, "
        "Tensor(a!)? grad_xp, bool need_coord, bool need_cols) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dcnv2_native, CPU, m) {
  m.impl("im2col", &im2col);
  m.impl("backward", &backward);
}
