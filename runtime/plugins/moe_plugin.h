// TensorRT IPluginV3 glue for the MoE-LLaVA MoE node: shape/type/format negotiation and serialisation only; the
// computation is moe_llava::moeForward (moe_kernels.h). Written against the TensorRT 10.3 API (JetPack 6); the V3
// interfaces used here are unchanged in 10.13+ and 11.x.
//
// Node contract (fixed by the ONNX exporter): op_type / plugin name "MoELlavaMoE", version "1", namespace
// "moe_llava". Inputs: hidden [T,H], router_logits [T,E] fp32, fc1_weight [E,F,H], fc1_bias [E,F],
// fc2_weight [E,H,I], fc2_bias [E,H]; output [T,H]. Inputs 0,2-5 and the output share one dtype (fp32 or fp16).
// INT fields: num_experts, top_k, activation (0 swiglu, 1 gelu_tanh, 2 gelu_erf), normalize_routing_weights;
// optional weight_bits (16 default, or 4) and group_size (INT4: 32, 64 or 128). With weight_bits 4 the weights are
// packed int32 codes fc1 [E,F,H/8], fc2 [E,H,I/8], hidden is fp16, and inputs 6-7 are the fp16 scales
// fc1_scales [E,F,H/G], fc2_scales [E,H,I/G] (layout: runtime/plugins/README.md).
#pragma once

#include <NvInferRuntime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "moe_kernels.h"

namespace moe_llava {

inline constexpr char kPluginName[] = "MoELlavaMoE";
inline constexpr char kPluginVersion[] = "1";
inline constexpr char kPluginNamespace[] = "moe_llava";
inline constexpr int32_t kNbInputs = 6;      // float experts
inline constexpr int32_t kNbInputsInt4 = 8;  // INT4 experts: + fc1_scales, fc2_scales

struct MoeAttributes {
    int32_t num_experts = 0;
    int32_t top_k = 0;
    int32_t activation = 0;  // MoeActivation
    int32_t normalize_routing_weights = 1;
    int32_t weight_bits = 16;  // 16: experts in hidden's dtype; 4: INT4 weight-only
    int32_t group_size = 0;    // INT4 only

    bool int4() const { return weight_bits == 4; }
    int32_t nbInputs() const { return int4() ? kNbInputsInt4 : kNbInputs; }
};

class MoePlugin final : public nvinfer1::IPluginV3,
                        public nvinfer1::IPluginV3OneCore,
                        public nvinfer1::IPluginV3OneBuild,
                        public nvinfer1::IPluginV3OneRuntime {
public:
    explicit MoePlugin(const MoeAttributes& attrs);
    MoePlugin(const MoePlugin& other);  // re-points the serialisation fields at the copy's attributes
    MoePlugin& operator=(const MoePlugin&) = delete;
    ~MoePlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    const char* getPluginName() const noexcept override { return kPluginName; }
    const char* getPluginVersion() const noexcept override { return kPluginVersion; }
    const char* getPluginNamespace() const noexcept override { return kPluginNamespace; }

    // IPluginV3OneBuild
    int32_t configurePlugin(const nvinfer1::DynamicPluginTensorDesc* in, int32_t nbInputs,
                            const nvinfer1::DynamicPluginTensorDesc* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
                               const nvinfer1::DataType* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nbInputs, const nvinfer1::DimsExprs* shapeInputs,
                            int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                            nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, const nvinfer1::DynamicPluginTensorDesc* inOut, int32_t nbInputs,
                                   int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override { return 1; }
    size_t getWorkspaceSize(const nvinfer1::DynamicPluginTensorDesc* inputs, int32_t nbInputs,
                            const nvinfer1::DynamicPluginTensorDesc* outputs,
                            int32_t nbOutputs) const noexcept override;
    const char* getTimingCacheID() noexcept override { return mId.c_str(); }
    const char* getMetadataString() noexcept override { return mId.c_str(); }

    // IPluginV3OneRuntime
    int32_t onShapeChange(const nvinfer1::PluginTensorDesc* in, int32_t nbInputs, const nvinfer1::PluginTensorDesc* out,
                          int32_t nbOutputs) noexcept override;
    int32_t enqueue(const nvinfer1::PluginTensorDesc* inputDesc, const nvinfer1::PluginTensorDesc* outputDesc,
                    const void* const* inputs, void* const* outputs, void* workspace,
                    cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    const nvinfer1::PluginFieldCollection* getFieldsToSerialize() noexcept override;

private:
    void bindFields();

    MoeAttributes mAttrs;
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
    std::string mId;  // attribute summary: timing-cache key and metadata
};

class MoePluginCreator final : public nvinfer1::IPluginCreatorV3One {
public:
    MoePluginCreator();

    const char* getPluginName() const noexcept override { return kPluginName; }
    const char* getPluginVersion() const noexcept override { return kPluginVersion; }
    const char* getPluginNamespace() const noexcept override { return kPluginNamespace; }
    const nvinfer1::PluginFieldCollection* getFieldNames() noexcept override { return &mFieldCollection; }
    nvinfer1::IPluginV3* createPlugin(const char* name, const nvinfer1::PluginFieldCollection* fc,
                                      nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

}  // namespace moe_llava
