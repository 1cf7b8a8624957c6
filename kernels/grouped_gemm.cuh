// The routed experts' matmuls as grouped GEMMs: one call computes every
// expert's product on its own (variable) number of rows.
//
// Path: cublasGemmGroupedBatchedEx (cuBLAS >= 12.5), one group per non-empty
// expert. Its per-group m/n/k are host arrays, so the host must know every
// expert's row count: that is the MoE layer's one device-to-host copy and
// stream synchronisation per forward (train_moe.cu, gpu_moe_forward). The
// A/B/C pointer arrays are device arrays: they are written into a pinned
// host staging area, one region per call site ("slot"), and copied
// asynchronously on the stream before the call. A region is rewritten only in
// a later micro-batch, after the stream synchronisation that ends every
// backend call, so a pending copy never reads a region being rewritten.
//
// Fallback: one cublasGemmEx per non-empty expert. At init a tiny probe runs
// every type combination both ways; a combination the grouped call rejects
// (not every cuBLAS supports bf16 inputs with an fp32 C in the grouped API)
// or gets wrong uses the fallback, and init prints which path each uses.
// MOE_GROUPED_GEMM=0 in the environment forces the fallback (for bisecting).
//
// Experts with no rows are left out of the groups (their weight gradient is
// unchanged, their outputs have no rows).
//
// The device path (grouped_dev_*): the project's own kernels on tensor cores
// (kernels/mma.cuh; fp32 FMAs in the FP32 build), whose expert offsets are a
// DEVICE array, so nothing about the routing has to reach the host before
// they are enqueued. Over the expert-contiguous rows:
//   m-grouped (forward, input gradients): the output's row tiles of 64 are
//     laid over the experts' segments, each block finds its expert and rows
//     by a prefix over the offsets (a segment's last tile is partial; no
//     padding of the segments is needed); the grid has one block per
//     possible tile, cdiv(rows, 64) + min(E, rows), and the blocks past the
//     real tiles return at once;
//   k-grouped (weight gradients): one block per (expert, 64 x 64 tile of
//     dW_e), looping over the expert's rows in order; it adds to the fp32
//     gradient (which sums the micro-batches). No atomics: every output
//     element is written by one block, in a fixed order, so the bits do not
//     depend on the order the blocks run in.
#ifndef KERNELS_GROUPED_GEMM_CUH
#define KERNELS_GROUPED_GEMM_CUH

#include "common.cuh"

typedef struct {
    cublasHandle_t handle;
    cudaStream_t stream;
    int n_experts;       // experts of the layers (E)
    int E;               // capacity in groups of one call: max(E, 2) (the probe uses two)
    int n_slots;         // call sites with their own pointer region
    const void **h_ptrs; // (n_slots, 3, E) pinned staging of the A, B, C pointer arrays
    const void **d_ptrs; // (n_slots, 3, E) device copies
    int grouped[2];      // use cublasGemmGroupedBatchedEx for C = floatX [0] / fp32 [1]
    // host argument arrays, (E) each, rebuilt per call
    cublasOperation_t *ta, *tb;
    int *m, *n, *k, *lda, *ldb, *ldc, *gsize;
    float *alpha, *beta;
} GroupedGemm;

// Allocates the staging for n_slots call sites of up to E groups, and probes
// which path each type combination takes (prints one line).
void grouped_gemm_init(GroupedGemm *gg, cublasHandle_t handle, cudaStream_t stream, int E, int n_slots);
// The device memory grouped_gemm_init allocates (the pointer arrays).
size_t grouped_gemm_device_bytes(int E, int n_slots);
void grouped_gemm_free(GroupedGemm *gg);

// For each expert e with rows [offsets[e], offsets[e+1]) (offsets (E + 1) on
// the HOST), n_e rows, inputs/outputs indexed by row, weights W (E, OC, IC):
// forward:         out (rows, OC) floatX = inp (rows, IC) @ W_e^T
void grouped_matmul_forward(GroupedGemm *gg, int slot, floatX *out, const floatX *inp, const floatX *W,
                            const int *offsets, int IC, int OC);
// backward input:  dinp (rows, IC) floatX = dout (rows, OC) @ W_e
void grouped_matmul_backward_input(GroupedGemm *gg, int slot, floatX *dinp, const floatX *dout, const floatX *W,
                                   const int *offsets, int IC, int OC);
// backward weight: dW_e (OC, IC) fp32 += dout_e^T @ inp_e
void grouped_matmul_backward_weight(GroupedGemm *gg, int slot, float *dW, const floatX *dout, const floatX *inp,
                                    const int *offsets, int IC, int OC);

// The device path. offsets (E + 1) in DEVICE memory: expert e owns rows
// [offsets[e], offsets[e + 1]); rows >= offsets[E] is a bound the host knows
// (the rows the buffers hold: it sizes the grid). Shapes as above; IC and OC
// multiples of 8 (grouped_dev_supported), pointers 16-byte aligned.
int grouped_dev_supported(int IC, int OC);
void grouped_dev_forward(floatX *out, const floatX *inp, const floatX *W, const int *offsets, int E, int rows, int IC,
                         int OC, cudaStream_t st);
void grouped_dev_backward_input(floatX *dinp, const floatX *dout, const floatX *W, const int *offsets, int E, int rows,
                                int IC, int OC, cudaStream_t st);
void grouped_dev_backward_weight(float *dW, const floatX *dout, const floatX *inp, const int *offsets, int E, int IC,
                                 int OC, cudaStream_t st);

#endif
