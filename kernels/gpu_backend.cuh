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
#include "../parallel/comm_nccl.h"

// Fills every callback of *be (and its name, "gpu-bf16" or "gpu-fp32");
// be->create then allocates the model. create takes its ranks from be->comm:
// one process (be->comm NULL or one rank) holds everything; several ranks,
// or MOE_NCCL=1, use NCCL (parallel/comm_nccl.h); MOE_EP_EXCHANGE=1 forces the
// EP exchange path with --ep 1.
void gpu_backend_init(Backend *be);

// What be->create does, with the ranks given explicitly (the tests simulate
// several ranks in one process with their own GpuComm).
typedef struct {
    const GpuComm *comm;   // the ranks' collectives; NULL: one process, nothing is shared
    int force_exchange;    // 1: the MoE rows go through comm's EP exchange even when ep == 1
    int grouped_cublas;    // 1: the expert GEMMs through cuBLAS (host offsets), not the device kernels
    int no_graphs;         // 1: no CUDA graphs (--cuda-graph 0, --profile); 0: graphs where they work
} GpuBackendOptions;
int gpu_backend_create(Backend *be, const MoeConfig *c, const RouteOptions *ro, int B, int T,
                       const GpuBackendOptions *opt);

// One micro-batch and its own statistics: micro_batch with loss_div 1, then
// step_stats (the tests compare micro-batch by micro-batch with references).
static inline void gpu_micro_batch_stats(Backend *be, const int *tokens, const int *targets, int B, int T, int train,
                                         float grad_scale, int64_t *counts, double *loss, double *aux) {
    be->micro_batch(be, tokens, targets, B, T, train, grad_scale, 1.0);
    be->step_stats(be, counts, loss, aux);
}

// hook(ctx) is called inside every capture of a training micro-batch, after
// its work is recorded and before the capture ends (NULL: none): a test runs
// another thread's device work there.
void gpu_debug_capture_hook(Backend *be, void (*hook)(void *), void *ctx);
// The device bytes allocated per category (train/memplan.h) by create.
void gpu_debug_memory(Backend *be, size_t *bytes);

// After a micro_batch: the accumulated fp32 gradient (n_params), in layout
// order; under expert parallelism the rows of experts held by other ranks are 0.
void gpu_debug_get_grads(Backend *be, float *grads);
// After a forward: the rows the local experts of the moe_idx-th MoE layer
// received (N K without the EP exchange).
int gpu_debug_expert_rows(Backend *be, int moe_idx);
// After a micro_batch with train = 0 (the classifier then leaves the logits
// alone): the logits (B*T, V) of that forward, as fp32.
void gpu_debug_get_logits(Backend *be, float *logits);
// After a micro_batch: the moe_idx-th MoE layer's (0 = the first) selection
// (B*T, K) and gate values (B*T, K).
void gpu_debug_get_routing(Backend *be, int moe_idx, int *sel, float *gates);

#endif
