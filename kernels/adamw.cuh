// AdamW on the fp32 master weights, with the per-element rule of the CPU
// trainer (train/optim.h: adamw_update_one, called from device code) and the
// per-step scalars it computes on the host (adamw_scalars), so the two
// trainers apply the same update. The clipping factor is applied to the
// gradient first (g *= grad_mult, as grad_scale does on the CPU), and the
// floatX copy of each updated weight is written in the same pass.
#ifndef KERNELS_ADAMW_CUH
#define KERNELS_ADAMW_CUH

#include "common.cuh"

extern "C" {
#include "../train/optim.h"
}

// Elements [off, off + len) of the flat buffers: params, grads, m, v (fp32);
// paramsX (floatX) gets the new weights, or is NULL (FP32 build: the matmuls
// read params directly). decay: 1 for weight-decayed elements (matrices).
void adamw_update(float *params, floatX *paramsX, const float *grads, float *m, float *v, int64_t off, int64_t len,
                  int decay, AdamWScalars s, float grad_mult, cudaStream_t stream);

#endif
