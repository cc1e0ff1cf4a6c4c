// Drives the IPluginV3 glue (runtime/plugins/moe_plugin.cpp) the way TensorRT would, without TensorRT: only its
// headers are needed, the kernels run under the CPU emulation. Built and run by test_plugin_glue_emulated.py.
//
//   plugin_glue_driver T E K H I DIR   (fp16, SwiGLU; inputs DIR/*.bin as for emu_driver, writes DIR/out.bin)
// Then negotiates an INT4-experts node (shapes, types, workspace, serialisation; its kernels: test_plugin_int4_*).
//
// Prints one line per failed check and exits non-zero if any failed.
#include "moe_plugin.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <string>
#include <vector>

using namespace nvinfer1;

extern "C" IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
extern "C" void setLoggerFinder(ILoggerFinder* finder);

// The emulated kernels never call the CUDA runtime; the glue only formats an error string with it.
const char* cudaGetErrorString(cudaError_t) { return "cuda error (emulated)"; }

namespace {

int gFailures = 0;
#define CHECK(cond)                                                         \
    do {                                                                    \
        if (!(cond)) {                                                      \
            std::printf("FAILED line %d: %s\n", __LINE__, #cond);           \
            ++gFailures;                                                    \
        }                                                                   \
    } while (0)

struct CollectingLogger : ILogger {
    std::string errors;
    void log(Severity severity, const char* msg) noexcept override {
        if (severity <= Severity::kERROR) errors += std::string(msg) + "\n";
    }
};

struct Finder : ILoggerFinder {
    ILogger* logger = nullptr;
    ILogger* findLogger() override { return logger; }
};

Dims dims(std::initializer_list<int64_t> extents) {
    Dims d{};
    d.nbDims = static_cast<int32_t>(extents.size());
    int i = 0;
    for (int64_t e : extents) d.d[i++] = e;
    return d;
}

struct Field {
    const char* name;
    int32_t value;
};

// `list` must outlive the collection: the fields point at its values.
PluginFieldCollection fieldsOf(std::vector<PluginField>& storage, const std::vector<Field>& list) {
    storage.clear();
    for (const Field& f : list) storage.emplace_back(f.name, &f.value, PluginFieldType::kINT32, 1);
    return PluginFieldCollection{static_cast<int32_t>(storage.size()), storage.data()};
}

std::vector<char> readFile(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    return std::vector<char>(std::istreambuf_iterator<char>(f), {});
}

// INT4 experts (weight_bits 4, group 32; H and I multiples of 32): 8 inputs, int32 codes, fp16 scales.
void checkInt4Negotiation(IPluginCreatorV3One& creator, CollectingLogger& logger, int E, int K, int H, int I) {
    std::vector<PluginField> storage;
    const std::vector<Field> fields = {{"num_experts", E}, {"top_k", K}, {"activation", 0},
                                       {"normalize_routing_weights", 1}, {"weight_bits", 4}, {"group_size", 32}};
    const PluginFieldCollection fc = fieldsOf(storage, fields);
    IPluginV3* plugin = creator.createPlugin("moe_int4", &fc, TensorRTPhase::kBUILD);
    CHECK(plugin != nullptr);
    if (plugin == nullptr) return;
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    const DataType kTypes[9] = {DataType::kHALF, DataType::kFLOAT, DataType::kINT32, DataType::kHALF,
                                DataType::kINT32, DataType::kHALF, DataType::kHALF, DataType::kHALF, DataType::kHALF};
    const Dims shapes[8] = {dims({-1, H}), dims({-1, E}), dims({E, 2 * I, H / 8}), dims({E, 2 * I}),
                            dims({E, H, I / 8}), dims({E, H}), dims({E, 2 * I, H / 32}), dims({E, H, I / 32})};
    DynamicPluginTensorDesc io[9]{};
    for (int i = 0; i < 9; ++i) {
        io[i].desc.format = TensorFormat::kLINEAR;
        io[i].desc.type = kTypes[i];
        io[i].desc.dims = io[i].min = io[i].opt = io[i].max = i < 8 ? shapes[i] : shapes[0];
    }
    for (int pos = 0; pos < 9; ++pos) CHECK(build->supportsFormatCombination(pos, io, 8, 1));
    CHECK(!build->supportsFormatCombination(0, io, 6, 1));  // 6 inputs is the float node
    io[2].desc.type = DataType::kHALF;
    CHECK(!build->supportsFormatCombination(2, io, 8, 1));  // codes are int32 words
    io[2].desc.type = DataType::kINT32;
    io[0].desc.type = DataType::kFLOAT;
    CHECK(!build->supportsFormatCombination(0, io, 8, 1));  // INT4 experts need fp16 hidden
    io[0].desc.type = DataType::kHALF;
    io[0].max.d[0] = io[1].max.d[0] = 16;
    logger.errors.clear();
    CHECK(build->configurePlugin(io, 8, io + 8, 1) == 0);
    CHECK(logger.errors.empty());
    CHECK(build->getWorkspaceSize(io, 8, io + 8, 1) ==
          moe_llava::moeWorkspaceSize(16, E, K, H, I, moe_llava::MoeDType::kFP16));  // I unpacked from I/8
    io[7].desc.dims = dims({E, H, I / 64});  // scales of another group size
    CHECK(build->configurePlugin(io, 8, io + 8, 1) != 0);
    CHECK(logger.errors.find("fc2_scales") != std::string::npos);
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    const PluginFieldCollection* saved = runtime->getFieldsToSerialize();
    CHECK(saved->nbFields == 6 && *static_cast<const int32_t*>(saved->fields[4].data) == 4 &&
          *static_cast<const int32_t*>(saved->fields[5].data) == 32);
    IPluginV3* restored = creator.createPlugin("moe_int4", saved, TensorRTPhase::kRUNTIME);
    CHECK(restored != nullptr);
    delete restored;
    delete plugin;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 7) {
        std::fprintf(stderr, "usage: plugin_glue_driver T E K H I DIR\n");
        return 2;
    }
    const int T = std::atoi(argv[1]), E = std::atoi(argv[2]), K = std::atoi(argv[3]), H = std::atoi(argv[4]),
              I = std::atoi(argv[5]);
    const std::string dir = argv[6];
    CollectingLogger logger;
    Finder finder;
    finder.logger = &logger;
    setLoggerFinder(&finder);

    // Creator: what the registry and the ONNX parser see.
    int32_t nbCreators = 0;
    IPluginCreatorInterface* const* creators = getCreators(nbCreators);
    CHECK(nbCreators == 1);
    CHECK(std::strcmp(creators[0]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0);
    auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);
    CHECK(std::strcmp(creator->getPluginName(), "MoELlavaMoE") == 0);
    CHECK(std::strcmp(creator->getPluginVersion(), "1") == 0);
    CHECK(std::strcmp(creator->getPluginNamespace(), "moe_llava") == 0);
    const PluginFieldCollection* names = creator->getFieldNames();
    CHECK(names->nbFields == 6);
    CHECK(std::strcmp(names->fields[3].name, "normalize_routing_weights") == 0);
    CHECK(std::strcmp(names->fields[4].name, "weight_bits") == 0);
    CHECK(std::strcmp(names->fields[5].name, "group_size") == 0);

    // Field validation: each bad collection is refused with a logged reason.
    std::vector<PluginField> storage;
    struct BadCase {
        std::vector<Field> fields;
        const char* expected;
    };
    const std::vector<BadCase> bad = {
        {{{"num_experts", E}, {"activation", 0}, {"normalize_routing_weights", 1}}, "missing field 'top_k'"},
        {{{"num_experts", 2}, {"top_k", 3}, {"activation", 0}, {"normalize_routing_weights", 1}}, "top_k=3"},
        {{{"num_experts", E}, {"top_k", K}, {"activation", 5}, {"normalize_routing_weights", 1}}, "activation=5"},
        {{{"num_experts", 0}, {"top_k", 1}, {"activation", 0}, {"normalize_routing_weights", 1}}, "num_experts=0"},
        {{{"num_experts", E}, {"top_k", K}, {"activation", 0}, {"normalize_routing_weights", 2}},
         "normalize_routing_weights=2"},
        {{{"num_experts", E}, {"top_k", K}, {"activation", 0}, {"normalize_routing_weights", 1}, {"weight_bits", 8}},
         "weight_bits=8"},
        {{{"num_experts", E}, {"top_k", K}, {"activation", 0}, {"normalize_routing_weights", 1}, {"weight_bits", 4},
          {"group_size", 48}}, "group_size=48"},
    };
    for (const BadCase& c : bad) {
        logger.errors.clear();
        const PluginFieldCollection fc = fieldsOf(storage, c.fields);
        IPluginV3* p = creator->createPlugin("moe", &fc, TensorRTPhase::kBUILD);
        CHECK(p == nullptr);
        CHECK(logger.errors.find(c.expected) != std::string::npos);
        if (logger.errors.find(c.expected) == std::string::npos) std::printf("  log was: %s\n", logger.errors.c_str());
        delete p;
    }

    const std::vector<Field> good = {
        {"num_experts", E}, {"top_k", K}, {"activation", 0}, {"normalize_routing_weights", 1}};
    PluginFieldCollection fc = fieldsOf(storage, good);
    IPluginV3* plugin = creator->createPlugin("moe", &fc, TensorRTPhase::kBUILD);
    CHECK(plugin != nullptr);
    if (plugin == nullptr) return 1;
    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    CHECK(std::strcmp(core->getPluginName(), "MoELlavaMoE") == 0);
    CHECK(std::strcmp(core->getPluginNamespace(), "moe_llava") == 0);
    CHECK(build->getNbOutputs() == 1);

    // Types and formats.
    const DataType kH = DataType::kHALF;
    DataType inTypes[6] = {kH, DataType::kFLOAT, kH, kH, kH, kH};
    DataType outType = DataType::kFLOAT;
    CHECK(build->getOutputDataTypes(&outType, 1, inTypes, 6) == 0 && outType == DataType::kHALF);
    DynamicPluginTensorDesc io[7]{};
    for (int i = 0; i < 7; ++i) {
        io[i].desc.format = TensorFormat::kLINEAR;
        io[i].desc.type = i == 1 ? DataType::kFLOAT : DataType::kHALF;
    }
    for (int pos = 0; pos < 7; ++pos) CHECK(build->supportsFormatCombination(pos, io, 6, 1));
    io[1].desc.type = DataType::kHALF;
    CHECK(!build->supportsFormatCombination(1, io, 6, 1));  // logits must stay fp32
    io[1].desc.type = DataType::kFLOAT;
    io[3].desc.type = DataType::kFLOAT;
    CHECK(!build->supportsFormatCombination(3, io, 6, 1));  // expert tensors follow hidden's dtype
    io[3].desc.type = DataType::kHALF;
    io[0].desc.type = DataType::kINT8;
    CHECK(!build->supportsFormatCombination(0, io, 6, 1));
    io[0].desc.type = DataType::kHALF;
    io[6].desc.format = static_cast<TensorFormat>(1);  // any non-linear format
    CHECK(!build->supportsFormatCombination(6, io, 6, 1));
    io[6].desc.format = TensorFormat::kLINEAR;

    // Shapes at build time: T dynamic (-1), profile max 4*T.
    const Dims shapes[6] = {dims({-1, H}), dims({-1, E}), dims({E, 2 * I, H}),
                            dims({E, 2 * I}), dims({E, H, I}),  dims({E, H})};
    for (int i = 0; i < 6; ++i) {
        io[i].desc.dims = shapes[i];
        io[i].min = io[i].opt = io[i].max = shapes[i];
    }
    io[0].max.d[0] = io[1].max.d[0] = 4 * T;
    io[6].desc.dims = io[0].desc.dims;
    logger.errors.clear();
    CHECK(build->configurePlugin(io, 6, io + 6, 1) == 0);
    CHECK(logger.errors.empty());
    const size_t ws = build->getWorkspaceSize(io, 6, io + 6, 1);
    CHECK(ws == moe_llava::moeWorkspaceSize(4 * T, E, K, H, I, moe_llava::MoeDType::kFP16));
    io[2].desc.dims = dims({E, I, H});  // F = I is wrong for SwiGLU
    io[3].desc.dims = dims({E, I});
    CHECK(build->configurePlugin(io, 6, io + 6, 1) != 0);
    CHECK(logger.errors.find("fc1 rows F=") != std::string::npos);
    io[2].desc.dims = shapes[2];
    io[3].desc.dims = dims({E, I + 1});  // fc1 bias disagrees with fc1 weight
    CHECK(build->configurePlugin(io, 6, io + 6, 1) != 0);
    io[3].desc.dims = shapes[3];
    io[1].desc.dims = dims({-1, E + 1});
    CHECK(build->configurePlugin(io, 6, io + 6, 1) != 0);
    io[1].desc.dims = shapes[1];

    // Serialisation round trip (runtime phase) and clones.
    const PluginFieldCollection* saved = runtime->getFieldsToSerialize();
    CHECK(saved->nbFields == 6);
    IPluginV3* restored = creator->createPlugin("moe", saved, TensorRTPhase::kRUNTIME);
    CHECK(restored != nullptr);
    IPluginV3* cloned = plugin->clone();
    CHECK(cloned != nullptr);
    IPluginV3* attached = runtime->attachToContext(nullptr);
    CHECK(attached != nullptr);
    if (cloned != nullptr) {
        auto* rt = static_cast<IPluginV3OneRuntime*>(cloned->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
        const PluginFieldCollection* f = rt->getFieldsToSerialize();
        CHECK(f->nbFields == 6 && *static_cast<const int32_t*>(f->fields[0].data) == E &&
              *static_cast<const int32_t*>(f->fields[1].data) == K);
        CHECK(f->fields[0].data != saved->fields[0].data);  // the clone owns its field storage
    }
    delete restored;
    delete cloned;

    // Execution, on the restored-by-attach plugin like an execution context would.
    auto* rt = static_cast<IPluginV3OneRuntime*>(attached->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    PluginTensorDesc in[6]{}, out[1]{};
    const Dims concrete[6] = {dims({T, H}), dims({T, E}), shapes[2], shapes[3], shapes[4], shapes[5]};
    for (int i = 0; i < 6; ++i) {
        in[i].dims = concrete[i];
        in[i].type = i == 1 ? DataType::kFLOAT : DataType::kHALF;
        in[i].format = TensorFormat::kLINEAR;
    }
    out[0] = in[0];
    CHECK(rt->onShapeChange(in, 6, out, 1) == 0);
    const char* files[6] = {"hidden", "logits", "fc1_w", "fc1_b", "fc2_w", "fc2_b"};
    std::vector<std::vector<char>> data;
    const void* inputs[6];
    for (int i = 0; i < 6; ++i) {
        data.push_back(readFile(dir + "/" + files[i] + ".bin"));
        inputs[i] = data.back().data();
    }
    std::vector<char> output(static_cast<size_t>(T) * H * 2), workspace(ws + 256);
    void* outputs[1] = {output.data()};
    void* wsAligned = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(workspace.data()) + 255) / 256 * 256);
    CHECK(rt->enqueue(in, out, inputs, outputs, wsAligned, nullptr) == 0);
    std::ofstream(dir + "/out.bin", std::ios::binary).write(output.data(), static_cast<std::streamsize>(output.size()));
    delete attached;
    delete plugin;
    checkInt4Negotiation(*creator, logger, E, K, /*H=*/64, /*I=*/32);

    std::printf("%d failed checks\n", gFailures);
    return gFailures == 0 ? 0 : 1;
}
