// The native deformable convolution's fused CPU passes for one convolution group in float32 on
// x86-64 CPUs with AVX2 and FMA (see native.py, which measures them against the column kernels
// of deform_conv_cpu.cpp and keeps the faster): sampling goes straight into cache-sized packed
// panels that the 6x16 register tiles of gemm_cpu.cpp multiply at once, so the columns and their
// gradient never go to memory.

#include "deform_conv_common.h"

namespace {

using namespace dcnv2;

constexpr int64_t kPanelFloats = 786432;  // the fused forward's packed columns per task (3 MiB)

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
  const int64_t depth = g.row(), P = g.all_positions(), C = g.channels, cd = g.dg_channels();
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
  // Positions per task: a multiple of 6, at most 96, whose panels fill at most 3 MiB. On an AMD
  // EPYC (Zen 3) 0.2-6 MiB made little difference at res3/res4, and res5 (36 KiB per position)
  // was 10-20% faster with 3 MiB than with 384 KiB: each task reads the whole packed weight once.
  const int64_t block = std::clamp<int64_t>((kPanelFloats / depth) / 6 * 6, 6, 96);
  const int64_t blocks = (P + block - 1) / block, K = g.taps(), wp = g.padded_width();
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
      for (int64_t q = 0; q < count; q += 6) {
        float* panel = panels.data() + q * depth;
        for (int64_t d = 0; d < g.dg; ++d) {
          for (int64_t k = 0; k < K; ++k) {
            for (int64_t j = 0; j < 6; ++j) {
              float* row = rows.data() + j * cd;
              const Tap<float> t =
                  q + j < count ? make_tap(g, off, m, b, d, k, p0 + q + j) : Tap<float>{};
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(dcnv2_native, m) {
  m.def("forward_packed(Tensor xp, Tensor offset, Tensor? mask, Tensor wpacked, Tensor? bias, "
        "int[2] kernel, int[2] stride, int[2] padding, int[2] dilation, int dg, "
        "Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(dcnv2_native, CPU, m) { m.impl("forward_packed", &forward_packed); }
