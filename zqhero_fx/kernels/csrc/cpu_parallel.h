// zqhero::parallel_for: ATen's parallel_for (torch's own OpenMP pool: no second pool, no oversubscription), which
// steps down to the calling thread alone while the machine is busy.
//
// Why: a parallel region ends only when every thread of the pool has run its share. When another process keeps a core
// busy, the pool thread that shares that core waits for a scheduler time slice (milliseconds) before it starts, and
// the whole region waits for it: a 0.2 ms LayerNorm takes 8 ms. The INT8 path runs ~10 short regions per layer, so it
// suffered most (measured here: BERT-base M3 3x slower with two threads than with one on a busy 2-core machine).
// Each region therefore times its threads: one that started more than kLateStartNs after the region began, or
// finished that much after the first one did (it lost its core part-way), makes the region late. When kLateOfLast8 of
// the last 8 regions were late, the next kSerialPeriodNs of regions run on the calling thread only (which is running,
// so it is not waiting for a time slice), and then threads are tried again. On a quiet machine threads start within
// tens of microseconds and nothing changes.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>

namespace zqhero {

constexpr int64_t kLateStartNs = 1'000'000;     // 1 ms: far above a sleeping pool thread's wake-up (~50 us)
constexpr int64_t kSerialPeriodNs = 200'000'000;  // 200 ms on the calling thread before threads are tried again
// Step down when this many of the last 8 regions had a late thread: one late region now and then is a virtual CPU
// descheduled by its host for a moment (seen on a quiet 2-vCPU VM), and going serial for it costs more than it saves.
constexpr int kLateOfLast8 = 3;

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Until when (steady-clock ns) regions run on the calling thread only; one per extension module.
inline std::atomic<int64_t>& serial_until() {
  static std::atomic<int64_t> until{0};
  return until;
}

// How many times regions stepped down to the calling thread (for tests and reports).
inline std::atomic<int64_t>& step_downs() {
  static std::atomic<int64_t> count{0};
  return count;
}

// Whether regions currently run serially (for tests and reports).
inline bool stepping_down() { return now_ns() < serial_until().load(std::memory_order_relaxed); }

// The last regions, newest in bit 0: 1 where a thread was late.
inline std::atomic<uint32_t>& late_history() {
  static std::atomic<uint32_t> bits{0};
  return bits;
}

inline void raise_to(std::atomic<int64_t>& value, int64_t candidate) {
  int64_t seen = value.load(std::memory_order_relaxed);
  while (candidate > seen && !value.compare_exchange_weak(seen, candidate, std::memory_order_relaxed)) {
  }
}

inline void lower_to(std::atomic<int64_t>& value, int64_t candidate) {
  int64_t seen = value.load(std::memory_order_relaxed);
  while (candidate < seen && !value.compare_exchange_weak(seen, candidate, std::memory_order_relaxed)) {
  }
}

template <class F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  if (at::get_num_threads() == 1 || at::in_parallel_region() || end - begin <= std::max<int64_t>(grain, 1) ||
      stepping_down()) {
    f(begin, end);
    return;
  }
  const int64_t start = now_ns();
  std::atomic<int64_t> last_start{start}, first_end{INT64_MAX}, last_end{start};
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    raise_to(last_start, now_ns());
    f(b, e);
    const int64_t ended = now_ns();
    lower_to(first_end, ended);
    raise_to(last_end, ended);
  });
  // A thread that started late, or one that finished long after the others (it lost its core part-way): waiting
  // for a time slice, not work. Uneven shares of work differ by less than half the region.
  const int64_t late_start = last_start.load() - start, spread = last_end.load() - first_end.load();
  const int64_t region = last_end.load() - start;
  const bool late = late_start > kLateStartNs || (spread > kLateStartNs && 2 * spread > region);
  const uint32_t history = (late_history().load(std::memory_order_relaxed) << 1) | (late ? 1u : 0u);
  late_history().store(history, std::memory_order_relaxed);
  if (late && __builtin_popcount(history & 0xFFu) >= kLateOfLast8) {
    serial_until().store(now_ns() + kSerialPeriodNs, std::memory_order_relaxed);
    step_downs().fetch_add(1, std::memory_order_relaxed);
  }
}

}  // namespace zqhero
