// A batch's ids grouped by row and the output gradient they read, as the backward ops read
// them: the per-row gradient reduction of torch.ops.shark.row_grads (grads.cpp) and of the
// fused backward update torch.ops.shark.row_grads_update_ (update.cpp). One row's gradient is
// the sum over its ids, in id order, from +0 (the reference's zeros): a mean bag's gradient
// divided by its length, then multiplied by the id's weight, then added.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

namespace shark {

struct IdRuns {
  // The arguments of `row_grads` checked (errors name `op`) and converted. `order` is a stable
  // argsort of the ids' row keys and `counts` the run length of each distinct key
  // (`ids_by_row`); `seg` each id's bag; pooling 0 sum, 1 mean, 2 none.
  IdRuns(const char* op, const at::Tensor& grad, const at::Tensor& order, const at::Tensor& counts,
         const at::Tensor& seg, const at::Tensor& lengths, const std::optional<at::Tensor>& per_sample_weights,
         const std::optional<at::Tensor>& labels, int64_t batch_size, int64_t pooling_code, int64_t dim)
      : B(batch_size), D(dim), pooling(pooling_code) {
    TORCH_CHECK(grad.device().is_cpu(), op, ": CPU tensors only");
    TORCH_CHECK(grad.dim() == 2, op, ": grad: [B, F * D] (pooled) or [nnz, D]");
    TORCH_CHECK(pooling >= 0 && pooling <= 2, op, ": pooling: 0 sum, 1 mean, 2 none");
    TORCH_CHECK(batch_size >= 0 && dim > 0, op, ": batch_size >= 0, dim > 0");
    nnz = order.numel();
    start.assign(1, 0);
    if (nnz == 0) {  // no ids (an empty batch): no rows, whatever the gradient's shape
      TORCH_CHECK(counts.numel() == 0, op, ": counts: no runs without ids");
      U = 0;
      return;
    }
    F = B > 0 ? lengths.numel() / B : 0;
    TORCH_CHECK(F * B == lengths.numel(), op, ": lengths: [F * ", B, "] expected, got ", lengths.sizes());
    if (pooling == 2) {
      TORCH_CHECK(grad.size(0) == nnz && grad.size(1) == D, op, ": grad: [", nnz, ", ", D, "] expected, got ",
                  grad.sizes());
    } else {
      TORCH_CHECK(grad.size(0) == B && grad.size(1) == F * D, op, ": grad: [", B, ", ", F * D, "] expected, got ",
                  grad.sizes());
    }
    TORCH_CHECK(seg.numel() == nnz, op, ": seg: one per id");
    g_ = grad.to(at::kFloat).contiguous();
    o_ = order.to(at::kLong).contiguous();
    c_ = counts.to(at::kLong).contiguous();
    s_ = seg.to(at::kLong).contiguous();
    len_ = lengths.to(at::kLong).contiguous();
    if (per_sample_weights.has_value() && per_sample_weights->defined()) {
      w_ = per_sample_weights->to(at::kFloat).contiguous();
      wp_ = w_.data_ptr<float>();
    }
    if (labels.has_value() && labels->defined()) {
      l_ = labels->to(at::kFloat).contiguous();
      labp_ = l_.data_ptr<float>();
    }
    U = c_.numel();
    start.resize(U + 1);
    const int64_t* cp = c_.data_ptr<int64_t>();
    for (int64_t u = 0; u < U; ++u) {
      // Each row's count against the ids left (a negative count could balance a larger one
      // and read `order` out of range).
      TORCH_CHECK(cp[u] >= 0 && cp[u] <= nnz - start[u], op, ": row ", u, " counts ", cp[u], " ids where ",
                  nnz - start[u], " remain");
      start[u + 1] = start[u] + cp[u];
    }
    TORCH_CHECK(start[U] == nnz, op, ": counts add up to ", start[U], ", there are ", nnz, " ids");
    TORCH_CHECK(!wp_ || w_.numel() == nnz, op, ": per_sample_weights: one per id (", nnz, "), got ", w_.numel());
    TORCH_CHECK(!labp_ || l_.numel() == nnz, op, ": labels: one per id (", nnz, "), got ", l_.numel());
    // Every id's place in the order and, pooled, its bag index the gradient and the lengths:
    // values out of range read (and under a sanitizer, crashed) outside them.
    const int64_t* ord = o_.data_ptr<int64_t>();
    const int64_t* sg = s_.data_ptr<int64_t>();
    for (int64_t k = 0; k < nnz; ++k) {
      TORCH_CHECK(ord[k] >= 0 && ord[k] < nnz, op, ": order[", k, "] = ", ord[k], " is no id of ", nnz);
      TORCH_CHECK(pooling == 2 || (sg[k] >= 0 && sg[k] < F * B), op, ": seg[", k, "] = ", sg[k], " is no bag of ",
                  F * B);
    }
    // bag / B by a multiply and a shift (Lemire, Kaser and Kurz, "Faster remainder by direct
    // computation", 2019: exact for 32-bit bags and B) instead of a 64-bit division an id,
    // which was most of this pass's time of its own.
    if (B > 0 && F * B < (int64_t{1} << 32)) by_b_ = ~uint64_t{0} / static_cast<uint64_t>(B) + 1;
    gp_ = g_.data_ptr<float>();
    op_ = o_.data_ptr<int64_t>();
    sp_ = s_.data_ptr<int64_t>();
    lp_ = len_.data_ptr<int64_t>();
  }

  // The gradient id i reads: pooled, bag (f, b) (bag number f * B + b) is output row b,
  // columns f * D ...; unpooled, the id's own row.
  const float* grad_of(int64_t i) const {
    if (pooling == 2) return gp_ + i * D;
    const int64_t bag = sp_[i];
    const int64_t f = by_b_ ? static_cast<int64_t>((static_cast<unsigned __int128>(by_b_) * bag) >> 64) : bag / B;
    return gp_ + (bag - f * B) * F * D + f * D;
  }

  // The ids' gradients are read in row order, so at random places in the output gradient: each
  // is prefetched kAhead ids before it is read. This prefetches the first kAhead ids from the
  // k-th (in row order), up to `last`.
  void prefetch_from(int64_t k, int64_t last) const {
    for (int64_t q = k; q < std::min(last, k + kAhead); ++q) {
      for (int64_t j = 0; j < D; j += 16) __builtin_prefetch(grad_of(op_[q]) + j);
    }
  }

  // Row u's gradient into acc (D floats), prefetching the id kAhead on while it is before
  // `last` (the end of the caller's rows in row order). Returns the row's count of positive
  // labels (0 without labels). Each id's term is rounded as the reference rounds it (divided,
  // then multiplied, then added: the library is built without contracting these into FMAs).
  float sum(int64_t u, float* acc, int64_t last) const {
    std::fill(acc, acc + D, 0.0f);  // the sum starts from +0, as the reference's zeros do
    float p = 0.0f;
    for (int64_t k = start[u]; k < start[u + 1]; ++k) {
      if (k + kAhead < last) {
        const float* ahead = grad_of(op_[k + kAhead]);
        for (int64_t j = 0; j < D; j += 16) __builtin_prefetch(ahead + j);
      }
      const int64_t i = op_[k];
      const float* src = grad_of(i);
      const float wi = wp_ ? wp_[i] : 1.0f;
      if (pooling == 1) {
        const float n = static_cast<float>(std::max<int64_t>(lp_[sp_[i]], 1));
        if (wp_) {
          for (int64_t j = 0; j < D; ++j) acc[j] = acc[j] + (src[j] / n) * wi;
        } else {
          for (int64_t j = 0; j < D; ++j) acc[j] = acc[j] + src[j] / n;
        }
      } else if (wp_) {
        for (int64_t j = 0; j < D; ++j) acc[j] = acc[j] + src[j] * wi;
      } else {
        for (int64_t j = 0; j < D; ++j) acc[j] = acc[j] + src[j];
      }
      if (labp_) p = p + labp_[i];
    }
    return p;
  }

  static constexpr int64_t kAhead = 8;
  int64_t B, D, pooling;
  int64_t F = 0, nnz = 0, U = 0;
  std::vector<int64_t> start;  // row u's ids are the order's entries start[u] ... start[u + 1]
  at::TensorOptions float_options() const { return g_.defined() ? g_.options() : at::TensorOptions(at::kFloat); }

 private:
  at::Tensor g_, o_, c_, s_, len_, w_, l_;  // the converted arguments the pointers read
  const float* gp_ = nullptr;
  const int64_t* op_ = nullptr;
  const int64_t* sp_ = nullptr;
  const int64_t* lp_ = nullptr;
  const float* wp_ = nullptr;
  const float* labp_ = nullptr;
  uint64_t by_b_ = 0;  // ceil(2^64 / B) when bags fit 32 bits and B > 1; else 0: bag / B divides
};

}  // namespace shark
