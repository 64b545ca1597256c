// A caching allocator for CPU tensors.
//
// glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh mmap and
// unmaps it on free, so a training step whose activations are larger than that page-faults all of
// them again every step: the kernel zeroes and maps every 4 KiB page anew. On the CPL step with one
// decoder pass over B (1 + m) rows that is millions of faults and seconds of system time per step.
// This allocator keeps freed blocks and hands them out again, as PyTorch's CUDA allocator does:
// after the first step the step's working set is reused and never touches the kernel.
//
// Blocks below `kMinCachedBytes` are left to the system allocator (glibc reuses those from its heap
// without faults). Larger requests are rounded up to a size class (at most 1/8 above the request)
// and served by the smallest free block that is at most 1/4 larger than the rounded size. Free
// blocks are kept up to a byte limit; a block that would exceed it goes back to the system. When a
// fresh allocation fails the cache is emptied and the allocation retried once.
//
// Every block, cached or not, is reported to PyTorch's profiler like the default allocator's, so
// torch.profiler(profile_memory=True) counts the same bytes. Installing and removing the allocator
// is done from Python (cpl_fast/memory.py) through the module functions defined at the bottom.
#include <Python.h>
#include <pthread.h>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <map>
#include <mutex>
#include <unordered_map>

namespace cpl_fast {
namespace {

constexpr size_t kMinCachedBytes = size_t{1} << 20;  // 1 MiB
// Requests above this (no machine has the memory) go straight to the system allocator, which
// refuses them with its own error; rounding them could overflow.
constexpr size_t kMaxCachedBytes = size_t{1} << 48;
constexpr size_t kPage = 4096;
// Raise above the default CPU allocator (priority 0) and anything registered at the same level.
constexpr uint8_t kPriority = 100;

size_t round_size(size_t nbytes) {
  // Size classes: multiples of 1/8 of the largest power of two not above the request (nbytes > 0).
  const size_t top = size_t{1} << (63 - __builtin_clzll(nbytes));
  const size_t step = std::max(kPage, top >> 3);
  return (nbytes + step - 1) / step * step;
}

struct Stats {
  uint64_t hits = 0;        // requests served from the cache
  uint64_t misses = 0;      // cached-size requests that needed a fresh block
  uint64_t uncached = 0;    // small requests passed to the system allocator
  uint64_t released = 0;    // blocks given back to the system (over the limit, emptied, disabled)
  size_t live_bytes = 0;    // bytes of blocks handed out (rounded sizes) and not yet freed
  size_t cached_bytes = 0;  // bytes of free blocks held
  size_t peak_bytes = 0;    // highest live_bytes + cached_bytes
};

class CachingCPUAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    void* ptr = nbytes == 0 ? nullptr : obtain(nbytes);
    if (ptr != nullptr) {
      c10::profiledCPUMemoryReporter().New(ptr, nbytes);
    }
    return {ptr, ptr, &CachingCPUAllocator::deleter, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &CachingCPUAllocator::deleter; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static CachingCPUAllocator& instance() {
    // Never destroyed: tensors freed during interpreter shutdown still reach a live allocator.
    static auto* allocator = [] {
      auto* created = new CachingCPUAllocator();
      // A fork (DataLoader workers) while another thread holds the lock would leave the child's
      // copy locked forever: hold it across fork, release it on both sides.
      pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                     [] { instance().mutex_.unlock(); });
      return created;
    }();
    return *allocator;
  }

  // Install (or re-limit) the allocator; returns false when another allocator of a higher
  // priority keeps the CPU slot.
  bool enable(size_t max_cached_bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      max_cached_bytes_ = max_cached_bytes;
      trim_locked(max_cached_bytes_);
      if (!enabled_) {
        previous_ = c10::GetCPUAllocator();
      }
    }
    if (c10::GetCPUAllocator() != this) {
      c10::SetCPUAllocator(this, kPriority);
    }
    std::lock_guard<std::mutex> lock(mutex_);
    enabled_ = c10::GetCPUAllocator() == this;
    return enabled_;
  }

  // Give the CPU slot back to the allocator found at enable() and every free block to the system.
  // Blocks still in use stay valid and go to the system when their tensors are freed.
  void disable() {
    c10::Allocator* previous = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!enabled_) {
        return;
      }
      enabled_ = false;
      previous = previous_;
      trim_locked(0);
    }
    if (c10::GetCPUAllocator() == this && previous != nullptr) {
      c10::SetCPUAllocator(previous, kPriority);
    }
  }

  bool enabled() {
    std::lock_guard<std::mutex> lock(mutex_);
    return enabled_;
  }

  void empty_cache() {
    std::lock_guard<std::mutex> lock(mutex_);
    trim_locked(0);
  }

  Stats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return stats_;
  }

  size_t max_cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return max_cached_bytes_;
  }

  void reset_peak() {
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.peak_bytes = stats_.live_bytes + stats_.cached_bytes;
  }

 private:
  static void deleter(void* ptr) {
    if (ptr == nullptr) {
      return;
    }
    c10::profiledCPUMemoryReporter().Delete(ptr);
    instance().give_back(ptr);
  }

  void* obtain(size_t nbytes) {
    if (nbytes < kMinCachedBytes || nbytes > kMaxCachedBytes) {
      void* ptr = c10::alloc_cpu(nbytes);  // throws c10::Error when the system has no memory
      std::lock_guard<std::mutex> lock(mutex_);
      live_[ptr] = 0;
      stats_.uncached += 1;
      return ptr;
    }
    const size_t size = round_size(nbytes);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.lower_bound(size);
      if (it != free_.end() && it->first <= size + size / 4) {
        const size_t block = it->first;
        void* ptr = it->second;
        free_.erase(it);
        stats_.cached_bytes -= block;
        stats_.live_bytes += block;
        stats_.hits += 1;
        live_[ptr] = block;
        return ptr;
      }
    }
    void* ptr = nullptr;
    try {
      ptr = c10::alloc_cpu(size);
    } catch (const c10::Error&) {
      empty_cache();
      ptr = c10::alloc_cpu(size);
    }
    std::lock_guard<std::mutex> lock(mutex_);
    live_[ptr] = size;
    stats_.misses += 1;
    stats_.live_bytes += size;
    stats_.peak_bytes = std::max(stats_.peak_bytes, stats_.live_bytes + stats_.cached_bytes);
    return ptr;
  }

  void give_back(void* ptr) {
    std::unique_lock<std::mutex> lock(mutex_);
    auto it = live_.find(ptr);
    // 0: a small block from the system allocator. Not found cannot happen through allocate();
    // the system allocator owns such a pointer.
    const size_t block = it == live_.end() ? 0 : it->second;
    if (it != live_.end()) {
      live_.erase(it);
    }
    if (block == 0) {
      lock.unlock();
      c10::free_cpu(ptr);
      return;
    }
    stats_.live_bytes -= block;
    if (enabled_ && stats_.cached_bytes + block <= max_cached_bytes_) {
      free_.emplace(block, ptr);
      stats_.cached_bytes += block;
      return;
    }
    stats_.released += 1;
    lock.unlock();
    c10::free_cpu(ptr);
  }

  // Free cached blocks, largest first, until at most `limit` bytes stay cached.
  void trim_locked(size_t limit) {
    while (stats_.cached_bytes > limit && !free_.empty()) {
      auto it = std::prev(free_.end());
      stats_.cached_bytes -= it->first;
      stats_.released += 1;
      c10::free_cpu(it->second);
      free_.erase(it);
    }
  }

  std::mutex mutex_;
  bool enabled_ = false;
  size_t max_cached_bytes_ = 0;
  c10::Allocator* previous_ = nullptr;
  std::multimap<size_t, void*> free_;       // block size -> free block
  std::unordered_map<void*, size_t> live_;  // handed-out block -> its size (0: system allocation)
  Stats stats_;
};

// ---- module functions: cpl_fast._C._cpu_cache_* (wrapped by cpl_fast/memory.py) ----

PyObject* py_enable(PyObject*, PyObject* arg) {
  const unsigned long long limit = PyLong_AsUnsignedLongLong(arg);
  if (PyErr_Occurred()) {
    return nullptr;
  }
  const bool ok = CachingCPUAllocator::instance().enable(static_cast<size_t>(limit));
  return PyBool_FromLong(ok);
}

// Freeing a large cache unmaps many blocks: let other Python threads run meanwhile.
PyObject* py_disable(PyObject*, PyObject*) {
  Py_BEGIN_ALLOW_THREADS CachingCPUAllocator::instance().disable();
  Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

PyObject* py_enabled(PyObject*, PyObject*) {
  return PyBool_FromLong(CachingCPUAllocator::instance().enabled());
}

PyObject* py_empty(PyObject*, PyObject*) {
  Py_BEGIN_ALLOW_THREADS CachingCPUAllocator::instance().empty_cache();
  Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

PyObject* py_reset_peak(PyObject*, PyObject*) {
  CachingCPUAllocator::instance().reset_peak();
  Py_RETURN_NONE;
}

PyObject* py_stats(PyObject*, PyObject*) {
  auto& allocator = CachingCPUAllocator::instance();
  const Stats s = allocator.stats();
  return Py_BuildValue(
      "{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K}", "hits", (unsigned long long)s.hits, "misses",
      (unsigned long long)s.misses, "uncached", (unsigned long long)s.uncached, "released",
      (unsigned long long)s.released, "live_bytes", (unsigned long long)s.live_bytes, "cached_bytes",
      (unsigned long long)s.cached_bytes, "peak_bytes", (unsigned long long)s.peak_bytes,
      "max_cached_bytes", (unsigned long long)allocator.max_cached_bytes());
}

PyMethodDef kMethods[] = {
    {"_cpu_cache_enable", py_enable, METH_O, "Install the caching CPU allocator with a byte limit."},
    {"_cpu_cache_disable", py_disable, METH_NOARGS, "Restore the previous CPU allocator."},
    {"_cpu_cache_enabled", py_enabled, METH_NOARGS, "Whether the caching CPU allocator is installed."},
    {"_cpu_cache_empty", py_empty, METH_NOARGS, "Give every cached free block back to the system."},
    {"_cpu_cache_reset_peak", py_reset_peak, METH_NOARGS, "Reset peak_bytes to the current bytes."},
    {"_cpu_cache_stats", py_stats, METH_NOARGS, "Counters and byte totals of the caching allocator."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* cpu_allocator_methods() { return kMethods; }

}  // namespace cpl_fast
