// Per-phase timing of a training step (see profile.h).
#include "profile.h"

#include <string.h>

#include "../bench/gpu_peaks.h"

const char *const profile_phase_names[PH_COUNT] = {
    [PH_EMBEDDING] = "embedding",
    [PH_ATTENTION] = "attention",
    [PH_DENSE_MATMUL] = "dense matmuls",
    [PH_ROUTER] = "router and TopK",
    [PH_PERMUTE] = "permutation, exchange",
    [PH_EXPERT_GEMM] = "expert GEMMs",
    [PH_SHARED] = "shared experts",
    [PH_ELEMENTWISE] = "elementwise",
    [PH_CLASSIFIER] = "classifier",
    [PH_OPTIMIZER] = "optimizer",
    [PH_COMM] = "communication",
    [PH_HOST] = "idle (host)",
};

void profile_phase_flops(const MoeConfig *c, int T, double *flops) {
    // 2 FLOPs per multiply-add, x3 for forward + backward (config.c's convention).
    double d = c->d_model, V = c->vocab_size, de = c->d_expert, train = 3.0 * 2.0;
    for (int i = 0; i < PH_COUNT; i++) flops[i] = 0;
    for (int l = 0; l < c->n_layers; l++) {
        flops[PH_DENSE_MATMUL] += train * 4.0 * d * d;  // wqkv (3d x d) and wo (d x d)
        flops[PH_ATTENTION] += train * 2.0 * T * d;     // QK^T and AV over T keys
        if (!config_is_moe(c, l)) {
            flops[PH_DENSE_MATMUL] += train * 3.0 * d * c->d_ff;
            continue;
        }
        flops[PH_ROUTER] += train * d * c->n_routed;
        flops[PH_EXPERT_GEMM] += train * c->top_k * 3.0 * d * de;
        flops[PH_SHARED] += train * c->n_shared * 3.0 * d * de;
    }
    flops[PH_DENSE_MATMUL] += train * V * d; // the LM head
}

double profile_gpu_peak_tflops(const char *gpu_name) {
    const GpuPeak *p = gpu_name ? gpu_peak_find(gpu_name) : NULL;
    return p ? p->tflops : 0.0;
}

void profile_print(const ProfileReport *r, FILE *f) {
    double total = 0, flops = 0;
    for (int i = 0; i < PH_COUNT; i++) {
        total += r->ms[i];
        flops += r->flops[i];
    }
    fprintf(f, "profile: %d steps of %.0f tokens after %d warm-up steps, %s%s%s\n", r->steps, r->tokens_per_step,
            r->warmup, r->backend, r->device[0] ? " on " : "", r->device);
    if (total > 0) { // a backend with phase timers
        fprintf(f, "  %-24s %10s %7s %9s\n", "phase", "ms/step", "share", "TFLOP/s");
        for (int i = 0; i < PH_COUNT; i++) {
            fprintf(f, "  %-24s %10.3f %6.1f%%", profile_phase_names[i], r->ms[i], 100 * r->ms[i] / total);
            if (r->flops[i] > 0 && r->ms[i] > 0) fprintf(f, " %9.3g", r->flops[i] / (r->ms[i] * 1e-3) / 1e12);
            fputc('\n', f);
        }
        fprintf(f, "  %-24s %10.3f\n", "all phases (device)", total);
    }
    fprintf(f, "  %-24s %10.3f\n", "step (host clock)", r->step_ms);
    double tps = r->tokens_per_step / (r->step_ms * 1e-3), tflops = flops / (r->step_ms * 1e-3) / 1e12;
    double peak = profile_gpu_peak_tflops(r->device);
    fprintf(f, "  tokens/s %.0f | model %.3g TFLOP/s", tps, tflops);
    if (peak > 0) fprintf(f, " | MFU %.1f%% of %.0f TFLOP/s (bf16 dense peak)\n", 100 * tflops / peak, peak);
    else fprintf(f, " | MFU: no peak known for this device\n");
}

void profile_json(const ProfileReport *r, FILE *log) {
    if (!log) return;
    double flops = 0;
    for (int i = 0; i < PH_COUNT; i++) flops += r->flops[i];
    double tflops = flops / (r->step_ms * 1e-3) / 1e12, peak = profile_gpu_peak_tflops(r->device);
    fprintf(log, "{\"type\":\"profile\",\"backend\":\"%s\",\"steps\":%d,\"warmup\":%d,\"tokens_per_step\":%.0f,"
            "\"step_ms\":%.4f,\"tokens_per_s\":%.1f,\"model_tflops\":%.4g,",
            r->backend, r->steps, r->warmup, r->tokens_per_step, r->step_ms,
            r->tokens_per_step / (r->step_ms * 1e-3), tflops);
    if (peak > 0) fprintf(log, "\"peak_tflops\":%.1f,\"mfu\":%.4f,", peak, tflops / peak);
    else fprintf(log, "\"peak_tflops\":null,\"mfu\":null,");
    fprintf(log, "\"phases\":{");
    for (int i = 0; i < PH_COUNT; i++)
        fprintf(log, "%s\"%s\":{\"ms\":%.4f,\"flops\":%.6g}", i ? "," : "", profile_phase_names[i], r->ms[i],
                r->flops[i]);
    fprintf(log, "}}\n");
    fflush(log);
}
