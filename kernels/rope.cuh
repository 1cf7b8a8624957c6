// Rotary position embedding, "rotate half" form (docs/model.md), applied in
// place to the query and key columns of qkv (N, 3d), as the CPU model does.
// The backward is the transpose rotation (sin negated) applied in place to
// dqkv. The cos/sin tables are built on the host in double, exactly as
// model/ops.c's rope_tables does, so both trainers use the same angles.
#ifndef KERNELS_ROPE_CUH
#define KERNELS_ROPE_CUH

#include "common.cuh"

// Host: cos_t, sin_t (T, hd/2) fp32 for base theta.
void rope_tables_host(float *cos_t, float *sin_t, int T, int hd, float theta);

// qkv (B*T, 3d) floatX: columns [0, d) queries, [d, 2d) keys, heads of hd
// contiguous; position of row b*T + t is t. inverse = 1 rotates by -angle
// (the backward). cos_t, sin_t (>= T, hd/2) device tables.
void rope_apply(floatX *qkv, const float *cos_t, const float *sin_t, int B, int T, int d, int H, int inverse,
                cudaStream_t stream);

#endif
