// Test driver: runs moe_llava::moeForward under the CPU emulation (cuda_cpu_emulation.h) on raw little-endian
// files written by test_plugin_kernels_emulated.py and writes the output and routing results back.
//
//   emu_driver T E K H I dtype(0 fp32, 1 fp16) activation normalize path misalign DIR [weight_bits group_size]
//   reads  DIR/{hidden,logits,fc1_w,fc1_b,fc2_w,fc2_b}.bin (+ fc1_s, fc2_s with weight_bits 4: INT4 experts)
//   writes DIR/{out,topk_ids,topk_w}.bin
// misalign=1 shifts every IO tensor by one element so the 16-byte vector paths are not taken.
#include "moe_kernels.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace {

std::vector<char> readFile(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) {
        std::fprintf(stderr, "cannot read %s\n", path.c_str());
        std::exit(2);
    }
    return std::vector<char>(std::istreambuf_iterator<char>(f), {});
}

void writeFile(const std::string& path, const void* data, size_t bytes) {
    std::ofstream f(path, std::ios::binary);
    f.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
}

// A 256-byte aligned copy of `bytes`, optionally shifted by `shift` bytes.
struct Buffer {
    std::vector<char> storage;
    char* data;
    Buffer(const std::vector<char>& bytes, size_t shift) : storage(bytes.size() + 512 + shift) {
        auto base = reinterpret_cast<uintptr_t>(storage.data());
        data = reinterpret_cast<char*>((base + 255) / 256 * 256) + shift;
        std::memcpy(data, bytes.data(), bytes.size());
    }
};

}  // namespace

int main(int argc, char** argv) {
    if (argc != 12 && argc != 14) {
        std::fprintf(stderr, "usage: emu_driver T E K H I dtype activation normalize path misalign DIR "
                             "[weight_bits group_size]\n");
        return 2;
    }
    using namespace moe_llava;
    MoeParams p;
    p.T = std::atoi(argv[1]);
    p.E = std::atoi(argv[2]);
    p.K = std::atoi(argv[3]);
    p.H = std::atoi(argv[4]);
    p.I = std::atoi(argv[5]);
    p.dtype = static_cast<MoeDType>(std::atoi(argv[6]));
    p.activation = static_cast<MoeActivation>(std::atoi(argv[7]));
    p.normalize = std::atoi(argv[8]) != 0;
    p.path = static_cast<MoeGemmPath>(std::atoi(argv[9]));
    const size_t shift = std::atoi(argv[10]) ? (p.dtype == MoeDType::kFP16 ? 2 : 4) : 0;
    const std::string dir = argv[11];
    if (argc == 14) {
        p.weight_bits = std::atoi(argv[12]);
        p.group_size = std::atoi(argv[13]);
    }
    const bool int4 = p.weight_bits == 4;

    Buffer hidden(readFile(dir + "/hidden.bin"), shift), logits(readFile(dir + "/logits.bin"), 0);
    Buffer fc1w(readFile(dir + "/fc1_w.bin"), shift), fc1b(readFile(dir + "/fc1_b.bin"), shift);
    Buffer fc2w(readFile(dir + "/fc2_w.bin"), shift), fc2b(readFile(dir + "/fc2_b.bin"), shift);
    const size_t es = p.dtype == MoeDType::kFP16 ? 2 : 4;
    const size_t outBytes = static_cast<size_t>(p.T) * p.H * es;
    Buffer out(std::vector<char>(outBytes, 0), shift);
    Buffer workspace(std::vector<char>(moeWorkspaceSize(p.T, p.E, p.K, p.H, p.I, p.dtype), 0), 0);

    p.hidden = hidden.data;
    p.router_logits = reinterpret_cast<const float*>(logits.data);
    p.fc1_weight = fc1w.data;
    p.fc1_bias = fc1b.data;
    p.fc2_weight = fc2w.data;
    p.fc2_bias = fc2b.data;
    p.output = out.data;
    std::vector<char> none;
    Buffer fc1s(int4 ? readFile(dir + "/fc1_s.bin") : none, 0), fc2s(int4 ? readFile(dir + "/fc2_s.bin") : none, 0);
    if (int4) {
        p.fc1_scales = fc1s.data;
        p.fc2_scales = fc2s.data;
    }

    const cudaError_t err = moeForward(p, workspace.data, nullptr);
    if (err != cudaSuccess) {
        std::fprintf(stderr, "moeForward failed: %d\n", static_cast<int>(err));
        return 1;
    }
    const MoeWorkspaceView view = moeWorkspaceView(workspace.data, p.T, p.E, p.K, p.H, p.I, p.dtype);
    const size_t S = static_cast<size_t>(p.T) * p.K;
    writeFile(dir + "/out.bin", out.data, outBytes);
    writeFile(dir + "/topk_ids.bin", view.topk_ids, S * sizeof(int32_t));
    writeFile(dir + "/topk_w.bin", view.topk_weights, S * sizeof(float));
    std::printf("workspace_bytes %zu\n", moeWorkspaceSize(p.T, p.E, p.K, p.H, p.I, p.dtype));
    return 0;
}
