// Stands in for libnvinfer's plugin registry to see what the MOE_LLAVA_STATIC_REGISTRATION build registers
// when it is loaded: prints "<creator name> <version> <namespace>" for each registerCreator call.
// Methods are declared without `override` so that one stub covers TensorRT 10.x and 11.x headers (a method a
// version lacks is then just an unrelated virtual).
#include <NvInferRuntime.h>

#include <cstdio>

namespace {

using nvinfer1::AsciiChar;

class RecordingRegistry : public nvinfer1::IPluginRegistry {
public:
    bool registerCreator(nvinfer1::IPluginCreatorInterface& creator, AsciiChar const* const ns) noexcept {
        auto* v3 = dynamic_cast<nvinfer1::IPluginCreatorV3One*>(&creator);
        std::printf("%s %s %s\n", v3 ? v3->getPluginName() : "?", v3 ? v3->getPluginVersion() : "?",
                    ns == nullptr ? "(null)" : (*ns ? ns : "(empty)"));
        return true;
    }
    bool registerCreator(nvinfer1::IPluginCreator&, AsciiChar const* const) noexcept { return false; }
    nvinfer1::IPluginCreator* const* getPluginCreatorList(int32_t* const n) const noexcept { *n = 0; return nullptr; }
    nvinfer1::IPluginCreator* getPluginCreator(AsciiChar const* const, AsciiChar const* const,
                                               AsciiChar const* const = "") noexcept { return nullptr; }
    bool deregisterCreator(nvinfer1::IPluginCreator const&) noexcept { return false; }
    void setErrorRecorder(nvinfer1::IErrorRecorder* const) noexcept {}
    nvinfer1::IErrorRecorder* getErrorRecorder() const noexcept { return nullptr; }
    bool isParentSearchEnabled() const { return false; }
    void setParentSearchEnabled(bool const) {}
    PluginLibraryHandle loadLibrary(AsciiChar const*) noexcept { return nullptr; }
    void deregisterLibrary(PluginLibraryHandle) noexcept {}
    nvinfer1::IPluginCreatorInterface* const* getAllCreators(int32_t* const n) const noexcept { *n = 0; return nullptr; }
    nvinfer1::IPluginCreatorInterface* getCreator(AsciiChar const* const, AsciiChar const* const,
                                                  AsciiChar const* const = "") noexcept { return nullptr; }
    bool deregisterCreator(nvinfer1::IPluginCreatorInterface const&) noexcept { return false; }
    nvinfer1::IPluginResource* acquirePluginResource(AsciiChar const*, nvinfer1::IPluginResource*) noexcept {
        return nullptr;
    }
    int32_t releasePluginResource(AsciiChar const*) noexcept { return 0; }
    nvinfer1::IPluginCreatorInterface* const* getAllCreatorsRecursive(int32_t* const n) noexcept {
        *n = 0;
        return nullptr;
    }
};

}  // namespace

extern "C" nvinfer1::IPluginRegistry* getPluginRegistry() noexcept {
    static RecordingRegistry registry;
    return &registry;
}

extern "C" nvinfer1::ILogger* getLogger() noexcept { return nullptr; }

int main() { return 0; }  // the registration ran while the program was loaded
