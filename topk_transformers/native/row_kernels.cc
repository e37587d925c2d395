// Row-gathered products for sparse decoding on CPU, as XLA FFI handlers.
//
//   topk_gather_matvec: out[t, c] = sum_d x[t, d] * w[idx[t, c], d]       (c rows of wi_rows [mlp, embed])
//   topk_gather_vecmat: out[t, d] = sum_j v[t, j] * w[idx[t, j], d]       (k rows of wo [mlp, embed])
//
// XLA:CPU computes both as a gather that copies the rows, then a product that reads the copy:
// three passes over the rows, the copy on one thread. These read each selected row once, four rows
// at a time (four independent memory streams), split over XLA's intra-op thread pool.
//
// Built on first use by topk_transformers/row_kernels.py with the system C++ compiler against the
// installed jaxlib's FFI headers (jax.ffi.include_dir()).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;    // independent partial sums per row (vectorised by the compiler)
constexpr int64_t kGroup = 4;     // rows read together
constexpr int64_t kChunkRows = 32;  // rows per task of the thread pool

// Runs fn(i) for i in [0, n). Tasks of the pool and the calling thread claim chunks from one counter,
// so a task that starts late finds nothing left and the caller never waits on work nobody runs.
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const Fn& fn) {
  const int64_t threads = pool.num_threads();
  if (threads <= 1 || n <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, fn]() {
    for (int64_t i; (i = state->next.fetch_add(1, std::memory_order_relaxed)) < n;) {
      fn(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min(threads, n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work]() { work(); });
  work();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// out[g] = dot(x, rows[g]) for kGroup rows of length d.
inline void DotGroup(const float* __restrict x, const float* const* rows, int64_t count, int64_t d,
                     float* __restrict out) {
  float acc[kGroup][kLanes] = {};
  int64_t i = 0;
  if (count == kGroup) {
    for (; i + kLanes <= d; i += kLanes)
      for (int64_t g = 0; g < kGroup; ++g)
        for (int64_t j = 0; j < kLanes; ++j) acc[g][j] += x[i + j] * rows[g][i + j];
  } else {
    for (; i + kLanes <= d; i += kLanes)
      for (int64_t g = 0; g < count; ++g)
        for (int64_t j = 0; j < kLanes; ++j) acc[g][j] += x[i + j] * rows[g][i + j];
  }
  for (int64_t g = 0; g < count; ++g) {
    float s = 0.f;
    for (int64_t j = 0; j < kLanes; ++j) s += acc[g][j];
    for (int64_t r = i; r < d; ++r) s += x[r] * rows[g][r];
    out[g] = s;
  }
}

bool IndicesInRange(const int32_t* idx, int64_t n, int64_t n_rows) {
  for (int64_t e = 0; e < n; ++e)
    if (idx[e] < 0 || idx[e] >= n_rows) return false;
  return true;
}

ffi::Error GatherMatvec(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::Buffer<ffi::S32> idx, ffi::ResultBuffer<ffi::F32> out) {
  if (w.dimensions().size() != 2 || x.dimensions().size() == 0 || idx.dimensions().size() == 0)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "topk_gather_matvec: w must be 2-D, x and idx at least 1-D");
  const int64_t n_rows = w.dimensions()[0], d = w.dimensions()[1];
  const int64_t c = idx.dimensions().back(), n = idx.element_count();
  if (x.dimensions().back() != d || c == 0 || x.element_count() / d != n / c)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "topk_gather_matvec: x [..., d] and idx [..., c] do not fit w [n, d]");
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  const int32_t* ip = idx.typed_data();
  float* op = out->typed_data();
  if (!IndicesInRange(ip, n, n_rows))
    return ffi::Error(ffi::ErrorCode::kOutOfRange, "topk_gather_matvec: a row index is outside w");
  const int64_t chunks = (n + kChunkRows - 1) / kChunkRows;
  ParallelFor(pool, chunks, [=](int64_t ch) {
    const int64_t lo = ch * kChunkRows, hi = std::min(n, lo + kChunkRows);
    for (int64_t e = lo; e < hi;) {
      // A group never spans two tokens: every row of it is dotted with the same x.
      const int64_t t = e / c, end = std::min(hi, (t + 1) * c), count = std::min(kGroup, end - e);
      const float* rows[kGroup];
      for (int64_t g = 0; g < count; ++g) rows[g] = wp + int64_t(ip[e + g]) * d;
      DotGroup(xp + t * d, rows, count, d, op + e);
      e += count;
    }
  });
  return ffi::Error::Success();
}

ffi::Error GatherVecmat(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> w,
                        ffi::Buffer<ffi::S32> idx, ffi::ResultBuffer<ffi::F32> out) {
  if (w.dimensions().size() != 2 || v.dimensions().size() == 0 || idx.dimensions().size() == 0)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "topk_gather_vecmat: w must be 2-D, v and idx at least 1-D");
  const int64_t n_rows = w.dimensions()[0], d = w.dimensions()[1];
  const int64_t k = idx.dimensions().back(), n = idx.element_count();
  if (v.element_count() != n || k == 0)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "topk_gather_vecmat: v and idx must have one shape [..., k], k > 0");
  const float* vp = v.typed_data();
  const float* wp = w.typed_data();
  const int32_t* ip = idx.typed_data();
  float* op = out->typed_data();
  const int64_t tokens = n / k;
  if (!IndicesInRange(ip, n, n_rows))
    return ffi::Error(ffi::ErrorCode::kOutOfRange, "topk_gather_vecmat: a row index is outside w");
  // Each task sums a block of one token's rows into its own partial row; the partials are added after.
  const int64_t blocks = (k + kChunkRows - 1) / kChunkRows;
  std::vector<float> partial(blocks > 1 ? tokens * blocks * d : 0);
  float* pp = partial.data();
  ParallelFor(pool, tokens * blocks, [=](int64_t ch) {
    const int64_t t = ch / blocks, b = ch % blocks;
    const int64_t lo = b * kChunkRows, hi = std::min(k, lo + kChunkRows);
    float* __restrict o = blocks > 1 ? pp + ch * d : op + t * d;
    std::fill(o, o + d, 0.f);
    const float* vt = vp + t * k;
    const int32_t* it = ip + t * k;
    int64_t q = lo;
    for (; q + kGroup <= hi; q += kGroup) {
      const float a0 = vt[q], a1 = vt[q + 1], a2 = vt[q + 2], a3 = vt[q + 3];
      const float* __restrict r0 = wp + int64_t(it[q]) * d;
      const float* __restrict r1 = wp + int64_t(it[q + 1]) * d;
      const float* __restrict r2 = wp + int64_t(it[q + 2]) * d;
      const float* __restrict r3 = wp + int64_t(it[q + 3]) * d;
      for (int64_t j = 0; j < d; ++j) o[j] += a0 * r0[j] + a1 * r1[j] + a2 * r2[j] + a3 * r3[j];
    }
    for (; q < hi; ++q) {
      const float a = vt[q];
      const float* __restrict r = wp + int64_t(it[q]) * d;
      for (int64_t j = 0; j < d; ++j) o[j] += a * r[j];
    }
  });
  if (blocks > 1) {
    for (int64_t t = 0; t < tokens; ++t) {
      float* __restrict o = op + t * d;
      std::copy(pp + t * blocks * d, pp + t * blocks * d + d, o);
      for (int64_t b = 1; b < blocks; ++b) {
        const float* __restrict p = pp + (t * blocks + b) * d;
        for (int64_t j = 0; j < d; ++j) o[j] += p[j];
      }
    }
  }
  return ffi::Error::Success();
}

// Both handlers take (x or v [..., m] f32, w [n, d] f32, idx [..., m] s32) and return one f32 buffer.
auto RowsBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(topk_gather_matvec, GatherMatvec, RowsBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(topk_gather_vecmat, GatherVecmat, RowsBinding());
