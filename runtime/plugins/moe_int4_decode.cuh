// Decode grouped GEMM for INT4 experts (private to moe_kernels.cu): the INT4 twin of skinnyGemmKernel.
//   C[r, n] = act(sum_k A[r, k] * w_e[n, k] + bias[e, n]),  w_e = (code - 8) * scale  (moe_int4.cuh)
// One warp per (active expert, output column). Each lane streams 16-byte loads of packed codes (32 weights, one
// group scale), unpacks them in registers and accumulates sum (code - 8) * x per load in fp32, scaling once per
// load: weights are never materialised in memory. A (fp16 activations) comes in 16-byte loads from L1/L2.
// Needs Kd % 32 == 0 and 16-byte aligned A and codes.
#pragma once

#include <cuda_fp16.h>

#include <cstddef>

#include "moe_device.cuh"
#include "moe_grouped_gemm.cuh"
#include "moe_int4.cuh"

namespace moe_llava {
namespace detail {

template <int ACT, int MAXR>
__global__ void __launch_bounds__(kSkinnyWarps * 32)
skinnyInt4GemmKernel(GemmArgs<__half> a) {
    constexpr bool kGated = ACT == kActSwiGLU;
    const int j = blockIdx.y;
    if (j >= *a.numActive) return;
    const int n = blockIdx.x * kSkinnyWarps + (threadIdx.x >> 5);
    if (n >= a.N) return;  // warp-uniform; no block-level barrier in this kernel
    const int lane = threadIdx.x & 31;
    const int e = a.activeExperts[j];
    const int rowBegin = a.expertOffsets[e];
    const int rowEnd = a.expertOffsets[e + 1];
    const size_t gateRow = static_cast<size_t>(e) * a.Nw + n;
    const size_t upRow = gateRow + a.N;  // only read when gated

    for (int r0 = rowBegin; r0 < rowEnd; r0 += MAXR) {
        const int rows = rowEnd - r0 < MAXR ? rowEnd - r0 : MAXR;
        float accG[MAXR], accU[MAXR];
#pragma unroll
        for (int r = 0; r < MAXR; ++r) accG[r] = accU[r] = 0.0f;

        auto step = [&](int k) {  // 32 weights of the row(s) at k against every row of the chunk
            const uint4 cg = loadInt4Codes(a.q, gateRow, a.Kd, k);
            const float sg = loadInt4Scale(a.q, gateRow, a.Kd, k);
            uint4 cu{0, 0, 0, 0};
            float su = 0.0f;
            if constexpr (kGated) {
                cu = loadInt4Codes(a.q, upRow, a.Kd, k);
                su = loadInt4Scale(a.q, upRow, a.Kd, k);
            }
            const uint32_t gw[4] = {cg.x, cg.y, cg.z, cg.w}, uw[4] = {cu.x, cu.y, cu.z, cu.w};
            float dotG[MAXR], dotU[MAXR];
#pragma unroll
            for (int r = 0; r < MAXR; ++r) dotG[r] = dotU[r] = 0.0f;
#pragma unroll
            for (int w = 0; w < 4; ++w) {
                float wg[8], wu[8];
                unpackInt4(gw[w], wg);
                if constexpr (kGated) unpackInt4(uw[w], wu);
#pragma unroll
                for (int r = 0; r < MAXR; ++r) {
                    if (r < rows) {
                        float x[8];
                        loadVec<8>(a.A + static_cast<size_t>(r0 + r) * a.Kd + k + 8 * w, x);
#pragma unroll
                        for (int v = 0; v < 8; ++v) {
                            dotG[r] += x[v] * wg[v];
                            if constexpr (kGated) dotU[r] += x[v] * wu[v];
                        }
                    }
                }
            }
#pragma unroll
            for (int r = 0; r < MAXR; ++r) {
                accG[r] += sg * dotG[r];
                if constexpr (kGated) accU[r] += su * dotU[r];
            }
        };
        if constexpr (MAXR == 1) {
            // T = 1 is bandwidth-bound: unrolling keeps several 16-byte code loads in flight per lane.
#pragma unroll 2
            for (int k = lane * kInt4PerLoad; k < a.Kd; k += 32 * kInt4PerLoad) step(k);
        } else {
            for (int k = lane * kInt4PerLoad; k < a.Kd; k += 32 * kInt4PerLoad) step(k);
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

}  // namespace detail
}  // namespace moe_llava
