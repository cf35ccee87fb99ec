// The pool of threads every pass of the kernel (matvec.cc) runs on, and the work it shares out: a Job.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <pthread.h>
#include <thread>
#include <unistd.h>

namespace dsv3 {

// A pause inside a spin-wait: lets the core's other hardware thread run and saves power.
inline void relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Work the pool shares: `units` pieces, any range of which any thread may run.
struct Job {
  virtual long units() const = 0;
  virtual void run(long u0, long u1) const = 0;
};

// A pool of `helpers` threads sharing each job with the calling thread in chunks: every thread claims chunks
// until none is left, so a helper the OS has not scheduled (test workers sharing the cores) delays nothing: the
// caller runs its chunks. A chunk is claimed by advancing a ticket that also names the job (a sequence number)
// and its chunk count, so a helper waking late cannot claim a chunk of a job already finished.
class Pool {
 public:
  explicit Pool(int helpers) : helpers_(helpers) {
    for (int part = 1; part <= helpers_; ++part) std::thread([this] { serve(); }).detach();
  }

  void run(const Job& job) {
    std::unique_lock<std::mutex> lock(busy_, std::try_to_lock);
    const long total = job.units();
    // Alone when another job is running, or in a process forked from this one (it has no helpers).
    if (!lock.owns_lock() || helpers_ == 0 || getpid() != owner_ || total < 2) {
      job.run(0, total);
      return;
    }
    job_ = &job;
    chunk_ = std::max(1L, total / ((helpers_ + 1) * kChunksPerThread));
    const uint64_t chunks = (total + chunk_ - 1) / chunk_;
    done_.store(0, std::memory_order_relaxed);
    sequence_ = (sequence_ + 1) & kSequenceMask;
    ticket_.store(sequence_ << 40 | chunks << 20, std::memory_order_release);
    generation_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) generation_.notify_all();
    claim_all();
    for (int spins = 0; done_.load(std::memory_order_acquire) != chunks; ++spins) {
      if (spins < 4096) relax(); else std::this_thread::yield();  // a helper mid-chunk was descheduled
    }
  }

 private:
  // Claims and runs chunks of the job the ticket names until none is left.
  void claim_all() {
    uint64_t ticket = ticket_.load(std::memory_order_acquire);
    const uint64_t sequence = ticket >> 40;
    for (;;) {
      const uint64_t chunks = (ticket >> 20) & kFieldMask, next = ticket & kFieldMask;
      if ((ticket >> 40) != sequence || next >= chunks) return;
      if (!ticket_.compare_exchange_weak(ticket, ticket + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
        continue;  // another thread claimed it (ticket now holds the new value)
      }
      const long u0 = static_cast<long>(next) * chunk_;
      job_->run(u0, std::min(u0 + chunk_, job_->units()));
      done_.fetch_add(1, std::memory_order_release);
      ticket = ticket_.load(std::memory_order_acquire);
    }
  }

  void serve() {
    pthread_setname_np(pthread_self(), "dsv3_pool");  // as `top -H` and /proc/<pid>/task/*/comm show it
    unsigned seen = 0;  // the generation before the first job, whenever this thread starts
    for (;;) {
      auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
      unsigned now;
      for (int spins = 0; (now = generation_.load(std::memory_order_acquire)) == seen; ++spins) {
        relax();
        if (spins % 256 == 255 && std::chrono::steady_clock::now() > spin_until) {
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          generation_.wait(seen, std::memory_order_seq_cst);
          sleepers_.fetch_sub(1, std::memory_order_seq_cst);
        }
      }
      seen = now;
      claim_all();
    }
  }

  static constexpr int kSpinMicros = 100;
  static constexpr long kChunksPerThread = 4;
  static constexpr uint64_t kSequenceMask = (1u << 24) - 1, kFieldMask = (1u << 20) - 1;
  const int helpers_;
  const pid_t owner_ = getpid();
  std::mutex busy_;
  const Job* job_ = nullptr;
  long chunk_ = 1;
  uint64_t sequence_ = 0;
  std::atomic<uint64_t> ticket_{0};
  std::atomic<uint64_t> done_{0};
  std::atomic<unsigned> generation_{0};
  std::atomic<int> sleepers_{0};
};

Pool& pool() {
  static Pool* instance = [] {
    long threads = std::thread::hardware_concurrency();
    if (const char* asked = std::getenv("DSV3_MATVEC_THREADS")) threads = std::atol(asked);
    return new Pool(static_cast<int>(std::clamp(threads, 1L, 8L) - 1));
  }();
  return *instance;
}

}  // namespace dsv3
