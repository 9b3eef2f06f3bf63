// Fused lookup of rows kept in precision groups (fp32, fp16, int8, int4, int2 and dropped; 1-bit
// and symmetric int4 and int2 rows too, in a served store),
// registered as torch.ops.shark.mixed_lookup. One pass per bag: id -> row map -> group and
// slot -> the row's bytes in its group table -> dequantized, weighted and pooled straight into
// the output layout. The reference it is tested against is `mixed_lookup_reference` in
// shark_torchrec/kernels/reference.py (the torch code around FBGEMM's INT-N inference op).
// torch.ops.shark.mixed_lookup_ranked is the same pass for a served store, whose rows are found
// by the ranked row map (`RankedLocator` below; reference `mixed_lookup_ranked_reference`).
//
// Bit-for-bit with the reference: an integer row's value is fma(scale, code, bias), as FBGEMM's
// kernels compute it (an fp16 scale times a code of at most 8 bits is exact in fp32, so the
// add is the one rounding either way); a weighted id's row is multiplied by its weight,
// rounded, then added; a bag is summed in id order from zero; the mean divides at the end.
// The build passes -ffp-contract=off so that the compiler fuses nothing else.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "layout.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace shark {
namespace {

// The codes of a packed row of kBits (1, 2, 4 or 8) bits a code, low bits first, one a byte
// in `unpacked` (D of them; an 8-bit row's codes are returned as they are). For int2 and 1-bit
// rows a table load a byte beats its shifts and masks (one 4- or 8-byte load; the shift-and-mask
// loop read 1-bit rows 1.5x slower an id than int2's); for int4 rows neither a 2-byte table
// load (one invocation) nor SSE2 nibble unpacking (four invocations alternating with the loop's)
// read faster than the loop here, within this machine's spread (bench/served_lookup_tiers.py).
template <int kBits>
inline const uint8_t* unpack_codes(const uint8_t* codes, int64_t D, uint8_t* unpacked) {
  if constexpr (kBits == 8) {
    return codes;
  } else if constexpr (kBits == 4) {
    for (int64_t k = 0; k < D / 2; ++k) {
      const uint8_t byte = codes[k];
      unpacked[2 * k] = byte & 15;
      unpacked[2 * k + 1] = byte >> 4;
    }
    return unpacked;
  } else {
    constexpr int kPerByte = 8 / kBits;
    using Word = std::conditional_t<kBits == 2, uint32_t, uint64_t>;
    static const auto kCodes = [] {
      std::array<Word, 256> t{};
      for (int b = 0; b < 256; ++b) {
        uint8_t each[kPerByte];
        for (int p = 0; p < kPerByte; ++p) each[p] = uint8_t((b >> (p * kBits)) & ((1 << kBits) - 1));
        std::memcpy(&t[b], each, kPerByte);
      }
      return t;
    }();
    for (int64_t k = 0; k < D / kPerByte; ++k) std::memcpy(unpacked + kPerByte * k, &kCodes[codes[k]], kPerByte);
    return unpacked;
  }
}

// acc[0:D) += w * row of group G (unweighted: the row itself, no multiply); with kAssign,
// acc[0:D) = w * row (an unpooled id's row: no 0 + v, which would turn -0 into +0). G is a
// template argument so that every loop has constant shifts and masks and vectorizes.
template <int G, bool kWeighted, bool kAssign>
inline void accumulate_group(float* acc, const uint8_t* row, int64_t D, float w) {
  if constexpr (G == 0) {
    const float* r = reinterpret_cast<const float*>(row);
    for (int64_t j = 0; j < D; ++j) {
      float v = r[j];
      if (kWeighted) v = v * w;
      acc[j] = kAssign ? v : acc[j] + v;
    }
  } else if constexpr (G == 1) {
    float r[kMaxDim];  // converted first, eight at a time: the loop below then vectorizes
    halves_to_floats(reinterpret_cast<const c10::Half*>(row), r, D);
    for (int64_t j = 0; j < D; ++j) {
      float v = r[j];
      if (kWeighted) v = v * w;
      acc[j] = kAssign ? v : acc[j] + v;
    }
  } else if constexpr (G == kInt4S || G == kInt2S) {
    // A symmetric int4 (int2) row is one byte for its scale s (`one_bit_magnitude`), then its
    // codes two (four) a byte, low bits first: code c reads s x (c - 7.5) (s x (c - 1.5)), the
    // subtraction exact, one rounding.
    constexpr int kBits = G == kInt4S ? 4 : 2;
    constexpr float kCentre = ((1 << kBits) - 1) / 2.0f;
    const float scale = one_bit_magnitude(row[0]);
    uint8_t unpacked[kMaxDim];
    const uint8_t* c = unpack_codes<kBits>(row + 1, D, unpacked);
    for (int64_t j = 0; j < D; ++j) {
      float v = scale * (static_cast<float>(c[j]) - kCentre);
      if (kWeighted) v = v * w;
      acc[j] = kAssign ? v : acc[j] + v;
    }
  } else {
    constexpr int kBits = G == 2 ? 8 : (G == 3 ? 4 : (G == 4 ? 2 : 1));
    // A 1-bit row is one byte for its magnitude a (`one_bit_magnitude`) and a sign bit a value:
    // codes 0 and 1 read -a and +a, the form scale x code + bias with scale 2a and bias -a (both
    // exact in fp32).
    const float scale = kBits == 1 ? 2.0f * one_bit_magnitude(row[0]) : half_to_float(row);
    const float bias = kBits == 1 ? -one_bit_magnitude(row[0]) : half_to_float(row + 2);
    // Unpack to one code a byte first, then dequantize: both loops vectorize, where extracting
    // codes inside the dequantizing loop did not.
    uint8_t unpacked[kMaxDim];
    const uint8_t* c = unpack_codes<kBits>(row + (kBits == 1 ? 1 : 4), D, unpacked);
    for (int64_t j = 0; j < D; ++j) {
      float v = std::fma(scale, static_cast<float>(c[j]), bias);
      if (kWeighted) v = v * w;
      acc[j] = kAssign ? v : acc[j] + v;
    }
  }
}

template <bool kWeighted, bool kAssign>
inline void accumulate(float* acc, const uint8_t* row, int64_t g, int64_t D, float w) {
  switch (g) {
    case 0: accumulate_group<0, kWeighted, kAssign>(acc, row, D, w); break;
    case 1: accumulate_group<1, kWeighted, kAssign>(acc, row, D, w); break;
    case 2: accumulate_group<2, kWeighted, kAssign>(acc, row, D, w); break;
    case 3: accumulate_group<3, kWeighted, kAssign>(acc, row, D, w); break;
    case 4: accumulate_group<4, kWeighted, kAssign>(acc, row, D, w); break;
    case kInt4S: accumulate_group<kInt4S, kWeighted, kAssign>(acc, row, D, w); break;
    case kInt2S: accumulate_group<kInt2S, kWeighted, kAssign>(acc, row, D, w); break;
    // The locators hand out only the ids above (each op checks its layout's groups first).
    default: accumulate_group<kInt1, kWeighted, kAssign>(acc, row, D, w); break;
  }
}

std::string name_of(c10::string_view names, int64_t f) {
  // names: the features' names joined by '\n' (TorchScript passes one str).
  int64_t at = 0;
  size_t start = 0;
  for (size_t i = 0; i <= names.size(); ++i) {
    if (i == names.size() || names[i] == '\n') {
      if (at == f) return std::string(names.substr(start, i - start));
      ++at;
      start = i + 1;
    }
  }
  return "#" + std::to_string(f);
}

}  // namespace

// Where the lookups of `mixed_lookup` find a row: the int32 row map of the training store.
struct RowMapLocator {
  const GroupTables& t;
  int64_t rows() const { return t.map_rows; }
  void prefetch(int64_t key) const {
    if (t.map) __builtin_prefetch(t.map + key);  // an identity map has nothing to fetch
  }
  // Byte offset of the row a lookup of `key` reads, its table's group in *tg.
  int64_t locate(int64_t key, int64_t* tg) const { return t.read_at(key, tg); }
};

// Where the lookups of `mixed_lookup_ranked` find a row: the ranked row map of the serving
// module, about half a byte a row (`shark_torchrec/kernels/ranked_map.py` builds it and
// documents the layout). Rows are numbered in blocks of 64 keys; a block's record holds P bit
// planes (a row's code is its bits across the planes) and, per stored code, the slot of the
// block's first row of that code in its group table. A stored row's slot is that base plus the
// rows of its code before it in the block (a popcount); a dropped row (code U) reads its
// table's fallback row in the fp32 table. Each group table holds its rows in key order.
// table_base is each table's first key, then the rows (keys past it are refused).
template <int kPlanes>
struct RankedLocator {
  RankedLocator(const at::Tensor& weights, const at::Tensor& group_offsets, const at::Tensor& blocks,
                const at::Tensor& code_groups, const at::Tensor& table_base, const at::Tensor& table_fallback,
                int64_t dim, int64_t row_alignment) {
    TORCH_CHECK(weights.device().is_cpu(), "shark::mixed_lookup_ranked: CPU tensors only");
    TORCH_CHECK(weights.scalar_type() == at::kByte && weights.is_contiguous(), "weights: contiguous uint8");
    TORCH_CHECK(blocks.scalar_type() == at::kInt && blocks.dim() == 2, "blocks: int32 [blocks, words]");
    TORCH_CHECK(dim > 0 && dim <= kMaxDim && dim % 4 == 0, "shark::mixed_lookup_ranked: dim ", dim,
                " must be a multiple of 4 (as FBGEMM's tables need) up to ", kMaxDim);
    TORCH_CHECK(row_alignment > 0, "shark::mixed_lookup_ranked: row_alignment must be positive");
    blocks_t_ = blocks.contiguous();
    codes_t_ = code_groups.to(at::kInt).contiguous();
    offs_t_ = group_offsets.to(at::kLong).contiguous();
    starts_t_ = table_base.to(at::kLong).contiguous();
    fallback_t_ = table_fallback.to(at::kLong).contiguous();
    TORCH_CHECK(starts_t_.numel() == fallback_t_.numel() + 1, "table_base: each table's first row, then the rows; "
                "table_fallback: one per table");
    n_codes_ = codes_t_.numel();
    TORCH_CHECK(n_codes_ <= kMaxCodes, "code_groups: at most ", kMaxCodes, " codes (three bit planes), got ",
                n_codes_);
    const int32_t* cg = codes_t_.data_ptr<int32_t>();
    stored_ = n_codes_;
    bool one_bit = false;
    for (int64_t c = 0; c < n_codes_; ++c) {
      TORCH_CHECK(cg[c] >= 0 && cg[c] < kIds, "code_groups: group ids 0..8");
      TORCH_CHECK((cg[c] == kDropped) == (c == n_codes_ - 1 && cg[c] == kDropped),
                  "code_groups: the dropped group only as the last code");
      one_bit = one_bit || cg[c] == kInt1;
      groups_[c] = cg[c];
    }
    TORCH_CHECK(!one_bit || dim % 8 == 0, "shark::mixed_lookup_ranked: 1-bit rows need a dim that is a multiple of 8, got ",
                dim);
    if (n_codes_ > 0 && cg[n_codes_ - 1] == kDropped) stored_ = n_codes_ - 1;
    planes_ = 0;
    while ((int64_t{1} << planes_) < n_codes_) ++planes_;
    TORCH_CHECK(planes_ == kPlanes, "shark::mixed_lookup_ranked: ", planes_, " planes dispatched as ", kPlanes);
    words_ = blocks_t_.size(1);
    TORCH_CHECK(words_ == 2 * planes_ + stored_, "blocks: ", 2 * planes_ + stored_, " words a block for ", n_codes_,
                " codes, got ", words_);
    for (int64_t g = 0; g < kIds; ++g) rb[g] = row_bytes(dim, g, row_alignment);
    w = weights.data_ptr<uint8_t>();
    wbytes_ = weights.numel();
    blocks_ = blocks_t_.data_ptr<int32_t>();
    offs_ = offs_t_.data_ptr<int64_t>();
    used_groups_ = offs_t_.numel();
    starts_ = starts_t_.data_ptr<int64_t>();
    fallback_ = fallback_t_.data_ptr<int64_t>();
    n_tables_ = fallback_t_.numel();
    for (int64_t g = 0; g < used_groups_; ++g) TORCH_CHECK(offs_[g] >= 0, "group_offsets: negative offset");
    rows_ = starts_[n_tables_];  // the map's rows (the last block's padding is not a row)
    TORCH_CHECK(rows_ >= 0 && rows_ <= blocks_t_.size(0) * 64, "blocks: ", blocks_t_.size(0), " blocks for ", rows_,
                " rows");
  }

  int64_t rows() const { return rows_; }
  void prefetch(int64_t key) const {
    if (words_ > 0) {  // a record may straddle two cache lines: fetch both ends
      const int32_t* rec = blocks_ + (key >> 6) * words_;
      __builtin_prefetch(rec);
      __builtin_prefetch(rec + words_ - 1);
    }
  }
  int64_t locate(int64_t key, int64_t* tg) const {
    const int32_t* rec = blocks_ + (key >> 6) * words_;
    const int64_t pos = key & 63;
    // The planes in registers (a fixed count: no array on the stack, whose stores and loads
    // stalled behind the output's stores).
    uint64_t p0 = 0, p1 = 0, p2 = 0;
    if constexpr (kPlanes > 0) std::memcpy(&p0, rec, 8);
    if constexpr (kPlanes > 1) std::memcpy(&p1, rec + 2, 8);
    if constexpr (kPlanes > 2) std::memcpy(&p2, rec + 4, 8);
    const int64_t code = static_cast<int64_t>(((p0 >> pos) & 1) | (((p1 >> pos) & 1) << 1) | (((p2 >> pos) & 1) << 2));
    if (code >= n_codes_) return -1;
    if (code == stored_) {  // dropped: its table's fallback row in the fp32 table
      *tg = 0;
      const int64_t t = std::upper_bound(starts_, starts_ + n_tables_, key) - starts_ - 1;
      return t >= 0 ? slot_at(0, fallback_[t]) : -1;
    }
    uint64_t same = ~uint64_t{0};  // the block's rows of this code
    if constexpr (kPlanes > 0) same &= (code & 1) ? p0 : ~p0;
    if constexpr (kPlanes > 1) same &= (code & 2) ? p1 : ~p1;
    if constexpr (kPlanes > 2) same &= (code & 4) ? p2 : ~p2;
    const uint64_t before = same & ((uint64_t{1} << pos) - 1);
    *tg = groups_[code];
    return slot_at(*tg, static_cast<int64_t>(rec[2 * kPlanes + code]) + __builtin_popcountll(before));
  }

  int64_t rb[kIds];
  const uint8_t* w;

 private:
  int64_t slot_at(int64_t g, int64_t slot) const {
    if (g >= used_groups_ || slot < 0) return -1;
    const int64_t at = offs_[g] + slot * rb[g];
    return at + rb[g] <= wbytes_ ? at : -1;
  }

  at::Tensor blocks_t_, codes_t_, offs_t_, starts_t_, fallback_t_;
  const int32_t* blocks_;
  const int64_t* offs_;
  const int64_t* starts_;
  const int64_t* fallback_;
  int64_t groups_[kIds];
  int64_t n_codes_, stored_, planes_, words_, used_groups_, n_tables_, wbytes_, rows_;
};

// The lookup of both ops: ids -> (locator) -> row bytes -> dequantized, weighted, pooled.
template <typename Locator>
at::Tensor lookup_with(const char* op, const Locator& loc, const int64_t* rb, const uint8_t* w,
                       const at::Tensor& weights, const at::Tensor& feature_base, const at::Tensor& feature_rows,
                       const at::Tensor& values, const at::Tensor& lengths,
                       const std::optional<at::Tensor>& per_sample_weights, int64_t dim, int64_t batch_size,
                       int64_t pooling, c10::string_view feature_names) {
  TORCH_CHECK(pooling >= 0 && pooling <= 2, "pooling: 0 sum, 1 mean, 2 none");
  const int64_t F = feature_base.numel();
  const int64_t B = batch_size;
  const int64_t D = dim;
  TORCH_CHECK(feature_rows.numel() == F, "feature_rows: one per feature");
  TORCH_CHECK(lengths.dim() == 1 && lengths.numel() == F * B, "lengths: [", F, " features * ", B, "] expected, got ",
              lengths.sizes());
  const at::Tensor v = values.to(at::kLong).contiguous();
  const at::Tensor len = lengths.to(at::kLong).contiguous();
  const at::Tensor base_t = feature_base.to(at::kLong).contiguous();
  const at::Tensor rows_t = feature_rows.to(at::kLong).contiguous();
  const int64_t nnz = v.numel();
  const bool weighted = per_sample_weights.has_value() && per_sample_weights->defined();
  at::Tensor psw;
  if (weighted) {
    psw = per_sample_weights->to(at::kFloat).contiguous();
    TORCH_CHECK(psw.numel() == nnz, "per_sample_weights: one per id");
  }
  // Bag starts (exclusive cumulative sum of the lengths).
  std::vector<int64_t> starts(F * B + 1, 0);
  const int64_t* lp = len.data_ptr<int64_t>();
  for (int64_t i = 0; i < F * B; ++i) {
    TORCH_CHECK(lp[i] >= 0, "lengths: a negative length at bag ", i);
    // Against what is left, not by the total alone: lengths near 2^62 wrapped the running sum
    // to nnz and passed (found under UBSan), then the bags read past `values`.
    TORCH_CHECK(lp[i] <= nnz - starts[i], "lengths: bag ", i, " has ", lp[i], " ids where ", nnz - starts[i],
                " of values' ", nnz, " remain");
    starts[i + 1] = starts[i] + lp[i];
  }
  TORCH_CHECK(starts[F * B] == nnz, "lengths add up to ", starts[F * B], ", values has ", nnz);

  at::Tensor out = pooling == 2 ? at::empty({nnz, D}, weights.options().dtype(at::kFloat))
                                : at::empty({B, F * D}, weights.options().dtype(at::kFloat));
  const int64_t* base = base_t.data_ptr<int64_t>();
  const int64_t* frows = rows_t.data_ptr<int64_t>();
  // A negative base made some ids' keys negative, which read as ids to skip: zeros, no error.
  for (int64_t f = 0; f < F; ++f) TORCH_CHECK(base[f] >= 0, op, ": feature_base must be >= 0");
  const int64_t map_rows = loc.rows();
  const int64_t* vp = v.data_ptr<int64_t>();
  const float* wp = weighted ? psw.data_ptr<float>() : nullptr;
  float* op_out = out.data_ptr<float>();
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  std::atomic<bool> layout_bad{false};

  // Two dependent random reads an id (the row map, then the row): prefetched ahead, the map
  // entry kMapAhead ids ahead and the row kRowAhead ids ahead, as FBGEMM's kernels prefetch rows.
  // 64 and 16 rather than 16 and 8: within the whole model's forward (caches cold from the dense
  // layers), at batch 4096 the ranked map's lookups of int8/int4/int2 rows ran at 0.6-0.8x the int32
  // map's speed at 32 and 8, and 1.11-1.30x at 64 and 16 (bench/serve_throughput.py --row-map).
  constexpr int64_t kMapAhead = 64;
  constexpr int64_t kRowAhead = 16;
  constexpr int64_t kRing = 32;  // a power of two above kRowAhead
  static_assert(kRing > kRowAhead && (kRing & (kRing - 1)) == 0, "kRing");

  // A task is a run of bags; their ids are contiguous in `values`, read in order.
  at::parallel_for(0, F * B, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> acc_buf(D);
    const int64_t i0 = starts[begin];
    const int64_t i1 = starts[end];
    std::vector<int64_t> keys(i1 - i0);  // row key of each id, -1 for an id outside its table
    for (int64_t bag = begin; bag < end; ++bag) {
      const int64_t f = bag / B;
      for (int64_t i = starts[bag]; i < starts[bag + 1]; ++i) {
        const int64_t id = vp[i];
        int64_t key = -1;
        if (id < 0 || id >= frows[f]) {
          int64_t prev = first_bad.load();
          while (i < prev && !first_bad.compare_exchange_weak(prev, i)) {
          }
        } else if (id >= map_rows - base[f]) {  // not base + id: a huge base wrapped it negative (skipped)
          layout_bad = true;
        } else {
          key = base[f] + id;
        }
        keys[i - i0] = key;
      }
    }
    for (int64_t i = i0; i < std::min(i1, i0 + kMapAhead); ++i) {
      if (keys[i - i0] >= 0) loc.prefetch(keys[i - i0]);
    }
    // Each id is located once, kRowAhead ids ahead of its use (its row prefetched then); the
    // ring keeps the byte offset and table group until the id is read (-2: an id to skip).
    int64_t ring_at[kRing];
    int64_t ring_tg[kRing];
    auto locate_ahead = [&](int64_t i) {
      const int64_t key = keys[i - i0];
      int64_t& at = ring_at[i & (kRing - 1)];
      if (key < 0) {
        at = -2;
        return;
      }
      at = loc.locate(key, &ring_tg[i & (kRing - 1)]);
      if (at >= 0) {
        prefetch_lines<false>(w + at, rb[ring_tg[i & (kRing - 1)]]);
      }
    };
    for (int64_t i = i0; i < std::min(i1, i0 + kRowAhead); ++i) locate_ahead(i);
    for (int64_t bag = begin; bag < end; ++bag) {
      const int64_t f = bag / B;
      const int64_t b = bag % B;
      float* acc = pooling == 2 ? nullptr : acc_buf.data();
      if (acc) std::fill(acc, acc + D, 0.0f);
      for (int64_t i = starts[bag]; i < starts[bag + 1]; ++i) {
        if (i + kMapAhead < i1 && keys[i + kMapAhead - i0] >= 0) loc.prefetch(keys[i + kMapAhead - i0]);
        if (i + kRowAhead < i1) locate_ahead(i + kRowAhead);
        const int64_t at = ring_at[i & (kRing - 1)];
        if (at == -2) continue;
        if (at < 0) {
          layout_bad = true;
          continue;
        }
        const int64_t tg = ring_tg[i & (kRing - 1)];
        if (pooling == 2) {
          if (wp) {
            accumulate<true, true>(op_out + i * D, w + at, tg, D, wp[i]);
          } else {
            accumulate<false, true>(op_out + i * D, w + at, tg, D, 1.0f);
          }
        } else if (wp) {
          accumulate<true, false>(acc, w + at, tg, D, wp[i]);
        } else {
          accumulate<false, false>(acc, w + at, tg, D, 1.0f);
        }
      }
      if (pooling != 2) {
        float* o = op_out + b * F * D + f * D;
        if (pooling == 1) {
          const float n = static_cast<float>(std::max<int64_t>(lp[bag], 1));
          for (int64_t j = 0; j < D; ++j) o[j] = acc[j] / n;
        } else {
          std::copy(acc, acc + D, o);
        }
      }
    }
  });
  const int64_t bad = first_bad.load();
  if (bad != std::numeric_limits<int64_t>::max()) {
    const int64_t f = static_cast<int64_t>(std::upper_bound(starts.begin(), starts.end(), bad) - starts.begin() - 1) / B;
    std::ostringstream msg;
    msg << "feature " << name_of(feature_names, f) << ": id " << vp[bad] << " outside its table of " << frows[f]
        << " rows";
    TORCH_CHECK_VALUE(false, msg.str());
  }
  TORCH_CHECK(!layout_bad.load(), op, ": a row map entry points outside the group tables");
  return out;
}

// See the schema in TORCH_LIBRARY below and the Python docstring of `mixed_lookup`.
at::Tensor mixed_lookup(
    const at::Tensor& weights,
    const at::Tensor& group_offsets,
    const at::Tensor& row_map,
    const at::Tensor& range_ends,
    const at::Tensor& range_shift,
    const at::Tensor& feature_base,
    const at::Tensor& feature_rows,
    const at::Tensor& values,
    const at::Tensor& lengths,
    const std::optional<at::Tensor>& per_sample_weights,
    int64_t dim,
    int64_t batch_size,
    int64_t pooling,
    int64_t row_alignment,
    c10::string_view feature_names) {
  const GroupTables t("shark::mixed_lookup", weights, group_offsets, row_map, range_ends, range_shift, dim,
                      row_alignment);
  const RowMapLocator loc{t};
  return lookup_with("shark::mixed_lookup", loc, t.rb, t.w, weights, feature_base, feature_rows, values, lengths,
                     per_sample_weights, dim, batch_size, pooling, feature_names);
}

// See the schema in TORCH_LIBRARY below and the Python docstring of `mixed_lookup_ranked`.
at::Tensor mixed_lookup_ranked(
    const at::Tensor& weights,
    const at::Tensor& group_offsets,
    const at::Tensor& blocks,
    const at::Tensor& code_groups,
    const at::Tensor& table_base,
    const at::Tensor& table_fallback,
    const at::Tensor& feature_base,
    const at::Tensor& feature_rows,
    const at::Tensor& values,
    const at::Tensor& lengths,
    const std::optional<at::Tensor>& per_sample_weights,
    int64_t dim,
    int64_t batch_size,
    int64_t pooling,
    int64_t row_alignment,
    c10::string_view feature_names) {
  const int64_t codes = code_groups.numel();
  const int planes = codes > 4 ? 3 : (codes > 2 ? 2 : (codes > 1 ? 1 : 0));
  auto run = [&](auto planes_constant) {
    constexpr int kPlanes = decltype(planes_constant)::value;
    const RankedLocator<kPlanes> loc(weights, group_offsets, blocks, code_groups, table_base, table_fallback, dim,
                                     row_alignment);
    return lookup_with("shark::mixed_lookup_ranked", loc, loc.rb, loc.w, weights, feature_base, feature_rows, values,
                       lengths, per_sample_weights, dim, batch_size, pooling, feature_names);
  };
  switch (planes) {
    case 0: return run(std::integral_constant<int, 0>{});
    case 1: return run(std::integral_constant<int, 1>{});
    case 2: return run(std::integral_constant<int, 2>{});
    default: return run(std::integral_constant<int, 3>{});
  }
}

// The layout of 1-bit rows this library reads: 3, one byte for the magnitude (an eighth-octave
// code, `one_bit_magnitude`) and a sign bit a value (2, before it: an fp16 magnitude; 1: an
// fp16 scale and bias). A serving export records the layout it wrote, and its
// recipe refuses to read 1-bit rows with a library of another layout already loaded.
int64_t one_bit_layout() { return 3; }

// The group ids this library's served lookup reads: 0..8 (7 and 8, symmetric int4 and int2 rows,
// since those tiers were added). A serving recipe refuses an export with rows of a group the
// library loaded in its process does not read.
int64_t served_groups() { return kIds; }

// The 256 magnitudes a 1-bit row's code byte stands for (`one_bit_magnitude`), as a tensor: what
// the torch reference reads them by, and what tests compare with the export's own table.
at::Tensor one_bit_magnitudes() {
  at::Tensor t = at::empty({256}, at::kFloat);
  for (int c = 0; c < 256; ++c) t.data_ptr<float>()[c] = one_bit_magnitude(static_cast<uint8_t>(c));
  return t;
}

TORCH_LIBRARY_FRAGMENT(shark, m) {
  m.def("one_bit_layout() -> int", &one_bit_layout);
  m.def("one_bit_magnitudes() -> Tensor", &one_bit_magnitudes);
  m.def("served_groups() -> int", &served_groups);
  m.def(
      "mixed_lookup(Tensor weights, Tensor group_offsets, Tensor row_map, Tensor range_ends, Tensor range_shift, "
      "Tensor feature_base, Tensor feature_rows, Tensor values, Tensor lengths, Tensor? per_sample_weights, "
      "int dim, int batch_size, int pooling, int row_alignment, str feature_names) -> Tensor");
  m.def(
      "mixed_lookup_ranked(Tensor weights, Tensor group_offsets, Tensor blocks, Tensor code_groups, "
      "Tensor table_base, Tensor table_fallback, Tensor feature_base, Tensor feature_rows, Tensor values, Tensor lengths, "
      "Tensor? per_sample_weights, int dim, int batch_size, int pooling, int row_alignment, str feature_names) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(shark, CPU, m) {
  m.impl("mixed_lookup", &mixed_lookup);
  m.impl("mixed_lookup_ranked", &mixed_lookup_ranked);
}

}  // namespace shark
