// CPU kernels of dcnv2's modulated deformable RoI pooling (see mdpool_cpp.py and mdpool.py).
//
// The function is exactly ``dcnv2.layers.mdpool``'s PyTorch-op implementation: RoIAlign whose bin
// (i, j) of RoI r is moved by gamma * (w_r * offset[r, 0, i, j], h_r * offset[r, 1, i, j]), each
// bin the mean of sy x sx bilinear samples (sampling_ratio, or ceil(extent / bins) when it is <= 0,
// as torchvision's and mmcv's RoIAlign).
// A sample outside [-1, H] x [-1, W] reads 0; one inside is clamped to [0, H-1] x [0, W-1] and
// interpolated as torchvision's RoIAlign (grid_sample's "border" padding). The coordinate
// gradient of a sample is that of grid_sample: 0 where it is clamped, borders included.
//
// Layouts are those of the callers (features (N, C, H, W), output (R, C, Ph, Pw)), so nothing
// is copied. The sample geometry of a RoI (four corners, four weights, and the slopes of the
// coordinate gradient) is computed once and used for all its channels, kChannels at a time.
// Work is split so that no two threads write the same element (no atomics): the output and the
// offset gradient by RoI; the feature gradient, where RoIs overlap, by (image, block of
// channels).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace {

// Channels per inner loop: a sample's geometry is read once for this many channels.
constexpr int64_t kChannels = 8;

struct Params {
  int64_t ph, pw, sampling_ratio;
  double spatial_scale, gamma;
  bool aligned;
};

// One bilinear sample: its four corners in the (H, W) plane, their weights, and the factors of
// the coordinate derivative (0 where the coordinate is clamped).
template <typename T>
struct Sample {
  int64_t i1, i2, i3, i4;  // (y_low, x_low), (y_low, x_high), (y_high, x_low), (y_high, x_high)
  T w1, w2, w3, w4;
  T dx_hy, dx_ly;  // d/dx = dx_hy * (v2 - v1) + dx_ly * (v4 - v3)
  T dy_hx, dy_lx;  // d/dy = dy_hx * (v3 - v1) + dy_lx * (v4 - v2)
};

// The samples of one RoI, bin by bin; bin k holds samples [start[k], start[k + 1]).
template <typename T>
struct RoiSamples {
  int64_t batch = 0;
  T scale_x = T(0), scale_y = T(0);  // gamma * RoI width / height: d coordinate / d offset
  T count = T(1);                    // sy * sx, the divisor of every bin
  std::vector<Sample<T>> samples;
  std::vector<int64_t> start;
};

// One axis of a sample: the clamped low/high index, fractions, and the slope factor.
template <typename T>
struct Axis {
  int64_t low, high;
  T l, h, slope;
};

template <typename T>
Axis<T> axis(T v, int64_t size) {
  // grid_sample's border clamp: zero slope at and beyond the borders.
  const T slope = (v > T(0) && v < static_cast<T>(size - 1)) ? T(1) : T(0);
  if (v <= T(0)) v = T(0);
  Axis<T> a{static_cast<int64_t>(v), 0, T(0), T(0), slope};
  if (a.low >= size - 1) {
    a.low = a.high = size - 1;
    v = static_cast<T>(a.low);
  } else {
    a.high = a.low + 1;
  }
  a.l = v - static_cast<T>(a.low);
  a.h = T(1) - a.l;
  return a;
}

// Samples per bin side: the fixed ratio, or (ratio <= 0) ceil(extent / bins); 0 for an empty or
// NaN extent.
template <typename T>
int64_t grid_size(T extent, int64_t bins, int64_t sampling_ratio) {
  if (sampling_ratio > 0) return sampling_ratio;
  const T g = std::ceil(extent / static_cast<T>(bins));
  return g > T(0) ? static_cast<int64_t>(g) : 0;  // false for NaN
}

template <typename T>
void roi_samples(const T* roi, const T* offset, const Params& p, int64_t n, int64_t height,
                 int64_t width, RoiSamples<T>& out) {
  const int64_t bins = p.ph * p.pw;
  out.samples.clear();
  out.start.assign(bins + 1, 0);
  out.batch = static_cast<int64_t>(roi[0]);
  TORCH_CHECK(0 <= out.batch && out.batch < n, "RoI batch index ", roi[0], " outside [0, ", n,
              ")");
  const T scale = static_cast<T>(p.spatial_scale), shift = p.aligned ? T(0.5) : T(0);
  const T x0 = roi[1] * scale - shift, y0 = roi[2] * scale - shift;
  const T x1 = roi[3] * scale - shift, y1 = roi[4] * scale - shift;
  T rw = x1 - x0, rh = y1 - y0;
  if (!p.aligned) {
    rw = std::max(rw, T(1));
    rh = std::max(rh, T(1));
  }
  const T bin_w = rw / static_cast<T>(p.pw), bin_h = rh / static_cast<T>(p.ph);
  const int64_t sy = grid_size(rh, p.ph, p.sampling_ratio);
  const int64_t sx = grid_size(rw, p.pw, p.sampling_ratio);
  const T gamma = static_cast<T>(p.gamma);
  out.scale_x = gamma * rw;
  out.scale_y = gamma * rh;
  out.count = static_cast<T>(sy * sx);
  if (sy == 0 || sx == 0) return;  // a degenerate RoI pools to 0, as RoIAlign
  out.samples.reserve(bins * sy * sx);
  for (int64_t i = 0; i < p.ph; ++i) {
    for (int64_t j = 0; j < p.pw; ++j) {
      const int64_t k = i * p.pw + j;
      T bx = x0 + static_cast<T>(j) * bin_w, by = y0 + static_cast<T>(i) * bin_h;
      if (offset) {
        bx = bx + out.scale_x * offset[k];
        by = by + out.scale_y * offset[bins + k];
      }
      for (int64_t a = 0; a < sy; ++a) {
        const T y = by + (static_cast<T>(a) + T(0.5)) * bin_h / static_cast<T>(sy);
        for (int64_t b = 0; b < sx; ++b) {
          const T x = bx + (static_cast<T>(b) + T(0.5)) * bin_w / static_cast<T>(sx);
          // Outside [-1, H] x [-1, W] (or NaN): the sample is 0 and has no gradient.
          if (!(y >= T(-1) && y <= static_cast<T>(height) && x >= T(-1) &&
                x <= static_cast<T>(width)))
            continue;
          const Axis<T> ay = axis(y, height), ax = axis(x, width);
          Sample<T> s;
          s.i1 = ay.low * width + ax.low;
          s.i2 = ay.low * width + ax.high;
          s.i3 = ay.high * width + ax.low;
          s.i4 = ay.high * width + ax.high;
          s.w1 = ay.h * ax.h;
          s.w2 = ay.h * ax.l;
          s.w3 = ay.l * ax.h;
          s.w4 = ay.l * ax.l;
          s.dx_hy = ax.slope * ay.h;
          s.dx_ly = ax.slope * ay.l;
          s.dy_hx = ay.slope * ax.h;
          s.dy_lx = ay.slope * ax.l;
          out.samples.push_back(s);
        }
      }
      out.start[k + 1] = static_cast<int64_t>(out.samples.size());
    }
  }
}

Params make_params(const at::Tensor& features, const at::Tensor& rois,
                   const std::optional<at::Tensor>& offset, int64_t ph, int64_t pw,
                   double spatial_scale, int64_t sampling_ratio, double gamma, bool aligned) {
  TORCH_CHECK(features.device().is_cpu() && features.dim() == 4 && features.is_contiguous(),
              "features: contiguous (N, C, H, W) CPU tensor");
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5 && rois.is_contiguous() &&
                  rois.scalar_type() == features.scalar_type(),
              "rois: contiguous (R, 5) tensor of the features' dtype");
  TORCH_CHECK(ph > 0 && pw > 0, "output size must be positive, got (", ph, ", ", pw, ")");
  if (offset) {
    TORCH_CHECK(offset->is_contiguous() && offset->scalar_type() == features.scalar_type() &&
                    offset->dim() == 4 && offset->size(0) == rois.size(0) &&
                    offset->size(1) == 2 && offset->size(2) == ph && offset->size(3) == pw,
                "offset: contiguous (R, 2, Ph, Pw) tensor of the features' dtype");
  }
  return Params{ph, pw, sampling_ratio, spatial_scale, gamma, aligned};
}

at::Tensor forward(const at::Tensor& features, const at::Tensor& rois,
                   const std::optional<at::Tensor>& offset, int64_t ph, int64_t pw,
                   double spatial_scale, int64_t sampling_ratio, double gamma, bool aligned) {
  const Params p =
      make_params(features, rois, offset, ph, pw, spatial_scale, sampling_ratio, gamma, aligned);
  const int64_t n = features.size(0), C = features.size(1), H = features.size(2),
                W = features.size(3), R = rois.size(0), bins = ph * pw;
  auto out = at::zeros({R, C, ph, pw}, features.options());
  if (R == 0 || C == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "dcnv2_mdpool_forward", [&] {
    const scalar_t* feat = features.data_ptr<scalar_t>();
    const scalar_t* roi = rois.data_ptr<scalar_t>();
    const scalar_t* off = offset ? offset->data_ptr<scalar_t>() : nullptr;
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
      RoiSamples<scalar_t> rs;
      for (int64_t r = begin; r < end; ++r) {
        roi_samples(roi + r * 5, off ? off + r * 2 * bins : nullptr, p, n, H, W, rs);
        if (rs.samples.empty()) continue;
        const Sample<scalar_t>* s = rs.samples.data();
        for (int64_t c0 = 0; c0 < C; c0 += kChannels) {
          const int64_t nc = std::min(kChannels, C - c0);
          const scalar_t* v = feat + (rs.batch * C + c0) * H * W;
          for (int64_t k = 0; k < bins; ++k) {
            scalar_t acc[kChannels] = {};
            for (int64_t q = rs.start[k]; q < rs.start[k + 1]; ++q) {
              const Sample<scalar_t>& t = s[q];
              for (int64_t j = 0; j < nc; ++j) {
                const scalar_t* vj = v + j * H * W;
                acc[j] += t.w1 * vj[t.i1] + t.w2 * vj[t.i2] + t.w3 * vj[t.i3] + t.w4 * vj[t.i4];
              }
            }
            for (int64_t j = 0; j < nc; ++j) dst[(r * C + c0 + j) * bins + k] = acc[j] / rs.count;
          }
        }
      }
    });
  });
  return out;
}

// Gradients for the features (N, C, H, W) and the offsets (R, 2, Ph, Pw); each is an empty
// tensor when not asked for.
std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& features,
                                            const at::Tensor& rois,
                                            const std::optional<at::Tensor>& offset, int64_t ph,
                                            int64_t pw, double spatial_scale,
                                            int64_t sampling_ratio, double gamma, bool aligned,
                                            bool need_features, bool need_offset) {
  const Params p =
      make_params(features, rois, offset, ph, pw, spatial_scale, sampling_ratio, gamma, aligned);
  const int64_t n = features.size(0), C = features.size(1), H = features.size(2),
                W = features.size(3), R = rois.size(0), bins = ph * pw;
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.scalar_type() == features.scalar_type() &&
                  grad_out.dim() == 4 && grad_out.size(0) == R && grad_out.size(1) == C &&
                  grad_out.size(2) == ph && grad_out.size(3) == pw,
              "grad_out: contiguous (R, C, Ph, Pw) tensor of the features' dtype");
  need_offset = need_offset && offset.has_value();
  auto grad_features = need_features ? at::zeros_like(features) : at::empty({0}, features.options());
  auto grad_offset = need_offset ? at::zeros({R, 2, ph, pw}, features.options())
                                 : at::empty({0}, features.options());
  if (R == 0 || C == 0 || !(need_features || need_offset)) return {grad_features, grad_offset};
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "dcnv2_mdpool_backward", [&] {
    const scalar_t* feat = features.data_ptr<scalar_t>();
    const scalar_t* roi = rois.data_ptr<scalar_t>();
    const scalar_t* off = offset ? offset->data_ptr<scalar_t>() : nullptr;
    const scalar_t* g = grad_out.data_ptr<scalar_t>();
    // Every RoI's samples, computed once (in parallel) for both gradients.
    std::vector<RoiSamples<scalar_t>> all(R);
    at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        roi_samples(roi + r * 5, off ? off + r * 2 * bins : nullptr, p, n, H, W, all[r]);
    });
    if (need_offset) {
      scalar_t* go = grad_offset.data_ptr<scalar_t>();
      at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> gx(bins), gy(bins);
        for (int64_t r = begin; r < end; ++r) {
          const RoiSamples<scalar_t>& rs = all[r];
          if (rs.samples.empty()) continue;
          const Sample<scalar_t>* s = rs.samples.data();
          std::fill(gx.begin(), gx.end(), scalar_t(0));
          std::fill(gy.begin(), gy.end(), scalar_t(0));
          for (int64_t c0 = 0; c0 < C; c0 += kChannels) {
            const int64_t nc = std::min(kChannels, C - c0);
            const scalar_t* v = feat + (rs.batch * C + c0) * H * W;
            for (int64_t k = 0; k < bins; ++k) {
              scalar_t dx[kChannels] = {}, dy[kChannels] = {};
              for (int64_t q = rs.start[k]; q < rs.start[k + 1]; ++q) {
                const Sample<scalar_t>& t = s[q];
                for (int64_t j = 0; j < nc; ++j) {
                  const scalar_t* vj = v + j * H * W;
                  const scalar_t v1 = vj[t.i1], v2 = vj[t.i2], v3 = vj[t.i3], v4 = vj[t.i4];
                  dx[j] += t.dx_hy * (v2 - v1) + t.dx_ly * (v4 - v3);
                  dy[j] += t.dy_hx * (v3 - v1) + t.dy_lx * (v4 - v2);
                }
              }
              for (int64_t j = 0; j < nc; ++j) {
                const scalar_t gc = g[(r * C + c0 + j) * bins + k];
                gx[k] += gc * dx[j];
                gy[k] += gc * dy[j];
              }
            }
          }
          for (int64_t k = 0; k < bins; ++k) {
            go[r * 2 * bins + k] = gx[k] * rs.scale_x / rs.count;
            go[r * 2 * bins + bins + k] = gy[k] * rs.scale_y / rs.count;
          }
        }
      });
    }
    if (need_features) {
      scalar_t* gf = grad_features.data_ptr<scalar_t>();
      // RoIs of one image meet in its gradient: a task owns a block of channels of one image
      // and scatters every RoI of that image into them.
      std::vector<std::vector<int64_t>> by_image(n);
      for (int64_t r = 0; r < R; ++r)
        if (!all[r].samples.empty()) by_image[all[r].batch].push_back(r);
      const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
      const int64_t block = std::max<int64_t>(8, (C + 2 * threads - 1) / (2 * threads));
      const int64_t blocks = (C + block - 1) / block;
      at::parallel_for(0, n * blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / blocks, c0 = (task % blocks) * block;
          const int64_t c1 = std::min(C, c0 + block);
          for (int64_t r : by_image[b]) {
            const RoiSamples<scalar_t>& rs = all[r];
            const Sample<scalar_t>* s = rs.samples.data();
            for (int64_t cb = c0; cb < c1; cb += kChannels) {
              const int64_t nc = std::min(kChannels, c1 - cb);
              scalar_t* gv = gf + (b * C + cb) * H * W;
              for (int64_t k = 0; k < bins; ++k) {
                scalar_t gk[kChannels];
                for (int64_t j = 0; j < nc; ++j) gk[j] = g[(r * C + cb + j) * bins + k] / rs.count;
                for (int64_t q = rs.start[k]; q < rs.start[k + 1]; ++q) {
                  const Sample<scalar_t>& t = s[q];
                  for (int64_t j = 0; j < nc; ++j) {
                    scalar_t* gj = gv + j * H * W;
                    gj[t.i1] += t.w1 * gk[j];
                    gj[t.i2] += t.w2 * gk[j];
                    gj[t.i3] += t.w3 * gk[j];
                    gj[t.i4] += t.w4 * gk[j];
                  }
                }
              }
            }
          }
        }
      });
    }
  });
  return {grad_features, grad_offset};
}

}  // namespace

TORCH_LIBRARY(dcnv2_mdpool, m) {
  m.def("forward(Tensor features, Tensor rois, Tensor? offset, int ph, int pw, "
        "float spatial_scale, int sampling_ratio, float gamma, bool aligned) -> Tensor");
  m.def("backward(Tensor grad_out, Tensor features, Tensor rois, Tensor? offset, int ph, "
        "int pw, float spatial_scale, int sampling_ratio, float gamma, bool aligned, "
        "bool need_features, bool need_offset) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dcnv2_mdpool, CPU, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
}
