// Entry points of the GPU backend that train_moe.cu defines for other
// programs: the Backend callbacks (train/backend.h), and read-back hooks the
// GPU tests (tests/test_gpu.cu) use to compare intermediate results with the
// reference. The tests link train_moe.cu compiled with -DTRAIN_MOECU_NO_MAIN.
#ifndef KERNELS_GPU_BACKEND_CUH
#define KERNELS_GPU_BACKEND_CUH

#include <stdint.h>

extern "C" {
#include "../train/backend.h"
}

// Fills every callback of *be (and its name, "gpu-bf16" or "gpu-fp32");
// be->create then allocates the model.
void gpu_backend_init(Backend *be);

// After a micro_batch: the accumulated fp32 gradient (n_params).
void gpu_debug_get_grads(Backend *be, float *grads);
// After a micro_batch with train = 0 (the classifier then leaves the logits
// alone): the logits (B*T, V) of that forward, as fp32.
void gpu_debug_get_logits(Backend *be, float *logits);
// After a micro_batch: MoE layer k's (0 = first MoE layer) selection (B*T, K)
// and gate values (B*T, K).
void gpu_debug_get_routing(Backend *be, int k, int *sel, float *gates);

#endif
