// torch C++ extension exposing moe_llava::moeForward, for the GPU tests and benchmarks/plugin_kernels.py.
// Built with torch.utils.cpp_extension.load(sources=[this file, runtime/plugins/moe_kernels.cu]).
//
//   moe_forward(hidden [T,H], router_logits [T,E] fp32, fc1_weight [E,F,H], fc1_bias [E,F] | None,
//               fc2_weight [E,H,I], fc2_bias [E,H] | None, top_k, activation, normalize, path)
//     -> (output [T,H], topk_ids [T,K] int32, topk_weights [T,K] fp32)
//   moe_forward_int4(hidden [T,H] fp16, router_logits, fc1_codes int32 [E,F,H/8], fc1_scales fp16 [E,F,H/G],
//                    fc1_bias | None, fc2_codes int32 [E,H,I/8], fc2_scales fp16 [E,H,I/G], fc2_bias | None,
//                    top_k, activation, normalize, group_size, path)  -> the same (INT4 experts, moe_kernels.h)
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "moe_kernels.h"

namespace {

using moe_llava::MoeDType;

MoeDType ioDType(const torch::Tensor& t) {
    TORCH_CHECK(t.scalar_type() == torch::kFloat16 || t.scalar_type() == torch::kFloat32,
                "hidden must be fp16 or fp32");
    return t.scalar_type() == torch::kFloat16 ? MoeDType::kFP16 : MoeDType::kFP32;
}

void checkTensor(const torch::Tensor& t, const torch::Tensor& hidden, int64_t dim, const char* name) {
    TORCH_CHECK(t.is_cuda() && t.is_contiguous(), name, " must be a contiguous CUDA tensor");
    TORCH_CHECK(t.device() == hidden.device(), name, " must be on hidden's device");
    TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions");
}

const void* optionalPointer(const std::optional<torch::Tensor>& t, const torch::Tensor& hidden, const char* name) {
    if (!t.has_value()) return nullptr;
    checkTensor(*t, hidden, 2, name);
    TORCH_CHECK(t->scalar_type() == hidden.scalar_type(), name, " must have hidden's dtype");
    return t->data_ptr();
}

// Allocates output and workspace, runs moeForward on torch's current stream, copies the routing out.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> run(moe_llava::MoeParams& p, const torch::Tensor& hidden) {
    auto output = torch::empty_like(hidden);
    const size_t wsBytes = moe_llava::moeWorkspaceSize(p.T, p.E, p.K, p.H, p.I, p.dtype);
    auto workspace = torch::empty({static_cast<int64_t>(wsBytes)}, hidden.options().dtype(torch::kUInt8));
    p.output = output.data_ptr();

    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    const cudaError_t status = moe_llava::moeForward(p, workspace.data_ptr(), stream);
    TORCH_CHECK(status == cudaSuccess, "moeForward failed: ", cudaGetErrorString(status));

    const auto view = moe_llava::moeWorkspaceView(workspace.data_ptr(), p.T, p.E, p.K, p.H, p.I, p.dtype);
    const auto intOpts = hidden.options().dtype(torch::kInt32);
    auto ids = torch::from_blob(view.topk_ids, {p.T, p.K}, intOpts).clone();  // copies before workspace is freed
    auto weights = torch::from_blob(view.topk_weights, {p.T, p.K}, intOpts.dtype(torch::kFloat32)).clone();
    return {output, ids, weights};
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> moeForward(
    torch::Tensor hidden, torch::Tensor logits, torch::Tensor fc1Weight, std::optional<torch::Tensor> fc1Bias,
    torch::Tensor fc2Weight, std::optional<torch::Tensor> fc2Bias, int64_t topK, int64_t activation, bool normalize,
    int64_t path) {
    checkTensor(hidden, hidden, 2, "hidden");
    checkTensor(logits, hidden, 2, "router_logits");
    checkTensor(fc1Weight, hidden, 3, "fc1_weight");
    checkTensor(fc2Weight, hidden, 3, "fc2_weight");
    TORCH_CHECK(logits.scalar_type() == torch::kFloat32, "router_logits must be fp32");
    TORCH_CHECK(fc1Weight.scalar_type() == hidden.scalar_type() && fc2Weight.scalar_type() == hidden.scalar_type(),
                "expert weights must have hidden's dtype");

    moe_llava::MoeParams p;
    p.T = static_cast<int32_t>(hidden.size(0));
    p.H = static_cast<int32_t>(hidden.size(1));
    p.E = static_cast<int32_t>(logits.size(1));
    p.I = static_cast<int32_t>(fc2Weight.size(2));
    p.K = static_cast<int32_t>(topK);
    p.dtype = ioDType(hidden);
    p.activation = static_cast<moe_llava::MoeActivation>(activation);
    p.normalize = normalize;
    p.path = static_cast<moe_llava::MoeGemmPath>(path);
    const int64_t F = activation == 0 ? 2 * p.I : p.I;
    TORCH_CHECK(logits.size(0) == p.T, "router_logits must be [T, E]");
    TORCH_CHECK(fc1Weight.size(0) == p.E && fc1Weight.size(1) == F && fc1Weight.size(2) == p.H,
                "fc1_weight must be [E, F, H] with F = ", F);
    TORCH_CHECK(fc2Weight.size(0) == p.E && fc2Weight.size(1) == p.H, "fc2_weight must be [E, H, I]");
    p.hidden = hidden.data_ptr();
    p.router_logits = logits.data_ptr<float>();
    p.fc1_weight = fc1Weight.data_ptr();
    p.fc1_bias = optionalPointer(fc1Bias, hidden, "fc1_bias");
    p.fc2_weight = fc2Weight.data_ptr();
    p.fc2_bias = optionalPointer(fc2Bias, hidden, "fc2_bias");

    return run(p, hidden);
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> moeForwardInt4(
    torch::Tensor hidden, torch::Tensor logits, torch::Tensor fc1Codes, torch::Tensor fc1Scales,
    std::optional<torch::Tensor> fc1Bias, torch::Tensor fc2Codes, torch::Tensor fc2Scales,
    std::optional<torch::Tensor> fc2Bias, int64_t topK, int64_t activation, bool normalize, int64_t groupSize,
    int64_t path) {
    checkTensor(hidden, hidden, 2, "hidden");
    checkTensor(logits, hidden, 2, "router_logits");
    TORCH_CHECK(hidden.scalar_type() == torch::kFloat16, "INT4 experts need fp16 hidden");
    TORCH_CHECK(logits.scalar_type() == torch::kFloat32, "router_logits must be fp32");
    const char* names[] = {"fc1_codes", "fc1_scales", "fc2_codes", "fc2_scales"};
    const torch::Tensor* tensors[] = {&fc1Codes, &fc1Scales, &fc2Codes, &fc2Scales};
    for (int i = 0; i < 4; ++i) {
        checkTensor(*tensors[i], hidden, 3, names[i]);
        TORCH_CHECK(tensors[i]->scalar_type() == (i % 2 ? torch::kFloat16 : torch::kInt32), names[i],
                    i % 2 ? " must be fp16" : " must be int32");
    }
    moe_llava::MoeParams p;
    p.T = static_cast<int32_t>(hidden.size(0));
    p.H = static_cast<int32_t>(hidden.size(1));
    p.E = static_cast<int32_t>(logits.size(1));
    p.I = static_cast<int32_t>(fc2Codes.size(2) * 8);
    p.K = static_cast<int32_t>(topK);
    p.dtype = MoeDType::kFP16;
    p.activation = static_cast<moe_llava::MoeActivation>(activation);
    p.normalize = normalize;
    p.path = static_cast<moe_llava::MoeGemmPath>(path);
    p.weight_bits = 4;
    p.group_size = static_cast<int32_t>(groupSize);
    const int64_t F = activation == 0 ? 2 * p.I : p.I;
    TORCH_CHECK(logits.size(0) == p.T, "router_logits must be [T, E]");
    TORCH_CHECK(fc1Codes.size(0) == p.E && fc1Codes.size(1) == F && fc1Codes.size(2) * 8 == p.H,
                "fc1_codes must be [E, F, H/8] with F = ", F);
    TORCH_CHECK(fc2Codes.size(0) == p.E && fc2Codes.size(1) == p.H, "fc2_codes must be [E, H, I/8]");
    TORCH_CHECK(groupSize > 0 && fc1Scales.sizes() == torch::IntArrayRef({p.E, F, p.H / groupSize}) &&
                    fc2Scales.sizes() == torch::IntArrayRef({p.E, p.H, p.I / groupSize}),
                "scales must be [E, F, H/G] and [E, H, I/G]");
    p.hidden = hidden.data_ptr();
    p.router_logits = logits.data_ptr<float>();
    p.fc1_weight = fc1Codes.data_ptr();
    p.fc1_scales = fc1Scales.data_ptr();
    p.fc1_bias = optionalPointer(fc1Bias, hidden, "fc1_bias");
    p.fc2_weight = fc2Codes.data_ptr();
    p.fc2_scales = fc2Scales.data_ptr();
    p.fc2_bias = optionalPointer(fc2Bias, hidden, "fc2_bias");
    return run(p, hidden);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("moe_forward", &moeForward, "MoE-LLaVA MoE layer (routing, permutation, grouped GEMMs, combine)",
          py::arg("hidden"), py::arg("router_logits"), py::arg("fc1_weight"), py::arg("fc1_bias"),
          py::arg("fc2_weight"), py::arg("fc2_bias"), py::arg("top_k"), py::arg("activation") = 0,
          py::arg("normalize") = true, py::arg("path") = 0);
    m.def("moe_forward_int4", &moeForwardInt4, "the same with INT4 experts (packed codes + fp16 group scales)",
          py::arg("hidden"), py::arg("router_logits"), py::arg("fc1_codes"), py::arg("fc1_scales"),
          py::arg("fc1_bias"), py::arg("fc2_codes"), py::arg("fc2_scales"), py::arg("fc2_bias"), py::arg("top_k"),
          py::arg("activation") = 0, py::arg("normalize") = true, py::arg("group_size") = 128, py::arg("path") = 0);
    m.def("workspace_size", [](int T, int E, int K, int H, int I, bool fp16) {
        return moe_llava::moeWorkspaceSize(T, E, K, H, I, fp16 ? MoeDType::kFP16 : MoeDType::kFP32);
    });
}
