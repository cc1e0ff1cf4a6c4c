// Runs the CUDA kernels of runtime/plugins/moe_kernels.cu on the CPU, so CI (no GPU) can check their indexing,
// barriers and warp reductions against a NumPy reference. Covers exactly the subset those kernels use: 1-D blocks
// of whole warps, static __shared__ arrays, __syncthreads, __shfl_xor_sync, atomicAdd(int) and nvcuda::wmma
// 16x16x16 fp16 fragments.
//
// Model: the blocks of a grid run one after another; the threads of a block are fibers (ucontext) on one OS thread,
// each running until it reaches a barrier (__syncthreads, or a shuffle's warp barrier) or returns. A thread that
// reads shared memory without the barrier that should precede it therefore sees stale data, deterministically.
// __shared__ becomes `static`, block-shared because only one block runs at a time. Exited threads no longer count
// at barriers (as on the GPU since Volta). Timing and memory-model subtleties are not modelled.
//
// Use: g++ -std=c++17 -include cuda_cpu_emulation.h -x c++ moe_kernels.cu ...
#pragma once

#define MOE_CPU_EMULATION 1
// Defined before the CUDA headers so that their host fallbacks (attributes g++ ignores) do not apply.
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __launch_bounds__(...)

#include <cuda_runtime_api.h>
#include <cuda_fp16.h>
#include <ucontext.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

// Set by the scheduler each time it resumes a thread.
inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace moe_emu {

enum class Wait { kRunnable, kBlock, kWarp, kDone };

struct Fiber {
    ucontext_t ctx;
    std::unique_ptr<char[]> stack;  // uninitialised: untouched pages cost nothing
    Wait wait = Wait::kRunnable;
};

struct Scheduler {
    static constexpr size_t kStackBytes = 256 * 1024;
    ucontext_t main;
    std::vector<Fiber> fibers;
    std::vector<uint64_t> lanes;  // shuffle exchange slots, one per thread
    void (*body)(void*) = nullptr;
    void* bodyArg = nullptr;
    int current = -1;
    std::string error;
};

inline Scheduler* gSched = nullptr;

inline void trampoline() {
    Scheduler& s = *gSched;
    try {
        s.body(s.bodyArg);
    } catch (const std::exception& e) {
        s.error = e.what();
    }
    s.fibers[s.current].wait = Wait::kDone;  // returning resumes uc_link, the scheduler
}

inline void yieldAt(Wait w) {
    Scheduler& s = *gSched;
    Fiber& f = s.fibers[s.current];
    f.wait = w;
    swapcontext(&f.ctx, &s.main);
}

// Releases the barrier(s) every live waiter has reached: whole warps first, then the block. False = deadlock.
inline bool releaseBarriers(Scheduler& s) {
    bool released = false;
    const size_t n = s.fibers.size();
    for (size_t w0 = 0; w0 < n; w0 += 32) {
        bool live = false, all = true;
        for (size_t t = w0; t < w0 + 32; ++t) {
            if (s.fibers[t].wait == Wait::kDone) continue;
            live = true;
            all &= s.fibers[t].wait == Wait::kWarp;
        }
        if (!live || !all) continue;
        for (size_t t = w0; t < w0 + 32; ++t) {
            if (s.fibers[t].wait == Wait::kWarp) s.fibers[t].wait = Wait::kRunnable;
        }
        released = true;
    }
    if (released) return true;
    bool live = false, all = true;
    for (const Fiber& f : s.fibers) {
        if (f.wait == Wait::kDone) continue;
        live = true;
        all &= f.wait == Wait::kBlock;
    }
    if (!live || !all) return false;
    for (Fiber& f : s.fibers) f.wait = Wait::kRunnable;
    return true;
}

inline void runBlock(Scheduler& s, dim3 grid, dim3 block, uint3 idx) {
    for (Fiber& f : s.fibers) {
        f.wait = Wait::kRunnable;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.get();
        f.ctx.uc_stack.ss_size = Scheduler::kStackBytes;
        f.ctx.uc_link = &s.main;
        makecontext(&f.ctx, trampoline, 0);
    }
    for (;;) {
        for (size_t t = 0; t < s.fibers.size(); ++t) {
            if (s.fibers[t].wait != Wait::kRunnable) continue;
            threadIdx = uint3{static_cast<unsigned>(t), 0, 0};
            blockIdx = idx;
            blockDim = block;
            gridDim = grid;
            s.current = static_cast<int>(t);
            swapcontext(&s.main, &s.fibers[t].ctx);
        }
        if (!s.error.empty()) throw std::runtime_error("emulated kernel: " + s.error);
        bool done = true;
        for (const Fiber& f : s.fibers) done &= f.wait == Wait::kDone;
        if (done) return;
        if (!releaseBarriers(s)) throw std::runtime_error("emulated kernel: threads wait at different barriers");
    }
}

template <typename Body>
void launch(dim3 grid, dim3 block, Body&& body) {
    const unsigned threads = block.x * block.y * block.z;
    if (block.y != 1 || block.z != 1 || threads % 32 != 0) {
        throw std::invalid_argument("emulation: 1-D blocks of whole warps only");
    }
    Scheduler s;
    s.fibers.resize(threads);
    for (Fiber& f : s.fibers) f.stack.reset(new char[Scheduler::kStackBytes]);
    s.lanes.resize(threads);
    s.body = [](void* b) { (*static_cast<std::remove_reference_t<Body>*>(b))(); };
    s.bodyArg = &body;
    gSched = &s;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) runBlock(s, grid, block, uint3{bx, by, bz});
    gSched = nullptr;
}

}  // namespace moe_emu

inline void __syncthreads() { moe_emu::yieldAt(moe_emu::Wait::kBlock); }

template <typename T>
inline T __shfl_xor_sync(unsigned /*mask: full warps only*/, T value, int laneMask) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of at most 8 bytes");
    std::vector<uint64_t>& lanes = moe_emu::gSched->lanes;
    const unsigned t = threadIdx.x;
    std::memcpy(&lanes[t], &value, sizeof(T));
    moe_emu::yieldAt(moe_emu::Wait::kWarp);
    T out;
    std::memcpy(&out, &lanes[(t & ~31u) | ((t & 31u) ^ static_cast<unsigned>(laneMask))], sizeof(T));
    moe_emu::yieldAt(moe_emu::Wait::kWarp);  // nobody overwrites a slot before the whole warp has read
    return out;
}

inline int atomicAdd(int* address, int value) {
    const int old = *address;  // one OS thread: plain read-modify-write is atomic here
    *address = old + value;
    return old;
}

// nvcuda::wmma for 16x16x16 fp16 -> fp32 tiles. The real fragment layout is opaque, so here every lane simply
// holds the whole tile: load/store/mma are warp-collective on the GPU and redundant (but identical) per lane here.
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    static constexpr int num_elements = 16 * 16;
    T x[num_elements];
};

template <typename Use, typename T, typename Layout>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, float v) {
    for (auto& e : f.x) e = static_cast<T>(v);
}

// element (i, k) of A row-major at p[i*ldm + k]; element (k, j) of B col-major at p[j*ldm + k]: both are stored
// as x[i*16 + k] / x[j*16 + k], i.e. the index pairs with its contiguous dimension last.
template <typename Use, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, __half, Layout>& f, const __half* p, unsigned ldm) {
    static_assert(std::is_same_v<Use, matrix_a> == std::is_same_v<Layout, row_major>,
                  "emulated: matrix_a row_major and matrix_b col_major only");
    if ((reinterpret_cast<uintptr_t>(p) & 31u) != 0 || ldm % 8 != 0) throw std::invalid_argument("wmma load alignment");
    for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = p[r * ldm + c];
}

inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
                     const fragment<matrix_a, 16, 16, 16, __half, row_major>& a,
                     const fragment<matrix_b, 16, 16, 16, __half, col_major>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
    float out[256];
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 16; ++j) {
            float s = c.x[i * 16 + j];
            for (int k = 0; k < 16; ++k) s += __half2float(a.x[i * 16 + k]) * __half2float(b.x[j * 16 + k]);
            out[i * 16 + j] = s;
        }
    std::memcpy(d.x, out, sizeof(out));
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
    if (layout != mem_row_major || (reinterpret_cast<uintptr_t>(p) & 31u) != 0 || ldm % 4 != 0) {
        throw std::invalid_argument("emulated wmma store: row-major, 32-byte aligned, ldm % 4 == 0");
    }
    // Every lane writes the same values (redundant, harmless).
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 16; ++j) p[i * ldm + j] = f.x[i * 16 + j];
}

}  // namespace wmma
}  // namespace nvcuda
