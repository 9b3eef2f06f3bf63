// The row update of a mixed-precision store, registered as torch.ops.shark.update_rows_: for
// each touched row, read it from its group table, step it (new = old - grad * step_scale, the
// scale being row-wise Adagrad's or SGD's learning rate, computed by the caller), and write
// it back in its group with stochastic rounding: fp32 exact, fp16 by adding noise to the
// mantissa bits it drops (fp16 subnormals: the exact rule), integer rows requantized over
// the new row's range (bias rounded down and scale up to fp16, codes floor(x + noise)). One
// pass over the rows, parallel (the rows are distinct), in place, no fp32 copy of any table.
//
// Its reference is the torch code of `RowOptimizer.apply_update` and
// `shark_torchrec.precision.quantize` (`round_fp16_stochastic`, `quantize_rows`); the two
// agree bit for bit given the same noise (tests/test_kernels.py). The noise is the store's
// reproducible table (`rounding_noise`): row i reads noise_table[noise_start[i] + j].

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "layout.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace shark {
namespace {

constexpr float kFp16Max = 65504.0f;

inline uint16_t half_bits(c10::Half h) {
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}

inline c10::Half half_from_bits(uint16_t b) {
  c10::Half h;
  std::memcpy(&h, &b, 2);
  return h;
}

// std::nextafter for fp16 towards -inf (down) or +inf (up); h is finite.
inline c10::Half next_half(c10::Half h, bool up) {
  const uint16_t b = half_bits(h);
  if ((b & 0x7FFF) == 0) return half_from_bits(up ? 0x0001 : 0x8001);  // +-0: the smallest subnormal
  const bool negative = b & 0x8000;
  return half_from_bits(static_cast<uint16_t>(negative == up ? b - 1 : b + 1));
}

inline c10::Half round_down_fp16(float x) {
  const c10::Half h(x);
  return static_cast<float>(h) > x ? next_half(h, false) : h;
}

inline c10::Half round_up_fp16(float x) {
  const c10::Half h(x);
  return static_cast<float>(h) < x ? next_half(h, true) : h;
}

inline float clamp_fp16_range(float v) { return std::min(std::max(v, -kFp16Max), kFp16Max); }

// `round_fp16_stochastic` of one value.
inline c10::Half round_fp16_stochastic(float value, float noise) {
  const float v = clamp_fp16_range(value);
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  if ((bits & 0x7FFFFFFFu) < 0x38800000u) {  // |v| < 2^-14: an fp16 subnormal, the exact rule
    const c10::Half near(v);
    const c10::Half lo = static_cast<float>(near) > v ? next_half(near, false) : near;
    const c10::Half hi = next_half(lo, true);
    const float lo32 = static_cast<float>(lo);
    const float gap = static_cast<float>(hi) - lo32;
    const float p = gap > 0 ? (v - lo32) / gap : 0.0f;
    return noise < p ? hi : lo;
  }
  const uint32_t r = static_cast<uint32_t>(static_cast<int32_t>(noise * 8192.0f));
  const uint32_t kept = (bits + r) & ~0x1FFFu;
  float f;
  std::memcpy(&f, &kept, 4);
  return c10::Half(clamp_fp16_range(f));
}

// An integer row of group G (constant bits: every loop below vectorizes or unrolls): old
// values -> stepped -> requantized with noise (`quantize_rows`) -> written back.
template <int G>
void step_int_row(uint8_t* row, int64_t D, const float* grad, float step_scale, const float* noise, float* buf) {
  constexpr int kBits = G == 2 ? 8 : (G == 3 ? 4 : 2);
  constexpr int kPerByte = 8 / kBits;
  constexpr int kTop = (1 << kBits) - 1;
  const float scale = half_to_float(row);
  const float bias = half_to_float(row + 2);
  uint8_t* packed = row + 4;
  for (int64_t k = 0; k < D / kPerByte; ++k) {
    const uint8_t byte = packed[k];
    for (int p = 0; p < kPerByte; ++p) buf[k * kPerByte + p] = static_cast<float>((byte >> (p * kBits)) & kTop);
  }
  for (int64_t j = 0; j < D; ++j) {
    const float old = std::fma(scale, buf[j], bias);
    const float t = grad[j] * step_scale;
    buf[j] = clamp_fp16_range(old - t);
  }
  float lo = buf[0], hi = buf[0];
  for (int64_t j = 1; j < D; ++j) {
    lo = std::min(lo, buf[j]);
    hi = std::max(hi, buf[j]);
  }
  const c10::Half new_bias = round_down_fp16(lo);
  const float b32 = static_cast<float>(new_bias);
  const c10::Half new_scale = round_up_fp16((hi - b32) / static_cast<float>(kTop));
  const float s32 = static_cast<float>(new_scale);
  const float inv = s32 > 0 ? 1.0f / std::max(s32, 1e-30f) : 0.0f;
  for (int64_t j = 0; j < D; ++j) {
    const float x = std::floor((buf[j] - b32) * inv + noise[j]);
    buf[j] = std::min(std::max(x, 0.0f), static_cast<float>(kTop));
  }
  std::memcpy(row, &new_scale, 2);
  std::memcpy(row + 2, &new_bias, 2);
  for (int64_t k = 0; k < D / kPerByte; ++k) {
    uint8_t byte = 0;
    for (int p = 0; p < kPerByte; ++p) byte |= static_cast<uint8_t>(buf[k * kPerByte + p]) << (p * kBits);
    packed[k] = byte;
  }
}

// One row of group g: new = old - grad * step_scale (two roundings, as the torch reference),
// written back in g.
void step_row(uint8_t* row, int64_t g, int64_t D, const float* grad, float step_scale, const float* noise,
              float* buf) {
  switch (g) {
    case 0: {
      float* r = reinterpret_cast<float*>(row);
      for (int64_t j = 0; j < D; ++j) {
        const float t = grad[j] * step_scale;
        r[j] = r[j] - t;
      }
      break;
    }
    case 1: {
      c10::Half* r = reinterpret_cast<c10::Half*>(row);
      for (int64_t j = 0; j < D; ++j) {
        const float t = grad[j] * step_scale;
        r[j] = round_fp16_stochastic(static_cast<float>(r[j]) - t, noise[j]);
      }
      break;
    }
    case 2: step_int_row<2>(row, D, grad, step_scale, noise, buf); break;
    case 3: step_int_row<3>(row, D, grad, step_scale, noise, buf); break;
    default: step_int_row<4>(row, D, grad, step_scale, noise, buf); break;
  }
}

}  // namespace

// See the Python docstring of `shark_torchrec.kernels.update_rows_`.
void update_rows_(
    at::Tensor& weights,
    const at::Tensor& group_offsets,
    const at::Tensor& row_map,
    const at::Tensor& range_ends,
    const at::Tensor& range_shift,
    const at::Tensor& keys,
    const at::Tensor& row_grad,
    const at::Tensor& step_scale,
    const at::Tensor& noise_table,
    const at::Tensor& noise_start,
    int64_t dim,
    int64_t row_alignment) {
  const GroupTables t("shark::update_rows_", weights, group_offsets, row_map, range_ends, range_shift, dim,
                      row_alignment);
  const int64_t D = dim;
  const int64_t n = keys.numel();
  TORCH_CHECK(row_grad.dim() == 2 && row_grad.size(0) == n && row_grad.size(1) == D, "row_grad: [", n, ", ", D,
              "] expected, got ", row_grad.sizes());
  TORCH_CHECK(step_scale.numel() == n && noise_start.numel() == n, "step_scale, noise_start: one per row");
  const at::Tensor k = keys.to(at::kLong).contiguous();
  const at::Tensor gr = row_grad.to(at::kFloat).contiguous();
  const at::Tensor sc = step_scale.to(at::kFloat).contiguous();
  const at::Tensor nt = noise_table.to(at::kFloat).contiguous();
  const at::Tensor ns = noise_start.to(at::kLong).contiguous();
  uint8_t* w = t.w;
  const int32_t* map = t.map;
  const int64_t map_rows = t.map_rows;
  const int64_t* kp = k.data_ptr<int64_t>();
  const float* gp = gr.data_ptr<float>();
  const float* sp = sc.data_ptr<float>();
  const float* np_ = nt.data_ptr<float>();
  const int64_t noise_len = nt.numel();
  const int64_t* nsp = ns.data_ptr<int64_t>();
  std::atomic<int64_t> bad{-1};

  // Three random reads a row (its row map entry, its bytes, its noise window): the map entry
  // is prefetched kMapAhead rows ahead, the bytes and the noise kRowAhead rows ahead.
  constexpr int64_t kMapAhead = 16;
  constexpr int64_t kRowAhead = 8;
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(D);
    for (int64_t i = begin; i < std::min(end, begin + kMapAhead); ++i) {
      if (kp[i] >= 0 && kp[i] < map_rows) __builtin_prefetch(map + kp[i]);
    }
    for (int64_t i = begin; i < end; ++i) {
      if (i + kMapAhead < end && kp[i + kMapAhead] >= 0 && kp[i + kMapAhead] < map_rows) {
        __builtin_prefetch(map + kp[i + kMapAhead]);
      }
      if (i + kRowAhead < end) {
        int64_t g_ahead;
        const int64_t ahead = t.own_at(kp[i + kRowAhead], &g_ahead);
        if (ahead >= 0) {
          for (int64_t o = 0; o < t.rb[g_ahead]; o += 64) __builtin_prefetch(w + ahead + o, 1);
        }
        const int64_t noise_at = nsp[i + kRowAhead];
        if (noise_at >= 0 && noise_at + D <= noise_len) {
          for (int64_t o = 0; o < D; o += 16) __builtin_prefetch(np_ + noise_at + o);
        }
      }
      int64_t g;
      const int64_t at = t.own_at(kp[i], &g);
      if (at == -2) continue;  // a dropped row: no bytes to update (the reference skips it too)
      if (at < 0 || nsp[i] < 0 || nsp[i] + D > noise_len) {
        bad = i;
        continue;
      }
      step_row(w + at, g, D, gp + i * D, sp[i], np_ + nsp[i], buf.data());
    }
  });
  TORCH_CHECK(bad.load() < 0, "shark::update_rows_: row ", bad.load(), " (key ", kp[std::max<int64_t>(bad.load(), 0)],
              ") is outside the row map or the group tables, or its noise window is out of range");
}

TORCH_LIBRARY_FRAGMENT(shark, m) {
  m.def(
      "update_rows_(Tensor(a!) weights, Tensor group_offsets, Tensor row_map, Tensor range_ends, "
      "Tensor range_shift, Tensor keys, Tensor row_grad, Tensor step_scale, Tensor noise_table, "
      "Tensor noise_start, int dim, int row_alignment) -> ()");
}

TORCH_LIBRARY_IMPL(shark, CPU, m) {
  m.impl("update_rows_", &update_rows_);
}

}  // namespace shark
