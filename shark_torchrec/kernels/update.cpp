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
//
// Also here, as it shares the rounding code: torch.ops.shark.convert_rows_, the conversion of
// rows moving between groups at a reassignment (decoded, then rounded to nearest into their
// new group), whose reference is the torch code of `RowGroupStore` (`_move_in_place` and
// `_rebuild` with kernels "torch").

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "decay.h"
#include "grads.h"
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

// A clamped code in [0, top] as its byte. A NaN (a row already NaN: its clamp keeps it) is code
// 0, what the plain cast gave on x86 (the vector path's max with 0 gives 0 too), without the
// cast's undefined behaviour (UBSan's float-cast-overflow).
inline uint8_t code_byte(float code) { return code >= 0.0f ? static_cast<uint8_t>(code) : uint8_t{0}; }

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

// The minimum and maximum of v[0:D), exactly as the sequential loop at the end finds them
// (for rows without NaN, as the torch reference's `aminmax` does; a NaN is skipped by the
// loop, unless it comes first, where `aminmax` returns it: the behaviour the update had
// before). With AVX, eight lanes at a time: a minimum or maximum is the same number whichever
// order finds it, except for the sign of a zero and for NaN, so a row whose minimum or
// maximum is zero, or that holds a NaN, is done again by the sequential loop. Once an integer
// row's codes were computed eight at a time, the sequential loop's chain of dependent
// instructions was a large part of the row's update.
inline void min_max(const float* v, int64_t D, float* lo_out, float* hi_out) {
#if defined(__AVX__)
  if (D % 8 == 0) {
    __m256 lo8 = _mm256_loadu_ps(v), hi8 = lo8;
    __m256 nan8 = _mm256_cmp_ps(lo8, lo8, _CMP_UNORD_Q);
    for (int64_t j = 8; j < D; j += 8) {
      const __m256 x = _mm256_loadu_ps(v + j);
      lo8 = _mm256_min_ps(lo8, x);
      hi8 = _mm256_max_ps(hi8, x);
      nan8 = _mm256_or_ps(nan8, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    }
    if (_mm256_movemask_ps(nan8) == 0) {
      float los[8], his[8];
      _mm256_storeu_ps(los, lo8);
      _mm256_storeu_ps(his, hi8);
      float lo = los[0], hi = his[0];
      for (int k = 1; k < 8; ++k) {
        lo = std::min(lo, los[k]);
        hi = std::max(hi, his[k]);
      }
      if (lo != 0.0f && hi != 0.0f) {
        *lo_out = lo;
        *hi_out = hi;
        return;
      }
    }
  }
#endif
  float lo = v[0], hi = v[0];
  for (int64_t j = 1; j < D; ++j) {
    lo = std::min(lo, v[j]);
    hi = std::max(hi, v[j]);
  }
  *lo_out = lo;
  *hi_out = hi;
}

// An integer row's new fp16 scale and bias from its values' min and max (`quantize_rows`: bias
// rounded down, scale up), and the reciprocal its codes are made with: the rule every integer
// row written here follows (the stochastic update and the conversion to nearest).
struct IntRowScale {
  c10::Half scale, bias;
  float bias32, inv;
};

inline IntRowScale int_row_scale(float lo, float hi, int top) {
  IntRowScale r;
  r.bias = round_down_fp16(lo);
  r.bias32 = static_cast<float>(r.bias);
  r.scale = round_up_fp16((hi - r.bias32) / static_cast<float>(top));
  const float s32 = static_cast<float>(r.scale);
  r.inv = s32 > 0 ? 1.0f / std::max(s32, 1e-30f) : 0.0f;
  return r;
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
  float lo, hi;
  min_max(buf, D, &lo, &hi);
  const IntRowScale q = int_row_scale(lo, hi, kTop);
  const float b32 = q.bias32, inv = q.inv;
  int64_t j = 0;
#if defined(__AVX__)
  // Eight codes at a time (the compiler leaves this loop scalar): the same operations, each
  // rounded on its own, so the same codes.
  const __m256 b8 = _mm256_set1_ps(b32), inv8 = _mm256_set1_ps(inv);
  const __m256 zero8 = _mm256_setzero_ps(), top8 = _mm256_set1_ps(static_cast<float>(kTop));
  for (; j + 8 <= D; j += 8) {
    const __m256 x = _mm256_floor_ps(
        _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(buf + j), b8), inv8), _mm256_loadu_ps(noise + j)));
    _mm256_storeu_ps(buf + j, _mm256_min_ps(_mm256_max_ps(x, zero8), top8));
  }
#endif
  for (; j < D; ++j) {
    const float x = std::floor((buf[j] - b32) * inv + noise[j]);
    buf[j] = std::min(std::max(x, 0.0f), static_cast<float>(kTop));
  }
  std::memcpy(row, &q.scale, 2);
  std::memcpy(row + 2, &q.bias, 2);
  for (int64_t k = 0; k < D / kPerByte; ++k) {
    uint8_t byte = 0;
    for (int p = 0; p < kPerByte; ++p) byte |= code_byte(buf[k * kPerByte + p]) << (p * kBits);
    packed[k] = byte;
  }
}

#if defined(__AVX2__) && defined(__FMA__)
// Eight codes of an integer row of group G (values j ... j + 7, j a multiple of 8) as floats.
template <int G>
inline __m256 codes8(const uint8_t* packed, int64_t j) {
  if constexpr (G == 2) {  // int8: a byte a code
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + j))));
  } else if constexpr (G == 3) {  // int4: two codes a byte, the first in the low bits
    uint32_t four;
    std::memcpy(&four, packed + j / 2, 4);
    const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_cvtepu8_epi32(_mm_cvtsi32_si128(static_cast<int>(four))),
                                                      _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
    const __m256i codes = _mm256_and_si256(_mm256_srlv_epi32(bytes, _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4)),
                                           _mm256_set1_epi32(15));
    return _mm256_cvtepi32_ps(codes);
  } else {  // int2: four codes a byte
    uint16_t two;
    std::memcpy(&two, packed + j / 4, 2);
    const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_cvtepu8_epi32(_mm_cvtsi32_si128(two)),
                                                      _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
    const __m256i codes = _mm256_and_si256(_mm256_srlv_epi32(bytes, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6)),
                                           _mm256_set1_epi32(3));
    return _mm256_cvtepi32_ps(codes);
  }
}

// Eight codes (floats in [0, top], whole numbers) packed as group G keeps them, at values j ... j + 7.
template <int G>
inline void store_codes8(uint8_t* packed, int64_t j, __m256 codes) {
  const __m256i c = _mm256_cvttps_epi32(codes);
  const __m128i c16 = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
  const __m128i c8 = _mm_packus_epi16(c16, c16);  // the eight codes in bytes 0 ... 7
  if constexpr (G == 2) {
    _mm_storel_epi64(reinterpret_cast<__m128i*>(packed + j), c8);
  } else if constexpr (G == 3) {  // pairs of bytes (a, b) -> a + 16 b
    const __m128i pairs = _mm_maddubs_epi16(c8, _mm_set1_epi16(0x1001));
    const uint32_t four = static_cast<uint32_t>(_mm_cvtsi128_si32(_mm_packus_epi16(pairs, pairs)));
    std::memcpy(packed + j / 2, &four, 4);
  } else {  // quads (a, b, c, d) -> a + 4 b + 16 c + 64 d
    const __m128i pairs = _mm_maddubs_epi16(c8, _mm_set1_epi16(0x0401));
    const __m128i quads = _mm_madd_epi16(pairs, _mm_set1_epi32(0x00100001));
    const __m128i q16 = _mm_packus_epi32(quads, quads);
    const uint16_t two = static_cast<uint16_t>(_mm_cvtsi128_si32(_mm_packus_epi16(q16, q16)));
    std::memcpy(packed + j / 4, &two, 2);
  }
}

// `step_int_row` for D a multiple of 8, eight values at a time throughout (the compiler left
// the unpacking, the clamp, the packing and the float-to-code conversions scalar, and the
// rows' min and max took a pass of their own): the same operations on the same values, each
// rounded as there, so the same bytes. The clamp keeps std::min / std::max's operand order
// (MAXPS(-M, v) is v < -M ? -M : v, a NaN passing through); a row whose minimum or maximum is
// zero, or that holds a NaN, takes `min_max`'s sequential loop, as there.
template <int G>
void step_int_row_avx2(uint8_t* row, int64_t D, const float* grad, float step_scale, const float* noise,
                       float* buf) {
  constexpr int kTop = (1 << (G == 2 ? 8 : (G == 3 ? 4 : 2))) - 1;
  uint8_t* packed = row + 4;
  const __m256 scale8 = _mm256_set1_ps(half_to_float(row)), bias8 = _mm256_set1_ps(half_to_float(row + 2));
  const __m256 step8 = _mm256_set1_ps(step_scale);
  const __m256 lo_clamp = _mm256_set1_ps(-kFp16Max), hi_clamp = _mm256_set1_ps(kFp16Max);
  __m256 lo8 = _mm256_set1_ps(0.0f), hi8 = lo8, nan8 = _mm256_setzero_ps();
  for (int64_t j = 0; j < D; j += 8) {
    const __m256 old = _mm256_fmadd_ps(scale8, codes8<G>(packed, j), bias8);
    const __m256 value = _mm256_sub_ps(old, _mm256_mul_ps(_mm256_loadu_ps(grad + j), step8));
    const __m256 v = _mm256_min_ps(hi_clamp, _mm256_max_ps(lo_clamp, value));
    _mm256_storeu_ps(buf + j, v);
    if (j == 0) {
      lo8 = hi8 = v;
    } else {
      lo8 = _mm256_min_ps(lo8, v);
      hi8 = _mm256_max_ps(hi8, v);
    }
    nan8 = _mm256_or_ps(nan8, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  float lo, hi;
  bool found = false;
  if (_mm256_movemask_ps(nan8) == 0) {
    // Lanes folded by halves: without NaN or zeros a minimum is the same number in any order.
    __m128 lo4 = _mm_min_ps(_mm256_castps256_ps128(lo8), _mm256_extractf128_ps(lo8, 1));
    __m128 hi4 = _mm_max_ps(_mm256_castps256_ps128(hi8), _mm256_extractf128_ps(hi8, 1));
    lo4 = _mm_min_ps(lo4, _mm_movehl_ps(lo4, lo4));
    hi4 = _mm_max_ps(hi4, _mm_movehl_ps(hi4, hi4));
    lo4 = _mm_min_ss(lo4, _mm_shuffle_ps(lo4, lo4, 1));
    hi4 = _mm_max_ss(hi4, _mm_shuffle_ps(hi4, hi4, 1));
    lo = _mm_cvtss_f32(lo4);
    hi = _mm_cvtss_f32(hi4);
    found = lo != 0.0f && hi != 0.0f;
  }
  if (!found) min_max(buf, D, &lo, &hi);
  const IntRowScale q = int_row_scale(lo, hi, kTop);
  const __m256 b8 = _mm256_set1_ps(q.bias32), inv8 = _mm256_set1_ps(q.inv);
  const __m256 zero8 = _mm256_setzero_ps(), top8 = _mm256_set1_ps(static_cast<float>(kTop));
  for (int64_t j = 0; j < D; j += 8) {
    const __m256 x = _mm256_floor_ps(
        _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(buf + j), b8), inv8), _mm256_loadu_ps(noise + j)));
    store_codes8<G>(packed, j, _mm256_min_ps(_mm256_max_ps(x, zero8), top8));
  }
  std::memcpy(row, &q.scale, 2);
  std::memcpy(row + 2, &q.bias, 2);
}
#endif

#if defined(__AVX2__) && defined(__F16C__)
// The fp16 row step eight values at a time, as `round_fp16_stochastic` of old - grad * scale
// does one (the compiler leaves that loop scalar): the same operations on the same bits.
// Eight values that hold an fp16 subnormal or a NaN are left to the scalar loop, as is
// everything from there on. Returns how many values were stepped.
inline int64_t step_fp16_avx2(c10::Half* r, int64_t D, const float* grad, float step_scale, const float* noise) {
  const __m256 lo = _mm256_set1_ps(-kFp16Max), hi = _mm256_set1_ps(kFp16Max);
  const __m256 scale8 = _mm256_set1_ps(step_scale), steps8 = _mm256_set1_ps(8192.0f);
  const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF), smallest = _mm256_set1_epi32(0x38800000);
  const __m256i keep = _mm256_set1_epi32(~0x1FFF);
  int64_t j = 0;
  for (; j + 8 <= D; j += 8) {
    const __m256 old = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + j)));
    const __m256 value = _mm256_sub_ps(old, _mm256_mul_ps(_mm256_loadu_ps(grad + j), scale8));
    if (_mm256_movemask_ps(_mm256_cmp_ps(value, value, _CMP_UNORD_Q))) break;  // a NaN
    const __m256 v = _mm256_min_ps(_mm256_max_ps(value, lo), hi);
    const __m256i bits = _mm256_castps_si256(v);
    if (_mm256_movemask_epi8(_mm256_cmpgt_epi32(smallest, _mm256_and_si256(bits, abs_mask)))) break;  // a subnormal
    const __m256i noise8 = _mm256_cvttps_epi32(_mm256_mul_ps(_mm256_loadu_ps(noise + j), steps8));
    const __m256 kept = _mm256_castsi256_ps(_mm256_and_si256(_mm256_add_epi32(bits, noise8), keep));
    const __m256 f = _mm256_min_ps(_mm256_max_ps(kept, lo), hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(r + j), _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  return j;
}
#endif

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
      int64_t j = 0;
#if defined(__AVX2__) && defined(__F16C__)
      j = step_fp16_avx2(r, D, grad, step_scale, noise);
#endif
      for (; j < D; ++j) {
        const float t = grad[j] * step_scale;
        r[j] = round_fp16_stochastic(static_cast<float>(r[j]) - t, noise[j]);
      }
      break;
    }
    default:
#if defined(__AVX2__) && defined(__FMA__)
      if (D % 8 == 0) {
        if (g == 2) step_int_row_avx2<2>(row, D, grad, step_scale, noise, buf);
        else if (g == 3) step_int_row_avx2<3>(row, D, grad, step_scale, noise, buf);
        else step_int_row_avx2<4>(row, D, grad, step_scale, noise, buf);
        break;
      }
#endif
      if (g == 2) step_int_row<2>(row, D, grad, step_scale, noise, buf);
      else if (g == 3) step_int_row<3>(row, D, grad, step_scale, noise, buf);
      else step_int_row<4>(row, D, grad, step_scale, noise, buf);
      break;
  }
}

// One row's fp32 values from its bytes in group G (`RowGroupStore._dequantize`: an integer
// row's code * scale + bias, exact in fp32).
template <int G>
void decode_row(const uint8_t* row, int64_t D, float* out) {
  if constexpr (G == 0) {
    std::memcpy(out, row, 4 * D);
  } else if constexpr (G == 1) {
    halves_to_floats(reinterpret_cast<const c10::Half*>(row), out, D);
  } else {
    constexpr int kBits = G == 2 ? 8 : (G == 3 ? 4 : 2);
    constexpr int kPerByte = 8 / kBits;
    constexpr int kTop = (1 << kBits) - 1;
    const float scale = half_to_float(row);
    const float bias = half_to_float(row + 2);
    const uint8_t* packed = row + 4;
    for (int64_t k = 0; k < D / kPerByte; ++k) {
      const uint8_t byte = packed[k];
      for (int p = 0; p < kPerByte; ++p) {
        out[k * kPerByte + p] = static_cast<float>((byte >> (p * kBits)) & kTop) * scale + bias;
      }
    }
  }
}

// fp32 values written into a row of group G rounded to nearest (`RowGroupStore._round_into`
// without a step: fp16 by conversion, integer rows `quantize_rows` without noise, codes
// rounded half to even as torch.round). v is overwritten.
template <int G>
void encode_row_nearest(uint8_t* row, int64_t D, float* v) {
  if constexpr (G == 0) {
    std::memcpy(row, v, 4 * D);
  } else if constexpr (G == 1) {
    c10::Half* r = reinterpret_cast<c10::Half*>(row);
    for (int64_t j = 0; j < D; ++j) r[j] = c10::Half(clamp_fp16_range(v[j]));
  } else {
    constexpr int kBits = G == 2 ? 8 : (G == 3 ? 4 : 2);
    constexpr int kPerByte = 8 / kBits;
    constexpr float kTop = static_cast<float>((1 << kBits) - 1);
    for (int64_t j = 0; j < D; ++j) v[j] = clamp_fp16_range(v[j]);
    float lo, hi;
    min_max(v, D, &lo, &hi);
    const IntRowScale q = int_row_scale(lo, hi, static_cast<int>(kTop));
    for (int64_t j = 0; j < D; ++j) v[j] = std::min(std::max(std::nearbyint((v[j] - q.bias32) * q.inv), 0.0f), kTop);
    std::memcpy(row, &q.scale, 2);
    std::memcpy(row + 2, &q.bias, 2);
    uint8_t* packed = row + 4;
    for (int64_t k = 0; k < D / kPerByte; ++k) {
      uint8_t byte = 0;
      for (int p = 0; p < kPerByte; ++p) byte |= code_byte(v[k * kPerByte + p]) << (p * kBits);
      packed[k] = byte;
    }
  }
}

// `decode_row` / `encode_row_nearest` for a group known at run time.
void decode_row(const uint8_t* row, int64_t g, int64_t D, float* out) {
  switch (g) {
    case 0: decode_row<0>(row, D, out); break;
    case 1: decode_row<1>(row, D, out); break;
    case 2: decode_row<2>(row, D, out); break;
    case 3: decode_row<3>(row, D, out); break;
    default: decode_row<4>(row, D, out); break;
  }
}

void encode_row_nearest(uint8_t* row, int64_t g, int64_t D, float* v) {
  switch (g) {
    case 0: encode_row_nearest<0>(row, D, v); break;
    case 1: encode_row_nearest<1>(row, D, v); break;
    case 2: encode_row_nearest<2>(row, D, v); break;
    case 3: encode_row_nearest<3>(row, D, v); break;
    default: encode_row_nearest<4>(row, D, v); break;
  }
}

constexpr int64_t kMapAhead = 16;  // rows ahead a row map entry is prefetched
constexpr int64_t kRowAhead = 8;   // rows ahead a row's bytes and noise window are

inline void prefetch_map_entry(const GroupTables& t, int64_t key) {
  if (t.map && key >= 0 && key < t.map_rows) __builtin_prefetch(t.map + key);
}

// Every cache line of row `key`'s bytes (`prefetch_lines`) and of its noise window (fp32 rows
// read none), for its update (row i of the pass).
template <typename NoiseStart>
inline void prefetch_row(const GroupTables& t, int64_t key, int64_t i, const float* noise, int64_t D,
                         const NoiseStart& noise_start) {
  int64_t g;
  const int64_t at = t.own_at(key, &g);
  if (at < 0) return;
  prefetch_lines<true>(t.w + at, t.rb[g]);
  const int64_t noise_at = g > 0 ? noise_start(i, key) : -1;
  if (noise_at >= 0) {
    for (int64_t o = 0; o < D; o += 16) __builtin_prefetch(noise + noise_at + o);
  }
}

// Rows first ... first + n - 1 of a pass over distinct rows, in this thread: row r (key
// keys[r]) read from its group table, stepped (new = old - grads[r * D ...] * scales[r]) and
// written back with the noise window at noise_start(first + r, key) (-1: outside the noise
// table, an error: *bad is set to first + r). Three random reads a row (its row map entry, its
// bytes, its noise window): the map entry is prefetched kMapAhead rows ahead, the bytes and the
// noise kRowAhead rows ahead. A dropped row (no bytes) is skipped, as is a row whose skip[r]
// is set (skip may be null). buf: D floats of scratch.
template <typename NoiseStart>
void step_rows_range(const GroupTables& t, const int64_t* keys, const float* grads, const float* scales,
                     const uint8_t* skip, int64_t first, int64_t n, const float* noise, int64_t D,
                     NoiseStart noise_start, float* buf, std::atomic<int64_t>* bad) {
  for (int64_t r = 0; r < std::min(n, kMapAhead); ++r) prefetch_map_entry(t, keys[r]);
  for (int64_t r = 0; r < n; ++r) {
    if (r + kMapAhead < n) prefetch_map_entry(t, keys[r + kMapAhead]);
    if (r + kRowAhead < n) prefetch_row(t, keys[r + kRowAhead], first + r + kRowAhead, noise, D, noise_start);
    if (skip && skip[r]) continue;
    int64_t g;
    const int64_t at = t.own_at(keys[r], &g);
    if (at == -2) continue;  // a dropped row: no bytes to update (the reference skips it too)
    const int64_t noise_at = at < 0 ? -1 : noise_start(first + r, keys[r]);
    if (noise_at < 0) {
      *bad = first + r;
      continue;
    }
    step_row(t.w + at, g, D, grads + r * D, scales[r], noise + noise_at, buf);
  }
}

// The pass both row updates make over distinct rows, with the arguments they share checked
// and converted: each row read from its group table, stepped (new = old - grad * step_scale)
// and written back with the noise window at noise_start(i, key) (`step_rows_range`, in
// parallel).
template <typename NoiseStart>
void step_rows_pass(const GroupTables& t, const char* op, const at::Tensor& keys, const at::Tensor& row_grad,
                    const at::Tensor& step_scale, const at::Tensor& noise_table, int64_t D,
                    NoiseStart noise_start) {
  const int64_t n = keys.numel();
  TORCH_CHECK(row_grad.dim() == 2 && row_grad.size(0) == n && row_grad.size(1) == D, "row_grad: [", n, ", ", D,
              "] expected, got ", row_grad.sizes());
  TORCH_CHECK(step_scale.numel() == n, "step_scale: one per row");
  const at::Tensor k = keys.to(at::kLong).contiguous();
  const at::Tensor gr = row_grad.to(at::kFloat).contiguous();
  const at::Tensor sc = step_scale.to(at::kFloat).contiguous();
  const at::Tensor nt = noise_table.to(at::kFloat).contiguous();
  const int64_t* kp = k.data_ptr<int64_t>();
  const float* gp = gr.data_ptr<float>();
  const float* sp = sc.data_ptr<float>();
  const float* noise = nt.data_ptr<float>();
  std::atomic<int64_t> bad{-1};
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(D);
    step_rows_range(t, kp + begin, gp + begin * D, sp + begin, nullptr, begin, end - begin, noise, D, noise_start,
                    buf.data(), &bad);
  });
  TORCH_CHECK(bad.load() < 0, op, ": row ", bad.load(), " (key ", kp[std::max<int64_t>(bad.load(), 0)],
              ") is outside the row map or the group tables, or its noise window is out of range");
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
  TORCH_CHECK(noise_start.numel() == keys.numel(), "noise_start: one per row");
  const at::Tensor ns = noise_start.to(at::kLong).contiguous();
  const int64_t* nsp = ns.data_ptr<int64_t>();
  const int64_t noise_len = noise_table.numel();
  step_rows_pass(t, "shark::update_rows_", keys, row_grad, step_scale, noise_table, dim, [&](int64_t i, int64_t) {
    return nsp[i] >= 0 && nsp[i] + dim <= noise_len ? nsp[i] : int64_t{-1};
  });
}

// See the Python docstring of `shark_torchrec.kernels.convert_rows_`.
void convert_rows_(
    at::Tensor& dst,
    const at::Tensor& dst_at,
    const at::Tensor& dst_group,
    const at::Tensor& src,
    const at::Tensor& src_at,
    const at::Tensor& src_group,
    int64_t dim,
    int64_t row_alignment) {
  TORCH_CHECK(dst.device().is_cpu() && src.device().is_cpu(), "shark::convert_rows_: CPU tensors only");
  TORCH_CHECK(dst.scalar_type() == at::kByte && dst.is_contiguous() && src.scalar_type() == at::kByte &&
                  src.is_contiguous(),
              "shark::convert_rows_: dst and src are contiguous uint8 buffers");
  TORCH_CHECK(dim > 0 && dim <= kMaxDim && dim % 4 == 0, "shark::convert_rows_: dim ", dim,
              " must be a multiple of 4 up to ", kMaxDim);
  TORCH_CHECK(row_alignment > 0, "shark::convert_rows_: row_alignment must be positive");
  const int64_t n = dst_at.numel();
  TORCH_CHECK(dst_group.numel() == n && src_at.numel() == n && src_group.numel() == n,
              "shark::convert_rows_: dst_at, dst_group, src_at, src_group: one per row");
  const at::Tensor da = dst_at.to(at::kLong).contiguous(), dg = dst_group.to(at::kLong).contiguous();
  const at::Tensor sa = src_at.to(at::kLong).contiguous(), sg = src_group.to(at::kLong).contiguous();
  const int64_t *dap = da.data_ptr<int64_t>(), *dgp = dg.data_ptr<int64_t>();
  const int64_t *sap = sa.data_ptr<int64_t>(), *sgp = sg.data_ptr<int64_t>();
  int64_t rb[kGroups];
  for (int64_t g = 0; g < kGroups; ++g) rb[g] = row_bytes(dim, g, row_alignment);
  const int64_t dbytes = dst.numel(), sbytes = src.numel();
  // Every row checked before any is written: a bad one leaves both buffers as they were.
  std::atomic<int64_t> bad{-1};
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const bool ok = dgp[i] >= 0 && dgp[i] < kGroups && sgp[i] >= 0 && sgp[i] < kGroups && dap[i] >= 0 &&
                      dap[i] <= dbytes - rb[dgp[i]] && sap[i] >= 0 && sap[i] <= sbytes - rb[sgp[i]];
      if (!ok) bad = i;
    }
  });
  TORCH_CHECK(bad.load() < 0, "shark::convert_rows_: row ", bad.load(),
              " has a group outside 0-4 or bytes outside its buffer");
  const uint8_t* s = src.data_ptr<uint8_t>();
  uint8_t* d = dst.data_ptr<uint8_t>();
  // In place (a row entering a group takes a slot another row left), every source row is
  // copied aside first, in its own precision, so no write lands on a row not yet read.
  std::vector<uint8_t> staged;
  std::vector<int64_t> staged_at;
  if (src.is_alias_of(dst)) {
    staged_at.resize(n + 1, 0);
    for (int64_t i = 0; i < n; ++i) staged_at[i + 1] = staged_at[i] + rb[sgp[i]];
    staged.resize(staged_at[n]);
    at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) std::memcpy(staged.data() + staged_at[i], s + sap[i], rb[sgp[i]]);
    });
  }
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(dim);
    for (int64_t i = begin; i < end; ++i) {
      const uint8_t* from = staged_at.empty() ? s + sap[i] : staged.data() + staged_at[i];
      decode_row(from, sgp[i], dim, buf.data());
      encode_row_nearest(d + dap[i], dgp[i], dim, buf.data());
    }
  });
}

namespace {

// splitmix64's finaliser (`shark_torchrec.precision.quantize._mix`, in unsigned arithmetic:
// the same wrapping multiplies and logical shifts).
inline uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

constexpr int64_t kNoiseMask = (1 << 20) - 1;  // quantize._NOISE_MASK

// A row's noise window (`rounding_noise_starts`): a hash of (seed, step, table, global row),
// plus the row's first global column. Built from the arguments of `update_rows_hashed_` that
// say where a row of the store sits in its table, checked; called for keys within the row map
// only.
struct HashedNoise {
  HashedNoise(const char* op, const GroupTables& t, const at::Tensor& table_base, const at::Tensor& table_ids,
              const at::Tensor& row_offset, const at::Tensor& col_offset, int64_t noise_head,
              const at::Tensor& noise_table, int64_t dim)
      : head(noise_head) {
    T = table_ids.numel();
    TORCH_CHECK(table_base.numel() == T + 1 && row_offset.numel() == T && col_offset.numel() == T, op,
                ": table_base [T + 1], table_ids, row_offset, col_offset [T]");
    TORCH_CHECK(noise_table.numel() >= kNoiseMask + 1 + dim, op, ": noise_table: too short for rows of ", dim);
    tb_ = table_base.to(at::kLong).contiguous();
    ti_ = table_ids.to(at::kLong).contiguous();
    ro_ = row_offset.to(at::kLong).contiguous();
    co_ = col_offset.to(at::kLong).contiguous();
    tbp = tb_.data_ptr<int64_t>();
    tip = ti_.data_ptr<int64_t>();
    rop = ro_.data_ptr<int64_t>();
    cop = co_.data_ptr<int64_t>();
    TORCH_CHECK(T >= 1 && tbp[0] <= 0 && tbp[T] >= t.map_rows, op, ": table_base must cover the row map's ",
                t.map_rows, " rows");
  }

  int64_t operator()(int64_t, int64_t key) const {
    const int64_t tab = std::upper_bound(tbp, tbp + T + 1, key) - tbp - 1;
    const uint64_t global_row = static_cast<uint64_t>(key - tbp[tab] + rop[tab]);
    const uint64_t h = mix64(mix64(static_cast<uint64_t>(tip[tab]) * 0x94D049BB133111EBull +
                                   static_cast<uint64_t>(head)) +
                             global_row * 0x9E3779B97F4A7C15ull);
    return ((static_cast<int64_t>(h >> 24) & kNoiseMask) + cop[tab]) & kNoiseMask;
  }

  int64_t T, head;
  const int64_t *tbp, *tip, *rop, *cop;

 private:
  at::Tensor tb_, ti_, ro_, co_;  // the converted arguments the pointers read
};

// torch's CPU sum of a contiguous row (`x.sum(dim=-1)` of an [n, D] float tensor, so also the
// numerator of its `.mean(dim=-1)`), in the order its kernel adds the values
// (`vectorized_inner_sum` and `row_sum` in ATen/native/cpu/SumKernel.cpp): vectors of 8
// floats (single values below D = 8) into four accumulators, cascaded every 16 vectors of four
// into three more levels; then the vectors left over, the accumulators into the first, and
// (for vectors) the values past the last whole vector and the 8 lanes, added to a +0 in
// order. Found by test against torch 2.13: every D from 4 to 4096 tried agreed bit for bit
// under its DEFAULT, AVX2 and AVX512 dispatch. The store checks `row_mean_squares` against
// torch before it uses the fused update (`fused_backward_agrees`), and the tests do.
template <int W>
void torch_row_sum_lanes(const float* x, int64_t size, float out[W]) {
  constexpr int kIlp = 4, kLevels = 4;
  const int64_t rows = size / kIlp;  // rows of kIlp items of W values
  float acc[kLevels][kIlp][W] = {};
  auto add_row = [&](int64_t row) {
    for (int k = 0; k < kIlp; ++k) {
      for (int l = 0; l < W; ++l) acc[0][k][l] = acc[0][k][l] + x[(row * kIlp + k) * W + l];
    }
  };
  // torch's CeilLog2 of the rows (1 up to 2 rows)
  const int64_t bits = rows <= 2 ? 1 : 64 - __builtin_clzll(static_cast<uint64_t>(rows - 1));
  const int64_t level_power = std::max<int64_t>(4, bits / kLevels);
  const int64_t level_step = int64_t{1} << level_power;
  const int64_t level_mask = level_step - 1;
  int64_t i = 0;
  while (i + level_step <= rows) {
    for (int64_t j = 0; j < level_step; ++j, ++i) add_row(i);
    for (int j = 1; j < kLevels; ++j) {
      for (int k = 0; k < kIlp; ++k) {
        for (int l = 0; l < W; ++l) {
          acc[j][k][l] = acc[j][k][l] + acc[j - 1][k][l];
          acc[j - 1][k][l] = 0.0f;
        }
      }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < rows; ++i) add_row(i);
  for (int j = 1; j < kLevels; ++j) {
    for (int k = 0; k < kIlp; ++k) {
      for (int l = 0; l < W; ++l) acc[0][k][l] = acc[0][k][l] + acc[j][k][l];
    }
  }
  for (int64_t item = rows * kIlp; item < size; ++item) {
    for (int l = 0; l < W; ++l) acc[0][0][l] = acc[0][0][l] + x[item * W + l];
  }
  for (int k = 1; k < kIlp; ++k) {
    for (int l = 0; l < W; ++l) acc[0][0][l] = acc[0][0][l] + acc[0][k][l];
  }
  for (int l = 0; l < W; ++l) out[l] = acc[0][0][l];
}

inline float torch_row_sum(const float* x, int64_t D) {
  constexpr int W = 8;
  if (D < W) {
    float one[1];
    torch_row_sum_lanes<1>(x, D, one);
    return one[0];
  }
  const int64_t vectors = D / W;
  float lanes[W];
  torch_row_sum_lanes<W>(x, vectors, lanes);
  float total = 0.0f;
  for (int64_t k = vectors * W; k < D; ++k) total = total + x[k];
  for (int l = 0; l < W; ++l) total = total + lanes[l];
  return total;
}

// (g * g).mean(dim=-1) of one row as torch computes it: the squares, `torch_row_sum`, / D.
inline float torch_row_mean_square(const float* g, int64_t D, float* squares) {
  for (int64_t j = 0; j < D; ++j) squares[j] = g[j] * g[j];
  return torch_row_sum(squares, D) / static_cast<float>(D);
}

}  // namespace

// See the Python docstring of `shark_torchrec.kernels.update_rows_hashed_`.
void update_rows_hashed_(
    at::Tensor& weights,
    const at::Tensor& group_offsets,
    const at::Tensor& row_map,
    const at::Tensor& range_ends,
    const at::Tensor& range_shift,
    const at::Tensor& keys,
    const at::Tensor& row_grad,
    const at::Tensor& step_scale,
    const at::Tensor& table_base,
    const at::Tensor& table_ids,
    const at::Tensor& row_offset,
    const at::Tensor& col_offset,
    int64_t noise_head,
    const at::Tensor& noise_table,
    int64_t dim,
    int64_t row_alignment) {
  const char* op = "shark::update_rows_hashed_";
  const GroupTables t(op, weights, group_offsets, row_map, range_ends, range_shift, dim, row_alignment);
  const HashedNoise noise_start(op, t, table_base, table_ids, row_offset, col_offset, noise_head, noise_table, dim);
  step_rows_pass(t, op, keys, row_grad, step_scale, noise_table, dim, noise_start);
}

// See the Python docstring of `shark_torchrec.kernels.row_mean_squares`.
at::Tensor row_mean_squares(const at::Tensor& rows) {
  TORCH_CHECK(rows.device().is_cpu() && rows.scalar_type() == at::kFloat && rows.dim() == 2,
              "shark::row_mean_squares: a 2-D float32 CPU tensor");
  const at::Tensor r = rows.contiguous();
  const int64_t n = r.size(0), D = r.size(1);
  TORCH_CHECK(D > 0, "shark::row_mean_squares: rows of at least one value");
  at::Tensor out = at::empty({n}, r.options());
  const float* x = r.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, n, 1024, [&](int64_t b, int64_t e) {
    std::vector<float> squares(D);
    for (int64_t i = b; i < e; ++i) o[i] = torch_row_mean_square(x + i * D, D, squares.data());
  });
  return out;
}

// See the Python docstring of `shark_torchrec.kernels.row_grads_update_`.
std::tuple<at::Tensor, at::Tensor> row_grads_update_(
    at::Tensor& weights,
    const at::Tensor& group_offsets,
    const at::Tensor& row_map,
    const at::Tensor& range_ends,
    const at::Tensor& range_shift,
    const at::Tensor& keys,
    const at::Tensor& grad,
    const at::Tensor& order,
    const at::Tensor& counts,
    const at::Tensor& seg,
    const at::Tensor& lengths,
    const std::optional<at::Tensor>& per_sample_weights,
    const std::optional<at::Tensor>& labels,
    int64_t batch_size,
    int64_t pooling,
    at::Tensor& momentum,
    double learning_rate,
    double eps,
    const at::Tensor& table_base,
    const at::Tensor& table_ids,
    const at::Tensor& row_offset,
    const at::Tensor& col_offset,
    int64_t noise_head,
    const at::Tensor& noise_table,
    int64_t dim,
    int64_t row_alignment) {
  const char* op = "shark::row_grads_update_";
  const IdRuns runs(op, grad, order, counts, seg, lengths, per_sample_weights, labels, batch_size, pooling, dim);
  const GroupTables t(op, weights, group_offsets, row_map, range_ends, range_shift, dim, row_alignment);
  const HashedNoise noise_start(op, t, table_base, table_ids, row_offset, col_offset, noise_head, noise_table, dim);
  const int64_t U = runs.U, D = dim;
  TORCH_CHECK(keys.dim() == 1 && keys.numel() == U, op, ": keys: one per run of counts (", U, "), got ",
              keys.sizes());
  const bool adagrad = momentum.numel() > 0;
  if (adagrad) {
    TORCH_CHECK(momentum.device().is_cpu() && momentum.scalar_type() == at::kFloat && momentum.dim() == 1 &&
                    momentum.is_contiguous(),
                op, ": momentum must be a contiguous 1-D float32 CPU tensor (empty: SGD)");
  }
  const at::Tensor k = keys.to(at::kLong).contiguous();
  const at::Tensor nt = noise_table.to(at::kFloat).contiguous();
  const int64_t* kp = k.data_ptr<int64_t>();
  const float* noise = nt.data_ptr<float>();
  const int64_t state_rows = momentum.numel();
  for (int64_t u = 0; adagrad && u < U; ++u) {
    TORCH_CHECK(kp[u] >= 0 && kp[u] < state_rows, op, ": key ", kp[u], " outside [0, ", state_rows, ")");
  }
  float* m = adagrad ? momentum.data_ptr<float>() : nullptr;
  const float lr = static_cast<float>(learning_rate), e = static_cast<float>(eps);
  at::Tensor pos = at::empty({U}, runs.float_options());
  float* posp = pos.data_ptr<float>();
  std::atomic<int64_t> bad{-1}, skipped{0};
  // Rows a block at a time: a block's gradients are summed into a buffer that stays in cache,
  // their Adagrad sums made and their square roots taken by one torch call (torch's sqrt is
  // not std::sqrt: see `rowwise_adagrad_scales_`), then the block's rows stepped.
  constexpr int64_t kBlockRows = 512;
  at::parallel_for(0, U, 256, [&](int64_t begin, int64_t end) {
    const int64_t most = std::min(kBlockRows, end - begin);
    std::vector<float> grads(most * D), squares(D), buf(D), sums(most), scales(most);
    std::vector<uint8_t> skip(most);
    const int64_t last = runs.start[end];
    runs.prefetch_from(runs.start[begin], last);
    int64_t skipped_here = 0;
    for (int64_t first = begin; first < end; first += kBlockRows) {
      const int64_t n = std::min(kBlockRows, end - first);
      for (int64_t r = 0; r < n; ++r) {
        const int64_t u = first + r;
        if (adagrad && u + IdRuns::kAhead < end) __builtin_prefetch(m + kp[u + IdRuns::kAhead], 1);
        float* g = grads.data() + r * D;
        posp[u] = runs.sum(u, g, last);
        // A NaN or inf anywhere makes a row's sum, and its mean square, non-finite: the row is
        // skipped and counted, as `RowOptimizer.apply_update` does, which checks the mean
        // square under Adagrad (so a finite gradient whose square overflows is skipped too) and
        // the sum under SGD (so is one whose sum overflows).
        const float check = adagrad ? torch_row_mean_square(g, D, squares.data()) : torch_row_sum(g, D);
        skip[r] = !std::isfinite(check);
        if (skip[r]) {
          ++skipped_here;
          sums[r] = 0.0f;
          continue;
        }
        if (adagrad) {
          sums[r] = m[kp[u]] + check;
          m[kp[u]] = sums[r];
        }
      }
      if (adagrad) {
        const at::Tensor s = at::from_blob(sums.data(), {n}, at::TensorOptions(at::kFloat));
        at::Tensor roots = at::from_blob(scales.data(), {n}, at::TensorOptions(at::kFloat));
        at::sqrt_out(roots, s);
        for (int64_t r = 0; r < n; ++r) scales[r] = (1.0f / (scales[r] + e)) * lr;
      } else {
        std::fill(scales.begin(), scales.begin() + n, lr);
      }
      step_rows_range(t, kp + first, grads.data(), scales.data(), skip.data(), first, n, noise, D, noise_start,
                      buf.data(), &bad);
    }
    skipped += skipped_here;
  });
  TORCH_CHECK(bad.load() < 0, op, ": row ", bad.load(), " (key ", kp[std::max<int64_t>(bad.load(), 0)],
              ") is outside the row map or the group tables, or its noise window is out of range");
  return {pos, at::scalar_tensor(static_cast<int64_t>(skipped.load()), at::kLong)};
}

// Paper Eq. 7 for the rows a step touched, in place: each row's stored score decayed to the
// step before (times decay[k] for k = step - 1 - last step, at least 0 steps; `decay` is
// `decay_table`'s (1 - beta)^k, whose last entry, if 0, stands for every k past it), then
// (1 - beta) * that + beta * (alpha * positives + negatives), stored with `step`. Equal, bit
// for bit, to the torch code (`shark_torchrec.precision.priority.updated` between an
// index_select and an index_copy_): the factor is the table's, and every other step is one
// float operation in the torch code's order. `keys` must be distinct.
void update_priorities_(at::Tensor& priority, at::Tensor& seen_step, const at::Tensor& keys,
                        const at::Tensor& positives, const at::Tensor& negatives, int64_t step, double alpha,
                        double beta, const at::Tensor& decay) {
  TORCH_CHECK(priority.device().is_cpu() && priority.scalar_type() == at::kFloat && priority.dim() == 1 &&
                  priority.is_contiguous(),
              "update_priorities_: priority must be a contiguous 1-D float32 CPU tensor");
  TORCH_CHECK(seen_step.device().is_cpu() && seen_step.scalar_type() == at::kInt && seen_step.dim() == 1 &&
                  seen_step.is_contiguous() && seen_step.numel() == priority.numel(),
              "update_priorities_: seen_step must be a contiguous int32 CPU tensor the size of priority");
  TORCH_CHECK(keys.device().is_cpu() && keys.scalar_type() == at::kLong && keys.dim() == 1 && keys.is_contiguous(),
              "update_priorities_: keys must be a contiguous 1-D int64 CPU tensor");
  const int64_t n = keys.numel();
  for (const at::Tensor* t : {&positives, &negatives})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 1 && t->numel() == n &&
                    t->is_contiguous(),
                "update_priorities_: positives and negatives must be contiguous float32 CPU tensors of ", n, " rows");
  const int64_t rows = priority.numel();
  const int64_t* key = keys.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(key[i] >= 0 && key[i] < rows, "update_priorities_: key ", key[i], " outside [0, ", rows, ")");
  const DecayTable factors("update_priorities_", decay);
  const int32_t before = static_cast<int32_t>(step - 1);  // the torch code's int32 arithmetic
  float* score = priority.data_ptr<float>();
  int32_t* seen = seen_step.data_ptr<int32_t>();
  factors.check_reaches(before, n, [&](int64_t i) { return seen[key[i]]; });
  const float* pos = positives.data_ptr<float>();
  const float* neg = negatives.data_ptr<float>();
  const float keep = static_cast<float>(1.0 - beta), rate = static_cast<float>(beta), a = static_cast<float>(alpha);
  const int32_t now = static_cast<int32_t>(step);
  // Each row's score and step are read at random (the keys come sorted, far apart) and written
  // back, so they are prefetched kAhead rows ahead, for writing.
  constexpr int64_t kAhead = 16;
  at::parallel_for(0, n, 16384, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if (i + kAhead < e) {
        __builtin_prefetch(score + key[i + kAhead], 1);
        __builtin_prefetch(seen + key[i + kAhead], 1);
      }
      const float prev = score[key[i]] * factors.factor(before, seen[key[i]]);
      const float seen_now = a * pos[i] + neg[i];
      score[key[i]] = keep * prev + rate * seen_now;
      seen[key[i]] = now;
    }
  });
}

// Row-wise Adagrad's state update and step scale for the rows a step touched (FBGEMM's
// EXACT_ROWWISE_ADAGRAD), in place on an fp32 state: m = state[key] + mean_sq, stored, and the
// row's scale lr / (sqrt(m) + eps). Equal, bit for bit, to the torch code of
// `RowOptimizer._step_scale` (an index_select, an add, an index_copy_, then
// `lr / (m.sqrt() + eps)`, which torch evaluates as reciprocal(sqrt(m) + eps) * lr, each in
// float32 with the Python floats rounded to float32 first), in two passes and torch's sqrt
// instead of seven tensor ops. The mean of squares stays torch's (`(g * g).mean(1)`):
// its summation order is torch's own. `keys` must be distinct.
at::Tensor rowwise_adagrad_scales_(at::Tensor& state, const at::Tensor& keys, const at::Tensor& mean_sq,
                                   double learning_rate, double eps) {
  TORCH_CHECK(state.device().is_cpu() && state.scalar_type() == at::kFloat && state.dim() == 1 &&
                  state.is_contiguous(),
              "rowwise_adagrad_scales_: state must be a contiguous 1-D float32 CPU tensor");
  TORCH_CHECK(keys.device().is_cpu() && keys.scalar_type() == at::kLong && keys.dim() == 1 && keys.is_contiguous(),
              "rowwise_adagrad_scales_: keys must be a contiguous 1-D int64 CPU tensor");
  const int64_t n = keys.numel();
  TORCH_CHECK(mean_sq.device().is_cpu() && mean_sq.scalar_type() == at::kFloat && mean_sq.dim() == 1 &&
                  mean_sq.numel() == n && mean_sq.is_contiguous(),
              "rowwise_adagrad_scales_: mean_sq must be a contiguous float32 CPU tensor of ", n, " rows");
  const int64_t rows = state.numel();
  const int64_t* key = keys.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(key[i] >= 0 && key[i] < rows, "rowwise_adagrad_scales_: key ", key[i], " outside [0, ", rows, ")");
  at::Tensor sum = at::empty({n}, state.options());
  float* m = state.data_ptr<float>();
  const float* msq = mean_sq.data_ptr<float>();
  float* sp = sum.data_ptr<float>();
  at::parallel_for(0, n, 16384, [&](int64_t b, int64_t end) {
    for (int64_t i = b; i < end; ++i) {
      sp[i] = m[key[i]] + msq[i];
      m[key[i]] = sp[i];
    }
  });
  // torch's sqrt, on a tensor like the torch code's: torch's sqrt of a float tensor gave other
  // bits than std::sqrt for about one value in six (tried), so ours would not match.
  at::Tensor scale = at::sqrt(sum);
  float* out = scale.data_ptr<float>();
  const float lr = static_cast<float>(learning_rate), e = static_cast<float>(eps);
  at::parallel_for(0, n, 16384, [&](int64_t b, int64_t end) {
    for (int64_t i = b; i < end; ++i) out[i] = (1.0f / (out[i] + e)) * lr;
  });
  return scale;
}

TORCH_LIBRARY_FRAGMENT(shark, m) {
  m.def(
      "update_rows_(Tensor(a!) weights, Tensor group_offsets, Tensor row_map, Tensor range_ends, "
      "Tensor range_shift, Tensor keys, Tensor row_grad, Tensor step_scale, Tensor noise_table, "
      "Tensor noise_start, int dim, int row_alignment) -> ()");
  m.def(
      "convert_rows_(Tensor(a!) dst, Tensor dst_at, Tensor dst_group, Tensor src, Tensor src_at, "
      "Tensor src_group, int dim, int row_alignment) -> ()");
  m.def(
      "update_rows_hashed_(Tensor(a!) weights, Tensor group_offsets, Tensor row_map, Tensor range_ends, "
      "Tensor range_shift, Tensor keys, Tensor row_grad, Tensor step_scale, Tensor table_base, "
      "Tensor table_ids, Tensor row_offset, Tensor col_offset, int noise_head, Tensor noise_table, int dim, "
      "int row_alignment) -> ()");
  m.def(
      "update_priorities_(Tensor(a!) priority, Tensor(b!) seen_step, Tensor keys, Tensor positives, "
      "Tensor negatives, int step, float alpha, float beta, Tensor decay) -> ()");
  m.def("rowwise_adagrad_scales_(Tensor(a!) state, Tensor keys, Tensor mean_sq, float learning_rate, float eps) -> Tensor");
  m.def("row_mean_squares(Tensor rows) -> Tensor");
  m.def(
      "row_grads_update_(Tensor(a!) weights, Tensor group_offsets, Tensor row_map, Tensor range_ends, "
      "Tensor range_shift, Tensor keys, Tensor grad, Tensor order, Tensor counts, Tensor seg, Tensor lengths, "
      "Tensor? per_sample_weights, Tensor? labels, int batch_size, int pooling, Tensor(b!) momentum, "
      "float learning_rate, float eps, Tensor table_base, Tensor table_ids, Tensor row_offset, Tensor col_offset, "
      "int noise_head, Tensor noise_table, int dim, int row_alignment) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(shark, CPU, m) {
  m.impl("update_rows_", &update_rows_);
  m.impl("convert_rows_", &convert_rows_);
  m.impl("update_rows_hashed_", &update_rows_hashed_);
  m.impl("update_priorities_", &update_priorities_);
  m.impl("rowwise_adagrad_scales_", &rowwise_adagrad_scales_);
  m.impl("row_mean_squares", &row_mean_squares);
  m.impl("row_grads_update_", &row_grads_update_);
}

}  // namespace shark
