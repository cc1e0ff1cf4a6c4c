// MoE-LLaVA sparse MoE layer on CUDA: the one entry point behind the TensorRT plugin (and the GPU tests).
//
// Shape legend
//   T tokens, E experts, K experts per token (top-k), H hidden size, I expert intermediate size,
//   F fc1 rows per expert (2*I for SwiGLU: rows [0,I) gate, rows [I,2I) up; I for the GELU variants),
//   S = T*K routed (token, expert) slots.
//
//   hidden        [T, H]     fp16 or fp32 (the "I/O dtype")
//   router_logits [T, E]     fp32 (routing math is always fp32)
//   fc1_weight    [E, F, H]  I/O dtype      fc1_bias [E, F]  I/O dtype
//   fc2_weight    [E, H, I]  I/O dtype      fc2_bias [E, H]  I/O dtype
//   output        [T, H]     I/O dtype
//
// INT4 weight-only experts (weight_bits = 4, fp16 I/O only): fc1_weight / fc2_weight hold packed codes, int32
// [E, F, H/8] / [E, H, I/8], and fc1_scales / fc2_scales fp16 [E, F, H/G] / [E, H, I/G] (G = group_size along the
// input dimension). Weight (n, k) = (code(n, k) - 8) * scale(n, k / G), code(n, k) = bits [4*(k%8), 4*(k%8)+4) of
// word k/8 of row n - byte for byte the uint8 codes of calibration/blockwise.py (element k in byte k/2, even k
// in the low nibble), read as little-endian int32 words.
//
// Semantics (identical to the project's PyTorch MoE, dropless):
//   probs = softmax(router_logits) over E                      (fp32)
//   (p, e) = top-K of probs, ties -> lower expert index first
//   w = p / sum(p) when normalize, else p
//   y_e(x) = fc2_e(act(fc1_e(x)))   act: silu(gate) * up | gelu_tanh | gelu_erf
//   output[t] = sum_k w[t,k] * y_{e(t,k)}(x_t)
//
// This header is plain C++17 + the CUDA runtime: no TensorRT, no torch.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace moe_llava {

enum class MoeDType : int32_t { kFP32 = 0, kFP16 = 1 };

// Numbering is the ONNX node's `activation` attribute.
enum class MoeActivation : int32_t { kSwiGLU = 0, kGeluTanh = 1, kGeluErf = 2 };

// Which grouped-GEMM kernel runs the expert FFNs. kAuto picks from T alone (never from routing data):
// kSkinny (one warp per output column, every weight row read once) for small T, kTiled otherwise. kSkinny and the
// fp16 tensor-core tiles need 16-byte rows (H and I multiples of 8 for fp16, of 4 for fp32) and 16-byte aligned
// tensors; other shapes, and kTiledSimt, use the fp32-FMA tile kernel.
enum class MoeGemmPath : int32_t { kAuto = 0, kSkinny = 1, kTiled = 2, kTiledSimt = 3 };

constexpr int kMoeMaxExperts = 256;  // shared-memory histogram size of the permutation kernel
constexpr int kMoeMaxTopK = 8;       // registers of the routing kernel
constexpr int kMoeSkinnyMaxTokens = 8;  // kAuto uses the skinny kernel up to this T

// INT4 experts: group sizes along the input dimension. A multiple of 32 keeps every 16-byte load of packed codes
// (32 weights) inside one group, so each load needs exactly one scale.
constexpr bool moeValidGroupSize(int g) { return g == 32 || g == 64 || g == 128; }

struct MoeParams {
    int32_t T = 0, E = 0, K = 0, H = 0, I = 0;
    MoeDType dtype = MoeDType::kFP16;
    MoeActivation activation = MoeActivation::kSwiGLU;
    bool normalize = true;  // renormalise the K selected probabilities to sum to 1
    MoeGemmPath path = MoeGemmPath::kAuto;
    // 16: fc1/fc2 weights in the I/O dtype. 4: packed INT4 codes with fp16 group scales (fp16 I/O; H and I
    // multiples of group_size; weights, scales and hidden 16-byte aligned). INT4 runs the skinny kernel or the
    // tensor-core tiles (kTiledSimt is refused).
    int32_t weight_bits = 16;
    int32_t group_size = 0;  // INT4 only: moeValidGroupSize

    const void* hidden = nullptr;          // [T, H]
    const float* router_logits = nullptr;  // [T, E]
    const void* fc1_weight = nullptr;      // [E, F, H]
    const void* fc1_bias = nullptr;        // [E, F]  (nullptr = no bias)
    const void* fc2_weight = nullptr;      // [E, H, I]
    const void* fc2_bias = nullptr;        // [E, H]  (nullptr = no bias)
    void* output = nullptr;                // [T, H]
    const void* fc1_scales = nullptr;      // INT4 only: fp16 [E, F, H/G]
    const void* fc2_scales = nullptr;      // INT4 only: fp16 [E, H, I/G]
};

// Bytes of device workspace moeForward needs for these sizes (also enough for any smaller T).
size_t moeWorkspaceSize(int T, int E, int K, int H, int I, MoeDType dtype);

// Runs routing -> permutation -> grouped GEMMs -> combine on `stream`. Asynchronous: no host<->device
// synchronisation, no allocation. Returns cudaErrorInvalidValue for bad sizes/pointers, else the launch status.
cudaError_t moeForward(const MoeParams& p, void* workspace, cudaStream_t stream);

// Typed views into a workspace, valid after moeForward has run on it (for tests and diagnostics).
struct MoeWorkspaceView {
    int32_t* topk_ids;        // [T, K]  selected experts, best first
    float* topk_weights;      // [T, K]  combine weights (renormalised when normalize)
    int32_t* slot_of;         // [T, K]  row of (t, k) in the expert-sorted buffers
    int32_t* sorted_token;    // [S]     token of each expert-sorted row
    int32_t* expert_offsets;  // [E + 1] exclusive scan of tokens per expert
    int32_t* tile_offsets;    // [E + 1] exclusive scan of tiled-GEMM row tiles per expert
    int32_t* active_experts;  // [E]     experts with at least one token, ascending; then num_active
    int32_t* num_active;      // [1]
    void* permuted;           // [S, H]  gathered tokens, later reused for the expert outputs
    void* intermediate;       // [S, I]  act(fc1) per routed slot
};
MoeWorkspaceView moeWorkspaceView(void* workspace, int T, int E, int K, int H, int I, MoeDType dtype);

const char* moeActivationName(MoeActivation a);

}  // namespace moe_llava
