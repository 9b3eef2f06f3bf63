// The ops of a reassignment (`shark_torchrec.modules.reassign`): its ranking keys, registered
// as torch.ops.shark.split_ranking_keys and torch.ops.shark.groups_by_ranking, and the rows a
// new grouping moves, torch.ops.shark.changed_rows. A row's key is
// its score's fp32 bits (negative scores count as 0; -0.0 and NaN keep their bits, as torch's
// clamp_min does) in the high 32 bits and the complement of its global row in the low 32
// (`shark_torchrec.precision.priority.ranking_keys`): a larger key ranks higher, ties to the
// lower row. The two key ops read a block of consecutive rows' scores and make each key in
// registers, where the torch code (their reference) made five int64 passes over the block.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "decay.h"

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace shark {

namespace {

inline int32_t score_bits(float s) {
  float v = s < 0.0f ? 0.0f : s;  // clamp_min(0): -0.0 and NaN pass as they are
  int32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits;
}

inline int64_t ranking_key(int32_t bits, int64_t row) {
  // (int64(bits) << 32) | (0xFFFFFFFF - row), the shift done on the unsigned pattern.
  uint64_t high = static_cast<uint64_t>(static_cast<int64_t>(bits)) << 32;
  return static_cast<int64_t>(high | static_cast<uint64_t>(0xFFFFFFFFLL - row));
}

void check_block(const at::Tensor& scores, int64_t first_row) {
  TORCH_CHECK(scores.device().is_cpu() && scores.scalar_type() == at::kFloat && scores.dim() == 1,
              "ranking keys: scores must be a 1-D float32 CPU tensor");
  TORCH_CHECK(scores.is_contiguous(), "ranking keys: scores must be contiguous");
  TORCH_CHECK(first_row >= 0 && first_row <= (int64_t(1) << 32) - scores.numel(),  // no overflow of the sum
              "ranking keys: rows must lie in [0, 2^32), got ", first_row, " + ", scores.numel());
}


}  // namespace

// Keys of rows first_row .. first_row + n - 1 written into `out` [n] as two runs: the keys of
// rows whose score bits are 0 (a +0.0 score) first, ascending (from the last row to the
// first), then the others in row order. Returns how many zero keys lead.
// With `seen_step`, `scores` are stored Eq. 7 scores, each decayed to `step` first by the
// factor decay[k] for k = step - seen step (at least 0; `decay` is `decay_table`'s, whose last
// entry, if 0, stands for every k past it), as `shark_torchrec.precision.priority.decayed`
// does; then divided by `divisor` if it is not 1 (`per_byte_scores`). Bit for bit the torch
// code, one float operation each, where it made seven passes over the block.
// One pass from the last row, without a branch on the (unpredictable) zero test: each key is
// written at the end of both runs, the zero run growing from the front and the other from
// the back, and only its own run's end moves on (where the two ends meet they write one slot,
// with the one key).
int64_t split_ranking_keys(const at::Tensor& scores, int64_t first_row, at::Tensor& out,
                           const std::optional<at::Tensor>& seen_step, int64_t step,
                           const std::optional<at::Tensor>& decay, double divisor) {
  check_block(scores, first_row);
  const int64_t n = scores.numel();
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kLong && out.dim() == 1 && out.numel() == n &&
                  out.is_contiguous(),
              "split_ranking_keys: out must be a contiguous int64 CPU tensor of ", n, " keys");
  TORCH_CHECK(seen_step.has_value() == decay.has_value(), "split_ranking_keys: seen_step and decay come together");
  const int32_t* seen = nullptr;
  std::optional<DecayTable> factors;
  const int32_t to_step = static_cast<int32_t>(step);  // the torch code's int32 arithmetic
  if (seen_step.has_value()) {
    const at::Tensor& st = *seen_step;
    TORCH_CHECK(st.device().is_cpu() && st.scalar_type() == at::kInt && st.dim() == 1 && st.numel() == n &&
                    st.is_contiguous(),
                "split_ranking_keys: seen_step must be a contiguous int32 CPU tensor of ", n, " rows");
    seen = st.data_ptr<int32_t>();
    factors.emplace("split_ranking_keys", *decay);
    factors->check_reaches(to_step, n, [&](int64_t i) { return seen[i]; });
  }
  const float div = static_cast<float>(divisor);
  const bool divide = div != 1.0f;
  const float* s = scores.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  int64_t z = 0, back = n - 1;
  for (int64_t i = n - 1; i >= 0; --i) {
    float score = s[i];
    if (seen != nullptr) {
      score = score * factors->factor(to_step, seen[i]);
    }
    if (divide) score = score / div;
    const int32_t bits = score_bits(score);
    const int64_t key = ranking_key(bits, first_row + i);
    const int64_t zero = bits == 0;
    o[z] = key;
    o[back] = key;
    z += zero;
    back -= 1 - zero;
  }
  return z;
}

// Groups of rows first_row .. first_row + n - 1 into `out` [n] (int8): groups[j] for the
// first j whose cut the row's key reaches (cuts non-increasing), else the last group, as
// `shark_torchrec.precision.priority.groups_by_cuts` does with `groups` sorted.
void groups_by_ranking(const at::Tensor& scores, int64_t first_row, at::IntArrayRef cuts, at::IntArrayRef groups,
                       at::Tensor& out) {
  check_block(scores, first_row);
  const int64_t n = scores.numel();
  TORCH_CHECK(groups.size() == cuts.size() + 1 && !groups.empty(),
              "groups_by_ranking: one cut fewer than groups, got ", cuts.size(), " cuts and ", groups.size(), " groups");
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kChar && out.dim() == 1 && out.numel() == n &&
                  out.is_contiguous(),
              "groups_by_ranking: out must be a contiguous int8 CPU tensor of ", n, " rows");
  std::vector<int64_t> cut(cuts.begin(), cuts.end());
  std::vector<int8_t> grp(groups.begin(), groups.end());
  const int64_t C = static_cast<int64_t>(cut.size());
  const float* s = scores.data_ptr<float>();
  int8_t* o = out.data_ptr<int8_t>();
  at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t key = ranking_key(score_bits(s[i]), first_row + i);
      int8_t g = grp[C];
      for (int64_t j = 0; j < C; ++j) {
        if (key >= cut[j]) {
          g = grp[j];
          break;
        }
      }
      o[i] = g;
    }
  });
}

// The rows whose group in `row_map` differs from `groups`, ascending, and how many rows
// `groups` puts in each of `num_groups` groups: what a reassignment's move needs, in one
// pass over the map, where the torch code decoded every row's group and slot first. A map
// value's group is the number of `range_ends` at or below it (`RowGroupStore._decode_map`).
std::tuple<at::Tensor, at::Tensor> changed_rows(const at::Tensor& row_map, const at::Tensor& range_ends,
                                                const at::Tensor& groups, int64_t num_groups) {
  TORCH_CHECK(row_map.device().is_cpu() && row_map.scalar_type() == at::kInt && row_map.dim() == 1 &&
                  row_map.is_contiguous(),
              "changed_rows: row_map must be a contiguous 1-D int32 CPU tensor");
  TORCH_CHECK(range_ends.device().is_cpu() && range_ends.scalar_type() == at::kInt && range_ends.dim() == 1 &&
                  range_ends.is_contiguous(),
              "changed_rows: range_ends must be a contiguous 1-D int32 CPU tensor");
  TORCH_CHECK(groups.device().is_cpu() && groups.scalar_type() == at::kChar && groups.dim() == 1 &&
                  groups.is_contiguous() && groups.numel() == row_map.numel(),
              "changed_rows: groups must be a contiguous int8 CPU tensor of ", row_map.numel(), " rows");
  TORCH_CHECK(num_groups > 0 && num_groups <= 127, "changed_rows: num_groups must be in [1, 127], got ", num_groups);
  const int64_t n = row_map.numel();
  const int64_t E = range_ends.numel();
  const int32_t* map = row_map.data_ptr<int32_t>();
  const int32_t* ends = range_ends.data_ptr<int32_t>();
  const int8_t* grp = groups.data_ptr<int8_t>();
  TORCH_CHECK(E <= 8, "changed_rows: at most 8 range ends, got ", E);
  // The ends padded to 8 with a value no map entry reaches (a store holds under 2^31 - 1
  // rows), so the group of an entry is 8 compares the compiler can vectorize.
  int32_t ends8[8];
  for (int64_t j = 0; j < 8; ++j) ends8[j] = j < E ? ends[j] : std::numeric_limits<int32_t>::max();
  auto old_group = [&](int32_t m) {
    int8_t g = 0;
    for (int64_t j = 0; j < 8; ++j) g += ends8[j] <= m;
    return g;
  };
  constexpr int64_t kBlock = 1 << 16;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  // Per block: how many rows change, and the count of every tag byte (4 interleaved
  // histograms, so consecutive rows of one group do not wait on one counter).
  std::vector<int64_t> changed(blocks, 0), counts(blocks * 256, 0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t lo = b * kBlock, hi = std::min(n, (b + 1) * kBlock);
      int64_t k = 0;
      for (int64_t i = lo; i < hi; ++i) k += old_group(map[i]) != grp[i];
      changed[b] = k;
      int32_t h[4][256] = {};
      int64_t i = lo;
      for (; i + 4 <= hi; i += 4) {
        ++h[0][static_cast<uint8_t>(grp[i])];
        ++h[1][static_cast<uint8_t>(grp[i + 1])];
        ++h[2][static_cast<uint8_t>(grp[i + 2])];
        ++h[3][static_cast<uint8_t>(grp[i + 3])];
      }
      for (; i < hi; ++i) ++h[0][static_cast<uint8_t>(grp[i])];
      for (int64_t v = 0; v < 256; ++v) counts[b * 256 + v] = int64_t(h[0][v]) + h[1][v] + h[2][v] + h[3][v];
    }
  });
  std::vector<int64_t> tally(256, 0);
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t v = 0; v < 256; ++v) tally[v] += counts[b * 256 + v];
  for (int64_t v = 0; v < 256; ++v) {
    const int64_t tag = static_cast<int8_t>(static_cast<uint8_t>(v));
    TORCH_CHECK(tally[v] == 0 || (tag >= 0 && tag < num_groups), "changed_rows: ", tally[v],
                " rows have group ", tag, ", not in [0, ", num_groups, ")");
  }
  std::vector<int64_t> start(blocks + 1, 0);
  for (int64_t b = 0; b < blocks; ++b) start[b + 1] = start[b] + changed[b];
  at::Tensor rows = at::empty({start[blocks]}, row_map.options().dtype(at::kLong));
  int64_t* out = rows.data_ptr<int64_t>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t at_ = start[b];
      if (at_ == start[b + 1]) continue;
      for (int64_t i = b * kBlock, end = std::min(n, (b + 1) * kBlock); i < end; ++i)
        if (old_group(map[i]) != grp[i]) out[at_++] = i;
    }
  });
  at::Tensor total = at::zeros({num_groups}, row_map.options().dtype(at::kLong));
  int64_t* t = total.data_ptr<int64_t>();
  for (int64_t g = 0; g < num_groups; ++g) t[g] = tally[g];
  return {rows, total};
}
TORCH_LIBRARY_FRAGMENT(shark, m) {
  m.def(
      "split_ranking_keys(Tensor scores, int first_row, Tensor(a!) out, Tensor? seen_step=None, int step=0, "
      "Tensor? decay=None, float divisor=1.0) -> int");
  m.def("groups_by_ranking(Tensor scores, int first_row, int[] cuts, int[] groups, Tensor(a!) out) -> ()");
  m.def("changed_rows(Tensor row_map, Tensor range_ends, Tensor groups, int num_groups) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(shark, CPU, m) {
  m.impl("split_ranking_keys", &split_ranking_keys);
  m.impl("groups_by_ranking", &groups_by_ranking);
  m.impl("changed_rows", &changed_rows);
}

}  // namespace shark
