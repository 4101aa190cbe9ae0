// The native deformable convolution's fused CPU passes for one convolution group in float32 on
// x86-64 CPUs with AVX2 and FMA (see native.py, which measures them against the column kernels
// of deform_conv_cpu.cpp and keeps the faster): sampling goes straight into cache-sized packed
// panels that the 6x16 register tiles of gemm_cpu.cpp multiply at once, so the columns and their
// gradient never go to memory.

#include "deform_conv_common.h"

namespace {

using namespace dcnv2;

constexpr int64_t kPanelFloats = 786432;  // the fused forward's packed columns per task (3 MiB)

// Samples the columns of up to 6 positions [p, p + count) of image b into a packed panel
// (K*C, 6), zero past count; rows: scratch for 6 x C/dg floats.
DCNV2_TARGET_AVX2 void sample_panel(const Geometry& g, const float* x, const float* off,
                                    const float* m, int64_t b, int64_t p, int64_t count,
                                    float* panel, float* rows) {
  const int64_t K = g.taps(), C = g.channels, cd = g.dg_channels(), wp = g.padded_width();
  for (int64_t d = 0; d < g.dg; ++d) {
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t j = 0; j < 6; ++j) {
        float* row = rows + j * cd;
        const Tap<float> t = j < count ? make_tap(g, off, m, b, d, k, p + j) : Tap<float>{};
        if (t.inside)
          sample(x + b * g.image() + t.index + d * cd, C, wp, t, cd, row);
        else
          std::fill(row, row + cd, 0.f);
      }
      float* dst = panel + (k * C + d * cd) * 6;
      for (int64_t c = 0; c < cd; ++c)
        for (int64_t j = 0; j < 6; ++j) dst[c * 6 + j] = rows[j * cd + c];
    }
  }
}

// The whole forward for groups == 1, float32, in one pass over blocks of output positions: a
// task samples its positions straight into packed panels (per 6 positions, [K*C][6] with the
// columns' (tap, channel) order) sized to stay in L2, and multiplies them with the weight,
// packed as (ceil(C_out/16), K*C, 16), in 6x16 AVX2 register tiles (gemm_cpu.cpp) over the whole
// depth. So the columns never go to memory, and each output element is stored once.
void forward_packed(const at::Tensor& xp, const at::Tensor& offset,
                    const std::optional<at::Tensor>& mask, const at::Tensor& wpacked,
                    const std::optional<at::Tensor>& bias, at::IntArrayRef kernel,
                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                    int64_t dg, const at::Tensor& out) {
  check_inputs(xp, offset, mask);
  TORCH_CHECK(dcnv2::cpu_has_avx2_fma(), "forward_packed needs a CPU with AVX2 and FMA");
  TORCH_CHECK(xp.scalar_type() == at::kFloat, "forward_packed: float32");
  const Geometry g = make_geometry(xp, offset, kernel, stride, padding, dilation, dg, 1, 0,
                                   offset.size(2) * offset.size(3));
  const int64_t depth = g.row(), P = g.all_positions(), cd = g.dg_channels();
  const int64_t c_out = out.size(1);
  TORCH_CHECK(wpacked.is_contiguous() && wpacked.scalar_type() == at::kFloat &&
                  wpacked.dim() == 3 && wpacked.size(0) == (c_out + 15) / 16 &&
                  wpacked.size(1) == depth && wpacked.size(2) == 16,
              "wpacked: contiguous float32 (ceil(C_out/16), kh*kw*C, 16)");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == at::kFloat && out.dim() == 3 &&
                  out.size(0) == g.n && out.size(2) == P,
              "out: contiguous float32 (n, C_out, Ho*Wo)");
  TORCH_CHECK(!bias || (bias->is_contiguous() && bias->scalar_type() == at::kFloat &&
                        bias->numel() == c_out),
              "bias: contiguous float32 (C_out,)");
  // Positions per task: a multiple of 6, at most 96, whose panels fill at most 3 MiB: each task
  // reads the whole packed weight once, so wide positions (res5) gain from large panels.
  const int64_t block = std::clamp<int64_t>((kPanelFloats / depth) / 6 * 6, 6, 96);
  const int64_t blocks = (P + block - 1) / block;
  const float *x = xp.data_ptr<float>(), *off = offset.data_ptr<float>();
  const float* m = mask_ptr<float>(mask);
  const float* w = wpacked.data_ptr<float>();
  const float* bias_data = bias ? bias->data_ptr<float>() : nullptr;
  float* y = out.data_ptr<float>();
  at::parallel_for(0, g.n * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> panels(block * depth), rows(6 * cd);
    alignas(32) float tile[6 * 16];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, p0 = (task % blocks) * block;
      const int64_t count = std::min(block, P - p0);
      for (int64_t q = 0; q < count; q += 6)
        sample_panel(g, x, off, m, b, p0 + q, std::min<int64_t>(6, count - q),
                     panels.data() + q * depth, rows.data());
      for (int64_t o = 0; o < c_out; o += 16) {
        const float* wpanel = w + (o / 16) * depth * 16;
        const int64_t rows_out = std::min<int64_t>(16, c_out - o);
        for (int64_t q = 0; q < count; q += 6) {
          dcnv2::tile_6x16(depth, panels.data() + q * depth, wpanel, tile, 16, 6, 16, false);
          float* dst = y + (b * c_out + o) * P + p0 + q;
          const int64_t cols = std::min<int64_t>(6, count - q);
          for (int64_t i = 0; i < rows_out; ++i) {
            const float add = bias_data ? bias_data[o + i] : 0.f;
            for (int64_t j = 0; j < cols; ++j) dst[i * P + j] = tile[j * 16 + i] + add;
          }
        }
      }
    }
  });
}

// The weight (C_out, C, kh, kw) as panels of 16 input channels of one tap: (K, S, C_out, 16),
// S = ceil(C/16), zero past C; panel (k, s) is what the column gradient's channels
// [16s, 16s + 16) of tap k meet.
at::Tensor pack_taps16(const at::Tensor& w, int64_t K, int64_t C) {
  const int64_t c_out = w.size(0), S = (C + 15) / 16;
  auto out = at::empty({K, S, c_out, 16}, w.options());
  const float* src = w.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, K * S, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ks = begin; ks < end; ++ks) {
      const int64_t k = ks / S, c0 = (ks % S) * 16, len = std::min<int64_t>(16, C - c0);
      for (int64_t o = 0; o < c_out; ++o) {
        float* row = dst + (ks * c_out + o) * 16;
        const float* from = src + (o * C + c0) * K + k;
        for (int64_t i = 0; i < len; ++i) row[i] = from[i * K];
        std::fill(row + len, row + 16, 0.f);
      }
    }
  });
  return out;
}

// What backward_packed's pass (2) needs besides the position and block.
struct BackwardContext {
  const Geometry& g;
  const float *x, *off, *m;
  float* gx;  // the input gradient, or null
  bool need_cols, need_grad_cols, need_coord;
};

// One run of at most 16 channels of a tap in backward_packed's pass (2): where to read and
// write (null: not wanted), the tap's bilinear weights and modulation.
struct Run {
  const float *v00, *v01, *v10, *v11;  // the four corners of the input
  const float* top;                     // the column gradient, or null
  float *g00, *g01, *g10, *g11;         // the input gradient's corners, or null
  float* cols;                          // the columns, or null
  float w[4];
  float m;
  float* sums;  // the corner products' sums (4), or null
};

// kLen > 0: the run's length known at compile time (whole panels of 16: straight vector code).
template <int64_t kLen>
DCNV2_TARGET_AVX2 inline void backward_run(const Run& r, int64_t dynamic_len) {
  const int64_t len = kLen > 0 ? kLen : dynamic_len;
  const float *__restrict v00 = r.v00, *__restrict v01 = r.v01, *__restrict v10 = r.v10;
  const float *__restrict v11 = r.v11, *__restrict top = r.top;
  const float w00 = r.w[0], w01 = r.w[1], w10 = r.w[2], w11 = r.w[3], m = r.m;
  if (r.cols) {
    float* __restrict out = r.cols;
    for (int64_t c = 0; c < len; ++c)
      out[c] = (w00 * v00[c] + w01 * v01[c] + w10 * v10[c] + w11 * v11[c]) * m;
  }
  if (!top) return;
  if (r.g00) {
    float *__restrict g00 = r.g00, *__restrict g01 = r.g01, *__restrict g10 = r.g10;
    float* __restrict g11 = r.g11;
    for (int64_t c = 0; c < len; ++c) {
      const float tm = top[c] * m;
      g00[c] += w00 * tm;
      g01[c] += w01 * tm;
      g10[c] += w10 * tm;
      g11[c] += w11 * tm;
    }
  }
  if (r.sums) {
    float a00 = 0, a01 = 0, a10 = 0, a11 = 0;
#pragma omp simd reduction(+ : a00, a01, a10, a11)
    for (int64_t c = 0; c < len; ++c) {
      a00 += top[c] * v00[c];
      a01 += top[c] * v01[c];
      a10 += top[c] * v10[c];
      a11 += top[c] * v11[c];
    }
    r.sums[0] += a00;
    r.sums[1] += a01;
    r.sums[2] += a10;
    r.sums[3] += a11;
  }
}

// Pass (2) of backward_packed for output position p (row q of the panels) of image b and the
// channels [lo, hi): adds the input gradient, samples the columns into cols, and writes the
// sums of the corner products over these channels to partial (dg*K, P, 4) when need_coord.
DCNV2_TARGET_AVX2 void backward_sample(const BackwardContext& ctx, int64_t b, int64_t p,
                                       int64_t q, int64_t lo, int64_t hi, int64_t s_lo,
                                       int64_t s_n, int64_t step, float* cols,
                                       const float* gcols, float* partial) {
  const Geometry& g = ctx.g;
  const int64_t K = g.taps(), C = g.channels, cd = g.dg_channels(), P = g.all_positions();
  const int64_t wp = g.padded_width();
  const float *x = ctx.x, *off = ctx.off, *m = ctx.m;
  float* gx = ctx.gx;
  const bool need_cols = ctx.need_cols, need_grad_cols = ctx.need_grad_cols;
  const bool need_coord = ctx.need_coord;
  for (int64_t d = lo / cd; d * cd < hi; ++d) {
    const int64_t c_lo = std::max(lo, d * cd), c_hi = std::min(hi, (d + 1) * cd);
    for (int64_t k = 0; k < K; ++k) {
      const Tap<float> t = make_tap(g, off, m, b, d, k, p);
      // Channel c of tap k sits at panel (k, c/16 - s_lo), row q, lane c % 16.
      auto at = [&](auto* base, int64_t c) {
        return base + ((k * s_n + c / 16 - s_lo) * step + q) * 16 + c % 16;
      };
      float s00 = 0, s01 = 0, s10 = 0, s11 = 0;
      if (t.inside) {
        const float hh = 1 - t.lh, hw = 1 - t.lw;
        const float w00 = hh * hw, w01 = hh * t.lw, w10 = t.lh * hw, w11 = t.lh * t.lw;
        float sums[4] = {0, 0, 0, 0};
        for (int64_t c0 = c_lo; c0 < c_hi;) {
          const int64_t c1 = std::min(c_hi, (c0 / 16 + 1) * 16), len = c1 - c0;
          const int64_t e = b * g.image() + t.index + c0;
          const float* v00 = x + e;
          float* gxe = gx ? gx + e : nullptr;
          const Run run{v00,
                        v00 + C,
                        v00 + wp * C,
                        v00 + wp * C + C,
                        need_grad_cols ? at(gcols, c0) : nullptr,
                        gxe,
                        gxe ? gxe + C : nullptr,
                        gxe ? gxe + wp * C : nullptr,
                        gxe ? gxe + wp * C + C : nullptr,
                        need_cols ? at(cols, c0) : nullptr,
                        {w00, w01, w10, w11},
                        t.m,
                        need_coord && need_grad_cols ? sums : nullptr};
          if (len == 16)
            backward_run<16>(run, len);
          else
            backward_run<0>(run, len);
          c0 = c1;
        }
        s00 = sums[0];
        s01 = sums[1];
        s10 = sums[2];
        s11 = sums[3];
      } else if (need_cols) {
        for (int64_t c0 = c_lo; c0 < c_hi;) {
          const int64_t c1 = std::min(c_hi, (c0 / 16 + 1) * 16);
          std::fill(at(cols, c0), at(cols, c0) + (c1 - c0), 0.f);
          c0 = c1;
        }
      }
      if (need_coord) {
        float* sums = partial + ((d * K + k) * P + p) * 4;
        sums[0] = s00;
        sums[1] = s01;
        sums[2] = s10;
        sums[3] = s11;
      }
    }
  }
}

// The whole backward for groups == 1, float32, split by blocks of input channels (one per
// thread, whole panels of 16), each over every image and position, so that no two threads write
// the same element of the input or weight gradient. A task walks blocks of positions; for each:
// (1) the column gradient of its channels, grad_out^T @ w, by register tiles into panels
//     (tap, 16 channels) x positions x 16 that stay in cache;
// (2) one pass over those panels as coord_col2im_impl's (input gradient; per-block sums of the
//     corner products for the offset and mask gradients, combined at the end), which also
//     samples the columns of its channels into panels;
// (3) the weight gradient of its channels, grad_out @ columns, by register tiles.
// Any of grad_xp (zeroed, like xp), grad_offset and grad_mask (n, dg*K [x2], Ho*Wo), grad_w
// (C_out, K*C, zeroed) may be absent.
void backward_packed(const at::Tensor& xp, const at::Tensor& offset,
                     const std::optional<at::Tensor>& mask, const at::Tensor& grad_out,
                     const at::Tensor& weight, at::IntArrayRef kernel, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t dg,
                     const std::optional<at::Tensor>& grad_xp,
                     const std::optional<at::Tensor>& grad_offset,
                     const std::optional<at::Tensor>& grad_mask,
                     const std::optional<at::Tensor>& grad_w) {
  check_inputs(xp, offset, mask);
  TORCH_CHECK(cpu_has_avx2_fma(), "backward_packed needs a CPU with AVX2 and FMA");
  TORCH_CHECK(xp.scalar_type() == at::kFloat, "backward_packed: float32");
  const Geometry g = make_geometry(xp, offset, kernel, stride, padding, dilation, dg, 1, 0,
                                   offset.size(2) * offset.size(3));
  const int64_t K = g.taps(), C = g.channels, P = g.all_positions();
  const int64_t c_out = weight.size(0), S = (C + 15) / 16;
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == at::kFloat && weight.dim() == 4 &&
                  weight.size(1) == C && weight.size(2) * weight.size(3) == K,
              "weight: contiguous float32 (C_out, C, kh, kw)");
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.scalar_type() == at::kFloat &&
                  grad_out.numel() == g.n * c_out * P,
              "grad_out: contiguous float32 (n, C_out, Ho*Wo)");
  auto like = [](const std::optional<at::Tensor>& t, std::vector<int64_t> sizes, const char* what) {
    TORCH_CHECK(!t || (t->is_contiguous() && t->scalar_type() == at::kFloat &&
                       t->sizes() == at::IntArrayRef(sizes)),
                what);
    return t ? t->data_ptr<float>() : nullptr;
  };
  float* gx = like(grad_xp, xp.sizes().vec(), "grad_xp: contiguous float32, like xp");
  float* go_ = like(grad_offset, {g.n, 2 * dg * K, P}, "grad_offset: (n, 2*dg*K, Ho*Wo)");
  float* gm_ = like(grad_mask, {g.n, dg * K, P}, "grad_mask: (n, dg*K, Ho*Wo)");
  float* gw = like(grad_w, {c_out, K * C}, "grad_w: contiguous float32 (C_out, kh*kw*C)");
  TORCH_CHECK(!gm_ || mask, "grad_mask needs a mask");
  const bool need_coord = go_ || gm_, need_cols = gw, need_grad_cols = gx || need_coord;
  if (!need_grad_cols && !need_cols) return;
  const at::Tensor wsegs = pack_taps16(weight, K, C);
  const float *x = xp.data_ptr<float>(), *off = offset.data_ptr<float>();
  const float* m = mask_ptr<float>(mask);
  const float *top = grad_out.data_ptr<float>(), *ws = wsegs.data_ptr<float>();
  // One block of channels per thread, whole panels of 16.
  const int64_t threads = at::get_num_threads();
  const int64_t width = std::min(S, std::max<int64_t>(1, (S + threads - 1) / threads)) * 16;
  const int64_t blocks = (C + width - 1) / width, taps = g.dg * K;
  std::vector<float> partial(need_coord ? blocks * g.n * taps * P * 4 : 0, 0.f);
  const BackwardContext ctx{g, x, off, m, gx, need_cols, need_grad_cols, need_coord};
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t lo = blk * width, hi = std::min(C, lo + width);
      const int64_t s_lo = lo / 16, s_n = (hi - lo + 15) / 16, panels = K * s_n;
      // Positions per step: a multiple of 6 whose two panel sets fill at most 1.5 MiB.
      const int64_t step = std::clamp<int64_t>((196608 / (panels * 16)) / 6 * 6, 6, 192);
      Buffer gcols = allocate(panels * step * 16), cols = allocate(panels * step * 16);
      Buffer top_t = allocate(step * c_out), top_r = allocate((c_out + 5) / 6 * 6 * step);
      for (int64_t b = 0; b < g.n; ++b) {
        const float* gob = top + b * c_out * P;
        for (int64_t p0 = 0; p0 < P; p0 += step) {
          const int64_t count = std::min(step, P - p0);
          if (need_grad_cols) {
            // (1) grad_out^T panels [6 positions][C_out] per 6 positions, then the tiles.
            for (int64_t q = 0; q < count; q += 6) {
              float* panel = top_t.get() + q * c_out;
              for (int64_t o = 0; o < c_out; ++o)
                for (int64_t j = 0; j < 6; ++j)
                  panel[o * 6 + j] = q + j < count ? gob[o * P + p0 + q + j] : 0.f;
            }
            for (int64_t k = 0; k < K; ++k)
              for (int64_t s = 0; s < s_n; ++s) {
                const float* wpanel = ws + ((k * S + s_lo + s) * c_out) * 16;
                float* dst = gcols.get() + ((k * s_n + s) * step) * 16;
                for (int64_t q = 0; q < count; q += 6)
                  tile_6x16(c_out, top_t.get() + q * c_out, wpanel, dst + q * 16, 16,
                            std::min<int64_t>(6, count - q), 16, false);
              }
          }
          // (2) the sampling pass over this block's channels.
          for (int64_t q = 0; q < count; ++q)
            backward_sample(ctx, b, p0 + q, q, lo, hi, s_lo, s_n, step, cols.get(), gcols.get(),
                            need_coord ? partial.data() + (blk * g.n + b) * taps * P * 4 : nullptr);
          if (need_cols) {
            // (3) grad_out panels [positions][6 output channels], then the tiles.
            for (int64_t o0 = 0; o0 < c_out; o0 += 6) {
              float* panel = top_r.get() + o0 * step;
              for (int64_t i = 0; i < 6; ++i) {
                const float* src = o0 + i < c_out ? gob + (o0 + i) * P + p0 : nullptr;
                for (int64_t q = 0; q < count; ++q) panel[q * 6 + i] = src ? src[q] : 0.f;
              }
            }
            for (int64_t k = 0; k < K; ++k)
              for (int64_t s = 0; s < s_n; ++s) {
                const int64_t c0 = (s_lo + s) * 16, len = std::min<int64_t>(16, hi - c0);
                const float* panel = cols.get() + ((k * s_n + s) * step) * 16;
                for (int64_t o0 = 0; o0 < c_out; o0 += 6)
                  tile_6x16(count, top_r.get() + o0 * step, panel, gw + o0 * K * C + k * C + c0,
                            K * C, std::min<int64_t>(6, c_out - o0), len, true);
              }
          }
        }
      }
    }
  });
  if (!need_coord) return;
  for_each_position(g, [&](int64_t b, int64_t p, int64_t) {
    for (int64_t d = 0; d < g.dg; ++d) {
      for (int64_t k = 0; k < K; ++k) {
        const Tap<float> t = make_tap(g, off, m, b, d, k, p);
        float s00 = 0, s01 = 0, s10 = 0, s11 = 0;
        if (t.inside)
          for (int64_t blk = 0; blk < blocks; ++blk) {
            const float* s = partial.data() + (((blk * g.n + b) * taps + d * K + k) * P + p) * 4;
            s00 += s[0];
            s01 += s[1];
            s10 += s[2];
            s11 += s[3];
          }
        // Outside taps: zero sums and modulation, so every gradient is 0, as in detectron2.
        offset_mask_gradients(t, s00, s01, s10, s11,
                              go_ ? go_ + ((b * g.dg + d) * K + k) * 2 * P + p : nullptr, P,
                              gm_ ? gm_ + ((b * g.dg + d) * K + k) * P + p : nullptr);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dcnv2_native, m) {
  m.def("forward_packed(Tensor xp, Tensor offset, Tensor? mask, Tensor wpacked, Tensor? bias, "
        "int[2] kernel, int[2] stride, int[2] padding, int[2] dilation, int dg, "
        "Tensor(a!) out) -> ()");
  m.def("backward_packed(Tensor xp, Tensor offset, Tensor? mask, Tensor grad_out, "
        "Tensor weight, int[2] kernel, int[2] stride, int[2] padding, int[2] dilation, "
        "int dg, Tensor(a!)? grad_xp, Tensor(b!)? grad_offset, Tensor(c!)? grad_mask, "
        "Tensor(d!)? grad_w) -> ()");
}

TORCH_LIBRARY_IMPL(dcnv2_native, CPU, m) {
  m.impl("forward_packed", &forward_packed);
  m.impl("backward_packed", &backward_packed);
}
