// Ranking keys of a reassignment (`shark_torchrec.modules.reassign`), registered as
// torch.ops.shark.split_ranking_keys and torch.ops.shark.groups_by_ranking. A row's key is
// its score's fp32 bits (negative scores count as 0; -0.0 and NaN keep their bits, as torch's
// clamp_min does) in the high 32 bits and the complement of its global row in the low 32
// (`shark_torchrec.precision.priority.ranking_keys`): a larger key ranks higher, ties to the
// lower row. Both ops read a block of consecutive rows' scores and make each key in
// registers, where the torch code (their reference) made five int64 passes over the block.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
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
  TORCH_CHECK(first_row >= 0 && first_row + scores.numel() <= (int64_t(1) << 32),
              "ranking keys: rows must lie in [0, 2^32), got ", first_row, " + ", scores.numel());
}

}  // namespace

// Keys of rows first_row .. first_row + n - 1 written into `out` [n] as two runs: the keys of
// rows whose score bits are 0 (a +0.0 score) first, ascending (from the last row to the
// first), then the others in row order. Returns how many zero keys lead.
int64_t split_ranking_keys(const at::Tensor& scores, int64_t first_row, at::Tensor& out) {
  check_block(scores, first_row);
  const int64_t n = scores.numel();
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kLong && out.dim() == 1 && out.numel() == n &&
                  out.is_contiguous(),
              "split_ranking_keys: out must be a contiguous int64 CPU tensor of ", n, " keys");
  const float* s = scores.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  int64_t zeros = 0;
  for (int64_t i = 0; i < n; ++i) zeros += score_bits(s[i]) == 0;
  int64_t z = 0, other = zeros;
  for (int64_t i = n - 1; i >= 0; --i) {
    const int32_t bits = score_bits(s[i]);
    if (bits == 0) o[z++] = ranking_key(0, first_row + i);
  }
  for (int64_t i = 0; i < n; ++i) {
    const int32_t bits = score_bits(s[i]);
    if (bits != 0) o[other++] = ranking_key(bits, first_row + i);
  }
  return zeros;
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

TORCH_LIBRARY_FRAGMENT(shark, m) {
  m.def("split_ranking_keys(Tensor scores, int first_row, Tensor(a!) out) -> int");
  m.def("groups_by_ranking(Tensor scores, int first_row, int[] cuts, int[] groups, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(shark, CPU, m) {
  m.impl("split_ranking_keys", &split_ranking_keys);
  m.impl("groups_by_ranking", &groups_by_ranking);
}

}  // namespace shark
