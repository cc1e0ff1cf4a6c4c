// Takes the real MoE IPluginV3 (runtime/plugins/moe_plugin.cpp) through TensorRT's life cycle on a real GPU,
// without TensorRT: only its open-source headers are needed (the static-registration macro stays compiled out, so
// nothing links libnvinfer). Built with nvcc and run by gpu_check/lifecycle.py, also under compute-sanitizer.
//
//   plugin_lifecycle T E K H I DTYPE DIR     (SwiGLU; DTYPE fp16|fp32)
//   reads  DIR/{hidden,logits,fc1_w,fc1_b,fc2_w,fc2_b}.bin
//   writes DIR/out_aligned.bin     enqueue on cudaMalloc'd (256-byte aligned) buffers
//          DIR/out_misaligned.bin  every I/O tensor shifted by one element: not 16-byte aligned, so the kernels
//                                  must take their scalar paths; the workspace 16 bytes past a 256-byte boundary
//          DIR/out_graph.bin       the enqueue captured into a CUDA graph, output cleared, graph replayed twice
//
// Life cycle as TensorRT drives it: getCreators -> createPlugin(kBUILD) -> supportsFormatCombination ->
// getOutputDataTypes -> configurePlugin -> getWorkspaceSize -> getFieldsToSerialize -> createPlugin(kRUNTIME) ->
// attachToContext -> onShapeChange -> enqueue. Prints one line per failed check; exit 0 only if all passed.
#include "moe_plugin.h"

#include <cuda_runtime_api.h>

#include <cstdint>
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

namespace {

int gFailures = 0;
constexpr size_t kWorkspaceShift = 16;  // the misaligned run's workspace: 16-byte aligned only
#define CHECK(cond)                                                   \
    do {                                                              \
        if (!(cond)) {                                                \
            std::printf("FAILED line %d: %s\n", __LINE__, #cond);     \
            ++gFailures;                                              \
        }                                                             \
    } while (0)

// A CUDA call that must succeed; on failure the run cannot go on.
#define CUDA_OK(call)                                                                                 \
    do {                                                                                              \
        const cudaError_t status_ = (call);                                                           \
        if (status_ != cudaSuccess) {                                                                 \
            std::printf("FAILED line %d: %s -> %s\n", __LINE__, #call, cudaGetErrorString(status_)); \
            std::exit(1);                                                                             \
        }                                                                                             \
    } while (0)

struct PrintingLogger : ILogger {
    int errors = 0;
    void log(Severity severity, const char* msg) noexcept override {
        if (severity <= Severity::kERROR) ++errors;
        if (severity <= Severity::kWARNING) std::printf("plugin log: %s\n", msg);
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

std::vector<char> readFile(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) {
        std::printf("FAILED: cannot read %s\n", path.c_str());
        std::exit(2);
    }
    return std::vector<char>(std::istreambuf_iterator<char>(f), {});
}

void writeFile(const std::string& path, const std::vector<char>& bytes) {
    std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// The six inputs and the output on the device, each at `shift` bytes past a cudaMalloc'd (256-aligned) base.
struct DeviceIO {
    std::vector<void*> bases;
    const void* inputs[6]{};
    void* outputs[1]{};
    size_t outBytes = 0;

    DeviceIO(const std::vector<std::vector<char>>& host, size_t outBytes_, size_t ioShift, size_t logitShift)
        : outBytes(outBytes_) {
        for (int i = 0; i < 6; ++i) {
            const size_t shift = i == 1 ? logitShift : ioShift;
            char* p = allocate(host[i].size() + shift) + shift;
            CUDA_OK(cudaMemcpy(p, host[i].data(), host[i].size(), cudaMemcpyHostToDevice));
            inputs[i] = p;
        }
        outputs[0] = allocate(outBytes + ioShift) + ioShift;
    }
    ~DeviceIO() {
        for (void* p : bases) cudaFree(p);
    }
    char* allocate(size_t bytes) {
        void* p = nullptr;
        CUDA_OK(cudaMalloc(&p, bytes));
        bases.push_back(p);
        return static_cast<char*>(p);
    }
    std::vector<char> download() const {
        std::vector<char> host(outBytes);
        CUDA_OK(cudaMemcpy(host.data(), outputs[0], outBytes, cudaMemcpyDeviceToHost));
        return host;
    }
};

struct Sizes {
    int T, E, K, H, I;
    bool fp16;
};

// Build phase: formats, types, shapes (T dynamic, profile max 4T+8), workspace. Returns the workspace bytes.
size_t buildPhase(IPluginV3* plugin, const Sizes& s, const PrintingLogger& logger) {
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    CHECK(build != nullptr && build->getNbOutputs() == 1);
    const DataType io = s.fp16 ? DataType::kHALF : DataType::kFLOAT;
    DataType inTypes[6] = {io, DataType::kFLOAT, io, io, io, io};
    DataType outType = DataType::kINT8;
    CHECK(build->getOutputDataTypes(&outType, 1, inTypes, 6) == 0 && outType == io);
    DynamicPluginTensorDesc desc[7]{};
    const Dims shapes[7] = {dims({-1, s.H}), dims({-1, s.E}), dims({s.E, 2 * s.I, s.H}), dims({s.E, 2 * s.I}),
                            dims({s.E, s.H, s.I}), dims({s.E, s.H}), dims({-1, s.H})};
    for (int i = 0; i < 7; ++i) {
        desc[i].desc.format = TensorFormat::kLINEAR;
        desc[i].desc.type = inTypes[i == 6 ? 0 : i];
        desc[i].desc.dims = desc[i].min = desc[i].opt = desc[i].max = shapes[i];
    }
    for (int i : {0, 1, 6}) {
        desc[i].min.d[0] = 1;
        desc[i].opt.d[0] = s.T;
        desc[i].max.d[0] = 4 * s.T + 8;
    }
    for (int pos = 0; pos < 7; ++pos) CHECK(build->supportsFormatCombination(pos, desc, 6, 1));
    const int errorsBefore = logger.errors;
    CHECK(build->configurePlugin(desc, 6, desc + 6, 1) == 0);
    CHECK(logger.errors == errorsBefore);
    const size_t ws = build->getWorkspaceSize(desc, 6, desc + 6, 1);
    const auto dtype = s.fp16 ? moe_llava::MoeDType::kFP16 : moe_llava::MoeDType::kFP32;
    CHECK(ws == moe_llava::moeWorkspaceSize(4 * s.T + 8, s.E, s.K, s.H, s.I, dtype));
    CHECK(ws >= moe_llava::moeWorkspaceSize(s.T, s.E, s.K, s.H, s.I, dtype));
    return ws;
}

// What an execution context does after deserialising: recreate from the serialised fields, attach, set shapes.
IPluginV3* runtimePhase(IPluginCreatorV3One* creator, IPluginV3* built, const Sizes& s, PluginTensorDesc (&in)[6],
                        PluginTensorDesc& out) {
    auto* builtRt = static_cast<IPluginV3OneRuntime*>(built->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    const PluginFieldCollection* saved = builtRt->getFieldsToSerialize();
    CHECK(saved != nullptr && saved->nbFields == 6);  // num_experts, top_k, activation, normalize, weight_bits, group_size
    // TensorRT copies the field data into the plan; copy it here too so nothing points into `built`.
    std::vector<int32_t> values;
    std::vector<PluginField> fields;
    for (int i = 0; i < saved->nbFields; ++i) values.push_back(*static_cast<const int32_t*>(saved->fields[i].data));
    for (int i = 0; i < saved->nbFields; ++i) {
        fields.emplace_back(saved->fields[i].name, &values[i], saved->fields[i].type, saved->fields[i].length);
    }
    const PluginFieldCollection plan{static_cast<int32_t>(fields.size()), fields.data()};
    IPluginV3* restored = creator->createPlugin("moe_layer", &plan, TensorRTPhase::kRUNTIME);
    CHECK(restored != nullptr);
    if (restored == nullptr) std::exit(1);
    auto* rt = static_cast<IPluginV3OneRuntime*>(restored->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    IPluginV3* attached = rt->attachToContext(nullptr);
    CHECK(attached != nullptr);
    delete restored;
    if (attached == nullptr) std::exit(1);

    const DataType io = s.fp16 ? DataType::kHALF : DataType::kFLOAT;
    const Dims concrete[6] = {dims({s.T, s.H}), dims({s.T, s.E}), dims({s.E, 2 * s.I, s.H}), dims({s.E, 2 * s.I}),
                              dims({s.E, s.H, s.I}), dims({s.E, s.H})};
    for (int i = 0; i < 6; ++i) {
        in[i] = PluginTensorDesc{};
        in[i].dims = concrete[i];
        in[i].type = i == 1 ? DataType::kFLOAT : io;
        in[i].format = TensorFormat::kLINEAR;
    }
    out = in[0];
    auto* attachedRt =
        static_cast<IPluginV3OneRuntime*>(attached->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    CHECK(attachedRt->onShapeChange(in, 6, &out, 1) == 0);
    return attached;
}

// Eager enqueue on `io`; returns the output bytes.
std::vector<char> runEager(IPluginV3OneRuntime* rt, const PluginTensorDesc (&in)[6], const PluginTensorDesc& out,
                           DeviceIO& io, void* workspace, cudaStream_t stream) {
    CUDA_OK(cudaMemsetAsync(io.outputs[0], 0, io.outBytes, stream));
    CHECK(rt->enqueue(in, &out, io.inputs, io.outputs, workspace, stream) == 0);
    CUDA_OK(cudaStreamSynchronize(stream));
    return io.download();
}

// The enqueue captured into a graph (nothing runs while capturing), then replayed twice on a cleared output.
std::vector<char> runGraph(IPluginV3OneRuntime* rt, const PluginTensorDesc (&in)[6], const PluginTensorDesc& out,
                           DeviceIO& io, void* workspace, cudaStream_t stream) {
    cudaGraph_t graph = nullptr;
    CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    const int32_t status = rt->enqueue(in, &out, io.inputs, io.outputs, workspace, stream);
    CUDA_OK(cudaStreamEndCapture(stream, &graph));
    CHECK(status == 0);
    cudaGraphExec_t exec = nullptr;
    CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
    CUDA_OK(cudaMemsetAsync(io.outputs[0], 0, io.outBytes, stream));
    CUDA_OK(cudaGraphLaunch(exec, stream));
    CUDA_OK(cudaGraphLaunch(exec, stream));
    CUDA_OK(cudaStreamSynchronize(stream));
    CUDA_OK(cudaGraphExecDestroy(exec));
    CUDA_OK(cudaGraphDestroy(graph));
    return io.download();
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 8 || (std::strcmp(argv[6], "fp16") != 0 && std::strcmp(argv[6], "fp32") != 0)) {
        std::fprintf(stderr, "usage: plugin_lifecycle T E K H I fp16|fp32 DIR\n");
        return 2;
    }
    const Sizes s{std::atoi(argv[1]), std::atoi(argv[2]), std::atoi(argv[3]), std::atoi(argv[4]),
                  std::atoi(argv[5]), std::strcmp(argv[6], "fp16") == 0};
    const std::string dir = argv[7];
    PrintingLogger logger;
    Finder finder;
    finder.logger = &logger;
    setLoggerFinder(&finder);

    int32_t nbCreators = 0;
    IPluginCreatorInterface* const* creators = getCreators(nbCreators);
    CHECK(nbCreators == 1 && std::strcmp(creators[0]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0);
    auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);
    CHECK(std::strcmp(creator->getPluginName(), "MoELlavaMoE") == 0);
    CHECK(std::strcmp(creator->getPluginNamespace(), "moe_llava") == 0);

    const int32_t values[4] = {s.E, s.K, 0, 1};  // num_experts, top_k, activation swiglu, normalise
    const char* names[4] = {"num_experts", "top_k", "activation", "normalize_routing_weights"};
    std::vector<PluginField> fields;
    for (int i = 0; i < 4; ++i) fields.emplace_back(names[i], &values[i], PluginFieldType::kINT32, 1);
    const PluginFieldCollection fc{4, fields.data()};
    IPluginV3* built = creator->createPlugin("moe_layer", &fc, TensorRTPhase::kBUILD);
    CHECK(built != nullptr);
    if (built == nullptr) return 1;
    const size_t wsBytes = buildPhase(built, s, logger);

    PluginTensorDesc in[6], out{};
    IPluginV3* attached = runtimePhase(creator, built, s, in, out);
    delete built;
    auto* rt = static_cast<IPluginV3OneRuntime*>(attached->getCapabilityInterface(PluginCapabilityType::kRUNTIME));

    const char* files[6] = {"hidden", "logits", "fc1_w", "fc1_b", "fc2_w", "fc2_b"};
    std::vector<std::vector<char>> host;
    for (const char* f : files) host.push_back(readFile(dir + "/" + f + ".bin"));
    const size_t element = s.fp16 ? 2 : 4, outBytes = static_cast<size_t>(s.T) * s.H * element;
    void* workspace = nullptr;
    CUDA_OK(cudaMalloc(&workspace, wsBytes + kWorkspaceShift));
    cudaStream_t stream = nullptr;
    CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    {
        DeviceIO aligned(host, outBytes, 0, 0);
        writeFile(dir + "/out_aligned.bin", runEager(rt, in, out, aligned, workspace, stream));
        writeFile(dir + "/out_graph.bin", runGraph(rt, in, out, aligned, workspace, stream));
        DeviceIO misaligned(host, outBytes, element, sizeof(float));
        void* shiftedWorkspace = static_cast<char*>(workspace) + kWorkspaceShift;
        writeFile(dir + "/out_misaligned.bin", runEager(rt, in, out, misaligned, shiftedWorkspace, stream));
    }
    CUDA_OK(cudaStreamDestroy(stream));
    CUDA_OK(cudaFree(workspace));
    delete attached;
    CHECK(logger.errors == 0);
    std::printf("workspace_bytes %zu\n%d failed checks\n", wsBytes, gFailures);
    return gFailures == 0 ? 0 : 1;
}
