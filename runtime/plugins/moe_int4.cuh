// INT4 weight-only expert weights (private to moe_kernels.cu): the packed layout and its dequantisation.
//
// A weight matrix [rows, Kd] is stored as
//   codes  uint32 [rows, Kd/8]   weight k of a row in bits [4*(k%8), 4*(k%8)+4) of word k/8 (unsigned 0..15)
//   scales fp16   [rows, Kd/G]   one scale per group of G consecutive k (G in {32, 64, 128})
//   w[row, k] = (code - 8) * scales[row, k/G]                  (symmetric: the zero point is the constant 8)
// Bytes are those of calibration/blockwise.py's uint8 codes (even k in the low nibble), read as little-endian
// words. One 16-byte load = 32 weights of one row; G % 32 == 0 puts them in one group, so one scale per load.
#pragma once

#include <cuda_fp16.h>

#include <cstddef>
#include <cstdint>

namespace moe_llava {
namespace detail {

constexpr int kInt4PerLoad = 32;  // weights per 16-byte load of packed codes

struct Int4Weights {
    const uint32_t* codes = nullptr;  // [E, Nw, Kd/8]; nullptr: the experts are not INT4
    const __half* scales = nullptr;   // [E, Nw, Kd/G]
    int group = 0;                    // G
};

// The 32 codes of row `row` starting at k (k % 32 == 0) and their scale.
__device__ __forceinline__ uint4 loadInt4Codes(const Int4Weights& q, size_t row, int Kd, int k) {
    return *reinterpret_cast<const uint4*>(q.codes + row * static_cast<size_t>(Kd / 8) + k / 8);
}

__device__ __forceinline__ float loadInt4Scale(const Int4Weights& q, size_t row, int Kd, int k) {
    return __half2float(q.scales[row * static_cast<size_t>(Kd / q.group) + k / q.group]);
}

// The 8 weights of one word, centred (code - 8) but not yet scaled: exact small integers in fp32.
__device__ __forceinline__ void unpackInt4(uint32_t word, float (&out)[8]) {
#pragma unroll
    for (int v = 0; v < 8; ++v) out[v] = static_cast<float>(static_cast<int>((word >> (4 * v)) & 0xFu) - 8);
}

// Dequantises rows [r0, r0 + ROWS) x k [k0, k0 + 32) of expert-row block `base` (row indices base + r) into an
// fp16 shared-memory tile dst[ROWS][LD]; rows at or past rowEnd (relative to r0's numbering) are zero-filled.
// The caller's threads split the rows; each writes 32 halves with four 16-byte stores.
template <int ROWS, int LD>
__device__ __forceinline__ void stageInt4Rows(__half (*dst)[LD], const Int4Weights& q, size_t base, int r0,
                                              int rowEnd, int k0, int Kd, int threads) {
    for (int r = threadIdx.x; r < ROWS; r += threads) {
        const int row = r0 + r;
        __align__(16) __half h[kInt4PerLoad];
        if (row < rowEnd) {
            const uint4 c = loadInt4Codes(q, base + row, Kd, k0);
            const float s = loadInt4Scale(q, base + row, Kd, k0);
            const uint32_t words[4] = {c.x, c.y, c.z, c.w};
#pragma unroll
            for (int w = 0; w < 4; ++w) {
                float f[8];
                unpackInt4(words[w], f);
#pragma unroll
                for (int v = 0; v < 8; ++v) h[8 * w + v] = __float2half(f[v] * s);
            }
        } else {
#pragma unroll
            for (int v = 0; v < kInt4PerLoad; ++v) h[v] = __float2half(0.0f);
        }
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            *reinterpret_cast<uint4*>(&dst[r][8 * w]) = *reinterpret_cast<const uint4*>(&h[8 * w]);
        }
    }
}

}  // namespace detail
}  // namespace moe_llava
