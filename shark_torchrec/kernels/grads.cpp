// The backward of a mixed-precision store's lookup, in two ops.
//
// torch.ops.shark.ids_by_row groups a batch's ids by the row they read: each id's bag, the
// ids' order sorted by row key (stable: ids of one row stay in input order), the distinct
// row keys ascending and how many ids read each. It replaces a stable argsort of the keys
// and a unique_consecutive over them (1.3 ms of a training step for 45,000 ids) by one LSD
// radix sort over the keys' significant bits. Its reference is the torch code of
// `RowLookup._ids_by_row_torch`; the two give equal tensors (a stable sort is unique).
//
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

#include "grads.h"

#include <algorithm>
#include <cstdint>
#include <string>
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
  const IdRuns runs("shark::row_grads", grad, order, counts, seg, lengths, per_sample_weights, labels, batch_size,
                    pooling, dim);
  const int64_t U = runs.U, D = dim;
  // Each output row is zeroed in the pass that sums into it, while it is in cache, rather than
  // by a zero fill of the whole [U, D] output first (a pass of its own, 0.3 ms a step of
  // 41,557 rows at dim 64 in bench/precision_profile.py).
  at::Tensor out = at::empty({U, D}, runs.float_options());
  at::Tensor pos = at::empty({U}, runs.float_options());
  float* outp = out.data_ptr<float>();
  float* posp = pos.data_ptr<float>();
  at::parallel_for(0, U, 256, [&](int64_t begin, int64_t end) {
    const int64_t last = runs.start[end];
    runs.prefetch_from(runs.start[begin], last);
    for (int64_t u = begin; u < end; ++u) posp[u] = runs.sum(u, outp + u * D, last);
  });
  return {out, pos};
}

// A buffer kept between calls (one per thread), grown as needed: a fresh one of a batch's
// size comes from mmap, and faulting its pages in cost more than the sort itself.
template <typename T>
T* grown(std::vector<T>& buf, int64_t n) {
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

struct KeyAndId {
  uint64_t key;
  int64_t id;
};

// LSD radix sort of `a` (n items) on bits [first_bit, end_bit) of key_of(item), 11 bits a
// pass: each pass is stable, so the whole sort is (equal keys keep their input order). All
// passes' histograms come from one read; a pass whose digit is the same for every item is
// skipped. The result is in `a`; `scratch` holds n items.
template <typename T, typename KeyOf>
void radix_sort(T* a, T* scratch, int64_t n, int first_bit, int end_bit, KeyOf key_of) {
  constexpr int kBits = 11;
  constexpr uint64_t kMask = (uint64_t{1} << kBits) - 1;
  if (n < 2 || end_bit <= first_bit) return;
  const int passes = (end_bit - first_bit + kBits - 1) / kBits;
  std::vector<int64_t> count(static_cast<size_t>(passes) << kBits, 0);
  for (int64_t k = 0; k < n; ++k) {
    const uint64_t x = key_of(a[k]);
    for (int p = 0; p < passes; ++p) ++count[(p << kBits) + ((x >> (first_bit + p * kBits)) & kMask)];
  }
  T* src = a;
  T* dst = scratch;
  for (int p = 0; p < passes; ++p) {
    int64_t* c = count.data() + (p << kBits);
    if (std::find(c, c + kMask + 1, n) != c + kMask + 1) continue;  // one digit everywhere
    int64_t sum = 0;
    for (uint64_t d = 0; d <= kMask; ++d) {
      const int64_t here = c[d];
      c[d] = sum;
      sum += here;
    }
    const int shift = first_bit + p * kBits;
    for (int64_t k = 0; k < n; ++k) dst[c[(key_of(src[k]) >> shift) & kMask]++] = src[k];
    std::swap(src, dst);
  }
  if (src != a) std::copy(src, src + n, a);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ids_by_row(
    const at::Tensor& values,
    const at::Tensor& lengths,
    const at::Tensor& feature_base,
    int64_t batch_size) {
  TORCH_CHECK(values.device().is_cpu(), "shark::ids_by_row: CPU tensors only");
  TORCH_CHECK(batch_size >= 0, "shark::ids_by_row: batch_size >= 0, got ", batch_size);
  for (const at::Tensor* t : {&values, &lengths, &feature_base}) {
    TORCH_CHECK(t->dim() == 1 && at::isIntegralType(t->scalar_type(), /*includeBool=*/false),
                "shark::ids_by_row: values, lengths and feature_base are 1-D integer tensors, got ",
                t->scalar_type(), " of shape ", t->sizes());
  }
  const at::Tensor v = values.to(at::kLong).contiguous();
  const at::Tensor len = lengths.to(at::kLong).contiguous();
  const at::Tensor base = feature_base.to(at::kLong).contiguous();
  const int64_t nnz = v.numel();
  const int64_t bags = len.numel();
  const int64_t B = batch_size;
  TORCH_CHECK(B > 0 ? bags % B == 0 : bags == 0, "lengths: [F * ", B, "] expected, got ", lengths.sizes());
  const int64_t F = B > 0 ? bags / B : 0;
  TORCH_CHECK(base.numel() >= F, "feature_base: one per feature (", F, "), got ", base.numel());
  const auto long_opts = v.options().dtype(at::kLong);
  at::Tensor seg = at::empty({nnz}, long_opts);
  const int64_t* vp = v.data_ptr<int64_t>();
  const int64_t* lp = len.data_ptr<int64_t>();
  const int64_t* bp = base.data_ptr<int64_t>();
  int64_t* sp = seg.data_ptr<int64_t>();
  // Each id's bag and row key; the largest key sets how many digits the sort needs.
  // (Kept per calling thread: 24 bytes an id of the largest batch it has seen.)
  thread_local std::vector<uint64_t> key_buf, packed_buf, packed_scratch;
  thread_local std::vector<KeyAndId> pair_buf, pair_scratch;
  uint64_t* key = grown(key_buf, nnz);
  int64_t at_id = 0;
  uint64_t most = 0;
  // Bags are feature-major, F runs of B: each bag's ids add its feature's first row.
  for (int64_t f = 0, bag = 0; f < F; ++f) {
    const int64_t first_row = bp[f];
    for (int64_t b = 0; b < B; ++b, ++bag) {
      const int64_t n = lp[bag];
      TORCH_CHECK(n >= 0 && n <= nnz - at_id, "lengths: bag ", bag, " has ", n, " ids where ", nnz - at_id,
                  " remain");
      for (int64_t k = at_id; k < at_id + n; ++k) {
        int64_t row = -1;
        const bool wrapped = __builtin_add_overflow(first_row, vp[k], &row);
        TORCH_CHECK(!wrapped && row >= 0, "shark::ids_by_row: id ", vp[k], " of bag ", bag, " reads row ",
                    wrapped ? std::string("beyond int64") : std::to_string(row), " (feature base ", first_row, ")");
        sp[k] = bag;
        key[k] = static_cast<uint64_t>(row);
        most = std::max(most, key[k]);
      }
      at_id += n;
    }
  }
  TORCH_CHECK(at_id == nnz, "lengths add up to ", at_id, ", there are ", nnz, " ids");
  const int key_bits = most ? 64 - __builtin_clzll(most) : 0;
  const int idx_bits = nnz > 1 ? 64 - __builtin_clzll(static_cast<uint64_t>(nnz - 1)) : 0;
  at::Tensor order = at::empty({nnz}, long_opts);
  int64_t* orderp = order.data_ptr<int64_t>();
  // Sorted, key[k] becomes the k-th smallest key and orderp[k] its id.
  if (key_bits + idx_bits <= 64) {
    // Key and id packed in one word (key high): half the bytes moved a pass.
    uint64_t* a = grown(packed_buf, nnz);
    for (int64_t k = 0; k < nnz; ++k) a[k] = (key[k] << idx_bits) | static_cast<uint64_t>(k);
    radix_sort(a, grown(packed_scratch, nnz), nnz, idx_bits, idx_bits + key_bits, [](uint64_t x) { return x; });
    const uint64_t id_mask = idx_bits ? (uint64_t{1} << idx_bits) - 1 : 0;
    for (int64_t k = 0; k < nnz; ++k) {
      orderp[k] = static_cast<int64_t>(a[k] & id_mask);
      key[k] = idx_bits ? a[k] >> idx_bits : a[k];
    }
  } else {
    KeyAndId* a = grown(pair_buf, nnz);
    for (int64_t k = 0; k < nnz; ++k) a[k] = {key[k], k};
    radix_sort(a, grown(pair_scratch, nnz), nnz, 0, key_bits, [](const KeyAndId& x) { return x.key; });
    for (int64_t k = 0; k < nnz; ++k) {
      orderp[k] = a[k].id;
      key[k] = a[k].key;
    }
  }
  // Runs of equal keys: the distinct rows and their ids' counts.
  int64_t U = 0;
  for (int64_t k = 0; k < nnz; ++k) U += (k == 0 || key[k] != key[k - 1]);
  at::Tensor uniq_t = at::empty({U}, long_opts);
  at::Tensor counts_t = at::empty({U}, long_opts);
  int64_t* up = uniq_t.data_ptr<int64_t>();
  int64_t* cp = counts_t.data_ptr<int64_t>();
  int64_t u = -1;
  for (int64_t k = 0; k < nnz; ++k) {
    if (k == 0 || key[k] != key[k - 1]) {
      up[++u] = static_cast<int64_t>(key[k]);
      cp[u] = 0;
    }
    ++cp[u];
  }
  return {seg, order, uniq_t, counts_t};
}

TORCH_LIBRARY_FRAGMENT(shark, m) {
  m.def("ids_by_row(Tensor values, Tensor lengths, Tensor feature_base, int batch_size) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "row_grads(Tensor grad, Tensor order, Tensor counts, Tensor seg, Tensor lengths, Tensor? per_sample_weights, "
      "Tensor? labels, int batch_size, int pooling, int dim) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(shark, CPU, m) {
  m.impl("row_grads", &row_grads);
  m.impl("ids_by_row", &ids_by_row);
}

}  // namespace shark
