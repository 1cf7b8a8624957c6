// The device memory a run would allocate (`--print-memory`): categories, the
// plan a backend fills without allocating anything (it works on a machine
// without a GPU), the table, and the largest micro-batch that fits a budget.
#ifndef MOE_MEMPLAN_H
#define MOE_MEMPLAN_H

#include <stddef.h>
#include <stdio.h>

typedef enum {
    MEM_MASTER,      // fp32 master weights, gradients, AdamW moments, balancing biases
    MEM_WEIGHTS_X,   // the activation-precision copy of the weights for the matmuls (bf16 build)
    MEM_ACTIVATIONS, // activations kept from the forward for the backward, the inputs, the traced router scores
    MEM_SCRATCH,     // buffers the layers share (the backward's gradients, exchange rows, reductions)
    MEM_WORKSPACE,   // library workspaces the trainer allocates (cuBLASLt, grouped-GEMM pointer arrays)
    MEM_COUNT
} MemCategory;

extern const char *const mem_category_names[MEM_COUNT];

typedef struct {
    size_t bytes[MEM_COUNT];
    size_t device_bytes; // the detected device's memory, 0 without a device
    char device[256];    // its name ("" without one)
} MemoryPlan;

static inline size_t memplan_total(const MemoryPlan *p) {
    size_t t = 0;
    for (int i = 0; i < MEM_COUNT; i++) t += p->bytes[i];
    return t;
}

// The table for one micro-batch (B x T), per rank.
void memplan_print(const MemoryPlan *p, int B, int T, FILE *f);

#endif
