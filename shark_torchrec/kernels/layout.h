// The group tables' layout, shared by the lookup (lookup.cpp) and the update (update.cpp):
// the constants, row sizes, fp16 reads, the group of a row map value, and `GroupTables`.
//
// One uint8 buffer holds a table per group: fp32, fp16, int8, int4, int2 rows, FBGEMM's
// layout (an integer row is its fp16 scale and bias, then its codes packed low bits first).
// The row map gives each row an int32 numbered across the group tables; its group is the
// number of range_ends at or below it (5: dropped, read from its table's fallback row in the
// fp32 table), its slot the number minus range_shift[group]. An empty row map is the identity
// (a one-tier store keeps its rows in key order and no map): a row's number is its key, and
// the rows are range_ends' last entry.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#if defined(__F16C__) || defined(__AVX__)
#include <immintrin.h>
#endif

#include <array>
#include <cmath>

namespace shark {

constexpr int64_t kGroups = 5;     // the training store's stored groups: fp32, fp16, int8, int4, int2
constexpr int64_t kDropped = 5;    // a dropped row reads its table's fallback row in the fp32 table
constexpr int64_t kInt1 = 6;       // 1-bit rows (+-a): served only (the export makes them), never trained
constexpr int64_t kInt4S = 7;      // symmetric int4 rows (s x (c - 7.5), s a byte): served only too
constexpr int64_t kInt2S = 8;      // symmetric int2 rows (s x (c - 1.5), s a byte): served only too
constexpr int64_t kIds = 9;        // group ids 0..8
constexpr int64_t kMaxCodes = 8;   // the most codes a ranked map holds: three bit planes
constexpr int64_t kMaxDim = 4096;  // the widest row an integer group is unpacked from

// Bytes of one row of group g (int8/int4/int2 rows: fp16 scale and bias, then packed codes; a
// 1-bit row: one byte for its magnitude a, then a bit a value, +a or -a; a symmetric int4 or
// int2 row: one byte for its scale s, then its codes two or four a byte; a dropped row has none).
inline int64_t row_bytes(int64_t dim, int64_t g, int64_t alignment) {
  const int64_t raw[kIds] = {4 * dim,     2 * dim, dim + 4,     dim / 2 + 4, dim / 4 + 4,
                             0,           dim / 8 + 1, dim / 2 + 1, dim / 4 + 1};
  return (raw[g] + alignment - 1) / alignment * alignment;
}

// A 1-bit row's magnitude from its code byte c (`shark_torchrec.precision.quantize.
// ONE_BIT_MAGNITUDES`, the same values): 0 for c = 0, else 2^((c - 192) / 8), eighth-octave
// steps from 2^-23.875 to 2^7.875, made as one of eight fp32 fractions 2^(r / 8) times a power
// of two (exact), so that this library and torch hold the same bits.
inline float one_bit_magnitude(uint8_t c) {
  static const auto kMagnitudes = [] {
    const float fractions[8] = {0x1p+0f,          0x1.172b84p+0f, 0x1.306fep+0f,   0x1.4bfdaep+0f,
                                0x1.6a09e6p+0f,   0x1.8ace54p+0f, 0x1.ae89fap+0f,  0x1.d5818ep+0f};
    std::array<float, 256> t{};
    for (int code = 1; code < 256; ++code) {
      const int e = code - 192;
      const int q = e >= 0 ? e / 8 : -((-e + 7) / 8);  // floor(e / 8)
      t[code] = std::ldexp(fractions[e - 8 * q], q);
    }
    return t;
  }();
  return kMagnitudes[c];
}

// Every cache line of `bytes` bytes from p, its last byte too: rows are not line-aligned, so a
// 36-byte int4 row straddles two lines more often than not, and prefetching from its first
// byte in steps of 64 left the second line to a demand miss (random ids read int4 rows at 2.6x
// int8's time an id, sequential ids at 1.3x; bench/served_lookup_tiers.py). kWrite: for a
// row about to be written (the update).
template <bool kWrite>
inline void prefetch_lines(const uint8_t* p, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, kWrite ? 1 : 0);
  if (bytes > 0) __builtin_prefetch(p + bytes - 1, kWrite ? 1 : 0);
}

inline int bits_of(int64_t g) { return g == 2 ? 8 : (g == 3 ? 4 : (g == 4 ? 2 : 1)); }

// n fp16 values to fp32, eight at a time with F16C (c10::Half converts one at a time, and the
// loops that read its values did not vectorize).
inline void halves_to_floats(const c10::Half* in, float* out, int64_t n) {
  int64_t j = 0;
#if defined(__F16C__) && defined(__AVX__)
  for (; j + 8 <= n; j += 8) {
    _mm256_storeu_ps(out + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + j))));
  }
#endif
  for (; j < n; ++j) out[j] = static_cast<float>(in[j]);
}

inline float half_to_float(const uint8_t* p) {
  c10::Half h;
  std::memcpy(&h, p, sizeof(h));
  return static_cast<float>(h);
}

// bucketize(m, range_ends, right=True), without branches (the next row's group is as good as
// random).
inline int64_t group_of(const int32_t* ends, int32_t m) {
  return (ends[0] <= m) + (ends[1] <= m) + (ends[2] <= m) + (ends[3] <= m) + (ends[4] <= m);
}

// The group tables of one buffer as an op reads them: the arguments both ops take checked
// once, and where a row's bytes are.
struct GroupTables {
  GroupTables(const char* op, const at::Tensor& weights, const at::Tensor& group_offsets, const at::Tensor& row_map,
              const at::Tensor& range_ends, const at::Tensor& range_shift, int64_t dim, int64_t row_alignment) {
    TORCH_CHECK(weights.device().is_cpu(), op, ": CPU tensors only");
    TORCH_CHECK(weights.scalar_type() == at::kByte && weights.is_contiguous(), "weights: contiguous uint8");
    TORCH_CHECK(row_map.scalar_type() == at::kInt, "row_map: int32");
    TORCH_CHECK(range_ends.numel() == kGroups && range_shift.numel() == kGroups + 1, "range_ends [5], range_shift [6]");
    TORCH_CHECK(dim > 0 && dim <= kMaxDim && dim % 4 == 0, op, ": dim ", dim,
                " must be a multiple of 4 (as FBGEMM's tables need) up to ", kMaxDim);
    TORCH_CHECK(row_alignment > 0, op, ": row_alignment must be positive");
    ends_t_ = range_ends.to(at::kInt).contiguous();
    shift_t_ = range_shift.to(at::kInt).contiguous();
    offs_t_ = group_offsets.to(at::kLong).contiguous();
    map_t_ = row_map.contiguous();
    for (int64_t g = 0; g < kGroups; ++g) rb[g] = row_bytes(dim, g, row_alignment);
    w = weights.data_ptr<uint8_t>();
    wbytes = weights.numel();
    ends_ = ends_t_.data_ptr<int32_t>();
    shift_ = shift_t_.data_ptr<int32_t>();
    offs_ = offs_t_.data_ptr<int64_t>();
    used_groups_ = offs_t_.numel();
    // A negative offset could put a row at byte -2 or -1, which read as "dropped" and "outside".
    for (int64_t g = 0; g < used_groups_; ++g) TORCH_CHECK(offs_[g] >= 0, op, ": group_offsets must be >= 0");
    identity_ = map_t_.numel() == 0;
    map = identity_ ? nullptr : map_t_.data_ptr<int32_t>();
    map_rows = identity_ ? ends_[kGroups - 1] : map_t_.numel();
  }

  // The row map's value for `key` (within the map).
  int32_t map_value(int64_t key) const { return identity_ ? static_cast<int32_t>(key) : map[key]; }

  // Byte offset of the row a lookup reads for `key` (a dropped row reads its table's fallback
  // row in the fp32 table), the table's group in *table_group; -1 when the row map points
  // outside the group tables. `key` must be within the row map.
  int64_t read_at(int64_t key, int64_t* table_group) const {
    const int32_t m = map_value(key);
    const int64_t g = group_of(ends_, m);
    *table_group = g == kDropped ? 0 : g;
    return slot_at(*table_group, static_cast<int64_t>(m) - shift_[g]);
  }

  // Byte offset of `key`'s own row, its group in *group: -2 for a dropped row (no bytes of
  // its own), -1 for a key outside the row map or a row map entry outside the group tables.
  int64_t own_at(int64_t key, int64_t* group) const {
    if (key < 0 || key >= map_rows) return -1;
    const int32_t m = map_value(key);
    const int64_t g = group_of(ends_, m);
    *group = g;
    if (g == kDropped) return -2;
    return slot_at(g, static_cast<int64_t>(m) - shift_[g]);
  }

  int64_t rb[kIds] = {};  // bytes of a row, per group (the stored groups')
  uint8_t* w;            // the buffer
  int64_t wbytes;        // its size
  const int32_t* map;    // the row map (null for the identity)
  int64_t map_rows;      // its rows

 private:
  // Byte offset of slot `slot` of group table g, or -1 outside the buffer.
  int64_t slot_at(int64_t g, int64_t slot) const {
    if (g >= used_groups_ || slot < 0) return -1;
    const int64_t at = offs_[g] + slot * rb[g];
    return at + rb[g] <= wbytes ? at : -1;
  }

  at::Tensor ends_t_, shift_t_, offs_t_, map_t_;  // the converted arguments the pointers read
  const int32_t* ends_;
  const int32_t* shift_;
  const int64_t* offs_;
  int64_t used_groups_;
  bool identity_;
};

}  // namespace shark
