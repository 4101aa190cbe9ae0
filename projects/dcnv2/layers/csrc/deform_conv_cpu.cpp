// CPU column kernels of dcnv2's native deformable convolution (see native_cpp.py).
//
// Semantics are those of detectron2's CUDA kernels (deform_conv_cuda_kernel.cu): a tap samples
// only inside the open box -1 < h < H, -1 < w < W; bilinear weights from floor(h), floor(w);
// corners outside the image read 0; gradients are the derivatives of that formula with the floor
// held fixed.
//
// Layouts are channels-last, so that every inner loop runs over contiguous channels (and
// vectorizes) while the sampling geometry of a tap is computed once for all its channels:
// - xp: the input (n, H+2, W+2, C), zero-padded by one pixel so that the four corners of any tap
//   inside the box are in bounds and corners outside the image read 0 without a branch;
// - columns: (n, Pc, G, K, C/G) for output positions [p_begin, p_end) of the flattened Ho*Wo
//   grid (Pc of them), G convolution groups, K = kh*kw taps. Row p of an image is what the
//   convolution's weight (G, C_out/G, K, C/G) meets at output position p.
//
// Work is split so that no two threads write the same element (no atomics): the columns and the
// offset/mask gradients by (image, block of positions); the input gradient, where taps of
// different positions meet, by (image, block of channels).

#include "deform_conv_common.h"

namespace {

using namespace dcnv2;

template <typename T>
void im2col_impl(const Geometry& g, const T* xp, const T* offset, const T* mask, T* cols) {
  const int64_t K = g.taps(), cd = g.dg_channels(), C = g.channels, wp = g.padded_width();
  for_each_position(g, [&](int64_t b, int64_t p, int64_t q) {
    T* row = cols + (b * g.positions() + q) * g.row();
    for (int64_t d = 0; d < g.dg; ++d) {
      for (int64_t k = 0; k < K; ++k) {
        const Tap<T> t = make_tap(g, offset, mask, b, d, k, p);
        const T* v = xp + b * g.image() + t.index;
        for_each_run(g, k, d * cd, (d + 1) * cd, [&](int64_t c0, int64_t c1, int64_t col) {
          if (t.inside)
            sample(v + c0, C, wp, t, c1 - c0, row + col);
          else
            std::fill(row + col, row + col + (c1 - c0), T(0));
        });
      }
    }
  });
}

// The offset and mask gradients of each tap, and (when cols is given) the columns for the
// weight gradient, in one pass split by positions. For a tap, with s_q the sum over its channels
// of grad_col * corner value q (q = 00, 01, 10, 11): the mask gradient is the bilinear value's,
// sum_q w_q s_q (detectron2: grad_col * dmcn_im2col_bilinear), and the offset gradients are the
// slopes with floor(h), floor(w) fixed (dmcn_get_coordinate_weight) times the mask.
template <typename T, bool kCols>
void coord_impl(const Geometry& g, const T* xp, const T* offset, const T* mask,
                const T* grad_cols, T* cols, T* grad_offset, T* grad_mask) {
  const int64_t K = g.taps(), cd = g.dg_channels(), C = g.channels, wp = g.padded_width();
  const int64_t P = g.positions();
  for_each_position(g, [&](int64_t b, int64_t p, int64_t q) {
    const int64_t row = (b * P + q) * g.row();
    for (int64_t d = 0; d < g.dg; ++d) {
      for (int64_t k = 0; k < K; ++k) {
        const Tap<T> t = make_tap(g, offset, mask, b, d, k, p);
        T* go = grad_offset + ((b * g.dg + d) * K + k) * 2 * P + q;
        T* gm = grad_mask ? grad_mask + ((b * g.dg + d) * K + k) * P + q : nullptr;
        if (!t.inside) {  // value 0 and every gradient 0, as in detectron2
          go[0] = go[P] = T(0);
          if (gm) *gm = T(0);
          if (kCols)
            for_each_run(g, k, d * cd, (d + 1) * cd, [&](int64_t c0, int64_t c1, int64_t col) {
              std::fill(cols + row + col, cols + row + col + (c1 - c0), T(0));
            });
          continue;
        }
        const T* v = xp + b * g.image() + t.index;
        const T hh = 1 - t.lh, hw = 1 - t.lw;
        const T w00 = hh * hw, w01 = hh * t.lw, w10 = t.lh * hw, w11 = t.lh * t.lw;
        T s00 = 0, s01 = 0, s10 = 0, s11 = 0;
        for_each_run(g, k, d * cd, (d + 1) * cd, [&](int64_t c0, int64_t c1, int64_t col) {
          const T* __restrict top = grad_cols + row + col;
          const T *v00 = v + c0, *v01 = v00 + C, *v10 = v00 + wp * C, *v11 = v10 + C;
          T* __restrict out = kCols ? cols + row + col : nullptr;
          T a00 = 0, a01 = 0, a10 = 0, a11 = 0;
#pragma omp simd reduction(+ : a00, a01, a10, a11)
          for (int64_t c = 0; c < c1 - c0; ++c) {
            a00 += top[c] * v00[c];
            a01 += top[c] * v01[c];
            a10 += top[c] * v10[c];
            a11 += top[c] * v11[c];
            if (kCols) out[c] = (w00 * v00[c] + w01 * v01[c] + w10 * v10[c] + w11 * v11[c]) * t.m;
          }
          s00 += a00;
          s01 += a01;
          s10 += a10;
          s11 += a11;
        });
        offset_mask_gradients(t, s00, s01, s10, s11, go, P, gm);
      }
    }
  });
}

// Adds the input gradient of the columns to grad_xp (detectron2's modulated_deformable_col2im
// with dmcn_get_gradient_weight), split by (image, block of channels) so that threads never add
// to the same element.
template <typename T>
void col2im_impl(const Geometry& g, const T* offset, const T* mask, const T* grad_cols,
                 T* grad_xp) {
  const int64_t K = g.taps(), cd = g.dg_channels(), C = g.channels, wp = g.padded_width();
  const int64_t P = g.positions(), width = channel_block(g);
  const int64_t blocks = (C + width - 1) / width;
  at::parallel_for(0, g.n * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, lo = (task % blocks) * width, hi = std::min(C, lo + width);
      T* image = grad_xp + b * g.image();
      for (int64_t q = 0; q < P; ++q) {
        const T* row = grad_cols + (b * P + q) * g.row();
        for (int64_t d = lo / cd; d * cd < hi; ++d) {
          for (int64_t k = 0; k < K; ++k) {
            const Tap<T> t = make_tap(g, offset, mask, b, d, k, g.p_begin + q);
            if (!t.inside) continue;
            const T hh = 1 - t.lh, hw = 1 - t.lw;
            const T w00 = hh * hw, w01 = hh * t.lw, w10 = t.lh * hw, w11 = t.lh * t.lw;
            const int64_t c_lo = std::max(lo, d * cd), c_hi = std::min(hi, (d + 1) * cd);
            for_each_run(g, k, c_lo, c_hi, [&](int64_t c0, int64_t c1, int64_t col) {
              const T* __restrict top = row + col;
              T* __restrict v00 = image + t.index + c0;
              T* __restrict v01 = v00 + C;
              T* __restrict v10 = v00 + wp * C;
              T* __restrict v11 = v10 + C;
#pragma omp simd
              for (int64_t c = 0; c < c1 - c0; ++c) {
                const T tm = top[c] * t.m;
                v00[c] += w00 * tm;
                v01[c] += w01 * tm;
                v10[c] += w10 * tm;
                v11[c] += w11 * tm;
              }
            });
          }
        }
      }
    }
  });
}

at::Tensor im2col(const at::Tensor& xp, const at::Tensor& offset,
                  const std::optional<at::Tensor>& mask, at::IntArrayRef kernel,
                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                  int64_t dg, int64_t groups, int64_t p_begin, int64_t p_end) {
  check_inputs(xp, offset, mask);
  const Geometry g =
      make_geometry(xp, offset, kernel, stride, padding, dilation, dg, groups, p_begin, p_end);
  auto cols = at::empty({g.n, g.positions(), g.row()}, xp.options());
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "dcnv2_im2col", [&] {
    im2col_impl<scalar_t>(g, xp.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(),
                          mask_ptr<scalar_t>(mask), cols.data_ptr<scalar_t>());
  });
  return cols;
}

// What backward needs from a chunk's column gradient grad_cols (n, Pc, K*C): adds the input
// gradient to grad_xp when given (what lands on the padding belongs to corners outside the
// image, which detectron2 drops: the caller crops it); returns the offset gradient
// (n, 2*dg*K, Pc) and mask gradient (n, dg*K, Pc) when need_coord (the mask one empty for
// DCNv1), and the columns (n, Pc, K*C) when need_cols; empty tensors otherwise.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& xp, const at::Tensor& offset, const std::optional<at::Tensor>& mask,
    const at::Tensor& grad_cols, at::IntArrayRef kernel, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t dg, int64_t groups,
    int64_t p_begin, int64_t p_end, const std::optional<at::Tensor>& grad_xp, bool need_coord,
    bool need_cols) {
  check_inputs(xp, offset, mask);
  const Geometry g =
      make_geometry(xp, offset, kernel, stride, padding, dilation, dg, groups, p_begin, p_end);
  TORCH_CHECK(grad_cols.is_contiguous() && grad_cols.scalar_type() == xp.scalar_type() &&
                  grad_cols.numel() == g.n * g.positions() * g.row(),
              "grad_cols: contiguous (n, p_end - p_begin, kh*kw*C), same dtype as xp");
  TORCH_CHECK(!grad_xp || (grad_xp->is_contiguous() && grad_xp->sizes() == xp.sizes() &&
                           grad_xp->scalar_type() == xp.scalar_type()),
              "grad_xp: contiguous, like xp");
  const int64_t K = g.taps(), P = g.positions();
  auto cols = at::empty({need_cols ? g.n : 0, P, g.row()}, xp.options());
  auto grad_offset = at::empty({need_coord ? g.n : 0, 2 * dg * K, P}, xp.options());
  auto grad_mask = at::empty({need_coord && mask ? g.n : 0, dg * K, P}, xp.options());
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "dcnv2_backward", [&] {
    using T = scalar_t;
    const T *x = xp.data_ptr<T>(), *off = offset.data_ptr<T>(), *m = mask_ptr<T>(mask);
    const T* top = grad_cols.data_ptr<T>();
    if (grad_xp) col2im_impl<T>(g, off, m, top, grad_xp->data_ptr<T>());
    if (need_coord) {
      T* gm = mask ? grad_mask.data_ptr<T>() : nullptr;
      if (need_cols)
        coord_impl<T, true>(g, x, off, m, top, cols.data_ptr<T>(), grad_offset.data_ptr<T>(), gm);
      else
        coord_impl<T, false>(g, x, off, m, top, nullptr, grad_offset.data_ptr<T>(), gm);
    } else if (need_cols) {
      im2col_impl<T>(g, x, off, m, cols.data_ptr<T>());
    }
  });
  return {grad_offset, grad_mask, cols};
}

// (n, H+2, W+2, C) -> (n, C, H, W) without the padding: the input gradient back in the input's
// layout. Tiles of the (W, C) -> (C, W) transpose of each row stay in L1.
at::Tensor crop_channels_first(const at::Tensor& xp) {
  TORCH_CHECK(xp.device().is_cpu() && xp.is_contiguous() && xp.dim() == 4 && xp.size(1) > 2 &&
                  xp.size(2) > 2,
              "xp: contiguous (n, H+2, W+2, C) CPU tensor");
  const int64_t n = xp.size(0), H = xp.size(1) - 2, W = xp.size(2) - 2, C = xp.size(3);
  auto out = at::empty({n, C, H, W}, xp.options());
  constexpr int64_t kTile = 32;
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "dcnv2_crop_channels_first", [&] {
    const scalar_t* src = xp.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, n * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        const scalar_t* row = src + ((b * (H + 2) + h + 1) * (W + 2) + 1) * C;
        scalar_t* plane = dst + b * C * H * W + h * W;
        for (int64_t c0 = 0; c0 < C; c0 += kTile)
          for (int64_t w0 = 0; w0 < W; w0 += kTile)
            for (int64_t c = c0; c < std::min(C, c0 + kTile); ++c)
              for (int64_t w = w0; w < std::min(W, w0 + kTile); ++w)
                plane[c * H * W + w] = row[w * C + c];
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(dcnv2_native, m) {
  m.def("im2col(Tensor xp, Tensor offset, Tensor? mask, int[2] kernel, int[2] stride, "
        "int[2] padding, int[2] dilation, int dg, int groups, int p_begin, int p_end) -> Tensor");
  m.def("backward(Tensor xp, Tensor offset, Tensor? mask, Tensor grad_cols, int[2] kernel, "
        "int[2] stride, int[2] padding, int[2] dilation, int dg, int groups, int p_begin, "
        "int p_end, Tensor(a!)? grad_xp, bool need_coord, bool need_cols) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("crop_channels_first(Tensor xp) -> Tensor");
}

TORCH_LIBRARY_IMPL(dcnv2_native, CPU, m) {
  m.impl("im2col", &im2col);
  m.impl("backward", &backward);
  m.impl("crop_channels_first", &crop_channels_first);
}
