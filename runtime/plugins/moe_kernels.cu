// MoE-LLaVA sparse MoE layer: routing -> permutation -> grouped GEMMs -> combine, all on one stream.
//
// Shape legend (see moe_kernels.h): T tokens, E experts, K experts per token, H hidden, I expert intermediate,
// F fc1 rows per expert (2I SwiGLU / I GELU), S = T*K routed slots. "IO" = fp16 or fp32 element type.
//
//   router_logits [T,E] --route--> topk_ids, topk_weights [T,K]
//                       --permute--> expert_offsets [E+1], slot_of [T,K], sorted_token [S]
//   hidden [T,H]        --gather--> permuted [S,H]          (rows sorted by expert)
//   permuted [S,H]      --fc1 grouped GEMM + act--> intermediate [S,I]
//   intermediate [S,I]  --fc2 grouped GEMM--> permuted [S,H] (buffer reused: expert outputs y)
//   y [S,H], weights    --combine--> output [T,H]
//
// This file: routing, permutation, gather, combine and the host side; the GEMM kernels are in
// moe_grouped_gemm.cuh, shared device helpers in moe_device.cuh.
//
// The grouped GEMMs read expert_offsets on the device: the grid is sized from T alone and blocks past an
// expert's rows exit at once, so enqueue never synchronises with the host. Only the selected experts' weights
// are read, once per 64-row tile of that expert's tokens (prefill never gathers weights per token). Kernels:
// skinny (T <= 8, one warp per output column), tensor-core WMMA tiles (fp16), fp32-FMA tiles (fp32, odd sizes).
//
// INT4 experts (weight_bits 4, fp16 I/O): the same pipeline; fc1/fc2 run skinnyInt4GemmKernel (decode,
// moe_int4_decode.cuh) or the tensor-core tiles dequantising each weight tile into shared memory. No extra
// workspace: dequantised weights never leave registers / shared memory.
//
// Precision: routing in fp32; every dot product accumulates in fp32. `intermediate` and the expert outputs are
// stored in the IO dtype (one extra fp16 rounding each on the fp16 path, the same roundings PyTorch's fp16 MoE makes).
//
// Testing seam: with MOE_CPU_EMULATION defined this file compiles as host C++ against
// tests/plugins/cuda_cpu_emulation.h, which runs every launch on the CPU (CI has no GPU); see launch() below.
#include "moe_kernels.h"

#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "moe_device.cuh"
#include "moe_grouped_gemm.cuh"
#include "moe_int4_decode.cuh"

namespace moe_llava {
namespace {

using namespace detail;  // device helpers and grouped GEMM kernels

// ---------------------------------------------------------------------------------------------------------------
// 1. Routing: one warp per token. softmax over E, top-K (ties -> lower index), optional renormalisation.
// ---------------------------------------------------------------------------------------------------------------

constexpr int kRouteWarps = 4;

__global__ void __launch_bounds__(kRouteWarps * 32)
routeKernel(const float* __restrict__ logits, int T, int E, int K, bool normalize, int* __restrict__ topkIds,
            float* __restrict__ topkWeights) {
    const int lane = threadIdx.x & 31;
    const int t = blockIdx.x * kRouteWarps + (threadIdx.x >> 5);
    if (t >= T) return;  // warp-uniform
    const float* row = logits + static_cast<size_t>(t) * E;

    float mx = -INFINITY;
    for (int e = lane; e < E; e += 32) mx = fmaxf(mx, row[e]);
    mx = warpMax(mx);
    float sum = 0.0f;
    for (int e = lane; e < E; e += 32) sum += expf(row[e] - mx);
    sum = warpSum(sum);

    int chosen[kMoeMaxTopK];
    float prob[kMoeMaxTopK];
    float probSum = 0.0f;
    for (int k = 0; k < K; ++k) {
        float bestP = -1.0f;  // probabilities are >= 0; NaN never compares greater
        int bestE = INT_MAX;
        for (int e = lane; e < E; e += 32) {
            bool taken = false;
            for (int j = 0; j < k; ++j) taken |= (chosen[j] == e);
            const float pe = expf(row[e] - mx) / sum;
            if (!taken && pe > bestP) {  // e ascends per lane, so '>' keeps the lower index on ties
                bestP = pe;
                bestE = e;
            }
        }
        warpArgMax(bestP, bestE);
        if (bestE == INT_MAX) {  // only NaN logits left: stay in bounds, let the NaN propagate
            bestE = 0;  // the lowest expert not chosen yet (K <= E, so one exists)
            for (int j = 0; j < k; ++j) {
                if (chosen[j] == bestE) {
                    ++bestE;
                    j = -1;  // rescan: the new candidate may be taken too
                }
            }
            bestP = NAN;
        }
        chosen[k] = bestE;
        prob[k] = bestP;
        probSum += bestP;
    }
    if (lane == 0) {
        for (int k = 0; k < K; ++k) {
            topkIds[t * K + k] = chosen[k];
            topkWeights[t * K + k] = normalize ? prob[k] / probSum : prob[k];
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 2. Permutation: one block. Histogram -> exclusive scans (rows and GEMM row tiles per expert) -> slot of every
//    (token, k). Slot order inside an expert follows atomics; results do not depend on it (each row's dot
//    products are computed alone, in a fixed order).
// ---------------------------------------------------------------------------------------------------------------

constexpr int kPermuteThreads = 512;

struct PermuteOut {
    int* slotOf;         // [S]
    int* sortedToken;    // [S]
    int* expertOffsets;  // [E+1]
    int* tileOffsets;    // [E+1]
    int* activeExperts;  // [E]
    int* numActive;      // [1]
};

__global__ void __launch_bounds__(kPermuteThreads)
permuteKernel(const int* __restrict__ topkIds, int S, int K, int E, PermuteOut o) {
    __shared__ int count[kMoeMaxExperts];
    __shared__ int cursor[kMoeMaxExperts];
    for (int e = threadIdx.x; e < E; e += blockDim.x) count[e] = 0;
    __syncthreads();
    for (int s = threadIdx.x; s < S; s += blockDim.x) atomicAdd(&count[topkIds[s]], 1);
    __syncthreads();
    if (threadIdx.x == 0) {  // E <= 256: a serial scan is cheaper than a parallel one at this size
        int rows = 0, tiles = 0, active = 0;
        for (int e = 0; e < E; ++e) {
            o.expertOffsets[e] = rows;
            o.tileOffsets[e] = tiles;
            cursor[e] = rows;
            if (count[e] > 0) o.activeExperts[active++] = e;
            rows += count[e];
            tiles += (count[e] + kTileM - 1) / kTileM;
        }
        o.expertOffsets[E] = rows;
        o.tileOffsets[E] = tiles;
        *o.numActive = active;
    }
    __syncthreads();
    for (int s = threadIdx.x; s < S; s += blockDim.x) {
        const int slot = atomicAdd(&cursor[topkIds[s]], 1);
        o.slotOf[s] = slot;
        o.sortedToken[slot] = s / K;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 3. Gather: permuted[slot] = hidden[sortedToken[slot]]; V is a 16-byte vector when rows allow it.
// ---------------------------------------------------------------------------------------------------------------

constexpr int kRowThreads = 128;

template <typename V>
__global__ void __launch_bounds__(kRowThreads)
gatherKernel(const V* __restrict__ src, const int* __restrict__ sortedToken, V* __restrict__ dst, int rowVecs) {
    const int slot = blockIdx.x;
    const V* from = src + static_cast<size_t>(sortedToken[slot]) * rowVecs;
    V* to = dst + static_cast<size_t>(slot) * rowVecs;
    for (int i = threadIdx.x; i < rowVecs; i += blockDim.x) to[i] = from[i];
}

// 4./5. fc1 and fc2: the grouped GEMM kernels of moe_grouped_gemm.cuh.

// ---------------------------------------------------------------------------------------------------------------
// 6. Combine: output[t] = sum_k w[t,k] * y[slotOf[t,k]] (fp32 sum, k ascending).
// ---------------------------------------------------------------------------------------------------------------

template <typename IO>
__global__ void __launch_bounds__(kRowThreads)
combineKernel(const IO* __restrict__ y, const int* __restrict__ slotOf, const float* __restrict__ weights, int K,
              int H, IO* __restrict__ out) {
    const int t = blockIdx.x;
    for (int h = threadIdx.x; h < H; h += blockDim.x) {
        float acc = 0.0f;
        for (int k = 0; k < K; ++k) {
            const int idx = t * K + k;
            acc += weights[idx] * toFloat(y[static_cast<size_t>(slotOf[idx]) * H + h]);
        }
        storeIO(out + static_cast<size_t>(t) * H + h, acc);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------------------------

// The one place a kernel is launched (the CPU emulation used by the tests swaps the launch mechanism here).
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, cudaStream_t stream, Args&&... args) {
    static_assert(sizeof...(KArgs) == sizeof...(Args), "kernel argument count");
#if defined(MOE_CPU_EMULATION)
    (void)stream;
    moe_emu::launch(grid, block, [&] { kernel(static_cast<KArgs>(args)...); });
#else
    kernel<<<grid, block, 0, stream>>>(static_cast<KArgs>(args)...);
#endif
}

cudaError_t lastLaunchError() {
#if defined(MOE_CPU_EMULATION)
    return cudaSuccess;
#else
    return cudaGetLastError();
#endif
}

constexpr size_t kAlign = 256;

size_t alignUp(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }
size_t elementSize(MoeDType d) { return d == MoeDType::kFP16 ? 2 : 4; }
bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
unsigned ceilDiv(size_t a, size_t b) { return static_cast<unsigned>((a + b - 1) / b); }

// Byte offsets of the workspace regions, each 256-byte aligned.
struct Layout {
    size_t topkIds, topkWeights, slotOf, sortedToken, expertOffsets, tileOffsets, activeExperts, numActive;
    size_t permuted, intermediate, total;
};

Layout makeLayout(int T, int E, int K, int H, int I, MoeDType dtype) {
    const size_t S = static_cast<size_t>(T) * K, es = elementSize(dtype);
    size_t at = 0;
    auto take = [&at](size_t bytes) { const size_t begin = at; at += alignUp(bytes); return begin; };
    Layout l{};
    l.topkIds = take(S * sizeof(int32_t));
    l.topkWeights = take(S * sizeof(float));
    l.slotOf = take(S * sizeof(int32_t));
    l.sortedToken = take(S * sizeof(int32_t));
    l.expertOffsets = take((E + 1) * sizeof(int32_t));
    l.tileOffsets = take((E + 1) * sizeof(int32_t));
    l.activeExperts = take(E * sizeof(int32_t));
    l.numActive = take(sizeof(int32_t));
    l.permuted = take(S * H * es);
    l.intermediate = take(S * I * es);
    l.total = at;
    return l;
}

// INT4 experts: fp16 I/O, group-aligned widths, scales present, codes 16-byte aligned for the vector loads.
bool validInt4(const MoeParams& p) {
    const bool layout = p.weight_bits == 4 && p.dtype == MoeDType::kFP16 && moeValidGroupSize(p.group_size) &&
                        p.H % p.group_size == 0 && p.I % p.group_size == 0 && p.path != MoeGemmPath::kTiledSimt;
    const bool pointers = p.T == 0 || (p.fc1_scales && p.fc2_scales && aligned16(p.fc1_weight) &&
                                       aligned16(p.fc2_weight));
    return layout && pointers;
}

bool validParams(const MoeParams& p) {
    const bool sizes = p.T >= 0 && p.E >= 1 && p.E <= kMoeMaxExperts && p.K >= 1 && p.K <= kMoeMaxTopK &&
                       p.K <= p.E && p.H >= 1 && p.I >= 1;
    const bool enums = (p.dtype == MoeDType::kFP32 || p.dtype == MoeDType::kFP16) &&
                       (p.activation == MoeActivation::kSwiGLU || p.activation == MoeActivation::kGeluTanh ||
                        p.activation == MoeActivation::kGeluErf);
    const bool path = p.path == MoeGemmPath::kAuto || p.path == MoeGemmPath::kSkinny ||
                      p.path == MoeGemmPath::kTiled || p.path == MoeGemmPath::kTiledSimt;
    const bool pointers = p.T == 0 || (p.hidden && p.router_logits && p.fc1_weight && p.fc2_weight && p.output);
    return sizes && enums && path && pointers && (p.weight_bits == 16 || validInt4(p));
}

// 16-byte loads along Kd: rows must be 16-byte multiples and the bases 16-byte aligned (always true for real
// models: H and I are multiples of 8). Other shapes fall back to the SIMT tiled kernel.
template <typename IO>
bool rowsVectorisable(const GemmArgs<IO>& a) {
    return (a.Kd * sizeof(IO)) % 16 == 0 && aligned16(a.A) && aligned16(a.W);
}

template <typename IO, int ACT, int MAXR>
void launchSkinny(const GemmArgs<IO>& a, int S, cudaStream_t stream) {
    const dim3 grid(ceilDiv(a.N, kSkinnyWarps), static_cast<unsigned>(std::min(a.E, S)));
    launch(skinnyGemmKernel<IO, ACT, MAXR>, grid, dim3(kSkinnyWarps * 32), stream, a);
}

template <typename IO, int ACT>
void launchTiled(const GemmArgs<IO>& a, int S, bool tensorCores, cudaStream_t stream) {
    // Row tiles: sum_e ceil(rows_e / 64) <= ceil(S / 64) + (experts with rows) -- a bound known without the data.
    const dim3 grid(ceilDiv(S, kTileM) + static_cast<unsigned>(std::min(a.E, S)), ceilDiv(a.N, kTileN));
    if constexpr (std::is_same_v<IO, __half>) {
        if (tensorCores && rowsVectorisable(a)) {
            launch(wmmaGemmKernel<ACT>, grid, dim3(kWmmaThreads), stream, a);
            return;
        }
    }
    launch(tiledGemmKernel<IO, ACT>, grid, dim3(kTiledThreads), stream, a);
}

template <typename IO, int ACT>
void launchGemm(const GemmArgs<IO>& a, int T, int S, MoeGemmPath path, cudaStream_t stream) {
    const bool skinny = path == MoeGemmPath::kSkinny || (path == MoeGemmPath::kAuto && T <= kMoeSkinnyMaxTokens);
    if (skinny && rowsVectorisable(a)) {
        // Rows per expert <= T: with T == 1 one accumulator per lane, otherwise chunks of 8 rows.
        if (T == 1) launchSkinny<IO, ACT, 1>(a, S, stream);
        else launchSkinny<IO, ACT, 8>(a, S, stream);
        return;
    }
    launchTiled<IO, ACT>(a, S, /*tensorCores=*/path != MoeGemmPath::kTiledSimt, stream);
}

// INT4 experts (validInt4 holds): the decode kernel for small T, else the tensor-core tiles.
template <int ACT>
void launchInt4Gemm(const GemmArgs<__half>& a, int T, int S, MoeGemmPath path, cudaStream_t stream) {
    const bool skinny = path == MoeGemmPath::kSkinny || (path == MoeGemmPath::kAuto && T <= kMoeSkinnyMaxTokens);
    if (skinny) {
        const dim3 grid(ceilDiv(a.N, kSkinnyWarps), static_cast<unsigned>(std::min(a.E, S)));
        if (T == 1) launch(skinnyInt4GemmKernel<ACT, 1>, grid, dim3(kSkinnyWarps * 32), stream, a);
        else launch(skinnyInt4GemmKernel<ACT, 8>, grid, dim3(kSkinnyWarps * 32), stream, a);
        return;
    }
    const dim3 grid(ceilDiv(S, kTileM) + static_cast<unsigned>(std::min(a.E, S)), ceilDiv(a.N, kTileN));
    launch(wmmaGemmKernel<ACT, true>, grid, dim3(kWmmaThreads), stream, a);
}

template <typename IO, int ACT>
void launchAnyGemm(const GemmArgs<IO>& a, int T, int S, MoeGemmPath path, cudaStream_t stream) {
    if constexpr (std::is_same_v<IO, __half>) {
        if (a.q.codes != nullptr) {
            launchInt4Gemm<ACT>(a, T, S, path, stream);
            return;
        }
    }
    launchGemm<IO, ACT>(a, T, S, path, stream);
}

template <typename IO>
void launchFc1(const GemmArgs<IO>& a, MoeActivation act, int T, int S, MoeGemmPath path, cudaStream_t stream) {
    switch (act) {
        case MoeActivation::kSwiGLU: launchAnyGemm<IO, kActSwiGLU>(a, T, S, path, stream); break;
        case MoeActivation::kGeluTanh: launchAnyGemm<IO, kActGeluTanh>(a, T, S, path, stream); break;
        case MoeActivation::kGeluErf: launchAnyGemm<IO, kActGeluErf>(a, T, S, path, stream); break;
    }
}

// The INT4 view of one expert weight tensor, or an empty one for float experts.
Int4Weights int4Weights(const MoeParams& p, const void* codes, const void* scales) {
    if (p.weight_bits != 4) return {};
    return {static_cast<const uint32_t*>(codes), static_cast<const __half*>(scales), p.group_size};
}

template <typename IO>
void launchGather(const IO* hidden, const int* sortedToken, IO* permuted, int S, int H, cudaStream_t stream) {
    const bool vec = (H * sizeof(IO)) % 16 == 0 && aligned16(hidden) && aligned16(permuted);
    if (vec) {
        launch(gatherKernel<uint4>, dim3(S), dim3(kRowThreads), stream, reinterpret_cast<const uint4*>(hidden),
               sortedToken, reinterpret_cast<uint4*>(permuted), static_cast<int>(H * sizeof(IO) / 16));
    } else {
        launch(gatherKernel<IO>, dim3(S), dim3(kRowThreads), stream, hidden, sortedToken, permuted, H);
    }
}

template <typename IO>
cudaError_t forward(const MoeParams& p, void* workspace, cudaStream_t stream) {
    const int T = p.T, E = p.E, K = p.K, H = p.H, I = p.I, S = T * K;
    const MoeWorkspaceView ws = moeWorkspaceView(workspace, T, E, K, H, I, p.dtype);
    const auto* hidden = static_cast<const IO*>(p.hidden);
    auto* permuted = static_cast<IO*>(ws.permuted);
    auto* intermediate = static_cast<IO*>(ws.intermediate);

    launch(routeKernel, dim3(ceilDiv(T, kRouteWarps)), dim3(kRouteWarps * 32), stream, p.router_logits, T, E, K,
           p.normalize, ws.topk_ids, ws.topk_weights);
    const PermuteOut po{ws.slot_of, ws.sorted_token, ws.expert_offsets, ws.tile_offsets, ws.active_experts,
                        ws.num_active};
    launch(permuteKernel, dim3(1), dim3(kPermuteThreads), stream, ws.topk_ids, S, K, E, po);
    launchGather<IO>(hidden, ws.sorted_token, permuted, S, H, stream);

    const int F = p.activation == MoeActivation::kSwiGLU ? 2 * I : I;
    const bool int4 = p.weight_bits == 4;
    const GemmArgs<IO> fc1{permuted, int4 ? nullptr : static_cast<const IO*>(p.fc1_weight),
                           static_cast<const IO*>(p.fc1_bias), intermediate, ws.expert_offsets, ws.tile_offsets,
                           ws.active_experts, ws.num_active, E, /*N=*/I, /*Kd=*/H, /*Nw=*/F,
                           int4Weights(p, p.fc1_weight, p.fc1_scales)};
    launchFc1<IO>(fc1, p.activation, T, S, p.path, stream);
    // fc2 writes the expert outputs over `permuted`: fc1 has consumed it (same stream).
    const GemmArgs<IO> fc2{intermediate, int4 ? nullptr : static_cast<const IO*>(p.fc2_weight),
                           static_cast<const IO*>(p.fc2_bias), permuted, ws.expert_offsets, ws.tile_offsets,
                           ws.active_experts, ws.num_active, E, /*N=*/H, /*Kd=*/I, /*Nw=*/H,
                           int4Weights(p, p.fc2_weight, p.fc2_scales)};
    launchAnyGemm<IO, kActNone>(fc2, T, S, p.path, stream);

    launch(combineKernel<IO>, dim3(T), dim3(kRowThreads), stream, permuted, ws.slot_of, ws.topk_weights, K, H,
           static_cast<IO*>(p.output));
    return lastLaunchError();
}

}  // namespace

size_t moeWorkspaceSize(int T, int E, int K, int H, int I, MoeDType dtype) {
    return makeLayout(T, E, K, H, I, dtype).total;
}

MoeWorkspaceView moeWorkspaceView(void* workspace, int T, int E, int K, int H, int I, MoeDType dtype) {
    const Layout l = makeLayout(T, E, K, H, I, dtype);
    auto* base = static_cast<char*>(workspace);
    auto ints = [base](size_t off) { return reinterpret_cast<int32_t*>(base + off); };
    return MoeWorkspaceView{ints(l.topkIds), reinterpret_cast<float*>(base + l.topkWeights), ints(l.slotOf),
                            ints(l.sortedToken), ints(l.expertOffsets), ints(l.tileOffsets),
                            ints(l.activeExperts), ints(l.numActive), base + l.permuted, base + l.intermediate};
}

cudaError_t moeForward(const MoeParams& p, void* workspace, cudaStream_t stream) {
    if (!validParams(p)) return cudaErrorInvalidValue;
    if (p.T == 0) return cudaSuccess;
    if (workspace == nullptr) return cudaErrorInvalidValue;
    return p.dtype == MoeDType::kFP16 ? forward<__half>(p, workspace, stream) : forward<float>(p, workspace, stream);
}

const char* moeActivationName(MoeActivation a) {
    switch (a) {
        case MoeActivation::kSwiGLU: return "swiglu";
        case MoeActivation::kGeluTanh: return "gelu_tanh";
        case MoeActivation::kGeluErf: return "gelu_erf";
    }
    return "unknown";
}

}  // namespace moe_llava
