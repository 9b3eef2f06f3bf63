// The per-row gradient reduction of a mixed-precision store's backward, registered as
// torch.ops.shark.row_grads: the output gradient [B, F * D] of a pooled lookup becomes one
// gradient a distinct row (the sum over its ids, in id order), and each row's count of
// positive labels. The ids come sorted by row (`order`, a stable argsort of their row keys,
// and `counts`, the run length of each distinct key), so a row's ids are one run; runs are
// reduced in parallel, each id's gradient read where it sits in the output (no gathered
// copy). Its reference is the torch code of `RowLookup._row_grads_torch`; the two agree bit
// for bit: a mean bag's gradient is divided by its length, then multiplied by the id's
// weight, then added, from zero, in id order.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

namespace shark {

std::tuple<at::Tensor, at::Tensor> row_grads(
    const at::Tensor& grad,
    const at::Tensor& order,
    const at::Tensor& counts,
    const at::Tensor& seg,
    const at::Tensor& lengths,
    const std::optional<at::Tensor>& per_sample_weights,
    const std::optional<at::Tensor>& labels,
    int64_t batch_size,
    int64_t pooling,
    int64_t dim) {
  TORCH_CHECK(grad.device().is_cpu(), "shark::row_grads: CPU tensors only");
  TORCH_CHECK(grad.dim() == 2, "grad: [B, F * D] (pooled) or [nnz, D]");
  TORCH_CHECK(pooling >= 0 && pooling <= 2, "pooling: 0 sum, 1 mean, 2 none");
  TORCH_CHECK(batch_size >= 0 && dim > 0, "batch_size >= 0, dim > 0");
  const int64_t B = batch_size;
  const int64_t D = dim;
  const int64_t nnz = order.numel();
  if (nnz == 0) {  // no ids (an empty batch): no rows, whatever the gradient's shape
    TORCH_CHECK(counts.numel() == 0, "counts: no runs without ids");
    return {at::zeros({0, D}, grad.options().dtype(at::kFloat)), at::zeros({0}, grad.options().dtype(at::kFloat))};
  }
  const int64_t F = B > 0 ? lengths.numel() / B : 0;
  TORCH_CHECK(F * B == lengths.numel(), "lengths: [F * ", B, "] expected, got ", lengths.sizes());
  if (pooling == 2) {
    TORCH_CHECK(grad.size(0) == nnz && grad.size(1) == D, "grad: [", nnz, ", ", D, "] expected, got ", grad.sizes());
  } else {
    TORCH_CHECK(grad.size(0) == B && grad.size(1) == F * D, "grad: [", B, ", ", F * D, "] expected, got ",
                grad.sizes());
  }
  TORCH_CHECK(seg.numel() == nnz, "seg: one per id");
  const at::Tensor g = grad.to(at::kFloat).contiguous();
  const at::Tensor o = order.to(at::kLong).contiguous();
  const at::Tensor c = counts.to(at::kLong).contiguous();
  const at::Tensor s = seg.to(at::kLong).contiguous();
  const at::Tensor len = lengths.to(at::kLong).contiguous();
  const bool weighted = per_sample_weights.has_value() && per_sample_weights->defined();
  const bool labelled = labels.has_value() && labels->defined();
  at::Tensor w, l;
  if (weighted) w = per_sample_weights->to(at::kFloat).contiguous();
  if (labelled) l = labels->to(at::kFloat).contiguous();
  const int64_t U = c.numel();
  std::vector<int64_t> start(U + 1, 0);
  const int64_t* cp = c.data_ptr<int64_t>();
  for (int64_t u = 0; u < U; ++u) start[u + 1] = start[u] + cp[u];
  TORCH_CHECK(start[U] == nnz, "counts add up to ", start[U], ", there are ", nnz, " ids");
  at::Tensor out = at::zeros({U, D}, g.options());
  at::Tensor pos = at::zeros({U}, g.options());
  const float* gp = g.data_ptr<float>();
  const int64_t* op = o.data_ptr<int64_t>();
  const int64_t* sp = s.data_ptr<int64_t>();
  const int64_t* lp = len.data_ptr<int64_t>();
  const float* wp = weighted ? w.data_ptr<float>() : nullptr;
  const float* labp = labelled ? l.data_ptr<float>() : nullptr;
  float* outp = out.data_ptr<float>();
  float* posp = pos.data_ptr<float>();
  // Pooled: bag (f, b) is output row b, columns f * D ...; unpooled: the id's own row.
  auto grad_of = [&](int64_t i) { return pooling == 2 ? gp + i * D : gp + (sp[i] % B) * F * D + (sp[i] / B) * D; };
  // The ids' gradients are read in row order, so at random places in the output gradient:
  // each is prefetched kAhead ids before it is read.
  constexpr int64_t kAhead = 8;
  at::parallel_for(0, U, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> per(D);
    const int64_t last = start[end];
    for (int64_t k = start[begin]; k < std::min(last, start[begin] + kAhead); ++k) {
      for (int64_t j = 0; j < D; j += 16) __builtin_prefetch(grad_of(op[k]) + j);
    }
    for (int64_t u = begin; u < end; ++u) {
      float* acc = outp + u * D;
      float p = 0.0f;
      for (int64_t k = start[u]; k < start[u + 1]; ++k) {
        if (k + kAhead < last) {
          const float* ahead = grad_of(op[k + kAhead]);
          for (int64_t j = 0; j < D; j += 16) __builtin_prefetch(ahead + j);
        }
        const int64_t i = op[k];
        const int64_t bag = sp[i];
        const float* src = grad_of(i);
        if (pooling == 1) {
          const float n = static_cast<float>(std::max<int64_t>(lp[bag], 1));
          for (int64_t j = 0; j < D; ++j) per[j] = src[j] / n;
        } else {
          std::copy(src, src + D, per.begin());
        }
        if (wp) {
          const float wi = wp[i];
          for (int64_t j = 0; j < D; ++j) per[j] = per[j] * wi;
        }
        for (int64_t j = 0; j < D; ++j) acc[j] = acc[j] + per[j];
        if (labp) p = p + labp[i];
      }
      posp[u] = p;
    }
  });
  return {out, pos};
}

TORCH_LIBRARY_FRAGMENT(shark, m) {
  m.def(
      "row_grads(Tensor grad, Tensor order, Tensor counts, Tensor seg, Tensor lengths, Tensor? per_sample_weights, "
      "Tensor? labels, int batch_size, int pooling, int dim) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(shark, CPU, m) {
  m.impl("row_grads", &row_grads);
}

}  // namespace shark
