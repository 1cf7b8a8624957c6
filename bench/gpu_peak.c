// The dense bf16 peak of a GPU, from the table in bench/gpu_peaks.h, for the
// MFU columns of bench/gpu_bench.sh.
//   gpu_peak "DEVICE NAME"   prints "TFLOPS<tab>label<tab>source"; exit 1 when unknown
//   gpu_peak --list          the whole table, as markdown
#include <stdio.h>
#include <string.h>

#include "gpu_peaks.h"

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: gpu_peak \"DEVICE NAME\" | --list\n");
        return 2;
    }
    if (strcmp(argv[1], "--list") == 0) {
        printf("| name contains | GPU | dense bf16 TFLOP/s | source |\n|---|---|---|---|\n");
        for (int i = 0; i < GPU_N_PEAKS; i++)
            printf("| `%s` | %s | %g | %s |\n", gpu_peaks[i].pattern, gpu_peaks[i].label, gpu_peaks[i].tflops,
                   gpu_peaks[i].source);
        return 0;
    }
    const GpuPeak *p = gpu_peak_find(argv[1]);
    if (!p) {
        fprintf(stderr, "gpu_peak: no dense bf16 peak known for '%s' (bench/gpu_peaks.h): no MFU\n", argv[1]);
        return 1;
    }
    printf("%.2f\t%s\t%s\n", p->tflops, p->label, p->source);
    return 0;
}
