// TensorRT IPluginV3 glue for the MoE-LLaVA MoE node (see moe_plugin.h for the node contract). Everything here is
// negotiation, validation and serialisation; enqueue forwards to moe_llava::moeForward.
//
// Registration: the library exports getCreators + setLoggerFinder, which is what IPluginRegistry::loadLibrary,
// trtexec --dynamicPlugins and trt.get_plugin_registry().load_library(path) look for. Building with
// MOE_LLAVA_STATIC_REGISTRATION also registers the creator at load time, under the namespace "moe_llava" (for
// dlopen/ctypes-style loading); that build links libnvinfer, and must not also be passed to loadLibrary, which
// refuses a library whose creators are already registered.
#include "moe_plugin.h"

#include <cstdio>
#include <exception>
#include <new>
#include <sstream>

namespace moe_llava {
namespace {

using nvinfer1::DataType;
using nvinfer1::Dims;
using nvinfer1::ILogger;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldType;

nvinfer1::ILoggerFinder* gLoggerFinder = nullptr;

void logMessage(ILogger::Severity severity, const std::string& message) {
    const std::string text = std::string(kPluginNamespace) + "::" + kPluginName + ": " + message;
    ILogger* logger = gLoggerFinder != nullptr ? gLoggerFinder->findLogger() : nullptr;
#if defined(MOE_LLAVA_STATIC_REGISTRATION)
    if (logger == nullptr) logger = getLogger();  // libnvinfer's logger; this build links libnvinfer anyway
#endif
    if (logger != nullptr) {
        logger->log(severity, text.c_str());
    } else if (severity <= ILogger::Severity::kWARNING) {
        std::fprintf(stderr, "[TensorRT plugin] %s\n", text.c_str());
    }
}

void logError(const std::string& message) { logMessage(ILogger::Severity::kERROR, message); }

std::string dimsToString(const Dims& d) {
    std::ostringstream s;
    s << '[';
    for (int32_t i = 0; i < d.nbDims; ++i) s << (i ? ", " : "") << d.d[i];
    s << ']';
    return s.str();
}

// Extents are -1 where unknown at build time: such an extent matches anything.
bool extentMatches(int64_t a, int64_t b) { return a < 0 || b < 0 || a == b; }

int64_t leadingProduct(const Dims& d) {  // T: every dimension of hidden but the last (-1 if any is unknown)
    int64_t t = 1;
    for (int32_t i = 0; i + 1 < d.nbDims; ++i) {
        if (d.d[i] < 0) return -1;
        t *= d.d[i];
    }
    return t;
}

// An extent of packed INT4 codes in weights (8 per int32), or unknown.
int64_t unpacked(int64_t words, const MoeAttributes& a) { return words < 0 || !a.int4() ? words : 8 * words; }

// INT4: the scales [E, N, K/G] of a weight [E, N, K/8] (K known unpacked), or "" when consistent.
std::string scaleProblem(const Dims& scales, const Dims& weight, int64_t K, const MoeAttributes& a,
                         const char* name) {
    const bool ok = scales.nbDims == 3 && extentMatches(scales.d[0], weight.d[0]) &&
                    extentMatches(scales.d[1], weight.d[1]) &&
                    (K < 0 || (K % a.group_size == 0 && extentMatches(scales.d[2], K / a.group_size)));
    if (ok) return "";
    return std::string(name) + " " + dimsToString(scales) + " must be [E, N, K/group_size] for weight " +
           dimsToString(weight) + " (K=" + std::to_string(K) + ", group_size=" + std::to_string(a.group_size) + ")";
}

// First inconsistency of the input shapes with each other and with the attributes, or "" when consistent.
std::string shapeProblem(const Dims (&d)[kNbInputsInt4], const MoeAttributes& a) {
    const Dims &x = d[0], &logits = d[1], &w1 = d[2], &b1 = d[3], &w2 = d[4], &b2 = d[5];
    if (x.nbDims < 2) return "hidden must be [T, H], got " + dimsToString(x);
    if (logits.nbDims != x.nbDims) return "router_logits must be [T, E], got " + dimsToString(logits);
    for (int32_t i = 0; i + 1 < x.nbDims; ++i) {
        if (!extentMatches(logits.d[i], x.d[i])) {
            return "router_logits " + dimsToString(logits) + " vs hidden " + dimsToString(x);
        }
    }
    if (!extentMatches(logits.d[logits.nbDims - 1], a.num_experts)) {
        return "router_logits " + dimsToString(logits) + " has a last extent other than num_experts=" +
               std::to_string(a.num_experts);
    }
    if (w1.nbDims != 3 || b1.nbDims != 2 || w2.nbDims != 3 || b2.nbDims != 2) {
        return "expert tensors must be fc1_weight [E,F,H], fc1_bias [E,F], fc2_weight [E,H,I], fc2_bias [E,H]; got " +
               dimsToString(w1) + ", " + dimsToString(b1) + ", " + dimsToString(w2) + ", " + dimsToString(b2);
    }
    const int64_t E = a.num_experts, H = x.d[x.nbDims - 1], F = w1.d[1], I = unpacked(w2.d[2], a);
    const bool ok = extentMatches(w1.d[0], E) && extentMatches(unpacked(w1.d[2], a), H) && extentMatches(b1.d[0], E) &&
                    extentMatches(b1.d[1], F) && extentMatches(w2.d[0], E) && extentMatches(w2.d[1], H) &&
                    extentMatches(b2.d[0], E) && extentMatches(b2.d[1], H);
    if (!ok) {
        return "expert tensors disagree with E=" + std::to_string(E) + ", H=" + std::to_string(H) +
               ": fc1_weight " + dimsToString(w1) + ", fc1_bias " + dimsToString(b1) + ", fc2_weight " +
               dimsToString(w2) + ", fc2_bias " + dimsToString(b2);
    }
    const bool gated = a.activation == static_cast<int32_t>(MoeActivation::kSwiGLU);
    if (F >= 0 && I >= 0 && F != (gated ? 2 * I : I)) {
        return std::string("fc1 rows F=") + std::to_string(F) + " must be " + (gated ? "2*I" : "I") + " (I=" +
               std::to_string(I) + ") for activation " + moeActivationName(static_cast<MoeActivation>(a.activation));
    }
    if (!a.int4()) return "";
    const std::string s1 = scaleProblem(d[6], w1, H, a, "fc1_scales");
    return s1.empty() ? scaleProblem(d[7], w2, I, a, "fc2_scales") : s1;
}

// 0 when the input shapes are consistent, else logs why and returns 1; `dimsOf` reads one input's Dims
// (configurePlugin gets DynamicPluginTensorDesc, onShapeChange PluginTensorDesc).
template <typename Desc, typename DimsOf>
int32_t checkShapes(const Desc* in, const MoeAttributes& a, DimsOf dimsOf) {
    Dims dims[kNbInputsInt4]{};
    for (int32_t i = 0; i < a.nbInputs(); ++i) dims[i] = dimsOf(in[i]);
    const std::string problem = shapeProblem(dims, a);
    if (!problem.empty()) logError(problem);
    return problem.empty() ? 0 : 1;
}

bool toMoeDType(DataType t, MoeDType& out) {
    if (t == DataType::kFLOAT) out = MoeDType::kFP32;
    else if (t == DataType::kHALF) out = MoeDType::kFP16;
    else return false;
    return true;
}

std::string attributeProblem(const MoeAttributes& a) {
    std::ostringstream s;
    if (a.num_experts < 1 || a.num_experts > kMoeMaxExperts) {
        s << "num_experts=" << a.num_experts << " is outside [1, " << kMoeMaxExperts << "]";
    } else if (a.top_k < 1 || a.top_k > kMoeMaxTopK || a.top_k > a.num_experts) {
        s << "top_k=" << a.top_k << " is outside [1, min(" << kMoeMaxTopK << ", num_experts=" << a.num_experts << ")]";
    } else if (a.activation < 0 || a.activation > 2) {
        s << "activation=" << a.activation << " is not 0 (swiglu), 1 (gelu_tanh) or 2 (gelu_erf)";
    } else if (a.normalize_routing_weights != 0 && a.normalize_routing_weights != 1) {
        s << "normalize_routing_weights=" << a.normalize_routing_weights << " is not 0 or 1";
    } else if (a.weight_bits != 16 && a.weight_bits != 4) {
        s << "weight_bits=" << a.weight_bits << " is not 16 (experts in hidden's dtype) or 4 (INT4)";
    } else if (a.int4() && !moeValidGroupSize(a.group_size)) {
        s << "group_size=" << a.group_size << " is not 32, 64 or 128 (needed with weight_bits=4)";
    }
    return s.str();
}

// The creator's fields, in the order of MoeAttributes; data pointers are filled per plugin when serialising.
// The first kRequiredFields are required; weight_bits and group_size came with INT4 experts and default to float
// experts, so engines and graphs written before them still load.
const char* const kFieldNames[] = {"num_experts", "top_k", "activation", "normalize_routing_weights", "weight_bits",
                                   "group_size"};
constexpr int kNbFields = 6;
constexpr int kRequiredFields = 4;

int32_t* attributeSlot(MoeAttributes& a, int index) {
    int32_t* slots[] = {&a.num_experts, &a.top_k, &a.activation, &a.normalize_routing_weights, &a.weight_bits,
                        &a.group_size};
    return slots[index];
}

// Reads one integer field (ONNX INT attributes arrive as kINT32; kINT64 and narrower ints are accepted too).
bool readInteger(const PluginField& f, int32_t& out) {
    if (f.data == nullptr || f.length != 1) return false;
    switch (f.type) {
        case PluginFieldType::kINT32: out = *static_cast<const int32_t*>(f.data); return true;
        case PluginFieldType::kINT64: out = static_cast<int32_t>(*static_cast<const int64_t*>(f.data)); return true;
        case PluginFieldType::kINT16: out = *static_cast<const int16_t*>(f.data); return true;
        case PluginFieldType::kINT8: out = *static_cast<const int8_t*>(f.data); return true;
        default: return false;
    }
}

// Fills `attrs` from `fc` (the first kRequiredFields are required). Returns the problem, or "" on success.
std::string parseFields(const nvinfer1::PluginFieldCollection* fc, MoeAttributes& attrs) {
    if (fc == nullptr) return "no plugin fields";
    bool seen[kNbFields] = {};
    for (int32_t i = 0; i < fc->nbFields; ++i) {
        const PluginField& f = fc->fields[i];
        if (f.name == nullptr) continue;
        for (int k = 0; k < kNbFields; ++k) {
            if (std::string(f.name) != kFieldNames[k]) continue;
            if (!readInteger(f, *attributeSlot(attrs, k))) {
                return std::string("field '") + f.name + "' must be one integer";
            }
            seen[k] = true;
        }
        // Other fields (none expected) are ignored, so newer exporters can add optional attributes.
    }
    for (int k = 0; k < kRequiredFields; ++k) {
        if (!seen[k]) return std::string("missing field '") + kFieldNames[k] + "'";
    }
    return attributeProblem(attrs);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// MoePlugin
// ---------------------------------------------------------------------------------------------------------------

MoePlugin::MoePlugin(const MoeAttributes& attrs) : mAttrs(attrs) { bindFields(); }

MoePlugin::MoePlugin(const MoePlugin& other)
    : nvinfer1::IPluginV3(other),
      nvinfer1::IPluginV3OneCore(other),
      nvinfer1::IPluginV3OneBuild(other),
      nvinfer1::IPluginV3OneRuntime(other),
      mAttrs(other.mAttrs) {
    bindFields();
}

void MoePlugin::bindFields() {
    mFields.clear();
    for (int k = 0; k < kNbFields; ++k) {
        mFields.emplace_back(kFieldNames[k], attributeSlot(mAttrs, k), PluginFieldType::kINT32, 1);
    }
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
    mId = std::string(kPluginName) + "_E" + std::to_string(mAttrs.num_experts) + "_K" + std::to_string(mAttrs.top_k) +
          "_" + moeActivationName(static_cast<MoeActivation>(mAttrs.activation)) + "_norm" +
          std::to_string(mAttrs.normalize_routing_weights) +
          (mAttrs.int4() ? "_int4g" + std::to_string(mAttrs.group_size) : "");
}

nvinfer1::IPluginCapability* MoePlugin::getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept {
    switch (type) {
        case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
        case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
        case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    }
    return nullptr;
}

nvinfer1::IPluginV3* MoePlugin::clone() noexcept {
    try {
        return new MoePlugin(*this);
    } catch (const std::exception& e) {
        logError(std::string("clone failed: ") + e.what());
        return nullptr;
    }
}

int32_t MoePlugin::configurePlugin(const nvinfer1::DynamicPluginTensorDesc* in, int32_t nbInputs,
                                   const nvinfer1::DynamicPluginTensorDesc* /*out*/, int32_t nbOutputs) noexcept {
    try {
        if (nbInputs != mAttrs.nbInputs() || nbOutputs != 1) {
            logError("expects " + std::to_string(mAttrs.nbInputs()) + " inputs and 1 output, got " +
                     std::to_string(nbInputs) + " and " +
                     std::to_string(nbOutputs));
            return 1;
        }
        return checkShapes(in, mAttrs, [](const nvinfer1::DynamicPluginTensorDesc& d) { return d.desc.dims; });
    } catch (const std::exception& e) {
        logError(e.what());
        return 1;
    }
}

int32_t MoePlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, const DataType* inputTypes,
                                      int32_t nbInputs) const noexcept {
    if (nbOutputs != 1 || nbInputs != mAttrs.nbInputs()) return 1;
    outputTypes[0] = inputTypes[0];  // output has hidden's dtype
    return 0;
}

int32_t MoePlugin::getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nbInputs,
                                   const nvinfer1::DimsExprs* /*shapeInputs*/, int32_t /*nbShapeInputs*/,
                                   nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                                   nvinfer1::IExprBuilder& /*exprBuilder*/) noexcept {
    if (nbInputs != mAttrs.nbInputs() || nbOutputs != 1) return 1;
    outputs[0] = inputs[0];  // [T, H], like hidden
    return 0;
}

bool MoePlugin::supportsFormatCombination(int32_t pos, const nvinfer1::DynamicPluginTensorDesc* inOut, int32_t nbInputs,
                                          int32_t nbOutputs) noexcept {
    if (nbInputs != mAttrs.nbInputs() || nbOutputs != 1 || pos < 0 || pos > nbInputs) return false;
    const nvinfer1::PluginTensorDesc& d = inOut[pos].desc;
    if (d.format != nvinfer1::TensorFormat::kLINEAR) return false;
    if (pos == 1) return d.type == DataType::kFLOAT;  // router logits: always fp32
    if (mAttrs.int4()) {
        // Packed codes travel as int32 words: TensorRT's (U)INT8 tensors carry quantisation semantics.
        if (pos == 2 || pos == 4) return d.type == DataType::kINT32;
        if (pos == 6 || pos == 7) return d.type == DataType::kHALF;  // group scales
        if (pos == 0) return d.type == DataType::kHALF;
    } else if (pos == 0) {
        return d.type == DataType::kFLOAT || d.type == DataType::kHALF;
    }
    return d.type == inOut[0].desc.type;  // biases and output follow hidden
}

size_t MoePlugin::getWorkspaceSize(const nvinfer1::DynamicPluginTensorDesc* inputs, int32_t nbInputs,
                                   const nvinfer1::DynamicPluginTensorDesc* /*outputs*/,
                                   int32_t /*nbOutputs*/) const noexcept {
    if (nbInputs != mAttrs.nbInputs()) return 0;
    MoeDType dtype = MoeDType::kFP32;
    if (!toMoeDType(inputs[0].desc.type, dtype)) dtype = MoeDType::kFP32;  // the larger element size
    const Dims& x = inputs[0].max;  // the profile's largest shapes bound every enqueue
    const int64_t T = leadingProduct(x), H = x.d[x.nbDims - 1], I = unpacked(inputs[4].max.d[2], mAttrs);
    if (T < 0 || H < 0 || I < 0) return 0;
    return moeWorkspaceSize(static_cast<int>(T), mAttrs.num_experts, mAttrs.top_k, static_cast<int>(H),
                            static_cast<int>(I), dtype);
}

int32_t MoePlugin::onShapeChange(const nvinfer1::PluginTensorDesc* in, int32_t nbInputs,
                                 const nvinfer1::PluginTensorDesc* /*out*/, int32_t nbOutputs) noexcept {
    try {
        if (nbInputs != mAttrs.nbInputs() || nbOutputs != 1) return 1;
        return checkShapes(in, mAttrs, [](const nvinfer1::PluginTensorDesc& d) { return d.dims; });
    } catch (const std::exception& e) {
        logError(e.what());
        return 1;
    }
}

int32_t MoePlugin::enqueue(const nvinfer1::PluginTensorDesc* inputDesc,
                           const nvinfer1::PluginTensorDesc* /*outputDesc*/, const void* const* inputs,
                           void* const* outputs, void* workspace, cudaStream_t stream) noexcept {
    MoeParams p;
    if (!toMoeDType(inputDesc[0].type, p.dtype)) {
        logError("hidden must be fp32 or fp16");
        return 1;
    }
    const Dims& x = inputDesc[0].dims;
    p.T = static_cast<int32_t>(leadingProduct(x));
    p.H = static_cast<int32_t>(x.d[x.nbDims - 1]);
    p.I = static_cast<int32_t>(unpacked(inputDesc[4].dims.d[2], mAttrs));
    p.E = mAttrs.num_experts;
    p.K = mAttrs.top_k;
    p.activation = static_cast<MoeActivation>(mAttrs.activation);
    p.normalize = mAttrs.normalize_routing_weights != 0;
    p.hidden = inputs[0];
    p.router_logits = static_cast<const float*>(inputs[1]);
    p.fc1_weight = inputs[2];
    p.fc1_bias = inputs[3];
    p.fc2_weight = inputs[4];
    p.fc2_bias = inputs[5];
    p.output = outputs[0];
    if (mAttrs.int4()) {
        p.weight_bits = 4;
        p.group_size = mAttrs.group_size;
        p.fc1_scales = inputs[6];
        p.fc2_scales = inputs[7];
    }
    const cudaError_t status = moeForward(p, workspace, stream);
    if (status != cudaSuccess) {
        logError(std::string("enqueue failed: ") + cudaGetErrorString(status));
        return 1;
    }
    return 0;
}

nvinfer1::IPluginV3* MoePlugin::attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept {
    return clone();  // no per-context resources
}

const nvinfer1::PluginFieldCollection* MoePlugin::getFieldsToSerialize() noexcept { return &mFieldCollection; }

// ---------------------------------------------------------------------------------------------------------------
// MoePluginCreator
// ---------------------------------------------------------------------------------------------------------------

MoePluginCreator::MoePluginCreator() {
    for (const char* name : kFieldNames) mFields.emplace_back(name, nullptr, PluginFieldType::kINT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

// Build and runtime phase get the same fields (at runtime: those of getFieldsToSerialize).
nvinfer1::IPluginV3* MoePluginCreator::createPlugin(const char* name, const nvinfer1::PluginFieldCollection* fc,
                                                    nvinfer1::TensorRTPhase /*phase*/) noexcept {
    try {
        MoeAttributes attrs;
        const std::string problem = parseFields(fc, attrs);
        if (!problem.empty()) {
            logError(std::string("cannot create '") + (name ? name : "") + "': " + problem);
            return nullptr;
        }
        return new MoePlugin(attrs);
    } catch (const std::exception& e) {
        logError(std::string("createPlugin failed: ") + e.what());
        return nullptr;
    }
}

#if defined(MOE_LLAVA_STATIC_REGISTRATION)
namespace {
// Registers the creator when the library is opened, under kPluginNamespace: REGISTER_TENSORRT_PLUGIN would
// register it under namespace "", where the parser - looking up the node's plugin_namespace "moe_llava" -
// does not look, and a V3 creator cannot be moved to another namespace afterwards.
struct StaticRegistration {
    StaticRegistration() {
        static MoePluginCreator creator;
        if (!getPluginRegistry()->registerCreator(creator, kPluginNamespace)) {
            logError("static registration of the creator failed (already registered?)");
        }
    }
};
const StaticRegistration gStaticRegistration;
}  // namespace
#endif

}  // namespace moe_llava

// Entry points of a dynamically loaded plugin library (IPluginRegistry::loadLibrary, trtexec --dynamicPlugins).
// Exported explicitly: TENSORRTAPI is empty outside TensorRT's own build, and the library hides everything else.
#define MOE_LLAVA_EXPORT __attribute__((visibility("default")))

extern "C" MOE_LLAVA_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder) { moe_llava::gLoggerFinder = finder; }

extern "C" MOE_LLAVA_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
    static moe_llava::MoePluginCreator creator;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
    nbCreators = 1;
    return creators;
}
