// Grouped GEMM kernels of the MoE layer (private to moe_kernels.cu). Every kernel computes, for the rows of
// expert e in the expert-sorted buffer A (rows expertOffsets[e] .. expertOffsets[e+1]):
//   C[r, n] = act(sum_k A[r, k] * W[e, n, k] + bias[e, n])        SwiGLU: silu(gate row n) * (up row N + n)
// reading the offsets on the device. Shapes: A [S, Kd], W [E, Nw, Kd], bias [E, Nw], C [S, N]. INT4 experts
// (moe_int4.cuh) replace W by packed codes + group scales; they run the tensor-core kernel here and the decode
// kernel of moe_int4_decode.cuh.
#pragma once

#include <cuda_fp16.h>
#include <mma.h>

#include <cstddef>

#include "moe_device.cuh"
#include "moe_int4.cuh"

namespace moe_llava {
namespace detail {

constexpr int kTileM = 64;  // rows per tile of the tiled kernels; the permutation kernel scans tiles with it

// SwiGLU fuses both halves of fc1: output column n reads weight rows n (gate) and N + n (up), so C is [S, I].
template <typename IO>
struct GemmArgs {
    const IO* A;     // [S, Kd]   expert-sorted rows
    const IO* W;     // [E, Nw, Kd]; unused (nullptr) with INT4 experts
    const IO* bias;  // [E, Nw] or nullptr
    IO* C;           // [S, N]
    const int* expertOffsets;  // [E+1]
    const int* tileOffsets;    // [E+1]
    const int* activeExperts;  // [E]
    const int* numActive;      // [1]
    int E, N, Kd, Nw;          // Nw = weight rows per expert: F for fc1, H for fc2
    Int4Weights q{};           // INT4 experts (q.codes != nullptr) instead of W
};

template <int ACT, typename IO>
__device__ __forceinline__ float epilogue(const GemmArgs<IO>& a, int e, int n, float g, float u) {
    if (a.bias != nullptr) {
        const IO* b = a.bias + static_cast<size_t>(e) * a.Nw;
        g += toFloat(b[n]);
        if constexpr (ACT == kActSwiGLU) u += toFloat(b[a.N + n]);
    }
    return activate<ACT>(g, u);
}

// Skinny kernel (decode): one warp per (active expert, output column). Lanes stride over Kd with 128-bit loads of
// the weight row(s), which are read exactly once per chunk of MAXR rows; the expert's few rows come from L1/L2.
constexpr int kSkinnyWarps = 8;

template <typename IO, int ACT, int MAXR>
__global__ void __launch_bounds__(kSkinnyWarps * 32)
skinnyGemmKernel(GemmArgs<IO> a) {
    constexpr bool kGated = ACT == kActSwiGLU;
    constexpr int VEC = 16 / sizeof(IO);  // one 128-bit load; needs Kd % VEC == 0 and aligned rows
    const int j = blockIdx.y;
    if (j >= *a.numActive) return;
    const int n = blockIdx.x * kSkinnyWarps + (threadIdx.x >> 5);
    if (n >= a.N) return;  // warp-uniform; no block-level barrier in this kernel
    const int lane = threadIdx.x & 31;
    const int e = a.activeExperts[j];
    const int rowBegin = a.expertOffsets[e];
    const int rowEnd = a.expertOffsets[e + 1];
    const IO* wGate = a.W + (static_cast<size_t>(e) * a.Nw + n) * a.Kd;
    const IO* wUp = wGate + static_cast<size_t>(a.N) * a.Kd;  // only dereferenced when gated

    for (int r0 = rowBegin; r0 < rowEnd; r0 += MAXR) {
        const int rows = rowEnd - r0 < MAXR ? rowEnd - r0 : MAXR;
        float accG[MAXR], accU[MAXR];
#pragma unroll
        for (int r = 0; r < MAXR; ++r) accG[r] = accU[r] = 0.0f;

        auto step = [&](int k) {  // one 128-bit chunk of the weight row(s) against every row of the chunk
            float wg[VEC], wu[VEC];
            loadVec<VEC>(wGate + k, wg);
            if constexpr (kGated) loadVec<VEC>(wUp + k, wu);
#pragma unroll
            for (int r = 0; r < MAXR; ++r) {
                if (r < rows) {
                    float x[VEC];
                    loadVec<VEC>(a.A + static_cast<size_t>(r0 + r) * a.Kd + k, x);
#pragma unroll
                    for (int v = 0; v < VEC; ++v) {
                        accG[r] += x[v] * wg[v];
                        if constexpr (kGated) accU[r] += x[v] * wu[v];
                    }
                }
            }
        };
        if constexpr (MAXR == 1) {
            // T = 1 decode is bandwidth-bound: unrolling keeps several weight loads in flight per lane.
#pragma unroll 4
            for (int k = lane * VEC; k < a.Kd; k += 32 * VEC) step(k);
        } else {
            for (int k = lane * VEC; k < a.Kd; k += 32 * VEC) step(k);  // MAXR rows give the parallelism
        }
#pragma unroll
        for (int r = 0; r < MAXR; ++r) {
            if (r < rows) {  // rows is warp-uniform, so every lane joins the shuffles
                const float g = warpSum(accG[r]);
                const float u = kGated ? warpSum(accU[r]) : 0.0f;
                if (lane == 0) storeIO(a.C + static_cast<size_t>(r0 + r) * a.N + n, epilogue<ACT>(a, e, n, g, u));
            }
        }
    }
}

// Tiled kernels (prefill): blockIdx.x walks the 64-row tiles of all experts back to back (tileOffsets), blockIdx.y
// the 64-column tiles. The expert of a row tile: e with tileOffsets[e] <= tile < tileOffsets[e+1].
__device__ __forceinline__ int expertOfTile(const int* tileOffsets, int E, int tile) {
    int lo = 0, hi = E;  // invariant: tileOffsets[lo] <= tile < tileOffsets[hi]
    while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (tileOffsets[mid] <= tile) lo = mid; else hi = mid;
    }
    return lo;
}

// SIMT tiled kernel (fp32, or fp16 rows the tensor-core kernel cannot take): 64x64 output tile per block, 256
// threads x (4x4) fp32 accumulators, K-steps of 32 through shared memory.
constexpr int kTileN = 64;
constexpr int kTileK = 32;
constexpr int kTiledThreads = 256;

// The rows and columns one tiled-kernel block owns: rows [rowBegin, rowEnd) of expert e, columns n0.. .
struct TileWork {
    int e, rowBegin, rowEnd, n0;
};

template <typename IO>
__device__ __forceinline__ TileWork tileWork(const GemmArgs<IO>& a, int tile) {
    const int e = expertOfTile(a.tileOffsets, a.E, tile);
    return {e, a.expertOffsets[e] + (tile - a.tileOffsets[e]) * kTileM, a.expertOffsets[e + 1],
            static_cast<int>(blockIdx.y) * kTileN};
}

template <typename IO, int ACT>
__global__ void __launch_bounds__(kTiledThreads)
tiledGemmKernel(GemmArgs<IO> a) {
    constexpr bool kGated = ACT == kActSwiGLU;
    const int tile = blockIdx.x;
    if (tile >= a.tileOffsets[a.E]) return;  // block-uniform, before any barrier
    const auto [e, rowBegin, rowEnd, n0] = tileWork(a, tile);
    const IO* W = a.W + static_cast<size_t>(e) * a.Nw * a.Kd;

    // k-major tiles; the +1 pad keeps the transposed stores conflict-free.
    __shared__ float As[kTileK][kTileM + 1];
    __shared__ float Bs[kTileK][kTileN + 1];
    __shared__ float Us[kGated ? kTileK : 1][kGated ? kTileN + 1 : 1];

    const int tid = threadIdx.x;
    const int tx = tid % 16, ty = tid / 16;  // thread owns rows ty + 16i, columns tx + 16j
    float acc[4][4] = {};
    float accU[4][4] = {};

    for (int k0 = 0; k0 < a.Kd; k0 += kTileK) {
        for (int i = tid; i < kTileM * kTileK; i += kTiledThreads) {
            const int m = i / kTileK, k = i % kTileK;  // consecutive threads read consecutive k
            const int row = rowBegin + m, kk = k0 + k;
            As[k][m] = (row < rowEnd && kk < a.Kd) ? toFloat(a.A[static_cast<size_t>(row) * a.Kd + kk]) : 0.0f;
        }
        for (int i = tid; i < kTileN * kTileK; i += kTiledThreads) {
            const int c = i / kTileK, k = i % kTileK;
            const int col = n0 + c, kk = k0 + k;
            const bool ok = col < a.N && kk < a.Kd;
            Bs[k][c] = ok ? toFloat(W[static_cast<size_t>(col) * a.Kd + kk]) : 0.0f;
            if constexpr (kGated) Us[k][c] = ok ? toFloat(W[static_cast<size_t>(a.N + col) * a.Kd + kk]) : 0.0f;
        }
        __syncthreads();
#pragma unroll 8
        for (int k = 0; k < kTileK; ++k) {
            float av[4], bv[4], uv[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) av[i] = As[k][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                bv[j] = Bs[k][tx + 16 * j];
                if constexpr (kGated) uv[j] = Us[k][tx + 16 * j];
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    acc[i][j] += av[i] * bv[j];
                    if constexpr (kGated) accU[i][j] += av[i] * uv[j];
                }
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int row = rowBegin + ty + 16 * i;
        if (row >= rowEnd) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int col = n0 + tx + 16 * j;
            if (col >= a.N) continue;
            storeIO(a.C + static_cast<size_t>(row) * a.N + col, epilogue<ACT>(a, e, col, acc[i][j], accU[i][j]));
        }
    }
}

// Tensor-core tiled kernel (fp16): the same 64x64 tiles, 4 warps each owning a 32x32 quarter as 2x2 WMMA 16x16x16
// fragments (fp16 products, fp32 accumulation). Operands are staged in shared memory with 16-byte loads, so it needs
// Kd % 8 == 0 and 16-byte aligned A and W; the accumulators go back through shared memory for bias + activation.
constexpr int kWmmaThreads = 128;
constexpr int kWmmaK = 32;
constexpr int kWmmaLd = kWmmaK + 8;   // halves per staged row: keeps fragment pointers 32-byte aligned
constexpr int kWmmaLdc = kTileN + 4;  // floats per output row in shared memory

template <bool kGated>
struct WmmaStage {
    __half a[kTileM][kWmmaLd];                   // A rows of this tile, k-contiguous
    __half b[kTileN][kWmmaLd];                   // weight rows (= B columns), k-contiguous
    __half u[kGated ? kTileN : 1][kWmmaLd];      // SwiGLU up-projection rows
};

template <bool kGated>
struct WmmaOut {
    float c[kTileM][kWmmaLdc];
    float u[kGated ? kTileM : 1][kWmmaLdc];
};

template <bool kGated>
union WmmaSmem {  // the staged operands are dead once the accumulators are written out
    WmmaStage<kGated> stage;
    WmmaOut<kGated> out;
};

// Copies rows [r0, r0 + 64) x k-chunk [k0, k0 + 32) of a [rows, Kd] fp16 matrix into dst, zero-filling past
// rowEnd and Kd (Kd % 8 == 0, so each 8-element chunk is wholly in or out).
__device__ __forceinline__ void stageRows(__half (*dst)[kWmmaLd], const __half* src, int r0, int rowEnd, int k0,
                                          int Kd) {
    for (int i = threadIdx.x; i < kTileM * (kWmmaK / 8); i += kWmmaThreads) {
        const int r = i / (kWmmaK / 8), c = (i % (kWmmaK / 8)) * 8;
        const int row = r0 + r, k = k0 + c;
        uint4 v{0, 0, 0, 0};
        if (row < rowEnd && k < Kd) v = *reinterpret_cast<const uint4*>(src + static_cast<size_t>(row) * Kd + k);
        *reinterpret_cast<uint4*>(&dst[r][c]) = v;
    }
}

// INT4 (kInt4): the weight tile is dequantised while staging (stageInt4Rows), so each expert's codes are read once
// per 64-row tile at a quarter of the fp16 bytes and no dequantised copy exists outside shared memory. Kd % 32 == 0.
template <int ACT, bool kInt4 = false>
__global__ void __launch_bounds__(kWmmaThreads)
wmmaGemmKernel(GemmArgs<__half> a) {
    namespace wmma = nvcuda::wmma;
    constexpr bool kGated = ACT == kActSwiGLU;
    const int tile = blockIdx.x;
    if (tile >= a.tileOffsets[a.E]) return;  // block-uniform, before any barrier
    const auto [e, rowBegin, rowEnd, n0] = tileWork(a, tile);
    const __half* W = kInt4 ? nullptr : a.W + static_cast<size_t>(e) * a.Nw * a.Kd;
    const size_t expertRow = static_cast<size_t>(e) * a.Nw;  // first weight row of expert e
    __shared__ __align__(128) WmmaSmem<kGated> sm;

    const int warp = threadIdx.x >> 5;
    const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;  // this warp's quarter of the tile
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2], accU[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            wmma::fill_fragment(acc[i][j], 0.0f);
            if constexpr (kGated) wmma::fill_fragment(accU[i][j], 0.0f);
        }
    }

    for (int k0 = 0; k0 < a.Kd; k0 += kWmmaK) {
        stageRows(sm.stage.a, a.A, rowBegin, rowEnd, k0, a.Kd);
        if constexpr (kInt4) {
            stageInt4Rows<kTileN, kWmmaLd>(sm.stage.b, a.q, expertRow, n0, a.N, k0, a.Kd, kWmmaThreads);
            if constexpr (kGated) {
                stageInt4Rows<kTileN, kWmmaLd>(sm.stage.u, a.q, expertRow + a.N, n0, a.N, k0, a.Kd, kWmmaThreads);
            }
        } else {
            stageRows(sm.stage.b, W, n0, a.N, k0, a.Kd);  // weight rows n0.. (< N) are the B columns
            if constexpr (kGated) stageRows(sm.stage.u, W + static_cast<size_t>(a.N) * a.Kd, n0, a.N, k0, a.Kd);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kWmmaK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb[2], fu[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &sm.stage.a[wm + 16 * i][kk], kWmmaLd);
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                wmma::load_matrix_sync(fb[j], &sm.stage.b[wn + 16 * j][kk], kWmmaLd);
                if constexpr (kGated) wmma::load_matrix_sync(fu[j], &sm.stage.u[wn + 16 * j][kk], kWmmaLd);
            }
#pragma unroll
            for (int i = 0; i < 2; ++i) {
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
                    if constexpr (kGated) wmma::mma_sync(accU[i][j], fa[i], fu[j], accU[i][j]);
                }
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            wmma::store_matrix_sync(&sm.out.c[wm + 16 * i][wn + 16 * j], acc[i][j], kWmmaLdc, wmma::mem_row_major);
            if constexpr (kGated) {
                wmma::store_matrix_sync(&sm.out.u[wm + 16 * i][wn + 16 * j], accU[i][j], kWmmaLdc, wmma::mem_row_major);
            }
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < kTileM * kTileN; i += kWmmaThreads) {
        const int r = i / kTileN, c = i % kTileN;  // consecutive threads write consecutive columns
        const int row = rowBegin + r, col = n0 + c;
        if (row < rowEnd && col < a.N) {
            float u = 0.0f;
            if constexpr (kGated) u = sm.out.u[r][c];
            storeIO(a.C + static_cast<size_t>(row) * a.N + col, epilogue<ACT>(a, e, col, sm.out.c[r][c], u));
        }
    }
}

}  // namespace detail
}  // namespace moe_llava
