// The host execution layer: runs the CUDA kernels of csrc/cuda, unmodified, on the CPU.
//
// Force-included (-include cuda_host.h) when the test build compiles csrc/cuda/*.cu with the host
// C++ compiler (tests/cuda_host_build.py). It provides what the kernels use of CUDA:
//
// * launches (csrc/cuda/launch.cuh calls cuda_host::launch): up to DAAD_CUDA_HOST_RESIDENT
//   blocks of the grid (default 4) are resident at once, each in its own slot with its own
//   threads, shared memory and barrier; a finished block's slot takes the next block. The
//   threads of all resident blocks run as fibers (ucontext), switched at every barrier and warp
//   collective, a pseudo-random ready thread of any resident block at a time; a warp collective
//   completes as soon as its lanes have arrived, so warps run ahead of each other up to the next
//   barrier and a missing barrier reads what other warps have not written yet;
// * __syncthreads(): a barrier of the block that reports, by file and line, threads that wait at
//   different barriers (divergence) or can never be joined (deadlock: a thread exited, or waits in
//   a warp collective); a watchdog ends a launch that runs longer than DAAD_CUDA_HOST_TIMEOUT
//   seconds (default 300: an endless loop);
// * shared memory, declared with DAAD_SHARED_ARRAY (csrc/cuda/common.cuh; a plain __shared__ does
//   not compile here): each array lies in its block's own arena, 128-byte aligned, between guard
//   regions of kSharedGuard bytes, filled with 0xff (NaN) bytes when the block starts. Under
//   AddressSanitizer the guards are poisoned, so an overflow is reported at the faulting access;
//   the other builds check the guards when the block ends. More than 48 KB per block (the static
//   limit of the GPU) is an error;
// * threadIdx, blockIdx, blockDim, gridDim per thread; atomicAdd (std::atomic_ref);
// * warp collectives (__shfl*_sync, __syncwarp): a 32-lane exchange that checks that the calling
//   lane is in the mask and that every lane of the mask arrives at the same call with the same
//   mask (a lane that exited or waits elsewhere is reported), and that a lane reads only lanes of
//   the mask;
// * nvcuda::wmma fragments (tf32, half and bf16 inputs, float accumulators) computed in float,
//   checking what the hardware requires: the whole warp calls with the same pointer, ldm and
//   layout; ldm a multiple of 16 bytes; 256-bit aligned pointers. mma_sync on tf32 fragments
//   drops the low 13 mantissa bits as the tensor cores do; __float_to_tf32 rounds to nearest,
//   ties away from zero (cvt.rna.tf32.f32);
// * half and bf16 from the CUDA toolkit's own headers (host code).
//
// Under ThreadSanitizer every fiber is a TSan thread, synchronised only by what synchronises
// CUDA threads: __syncthreads between the threads of a block (warp collectives exchange values,
// not memory), atomics, and the ends of the launch. Blocks resident at the same time are not
// ordered at all, so a race on global memory between them (a plain += where an atomicAdd is
// needed) is reported like a race on shared memory within a block. The blocks that run one after
// the other in one slot are ordered (they reuse its shared memory); the layer's own bookkeeping is
// hidden from TSan. Under AddressSanitizer the fiber stacks are annotated.
// What it cannot prove is listed in csrc/cuda/README.md.
#pragma once

#define DAAD_CUDA_HOST_EMULATION 1

// CUDA's keywords as host C++; the toolkit headers keep definitions made before them.
#define __host__
#define __device__
#define __global__
#define __shared__ \
  _Pragma("GCC error \"cuda_host: declare shared memory with DAAD_SHARED_ARRAY (common.cuh)\"")
#define __launch_bounds__(...)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>  // dim3, uint3, cudaStream_t, cudaError_t: declarations only
#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <source_location>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
extern "C" void AnnotateIgnoreReadsBegin(const char* file, int line);
extern "C" void AnnotateIgnoreReadsEnd(const char* file, int line);
extern "C" void AnnotateIgnoreWritesBegin(const char* file, int line);
extern "C" void AnnotateIgnoreWritesEnd(const char* file, int line);
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace cuda_host {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxPayload = 64;  // bytes one lane contributes to a warp collective
constexpr int kMaxUniform = 3;   // arguments a warp collective requires to be warp-uniform
constexpr size_t kSharedLimit = 48 << 10;   // static shared memory of one block on the GPU
constexpr size_t kSharedAlign = 128;        // of every shared array
constexpr size_t kSharedGuard = 4096;       // before and after every shared array
constexpr unsigned char kSharedFill = 0xff;  // shared memory at block start; the guards

// An error found by the layer: becomes a RuntimeError in Python.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <typename... A>
std::string format(const char* fmt, A... args) {
  char buffer[1024];
  std::snprintf(buffer, sizeof buffer, fmt, args...);
  return buffer;
}

// Where a thread waits: the collective and its call site.
struct Site {
  const char* what = "";
  const char* file = "";
  unsigned line = 0;
  const char* function = "";

  bool operator==(const Site& o) const {
    return line == o.line && std::strcmp(what, o.what) == 0 && std::strcmp(file, o.file) == 0;
  }
  std::string str() const {
    const char* slash = std::strrchr(file, '/');
    std::string fn = function;
    const size_t paren = fn.find('(');  // "void ns::f<...>(args)" -> "f"
    if (paren != std::string::npos) fn.resize(paren);
    const size_t space = fn.rfind(' ', fn.find('<'));
    if (space != std::string::npos) fn = fn.substr(space + 1);
    return format("%s at %s:%u (%s)", what, slash ? slash + 1 : file, line, fn.c_str());
  }
};

inline Site site(const char* what, const std::source_location& loc) {
  return Site{what, loc.file_name(), loc.line(), loc.function_name()};
}

enum class State { Ready, AtBarrier, AtWarp, Done };

// Under TSan, the layer's own bookkeeping on a lane (not kernel code) is invisible to race
// detection, so that it orders nothing between the threads it serves.
struct Bookkeeping {
#if defined(__SANITIZE_THREAD__)
  Bookkeeping() {
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
  }
  ~Bookkeeping() {
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
  }
#endif
};

struct Slot;

// One CUDA thread: a fiber with its own stack.
struct Lane {
  ucontext_t context{};
  void* stack = nullptr;  // mmap'ed, with a guard page below
  size_t stack_bytes = 0;
  void* tsan_fiber = nullptr;
  void* asan_fake_stack = nullptr;

  Slot* slot = nullptr;  // the block it belongs to
  uint3 thread_idx{};
  int rank = 0;  // linear thread index in the block
  State state = State::Done;
  Site site;
  unsigned mask = 0;
  unsigned char payload[kMaxPayload];
  int payload_bytes = 0;
  uint64_t uniform[kMaxUniform] = {};
  int uniform_count = 0;
  const char* uniform_names = "";
  int shared_declared = 0;  // DAAD_SHARED_ARRAY declarations passed in this block
  std::string error;
};

// A shared array of the block: where it lies in the arena.
struct SharedArray {
  const char* name;
  size_t offset, bytes;
};

// The shared memory of one slot: arrays between guards in one mapping, reset for each block.
class SharedArena {
 public:
  static constexpr size_t kCapacity = kSharedLimit + 16 * (kSharedGuard + kSharedAlign);

  SharedArena() {
    void* mem =
        mmap(nullptr, kCapacity, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) throw Error("cuda_host: cannot map a shared-memory arena");
    base_ = static_cast<unsigned char*>(mem);
  }
  ~SharedArena() {
#if defined(__SANITIZE_ADDRESS__)
    __asan_unpoison_memory_region(base_, kCapacity);
#endif
    munmap(base_, kCapacity);
  }
  SharedArena(const SharedArena&) = delete;
  SharedArena& operator=(const SharedArena&) = delete;

  // For a new block: no arrays, every byte 0xff and, under ASan, poisoned.
  void reset() {
#if defined(__SANITIZE_ADDRESS__)
    __asan_unpoison_memory_region(base_, kCapacity);
#endif
    std::memset(base_, kSharedFill, kCapacity);
#if defined(__SANITIZE_ADDRESS__)
    __asan_poison_memory_region(base_, kCapacity);
#endif
    arrays_.clear();
  }

  // The k-th array the block declares: made by the first thread that declares it, checked
  // against it by the others.
  unsigned char* declare(size_t k, const char* name, size_t bytes) {
    if (k < arrays_.size()) {
      const SharedArray& a = arrays_[k];
      if (a.bytes != bytes || std::strcmp(a.name, name) != 0)
        throw Error(format("shared array %zu is '%s' (%zu bytes) in this thread but '%s' (%zu "
                           "bytes) in another thread of the block", k, name, bytes, a.name,
                           a.bytes));
      return base_ + a.offset;
    }
    const size_t offset =
        (used_end() + kSharedGuard + kSharedAlign - 1) / kSharedAlign * kSharedAlign;
    size_t total = bytes;
    for (const SharedArray& a : arrays_) total += a.bytes;
    if (total > kSharedLimit || offset + bytes + kSharedGuard > kCapacity)
      throw Error(format("shared array '%s' (%zu bytes) brings the block's shared memory to %zu "
                         "bytes, more than the 48 KB a GPU allows statically", name, bytes, total));
    arrays_.push_back(SharedArray{name, offset, bytes});
#if defined(__SANITIZE_ADDRESS__)
    __asan_unpoison_memory_region(base_ + offset, bytes);
#endif
    return base_ + offset;
  }

  // The first array whose guard after it was written (outside ASan, which reports the write
  // itself), as "'name' (N bytes) ... byte +k", or "".
  std::string overflow() const {
#if !defined(__SANITIZE_ADDRESS__)
    for (const SharedArray& a : arrays_) {
      const unsigned char* end = base_ + a.offset + a.bytes;
      for (size_t i = 0; i < kSharedGuard; ++i)
        if (end[i] != kSharedFill)
          return format("shared array '%s' (%zu bytes) was written past its end (at byte %zu of "
                        "the %zu guard bytes after it)", a.name, a.bytes, i, kSharedGuard);
    }
#endif
    return "";
  }

 private:
  size_t used_end() const {
    return arrays_.empty() ? 0 : arrays_.back().offset + arrays_.back().bytes + kSharedGuard;
  }

  unsigned char* base_ = nullptr;
  std::vector<SharedArray> arrays_;
};

// A resident block: its threads, its shared memory, its barrier and its warps' exchanges.
struct Slot {
  std::vector<Lane> lanes;
  uint3 block_idx{};
  bool active = false;
  int runnable = 0;  // lanes in the ready list
  int barrier_generation = 0;
  SharedArena shared;
  std::vector<std::vector<unsigned char>> exchange;  // per warp: kWarpSize payload slots
  // TSan sync objects: the barrier (per generation parity) and the order of the blocks that run
  // one after the other in this slot.
  char barrier_sync[2] = {};
  char order_sync = 0;
};

// Calls a callable through a plain pointer (the kernel body of one launch).
struct Body {
  void* object = nullptr;
  void (*call)(void*) = nullptr;
  void operator()() const { call(object); }
};

inline std::string ranges(const std::vector<int>& ids) {  // "0-31, 64"
  std::string s;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (!s.empty()) s += ", ";
    s += j == i ? std::to_string(ids[i]) : std::to_string(ids[i]) + "-" + std::to_string(ids[j]);
    i = j + 1;
  }
  return s;
}

inline std::string kernel_name(const void* kernel) {
  Dl_info info{};
  if (dladdr(kernel, &info) == 0 || info.dli_sname == nullptr) return "<kernel>";
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> demangled(
      abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status), std::free);
  std::string name = status == 0 ? demangled.get() : info.dli_sname;
  const size_t paren = name.rfind('(');
  if (paren != std::string::npos) name.resize(paren);
  return name;
}

inline int resident_blocks() {
  static const int resident = [] {
    const char* env = std::getenv("DAAD_CUDA_HOST_RESIDENT");
    return env ? std::max(1, std::atoi(env)) : 4;
  }();
  return resident;
}

void lane_main();

// The state of the layer: one launch at a time (a mutex serialises launching threads); the
// launching thread is the scheduler of the fibers.
class Runtime {
 public:
  static Runtime& get() {
    static Runtime* runtime = new Runtime();  // never destroyed: fibers may still refer to it
    return *runtime;
  }

  Lane& lane() {
    if (current_ == nullptr) throw Error("cuda_host: device code called outside a kernel launch");
    return *current_;
  }
  dim3 block_dim() const { return block_dim_; }
  dim3 grid_dim() const { return grid_dim_; }

  template <typename F>
  void run_grid(const void* kernel, dim3 grid, dim3 block, F& body_fn) {
    std::lock_guard<std::mutex> lock(mutex_);
    const int threads = int(block.x * block.y * block.z);
    if (threads < 1 || threads > 1024 || block.z > 64)
      throw Error(format("cuda_host: invalid block (%u, %u, %u)", block.x, block.y, block.z));
    if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 || grid.z > 65535)
      throw Error(format("cuda_host: invalid grid (%u, %u, %u)", grid.x, grid.y, grid.z));
    kernel_ = kernel;
    body_ = Body{&body_fn, [](void* f) { (*static_cast<F*>(f))(); }};
    grid_dim_ = grid;
    block_dim_ = block;
    const int64_t blocks = int64_t(grid.x) * grid.y * grid.z;
    const int slots = int(std::min<int64_t>(resident_blocks(), blocks));
    if (slots_.size() < size_t(slots) || int(slots_[0]->lanes.size()) != threads)
      make_slots(slots, threads);
    watchdog_arm();
#if defined(__SANITIZE_THREAD__)
    __tsan_release(&launch_begin_);  // the launch's arguments and earlier launches -> every block
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);  // the scheduler's bookkeeping is not kernel code
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
#endif
    try {
      run_blocks(blocks, slots);
    } catch (...) {
      finish_launch();
      destroy_slots();  // threads of the failed block are stuck mid-kernel
      throw;
    }
    finish_launch();
  }

  // Blocks the calling lane until the scheduler releases it.
  void yield(Lane& me) {
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_start_switch_fiber(&me.asan_fake_stack, scheduler_stack_, scheduler_stack_bytes_);
#endif
#if defined(__SANITIZE_THREAD__)
    __tsan_switch_to_fiber(scheduler_fiber_, __tsan_switch_to_fiber_no_sync);
#endif
    swapcontext(&me.context, &scheduler_context_);
    entered(me);
  }

  // Called on a lane's stack each time it gets control.
  void entered(Lane& me) {
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_finish_switch_fiber(me.asan_fake_stack, &scheduler_stack_, &scheduler_stack_bytes_);
#else
    (void)me;
#endif
  }

  // The body of every lane: runs the kernel for each block it is given.
  [[noreturn]] void lane_loop() {
    for (;;) {
#if defined(__SANITIZE_THREAD__)
      __tsan_acquire(&launch_begin_);  // before reading any state of the launch
#endif
      Lane& me = lane();
#if defined(__SANITIZE_THREAD__)
      __tsan_acquire(&me.slot->order_sync);  // after the slot's previous block
#endif
      try {
        body_();
      } catch (const std::exception& e) {
        me.error = e.what();
      } catch (...) {
        me.error = "unknown exception";
      }
      me.state = State::Done;
#if defined(__SANITIZE_THREAD__)
      __tsan_release(&me.slot->order_sync);
      __tsan_release(&launch_end_);
#endif
      yield(me);
    }
  }

 private:
  Runtime() = default;

  void finish_launch() {
#if defined(__SANITIZE_THREAD__)
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
    __tsan_acquire(&launch_end_);  // every block -> the launching thread, later launches
#endif
    watchdog_disarm();
    current_ = nullptr;
  }

  static constexpr size_t kPage = 4096;
  static size_t stack_bytes() {
#if defined(__SANITIZE_ADDRESS__)
    return size_t(64) << 10;  // ASan's swapcontext clears the shadow of the whole stack each time
#elif defined(__SANITIZE_THREAD__)
    return size_t(512) << 10;
#else
    return size_t(128) << 10;
#endif
  }

  // The slots and their fibers, reused by every launch with this block size.
  void make_slots(int count, int threads) {
    destroy_slots();
    const size_t bytes = stack_bytes();
    for (int s = 0; s < count; ++s) {
      slots_.push_back(std::make_unique<Slot>());
      Slot& slot = *slots_.back();
      slot.lanes = std::vector<Lane>(threads);
      slot.exchange.assign((threads + kWarpSize - 1) / kWarpSize,
                           std::vector<unsigned char>(kWarpSize * kMaxPayload));
      for (Lane& lane : slot.lanes) {
        void* mem = mmap(nullptr, bytes + kPage, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (mem == MAP_FAILED) throw Error("cuda_host: cannot map a fiber stack");
        mprotect(mem, kPage, PROT_NONE);  // a stack overflow faults instead of corrupting memory
        lane.slot = &slot;
        lane.stack = static_cast<char*>(mem) + kPage;
        lane.stack_bytes = bytes;
        getcontext(&lane.context);
        lane.context.uc_stack.ss_sp = lane.stack;
        lane.context.uc_stack.ss_size = bytes;
        lane.context.uc_link = nullptr;
        makecontext(&lane.context, lane_main, 0);
#if defined(__SANITIZE_THREAD__)
        lane.tsan_fiber = __tsan_create_fiber(0);
#endif
      }
    }
  }

  void destroy_slots() {
    for (auto& slot : slots_) {
      for (Lane& lane : slot->lanes) {
#if defined(__SANITIZE_ADDRESS__)
        __asan_unpoison_memory_region(lane.stack, lane.stack_bytes);
#endif
#if defined(__SANITIZE_THREAD__)
        __tsan_destroy_fiber(lane.tsan_fiber);
#endif
        munmap(static_cast<char*>(lane.stack) - kPage, lane.stack_bytes + kPage);
      }
    }
    slots_.clear();
  }

  void resume(Lane& lane) {
    current_ = &lane;
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_start_switch_fiber(&scheduler_fake_stack_, lane.stack, lane.stack_bytes);
#endif
#if defined(__SANITIZE_THREAD__)
    scheduler_fiber_ = __tsan_get_current_fiber();
    __tsan_switch_to_fiber(lane.tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
    swapcontext(&scheduler_context_, &lane.context);
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_finish_switch_fiber(scheduler_fake_stack_, nullptr, nullptr);
#endif
    current_ = nullptr;
  }

  // Puts block ``linear`` of the grid into ``slot``: every thread ready, fresh shared memory.
  void start_block(Slot& slot, int64_t linear) {
    const unsigned gx = grid_dim_.x, gy = grid_dim_.y;
    slot.block_idx = uint3{unsigned(linear % gx), unsigned(linear / gx % gy),
                           unsigned(linear / (int64_t(gx) * gy))};
    slot.active = true;
    slot.shared.reset();
    for (int t = 0; t < int(slot.lanes.size()); ++t) {
      Lane& lane = slot.lanes[t];
      lane.rank = t;
      lane.thread_idx = uint3{t % block_dim_.x, (t / block_dim_.x) % block_dim_.y,
                              t / (block_dim_.x * block_dim_.y)};
      lane.state = State::Ready;
      lane.shared_declared = 0;
      lane.error.clear();
      ready_.push_back(&lane);
    }
    slot.runnable = int(slot.lanes.size());
  }

  // Runs the grid's blocks, ``slots`` at a time: a random ready thread of any resident block at
  // a time, until it waits or exits. A warp collective completes as soon as its last lane
  // arrives, so warps run ahead of each other as far as the barriers let them (a missing barrier
  // reads what other warps have not written yet), and so do the blocks.
  void run_blocks(int64_t blocks, int slots) {
    ready_.clear();
    int64_t next = 0;
    for (int s = 0; s < slots; ++s) start_block(*slots_[s], next++);
    int active = slots;
    uint64_t seed = 0x9e3779b97f4a7c15ull * ++launches_;
    while (active > 0) {
      seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
      const size_t pick = seed % ready_.size();
      Lane* lane = ready_[pick];
      ready_[pick] = ready_.back();
      ready_.pop_back();
      resume(*lane);
      Slot& slot = *lane->slot;
      if (!lane->error.empty())
        fail(slot, format("thread %d: %s", lane->rank, lane->error.c_str()));
      --slot.runnable;
      if (lane->state == State::AtWarp) release_warp(*lane);
      if (slot.runnable > 0) continue;
      if (std::all_of(slot.lanes.begin(), slot.lanes.end(),
                      [](const Lane& l) { return l.state == State::Done; })) {
        const std::string overflow = slot.shared.overflow();
        if (!overflow.empty()) fail(slot, overflow);
        if (next < blocks) {
          start_block(slot, next++);
        } else {
          slot.active = false;
          --active;
        }
      } else if (!release_barrier(slot)) {
        stuck(slot);
      }
    }
  }

  [[noreturn]] void fail(const Slot& slot, const std::string& message) {
    throw Error(format("cuda_host: %s, block (%u, %u, %u), %s", kernel_name(kernel_).c_str(),
                       slot.block_idx.x, slot.block_idx.y, slot.block_idx.z, message.c_str()));
  }

  // Completes the warp collective ``lane`` waits in if every lane of its mask has arrived there.
  void release_warp(const Lane& lane) {
    Slot& slot = *lane.slot;
    const int base = lane.rank / kWarpSize * kWarpSize;
    for (int l = 0; l < kWarpSize; ++l) {
      if (!(lane.mask >> l & 1u)) continue;
      const Lane& other = slot.lanes[base + l];
      if (other.state != State::AtWarp || !(other.site == lane.site) || other.mask != lane.mask)
        return;
    }
    unsigned char* exchange = slot.exchange[base / kWarpSize].data();
    for (int l = 0; l < kWarpSize; ++l) {
      if (!(lane.mask >> l & 1u)) continue;
      Lane& other = slot.lanes[base + l];
      for (int u = 0; u < lane.uniform_count; ++u)
        if (other.uniform[u] != lane.uniform[u])
          fail(slot, format("warp %d: %s needs the same %s on every lane; argument %d is 0x%llx "
                            "on lane %d but 0x%llx on lane %d",
                            base / kWarpSize, lane.site.str().c_str(), lane.uniform_names, u + 1,
                            (unsigned long long)lane.uniform[u], lane.rank - base,
                            (unsigned long long)other.uniform[u], l));
      if (other.payload_bytes > 0)
        std::memcpy(exchange + l * kMaxPayload, other.payload, other.payload_bytes);
      other.state = State::Ready;
      ready_.push_back(&other);
      ++slot.runnable;
    }
  }

  bool release_barrier(Slot& slot) {
    for (const Lane& lane : slot.lanes)
      if (lane.state != State::AtBarrier || !(lane.site == slot.lanes[0].site)) return false;
    ++slot.barrier_generation;
    for (Lane& lane : slot.lanes) {
      lane.state = State::Ready;
      ready_.push_back(&lane);
    }
    slot.runnable = int(slot.lanes.size());
    return true;
  }

  // No thread of the block can run and no barrier or collective can complete: report where each
  // thread is.
  [[noreturn]] void stuck(const Slot& slot) {
    std::map<std::string, std::vector<int>> where;
    bool exited = false, warp = false;
    for (const Lane& lane : slot.lanes) {
      std::string key;
      switch (lane.state) {
        case State::Done:
          key = "exited";
          exited = true;
          break;
        case State::AtWarp:
          key = "wait in " + lane.site.str() + format(" with mask 0x%08x", lane.mask);
          warp = true;
          break;
        default:
          key = "wait at " + lane.site.str();
      }
      where[key].push_back(lane.rank);
    }
    std::string message = warp ? "warp collective that not every lane of its mask reaches;"
                          : exited ? "deadlock: a barrier that exited threads never reach;"
                                   : "barrier divergence: threads wait at different barriers;";
    for (const auto& [key, ids] : where) message += " threads " + ranges(ids) + " " + key + ";";
    fail(slot, message);
  }

  // A launch that runs past the timeout (an endless loop) ends the process with a message.
  void watchdog_arm() {
    static const double timeout = [] {
      const char* env = std::getenv("DAAD_CUDA_HOST_TIMEOUT");
      return env ? std::atof(env) : 300.0;
    }();
    static std::once_flag started;
    std::call_once(started, [this] {
      std::thread([this] {
        for (;;) {
          std::this_thread::sleep_for(std::chrono::milliseconds(200));
          const double since = launch_started_.load();
          if (since > 0 && now() - since > timeout) {
            std::fprintf(stderr,
                         "cuda_host: %s did not finish within %.0f s (DAAD_CUDA_HOST_TIMEOUT): an "
                         "endless loop in the kernel?\n",
                         kernel_name(kernel_).c_str(), timeout);
            std::fflush(stderr);
            std::_Exit(124);
          }
        }
      }).detach();
    });
    launch_started_.store(now());
  }
  void watchdog_disarm() { launch_started_.store(0); }
  static double now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }

  std::mutex mutex_;
  const void* kernel_ = nullptr;
  Body body_;
  dim3 grid_dim_, block_dim_;
  std::vector<std::unique_ptr<Slot>> slots_;
  std::vector<Lane*> ready_;  // the threads of the resident blocks that can run
  Lane* current_ = nullptr;
  ucontext_t scheduler_context_{};
  void* scheduler_fiber_ = nullptr;
  void* scheduler_fake_stack_ = nullptr;
  const void* scheduler_stack_ = nullptr;
  size_t scheduler_stack_bytes_ = 0;
  // TSan sync objects: the launching thread -> every block, every block -> the launching thread.
  char launch_begin_ = 0, launch_end_ = 0;
  uint64_t launches_ = 0;
  std::atomic<double> launch_started_{0};
};

inline void lane_main() {
  Runtime& rt = Runtime::get();
  rt.entered(rt.lane());
  rt.lane_loop();
}

// Runs kernel(args...) on every thread of every block (csrc/cuda/launch.cuh).
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, A... args) {
  auto body = [&] { kernel(args...); };
  Runtime::get().run_grid(reinterpret_cast<const void*>(kernel), grid, block, body);
}

// The block's shared array ``name`` of ``count`` T (DAAD_SHARED_ARRAY).
template <typename T>
T* shared_array(size_t count, const char* name) {
  static_assert(alignof(T) <= kSharedAlign);
  Lane& me = Runtime::get().lane();
  [[maybe_unused]] const Bookkeeping quiet;
  unsigned char* array = me.slot->shared.declare(me.shared_declared++, name, count * sizeof(T));
  return reinterpret_cast<T*>(array);
}

#define DAAD_SHARED_ARRAY(T, name, count) T* const name = ::cuda_host::shared_array<T>(count, #name)

// ---------------------------------------------------------------------------------------------
// Warp collectives.

inline int lane_id(const Lane& lane) { return lane.rank % kWarpSize; }

// Waits until every lane of ``mask`` has reached this collective, checks that the arguments
// named in ``uniform`` agree, and returns the lanes' payloads (kMaxPayload bytes each).
inline const unsigned char* warp_collective(const Site& where, unsigned mask, const void* payload,
                                            int bytes, std::initializer_list<uint64_t> uniform = {},
                                            const char* uniform_names = "") {
  Runtime& rt = Runtime::get();
  Lane& me = rt.lane();
  const int warp = me.rank / kWarpSize, lane = lane_id(me);
  const int threads = int(rt.block_dim().x * rt.block_dim().y * rt.block_dim().z);
  const int present = std::min(kWarpSize, threads - warp * kWarpSize);
  if (!(mask >> lane & 1u))
    throw Error(format("%s: lane %d calls with mask 0x%08x, which leaves it out",
                       where.str().c_str(), lane, mask));
  if (present < kWarpSize && (mask >> present) != 0)
    throw Error(format("%s: mask 0x%08x names lanes beyond the block's last thread",
                       where.str().c_str(), mask));
  me.site = where;
  me.mask = mask;
  if (bytes > 0) std::memcpy(me.payload, payload, bytes);
  me.payload_bytes = bytes;
  me.uniform_count = int(uniform.size());
  std::copy(uniform.begin(), uniform.end(), me.uniform);
  me.uniform_names = uniform_names;
  me.state = State::AtWarp;
  rt.yield(me);
  return me.slot->exchange[warp].data();
}

template <typename T>
T shuffle(const char* what, unsigned mask, T value, int source, int width,
          const std::source_location& loc) {
  static_assert(sizeof(T) <= kMaxPayload && std::is_trivially_copyable_v<T>);
  const Site where = site(what, loc);
  if (width != kWarpSize)
    throw Error(where.str() + ": the host layer supports width = 32 only");
  const unsigned char* values = warp_collective(where, mask, &value, sizeof(T));
  if (source == -1) return value;  // out of range: the lane keeps its own value
  if (!(mask >> source & 1u))
    throw Error(format("%s: lane %d reads lane %d, which is not in mask 0x%08x",
                       where.str().c_str(), lane_id(Runtime::get().lane()), source, mask));
  T result;
  std::memcpy(&result, values + source * kMaxPayload, sizeof(T));
  return result;
}

// ---------------------------------------------------------------------------------------------
// __float_to_tf32 and the wmma fragments.

inline float round_tf32(float v) {  // cvt.rna.tf32.f32: 10 mantissa bits, ties away from zero
  if (!std::isfinite(v)) return v;
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits = (bits + 0x1000u) & 0xffffe000u;
  std::memcpy(&v, &bits, 4);
  return v;
}
inline float truncate_tf32(float v) {  // what the tensor cores read of a float operand
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits &= 0xffffe000u;
  std::memcpy(&v, &bits, 4);
  return v;
}

}  // namespace cuda_host

// ---------------------------------------------------------------------------------------------
// CUDA's names.

#define threadIdx (::cuda_host::Runtime::get().lane().thread_idx)
#define blockIdx (::cuda_host::Runtime::get().lane().slot->block_idx)
#define blockDim (::cuda_host::Runtime::get().block_dim())
#define gridDim (::cuda_host::Runtime::get().grid_dim())
constexpr int warpSize = cuda_host::kWarpSize;

// The multiprocessor count is what choose_split asks the runtime for (DAAD_CUDA_HOST_SMS, else
// an H100's 132).
namespace cuda_host {
inline cudaError_t device_attribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  const char* env = std::getenv("DAAD_CUDA_HOST_SMS");
  *value = env ? std::atoi(env) : 132;
  return cudaSuccess;
}
}  // namespace cuda_host
#define cudaDeviceGetAttribute ::cuda_host::device_attribute

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

inline void __syncthreads(std::source_location loc = std::source_location::current()) {
  cuda_host::Runtime& rt = cuda_host::Runtime::get();
  cuda_host::Lane& me = rt.lane();
  const int generation = me.slot->barrier_generation;
#if defined(__SANITIZE_THREAD__)
  __tsan_release(&me.slot->barrier_sync[generation & 1]);
#endif
  me.site = cuda_host::site("__syncthreads()", loc);
  me.state = cuda_host::State::AtBarrier;
  rt.yield(me);
#if defined(__SANITIZE_THREAD__)
  __tsan_acquire(&me.slot->barrier_sync[generation & 1]);
#else
  (void)generation;
#endif
}

// One atomic read-modify-write (std::atomic_ref: TSan sees an atomic, not a race).
template <typename T>
T atomicAdd(T* address, T value) {
  static_assert(std::is_arithmetic_v<T>, "cuda_host: atomicAdd of int, unsigned, float, double");
  return std::atomic_ref<T>(*address).fetch_add(value);
}

inline void __syncwarp(unsigned mask = cuda_host::kFullMask,
                       std::source_location loc = std::source_location::current()) {
  cuda_host::warp_collective(cuda_host::site("__syncwarp", loc), mask, nullptr, 0);
}

template <typename T>
T __shfl_sync(unsigned mask, T var, int src, int width = warpSize,
              std::source_location loc = std::source_location::current()) {
  const int lane = cuda_host::lane_id(cuda_host::Runtime::get().lane());
  return cuda_host::shuffle("__shfl_sync", mask, var, lane / width * width + src % width, width,
                            loc);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                  std::source_location loc = std::source_location::current()) {
  const int lane = cuda_host::lane_id(cuda_host::Runtime::get().lane());
  return cuda_host::shuffle("__shfl_xor_sync", mask, var, lane ^ lane_mask, width, loc);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                   std::source_location loc = std::source_location::current()) {
  const int lane = cuda_host::lane_id(cuda_host::Runtime::get().lane());
  const int source = lane % width + int(delta) < width ? lane + int(delta) : -1;
  return cuda_host::shuffle("__shfl_down_sync", mask, var, source, width, loc);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                 std::source_location loc = std::source_location::current()) {
  const int lane = cuda_host::lane_id(cuda_host::Runtime::get().lane());
  const int source = lane % width >= int(delta) ? lane - int(delta) : -1;
  return cuda_host::shuffle("__shfl_up_sync", mask, var, source, width, loc);
}

// ---------------------------------------------------------------------------------------------
// nvcuda::wmma: fragments of a warp, element e of the fragment's matrix (row-major) held by lane
// e % 32 as x[e / 32]. Code may not rely on that layout (the hardware's is unspecified), only on
// num_elements and element-wise operations.
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

inline float __float_to_tf32(float v) { return cuda_host::round_tf32(v); }

template <class T>
struct Storage {
  using type = T;
};
template <>
struct Storage<precision::tf32> {
  using type = float;
};

template <class Use, int M, int N, int K>
struct Shape;
template <int M, int N, int K>
struct Shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct Shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct Shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && (K == 16 || (K == 8 && (std::is_same_v<T, precision::tf32> ||
                                                              std::is_same_v<Use, accumulator>))),
                "cuda_host emulates the 16x16x16 (half, bf16) and 16x16x8 (tf32) shapes only");
  static_assert(std::is_same_v<Use, accumulator> == std::is_void_v<Layout>,
                "matrix_a / matrix_b fragments need a layout, accumulators none");
  using element_type = typename Storage<T>::type;
  using precision_type = T;
  using layout = Layout;
  static constexpr int rows = Shape<Use, M, N, K>::rows, cols = Shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols / cuda_host::kWarpSize;
  element_type x[num_elements];
};

template <class Frag>
void fill_fragment(Frag& f, const typename Frag::element_type& v) {
  for (int t = 0; t < Frag::num_elements; ++t) f.x[t] = v;
}

namespace detail {
// The checks of load_matrix_sync / store_matrix_sync, then the rendezvous of the warp.
inline void matrix_sync(const char* what, const void* ptr, unsigned ldm, size_t element_bytes,
                        int min_ldm, int layout, const std::source_location& loc) {
  const cuda_host::Site where = cuda_host::site(what, loc);
  if (ldm * element_bytes % 16 != 0)
    throw cuda_host::Error(cuda_host::format(
        "%s: ldm = %u elements (%zu bytes) is not a multiple of 16 bytes", where.str().c_str(),
        ldm, ldm * element_bytes));
  if (int(ldm) < min_ldm)
    throw cuda_host::Error(cuda_host::format("%s: ldm = %u is shorter than a fragment line (%d)",
                                             where.str().c_str(), ldm, min_ldm));
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0)
    throw cuda_host::Error(cuda_host::format("%s: pointer %p is not 256-bit aligned",
                                             where.str().c_str(), ptr));
  cuda_host::warp_collective(where, cuda_host::kFullMask, nullptr, 0,
                             {reinterpret_cast<uintptr_t>(ptr), ldm, uint64_t(layout)},
                             "pointer, ldm and layout");
}
}  // namespace detail

template <class Use, int M, int N, int K, class T, class Layout, class E>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const E* ptr, unsigned ldm,
                      std::source_location loc = std::source_location::current()) {
  using F = fragment<Use, M, N, K, T, Layout>;
  static_assert(!std::is_void_v<Layout>, "accumulator loads need a layout_t (not emulated)");
  static_assert(std::is_same_v<std::remove_cv_t<E>, typename F::element_type>,
                "the pointer's type must be the fragment's element type");
  constexpr bool kRowMajor = std::is_same_v<Layout, row_major>;
  detail::matrix_sync("wmma::load_matrix_sync", ptr, ldm, sizeof(E), kRowMajor ? F::cols : F::rows,
                      kRowMajor, loc);
  const int lane = cuda_host::lane_id(cuda_host::Runtime::get().lane());
  for (int t = 0; t < F::num_elements; ++t) {
    const int e = lane + cuda_host::kWarpSize * t, r = e / F::cols, c = e % F::cols;
    f.x[t] = kRowMajor ? ptr[size_t(r) * ldm + c] : ptr[size_t(c) * ldm + r];
  }
}

template <int M, int N, int K>
void store_matrix_sync(float* ptr, const fragment<accumulator, M, N, K, float>& f, unsigned ldm,
                       layout_t layout,
                       std::source_location loc = std::source_location::current()) {
  using F = fragment<accumulator, M, N, K, float>;
  const bool row = layout == mem_row_major;
  detail::matrix_sync("wmma::store_matrix_sync", ptr, ldm, sizeof(float), row ? F::cols : F::rows,
                      int(layout), loc);
  const int lane = cuda_host::lane_id(cuda_host::Runtime::get().lane());
  for (int t = 0; t < F::num_elements; ++t) {
    const int e = lane + cuda_host::kWarpSize * t, r = e / F::cols, c = e % F::cols;
    (row ? ptr[size_t(r) * ldm + c] : ptr[size_t(c) * ldm + r]) = f.x[t];
  }
}

namespace detail {
inline float operand(float v, bool tf32) { return tf32 ? cuda_host::truncate_tf32(v) : v; }
inline float operand(__half v, bool) { return __half2float(v); }
inline float operand(__nv_bfloat16 v, bool) { return __bfloat162float(v); }
}  // namespace detail

// d = a @ b + c over the warp, in float: every lane contributes its a and b elements, then
// computes its own elements of d (which may be c itself).
template <int M, int N, int K, class T, class LA, class LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b,
              const fragment<accumulator, M, N, K, float>& c,
              std::source_location loc = std::source_location::current()) {
  using A = fragment<matrix_a, M, N, K, T, LA>;
  using B = fragment<matrix_b, M, N, K, T, LB>;
  using C = fragment<accumulator, M, N, K, float>;
  static_assert(sizeof(a.x) + sizeof(b.x) <= cuda_host::kMaxPayload);
  constexpr bool kTf32 = std::is_same_v<T, precision::tf32>;
  unsigned char mine[sizeof(a.x) + sizeof(b.x)];
  std::memcpy(mine, a.x, sizeof(a.x));
  std::memcpy(mine + sizeof(a.x), b.x, sizeof(b.x));
  const unsigned char* all = cuda_host::warp_collective(cuda_host::site("wmma::mma_sync", loc),
                                                        cuda_host::kFullMask, mine, sizeof mine);
  using Element = typename A::element_type;
  const auto element = [&](int matrix, int e) {  // element e of a (matrix 0) or b (matrix 1)
    Element v;
    const int lane = e % cuda_host::kWarpSize, slot = e / cuda_host::kWarpSize;
    std::memcpy(&v, all + lane * cuda_host::kMaxPayload + matrix * sizeof(a.x) + slot * sizeof v,
                sizeof v);
    return detail::operand(v, kTf32);
  };
  const int lane = cuda_host::lane_id(cuda_host::Runtime::get().lane());
  for (int t = 0; t < C::num_elements; ++t) {
    const int e = lane + cuda_host::kWarpSize * t, m = e / C::cols, n = e % C::cols;
    float acc = c.x[t];
    for (int k = 0; k < K; ++k) acc = std::fmaf(element(0, m * A::cols + k), element(1, k * B::cols + n), acc);
    d.x[t] = acc;
  }
}

}  // namespace wmma
}  // namespace nvcuda
