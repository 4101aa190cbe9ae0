// CPU column kernels of dcnv2's native deformable convolution (see native_cpp.py).
//
// Semantics are those of detectron2's CUDA kernels (deform_conv_cuda_kernel.cu): a tap samples
// only inside the open box -1 < h < H, -1 < w < W; bilinear weights from floor(h), floor(w);
// corners outside the image read 0; gradients are the derivatives of that formula with the floor
// held fixed. Columns are (n, C*K, P), K = kh*kw taps, P = Ho*Wo output positions.
//
// The sampling geometry (Taps) is computed once per call and reused for every channel. Work is
// split so that no two threads write the same element (no atomics): im2col and the offset/mask
// gradient by (image, deformable group, block of positions); the input gradient by ranges of
// (image, channel) planes.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
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

template <typename T>
void col2im_input_impl(const Geometry& g, const Taps<T>& taps, const T* grad_cols, T* grad_xp) {
  const int64_t P = g.positions(), K = g.taps(), cg = g.group_channels(), wp = g.padded_width();
  // Each thread owns a range of (image, channel) gradient planes: no two threads add to the same
  // element. Within the range, blocks of positions go outermost so a block's taps stay cached.
  at::parallel_for(0, g.n * g.channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p0 = 0; p0 < P; p0 += kBlock) {
      const int64_t p1 = std::min(P, p0 + kBlock);
      for (int64_t bc = begin; bc < end; ++bc) {
        const int64_t b = bc / g.channels, grp = (bc % g.channels) / cg;
        T* plane = grad_xp + bc * g.padded_plane();
        for (int64_t k = 0; k < K; ++k) {
          const int64_t t0 = ((b * g.dg + grp) * K + k) * P;
          const int64_t* index = taps.index.data() + t0;
          const T *lh = taps.lh.data() + t0, *lw = taps.lw.data() + t0;
          const T* m = taps.mask.data() + t0;
          const T* col = grad_cols + (bc * K + k) * P;
          for (int64_t p = p0; p < p1; ++p) {
            const T top = col[p] * m[p], hh = 1 - lh[p], hw = 1 - lw[p];
            T* v = plane + index[p];
            v[0] += hh * hw * top;
            v[1] += hh * lw[p] * top;
            v[wp] += lh[p] * hw * top;
            v[wp + 1] += lh[p] * lw[p] * top;
          }
        }
      }
    }
  });
}

template <typename T>
void col2im_coord_impl(const Geometry& g, const Taps<T>& taps, const T* xp, const T* grad_cols,
                       T* grad_offset, T* grad_mask) {
  const int64_t P = g.positions(), K = g.taps(), cg = g.group_channels(), wp = g.padded_width();
  for_each_block(g, [&](int64_t b, int64_t grp, int64_t p0, int64_t p1) {
    // Sums over the group's channels of grad_col times d(value)/dh, d/dw and the value.
    std::vector<T> gh(K * kBlock, T(0)), gw(K * kBlock, T(0)), gm(K * kBlock, T(0));
    for (int64_t c = grp * cg; c < (grp + 1) * cg; ++c) {
      const T* plane = xp + (b * g.channels + c) * g.padded_plane();
      for (int64_t k = 0; k < K; ++k) {
        const int64_t t0 = ((b * g.dg + grp) * K + k) * P;
        const int64_t* index = taps.index.data() + t0;
        const T *lh = taps.lh.data() + t0, *lw = taps.lw.data() + t0;
        const T* col = grad_cols + ((b * g.channels + c) * K + k) * P;
        T *ah = gh.data() + k * kBlock - p0, *aw = gw.data() + k * kBlock - p0;
        T* am = gm.data() + k * kBlock - p0;
        for (int64_t p = p0; p < p1; ++p) {
          const T* v = plane + index[p];
          const T hh = 1 - lh[p], hw = 1 - lw[p], top = col[p];
          am[p] += top * (hh * hw * v[0] + hh * lw[p] * v[1] + lh[p] * hw * v[wp] +
                          lh[p] * lw[p] * v[wp + 1]);
          // detectron2's dmcn_get_coordinate_weight: the slope with floor(h), floor(w) fixed.
          ah[p] += top * (hw * (v[wp] - v[0]) + lw[p] * (v[wp + 1] - v[1]));
          aw[p] += top * (hh * (v[1] - v[0]) + lh[p] * (v[wp + 1] - v[wp]));
        }
      }
    }
    for (int64_t k = 0; k < K; ++k) {
      const int64_t t0 = ((b * g.dg + grp) * K + k) * P;
      const T* m = taps.mask.data() + t0;
      T* out_h = grad_offset + ((b * g.dg + grp) * 2 * K + 2 * k) * P;
      T* out_w = out_h + P;
      T* out_m = grad_mask ? grad_mask + t0 : nullptr;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t q = k * kBlock + p - p0;
        // m is 0 outside the box, where detectron2's offset gradient is 0.
        out_h[p] = gh[q] * m[p];
        out_w[p] = gw[q] * m[p];
        // Outside the box lh = lw = 0 and index 0 reads the padding: the value term is 0 too.
        if (out_m) out_m[p] = gm[q];
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

// Adds the input gradient of these columns to grad_xp (same shape as xp). What lands on the
// padding belongs to corners outside the image, which detectron2 drops: the caller crops it.
void col2im_input(const at::Tensor& xp, const at::Tensor& offset,
                  const std::optional<at::Tensor>& mask, const at::Tensor& grad_cols,
                  at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                  at::IntArrayRef dilation, int64_t dg, int64_t p_begin, int64_t p_end,
                  at::Tensor grad_xp) {
  check_inputs(xp, offset, mask);
  const Geometry g =
      make_geometry(xp, offset, kernel, stride, padding, dilation, dg, p_begin, p_end);
  check_cols(g, xp, grad_cols);
  TORCH_CHECK(grad_xp.is_contiguous() && grad_xp.sizes() == xp.sizes() &&
                  grad_xp.scalar_type() == xp.scalar_type(),
              "grad_xp: contiguous, like xp");
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "dcnv2_col2im_input", [&] {
    const Taps<scalar_t> taps(g, offset.data_ptr<scalar_t>(), mask_ptr<scalar_t>(mask));
    col2im_input_impl<scalar_t>(g, taps, grad_cols.data_ptr<scalar_t>(),
                                grad_xp.data_ptr<scalar_t>());
  });
}

// Offset gradient (n, 2*dg*K, positions) and mask gradient (n, dg*K, positions; empty for DCNv1).
std::tuple<at::Tensor, at::Tensor> col2im_coord(
    const at::Tensor& xp, const at::Tensor& offset, const std::optional<at::Tensor>& mask,
    const at::Tensor& grad_cols, at::IntArrayRef kernel, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t dg, int64_t p_begin,
    int64_t p_end) {
  check_inputs(xp, offset, mask);
  const Geometry g =
      make_geometry(xp, offset, kernel, stride, padding, dilation, dg, p_begin, p_end);
  check_cols(g, xp, grad_cols);
  auto grad_offset = at::empty({g.n, 2 * dg * g.taps(), g.positions()}, xp.options());
  auto grad_mask = at::empty({mask ? g.n : 0, dg * g.taps(), g.positions()}, xp.options());
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "dcnv2_col2im_coord", [&] {
    const Taps<scalar_t> taps(g, offset.data_ptr<scalar_t>(), mask_ptr<scalar_t>(mask));
    col2im_coord_impl<scalar_t>(g, taps, xp.data_ptr<scalar_t>(),
                                grad_cols.data_ptr<scalar_t>(), grad_offset.data_ptr<scalar_t>(),
                                mask ? grad_mask.data_ptr<scalar_t>() : nullptr);
  });
  return {grad_offset, grad_mask};
}

}  // namespace

TORCH_LIBRARY(dcnv2_native, m) {
  m.def("im2col(Tensor xp, Tensor offset, Tensor? mask, int[2] kernel, int[2] stride, "
        "int[2] padding, int[2] dilation, int dg, int p_begin, int p_end) -> Tensor");
  m.def("col2im_input(Tensor xp, Tensor offset, Tensor? mask, Tensor grad_cols, int[2] kernel, "
        "int[2] stride, int[2] padding, int[2] dilation, int dg, int p_begin, int p_end, "
        "Tensor(a!) grad_xp) -> ()");
  m.def("col2im_coord(Tensor xp, Tensor offset, Tensor? mask, Tensor grad_cols, int[2] kernel, "
        "int[2] stride, int[2] padding, int[2] dilation, int dg, int p_begin, int p_end) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dcnv2_native, CPU, m) {
  m.impl("im2col", &im2col);
  m.impl("col2im_input", &col2im_input);
  m.impl("col2im_coord", &col2im_coord);
}
