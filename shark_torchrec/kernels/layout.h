// The group tables' layout, shared by the lookup (lookup.cpp) and the update (update.cpp).
//
// One uint8 buffer holds a table per group: fp32, fp16, int8, int4, int2 rows, FBGEMM's
// layout (an integer row is its fp16 scale and bias, then its codes packed low bits first).
// The row map gives each row an int32 numbered across the group tables; its group is the
// number of range_ends at or below it (5: dropped, read from its table's fallback row in the
// fp32 table), its slot the number minus range_shift[group].
#pragma once

#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace shark {

constexpr int64_t kGroups = 5;     // stored groups: fp32, fp16, int8, int4, int2
constexpr int64_t kDropped = 5;    // a dropped row reads its table's fallback row in the fp32 table
constexpr int64_t kMaxDim = 4096;  // the widest row an integer group is unpacked from

// Bytes of one row of group g (integer rows: fp16 scale and bias, then packed codes).
inline int64_t row_bytes(int64_t dim, int64_t g, int64_t alignment) {
  const int64_t raw[kGroups] = {4 * dim, 2 * dim, dim + 4, dim / 2 + 4, dim / 4 + 4};
  return (raw[g] + alignment - 1) / alignment * alignment;
}

inline int bits_of(int64_t g) { return g == 2 ? 8 : (g == 3 ? 4 : 2); }

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

}  // namespace shark
