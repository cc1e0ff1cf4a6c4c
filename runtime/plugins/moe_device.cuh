// Device helpers shared by the MoE kernels (private to moe_kernels.cu): IO <-> fp32 conversion, 128-bit vector
// loads, warp reductions and the expert activations. IO = fp16 (__half) or fp32.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cmath>

namespace moe_llava {
namespace detail {

__device__ __forceinline__ float toFloat(float x) { return x; }
__device__ __forceinline__ float toFloat(__half x) { return __half2float(x); }

__device__ __forceinline__ void storeIO(float* p, float v) { *p = v; }
__device__ __forceinline__ void storeIO(__half* p, float v) { *p = __float2half(v); }

// 8 fp16 or 4 fp32 consecutive elements (one 128-bit load from a 16-byte aligned address) -> fp32.
template <int VEC>
__device__ __forceinline__ void loadVec(const float* p, float (&out)[VEC]) {
    static_assert(VEC == 4, "fp32: 4 per 128-bit load");
    const float4 v = *reinterpret_cast<const float4*>(p);
    out[0] = v.x;
    out[1] = v.y;
    out[2] = v.z;
    out[3] = v.w;
}

template <int VEC>
__device__ __forceinline__ void loadVec(const __half* p, float (&out)[VEC]) {
    static_assert(VEC == 8, "fp16: 8 per 128-bit load");
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __half2* h2 = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = __half22float2(h2[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}

__device__ __forceinline__ float warpSum(float v) {
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
    return v;
}

__device__ __forceinline__ float warpMax(float v) {
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, m));
    return v;
}

// (prob, expert) all-reduce: higher prob wins, equal probs -> lower expert index (a total order, so every lane
// ends with the same answer).
__device__ __forceinline__ void warpArgMax(float& p, int& e) {
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) {
        const float op = __shfl_xor_sync(0xffffffffu, p, m);
        const int oe = __shfl_xor_sync(0xffffffffu, e, m);
        if (op > p || (op == p && oe < e)) {
            p = op;
            e = oe;
        }
    }
}

// Activation ids for the GEMM epilogue; kNone is fc2 (bias only).
enum Act : int { kActNone = -1, kActSwiGLU = 0, kActGeluTanh = 1, kActGeluErf = 2 };

// g: fc1 gate (or only) projection incl. bias; u: up projection incl. bias (SwiGLU only).
template <int ACT>
__device__ __forceinline__ float activate(float g, float u) {
    if constexpr (ACT == kActSwiGLU) {
        return g / (1.0f + expf(-g)) * u;  // silu(gate) * up
    } else if constexpr (ACT == kActGeluTanh) {
        const float kSqrt2OverPi = 0.7978845608028654f;  // HF "gelu_new"
        return 0.5f * g * (1.0f + tanhf(kSqrt2OverPi * (g + 0.044715f * g * g * g)));
    } else if constexpr (ACT == kActGeluErf) {
        return 0.5f * g * (1.0f + erff(g * 0.7071067811865476f));
    } else {
        return g;
    }
}

}  // namespace detail
}  // namespace moe_llava
