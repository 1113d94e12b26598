// A small blocking thread pool for the CPU kernels.
//
// Why not OpenMP: torch ships its own libgomp, and two OpenMP runtimes in one
// process each keep spinning threads after a parallel region. On a machine
// with few cores they starve each other: a 0.2 ms masking call measured 16 ms
// right after a torch op. These workers sleep on a condition variable instead.
// The pool is rebuilt lazily after fork() (DataLoader workers fork), since a
// child process inherits the pool object but none of its threads.
#pragma once
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace fastpt {

class ThreadPool {
 public:
  // Runs task(i) for i in [0, n) on up to `threads` threads (the caller included)
  // and returns when all are done. Concurrent callers (the GIL is released)
  // take turns; a call made while the pool is busy runs inline instead.
  static void run(int64_t n, int threads, const std::function<void(int64_t)>& task) {
    if (n <= 0) return;
    if (threads <= 1 || n == 1) {
      for (int64_t i = 0; i < n; ++i) task(i);
      return;
    }
    ThreadPool& pool = instance();
    std::unique_lock<std::mutex> busy(pool.busy_, std::try_to_lock);
    if (!busy.owns_lock()) {
      for (int64_t i = 0; i < n; ++i) task(i);
      return;
    }
    pool.dispatch(n, std::min<int64_t>(threads, n), task);
  }

 private:
  static ThreadPool& instance() {
    static std::mutex guard;
    static ThreadPool* pool = nullptr;
    static pid_t owner = 0;
    std::lock_guard<std::mutex> lock(guard);
    if (pool == nullptr || owner != getpid()) {
      // After fork() the old pool's threads do not exist: leak it (its mutexes
      // may be in any state) and start a new one.
      pool = new ThreadPool();
      owner = getpid();
    }
    return *pool;
  }

  void dispatch(int64_t n, int64_t threads, const std::function<void(int64_t)>& task) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      while (static_cast<int64_t>(workers_.size()) < threads - 1) {
        workers_.emplace_back([this, id = workers_.size()] { work(id); });
        workers_.back().detach();
      }
      task_ = &task;
      n_ = n;
      next_.store(0);
      active_ = threads - 1;  // workers that take part in this job
      pending_ = threads - 1;
      ++generation_;
    }
    cv_.notify_all();
    drain();
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [this] { return pending_ == 0; });
    task_ = nullptr;
  }

  void drain() {
    for (int64_t i = next_.fetch_add(1); i < n_; i = next_.fetch_add(1)) (*task_)(i);
  }

  void work(size_t id) {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (static_cast<int64_t>(id) >= active_) continue;  // not needed for this job
      }
      drain();
      std::lock_guard<std::mutex> lock(mu_);
      if (--pending_ == 0) done_cv_.notify_one();
    }
  }

  std::mutex busy_, mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t)>* task_ = nullptr;
  int64_t n_ = 0, active_ = 0, pending_ = 0;
  std::atomic<int64_t> next_{0};
  uint64_t generation_ = 0;
};

// How parallel_for cuts [0, n): at most 4 chunks per thread, each of at least `grain` items
// (one chunk when a single thread would run them all). Depends on n, grain and threads only.
inline int64_t parallel_chunks(int64_t n, int64_t grain, int threads) {
  if (n <= 0) return 0;
  grain = std::max<int64_t>(grain, 1);
  const int64_t chunks = std::min<int64_t>((n + grain - 1) / grain, std::max(1, threads) * 4);
  return std::min<int64_t>(threads, chunks) <= 1 ? 1 : chunks;
}

// Calls fn(chunk, begin, end) for the parallel_chunks(n, grain, threads) contiguous chunks of
// [0, n), handed out dynamically to up to `threads` threads. The chunk index lets a caller
// keep per-chunk partial results and combine them in a fixed order (deterministic sums).
template <typename F>
void parallel_for_chunks(int64_t n, int64_t grain, int threads, F&& fn) {
  const int64_t chunks = parallel_chunks(n, grain, threads);
  if (chunks == 0) return;
  if (chunks == 1) {
    fn(int64_t{0}, int64_t{0}, n);
    return;
  }
  const int64_t step = (n + chunks - 1) / chunks;
  ThreadPool::run(chunks, static_cast<int>(std::min<int64_t>(threads, chunks)), [&](int64_t c) {
    const int64_t b = c * step, e = std::min(n, b + step);
    if (b < e) fn(c, b, e);
  });
}

// Calls fn(begin, end) over [0, n) in chunks of at least `grain` items, on up to
// `threads` threads. Chunks are contiguous and handed out dynamically.
template <typename F>
void parallel_for(int64_t n, int64_t grain, int threads, F&& fn) {
  parallel_for_chunks(n, grain, threads, [&](int64_t, int64_t b, int64_t e) { fn(b, e); });
}

}  // namespace fastpt
