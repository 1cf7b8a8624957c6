// Dense bf16 tensor-core peaks of known GPUs: the denominator of MFU (model
// FLOPs utilisation = training FLOPs per token x tokens/s / peak). The one
// table for every user: bench/gpu_bench.sh reads it through build/gpu_peak
// (bench/gpu_peak.c), and the trainer's own profile can include this header.
//
// The figures are the vendors' datasheet numbers for bf16 inputs with fp32
// accumulation (the project's cuBLAS calls use CUBLAS_COMPUTE_32F) without
// 2:4 structured sparsity: datasheets print the sparse figure, twice the
// dense one, marked with a footnote; the table holds half of it. A GPU whose
// name matches no entry gets no MFU figure rather than a guess.
//
// Matching: an entry's pattern must appear in the device name (as CUDA and
// nvidia-smi report it, e.g. "NVIDIA H100 80GB HBM3") as a whole word: at the
// start or after a space or '-', and followed by the end, a space or '-'. So
// "A10" does not match "A100-SXM4-80GB" or "A10G", and "L4" does not match
// "L40S". Entries are tried in order: the specific variants come first.
#ifndef MOE_GPU_PEAKS_H
#define MOE_GPU_PEAKS_H

#include <string.h>

typedef struct {
    const char *pattern; // a word of the device name
    const char *label;   // what the figure is for
    double tflops;       // dense bf16 tensor-core peak, fp32 accumulation, TFLOP/s
    const char *source;  // the datasheet it comes from
} GpuPeak;

static const GpuPeak gpu_peaks[] = {
    { "H100 NVL", "H100 NVL", 835.5, "NVIDIA H100 Tensor Core GPU datasheet: BF16 1,671 TFLOPS with sparsity" },
    { "H100 PCIe", "H100 PCIe", 756.5, "NVIDIA H100 Tensor Core GPU datasheet: BF16 1,513 TFLOPS with sparsity" },
    { "H100", "H100 SXM5", 989.4, "NVIDIA H100 Tensor Core GPU datasheet: BF16 1,979 TFLOPS with sparsity "
                                  "(989.4 dense in the NVIDIA H100 architecture whitepaper)" },
    { "H200 NVL", "H200 NVL", 835.5, "NVIDIA H200 Tensor Core GPU datasheet: BF16 1,671 TFLOPS with sparsity" },
    { "H200", "H200 SXM", 989.4, "NVIDIA H200 Tensor Core GPU datasheet: BF16 1,979 TFLOPS with sparsity" },
    { "GH200", "GH200 (Hopper GPU)", 989.4, "NVIDIA GH200 Grace Hopper Superchip datasheet: BF16 1,979 TFLOPS "
                                            "with sparsity" },
    { "A100", "A100 (SXM4 and PCIe)", 312.0, "NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TFLOPS "
                                             "(624 with sparsity)" },
    { "L40S", "L40S", 362.05, "NVIDIA L40S datasheet: BF16 362.05 TFLOPS (733 with sparsity)" },
    { "L40", "L40", 181.05, "NVIDIA L40 datasheet: BF16 181.05 TFLOPS (362.1 with sparsity)" },
    { "L4", "L4", 121.0, "NVIDIA L4 datasheet: BF16 242 TFLOPS with sparsity" },
    { "A10", "A10", 125.0, "NVIDIA A10 datasheet: BF16 125 TFLOPS (250 with sparsity)" },
    { "RTX 4090", "GeForce RTX 4090", 165.2, "NVIDIA Ada Lovelace architecture whitepaper (RTX 4090): "
                                             "peak BF16 tensor TFLOPS with FP32 accumulate 165.2 (330.4 sparse)" },
    { "B200", "B200", 2250.0, "NVIDIA HGX B200 datasheet: FP16/BF16 4.5 PFLOPS per GPU with sparsity" },
};
enum { GPU_N_PEAKS = sizeof gpu_peaks / sizeof gpu_peaks[0] };

// The entry for a device name, or NULL when no entry matches.
static inline const GpuPeak *gpu_peak_find(const char *device_name) {
    for (int i = 0; i < GPU_N_PEAKS; i++) {
        size_t n = strlen(gpu_peaks[i].pattern);
        for (const char *p = strstr(device_name, gpu_peaks[i].pattern); p; p = strstr(p + 1, gpu_peaks[i].pattern)) {
            int starts = p == device_name || p[-1] == ' ' || p[-1] == '-';
            int ends = p[n] == '\0' || p[n] == ' ' || p[n] == '-';
            if (starts && ends) return &gpu_peaks[i];
        }
    }
    return NULL;
}

#endif
