// A small persistent thread pool for the weight kernels: `run(parts, f)` calls f(0) .. f(parts - 1) on the calling
// thread and the workers (each takes the next part when it is free) and returns when all are done. Decode calls it
// dozens of times per token, each a few tens of microseconds of work, so a worker keeps polling for a while after
// its last part before it sleeps: a hand-off then costs about a microsecond instead of a futex wake-up. The polling
// yields the core now and then, so on a machine busy with other work it gives way rather than spin against it.
// A call from inside a part, or while another thread's call has the workers, runs serially.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define DHN_PAUSE() _mm_pause()
#else
#define DHN_PAUSE() std::this_thread::yield()
#endif

namespace dhn {

class Pool {
 public:
  explicit Pool(int threads) { resize(threads); }
  ~Pool() { stop(); }

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Threads in all (the caller included); takes effect between calls.
  void resize(int threads) {
    stop();
    stopping_ = false;
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { work(); });
  }

  void run(int parts, const std::function<void(int)>& f) {
    // Serial: nothing to share, no workers, called from a part, or another thread (a second MLX stream) has the
    // workers now.
    std::unique_lock<std::mutex> caller(caller_, std::defer_lock);
    if (parts <= 1 || workers_.empty() || inside_ || !caller.try_lock()) {
      for (int p = 0; p < parts; ++p) f(p);
      return;
    }
    while (busy_.load() != 0) DHN_PAUSE();  // a worker still leaving the previous call
    job_ = &f;
    parts_ = parts;
    next_.store(0);
    done_.store(0);
    epoch_.fetch_add(1);
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      wake_.notify_all();
    }
    inside_ = true;
    drain();
    inside_ = false;
    for (int i = 1; done_.load() < parts; ++i) relax(i);
  }

 private:
  void drain() {
    for (int p; (p = next_.fetch_add(1)) < parts_;) {
      (*job_)(p);
      done_.fetch_add(1);
    }
  }

  void work() {
    inside_ = true;
    uint64_t seen = epoch_.load();
    for (;;) {
      const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
      for (int i = 1; epoch_.load() == seen && !stopping_.load(); ++i) {
        relax(i);
        if ((i & 255) == 0 && std::chrono::steady_clock::now() > spin_until) {
          std::unique_lock<std::mutex> lock(mutex_);
          sleepers_.fetch_add(1);
          wake_.wait(lock, [&] { return epoch_.load() != seen || stopping_.load(); });
          sleepers_.fetch_sub(1);
        }
      }
      if (stopping_.load()) return;
      busy_.fetch_add(1);  // before reading the job: `run` does not replace it while a worker is busy
      const uint64_t e = epoch_.load();
      if (e != seen) {
        seen = e;
        drain();
      }
      busy_.fetch_sub(1);
    }
  }

  static void relax(int i) {  // pause; every 64th time let another thread have the core
    if (i % 64 == 0) std::this_thread::yield();
    else DHN_PAUSE();
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  static constexpr int kSpinMicros = 2000;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* job_ = nullptr;
  int parts_ = 0;
  std::atomic<uint64_t> epoch_{0};
  std::atomic<int> next_{0}, done_{0}, busy_{0}, sleepers_{0};
  std::atomic<bool> stopping_{false};
  std::mutex mutex_, caller_;
  std::condition_variable wake_;
  static inline thread_local bool inside_ = false;
};

}  // namespace dhn
