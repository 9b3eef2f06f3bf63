// Paper Eq. 7's decay factors as the C++ ops read them (ranking.cpp's `split_ranking_keys`,
// update.cpp's `update_priorities_`): from `shark_torchrec.precision.priority.decay_table`'s
// (1 - beta)^k, whose last entry, if 0, stands for every k past it.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

namespace shark {

// Steps from `seen` to `to`, at least 0, as the torch code's int32 arithmetic gives them: its
// subtraction wraps, where C++'s signed overflow is undefined, so the wrap is done unsigned.
inline int64_t steps_since(int32_t to, int32_t seen) {
  const int32_t d = static_cast<int32_t>(static_cast<uint32_t>(to) - static_cast<uint32_t>(seen));
  return d < 0 ? 0 : d;
}

// A decay table given to op `op`, checked: a non-empty contiguous 1-D float32 CPU tensor.
class DecayTable {
 public:
  DecayTable(const char* op, const at::Tensor& table) : op_(op) {
    TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kFloat && table.dim() == 1 &&
                    table.is_contiguous() && table.numel() > 0,
                op, ": decay must be a non-empty contiguous 1-D float32 CPU tensor");
    w_ = table.data_ptr<float>();
    last_ = table.numel() - 1;
  }

  // A table that ends above 0 must reach the longest wait: from each of the n rows' seen step
  // (`seen_of(i)`) to step `to`.
  template <typename SeenOf>
  void check_reaches(int32_t to, int64_t n, SeenOf seen_of) const {
    if (w_[last_] == 0.0f) return;
    int64_t longest = 0;
    for (int64_t i = 0; i < n; ++i) longest = std::max(longest, steps_since(to, seen_of(i)));
    TORCH_CHECK(longest <= last_, op_, ": the decay table's ", last_ + 1, " factors do not reach ", longest,
                " steps");
  }

  // The factor of a score stored at step `seen`, decayed to step `to`.
  float factor(int32_t to, int32_t seen) const { return w_[std::min(steps_since(to, seen), last_)]; }

 private:
  const char* op_;
  const float* w_ = nullptr;
  int64_t last_ = 0;
};

}  // namespace shark
