// Token permutation of the MoE layer: the N*K (token, choice) "slots" in
// expert-contiguous "rows" (all of expert 0's slots, then expert 1's, ...,
// each expert's in slot order, i.e. stable by token: model/moe.c's
// moe_permute) with the gather of the expert inputs, the gated combine of
// the expert outputs, and their backward.
//
// The permutation is a counting sort with no atomics on positions, so it is
// deterministic: (1) per chunk of PERMUTE_CHUNK slots, a histogram of
// experts; (2) one block per expert: its offset (the counts before it) and,
// by a block-wide scan down the chunks, the first row each chunk's slots of
// that expert take; (3) per chunk, each slot's rank among the earlier slots
// of the same expert in its chunk gives its row, and the chunk's block copies
// its slots' input rows to those rows (the gather, fused).
#ifndef KERNELS_PERMUTE_CUH
#define KERNELS_PERMUTE_CUH

#include "common.cuh"

enum { PERMUTE_CHUNK = 256, PERMUTE_SCAN_THREADS = 256 };

// Ints of scratch moe_permute needs for NK slots and E experts: (chunks, E)
// chunk bases, then (E) rows per expert as the chunks counted them.
inline size_t moe_permute_scratch_ints(int64_t NK, int E) { return ((size_t)cdiv_u(NK, PERMUTE_CHUNK) + 1) * E; }

// sel (NK) expert of each slot; counts (E) tokens per expert (from moe_route).
// Writes offsets (E + 1) (first row of each expert; offsets[E] = NK), row_of
// (NK) the row of each slot, slot_of (NK) the slot of each row. If the counts
// disagree with sel, offsets[E] is set to -1 (the host checks it).
// scratch: moe_permute_scratch_ints(NK, E) ints.
// And the gather: xe (NK, d) = h (N, d) [slot_of[r] / K] for each row r (the
// tokens' inputs in expert order; K the choices per token).
void moe_permute(int *offsets, int *row_of, int *slot_of, int *scratch, const int *sel, const int *counts, int NK,
                 int E, floatX *xe, const floatX *h, int K, int d, cudaStream_t stream);

// out (N, d) fp32 += sum over j < K, in order, of gates[t, j] * eout[row_of[t K + j]]
// (eout (NK, d) floatX by row).
void moe_combine_forward(float *out, const floatX *eout, const float *gates, const int *row_of, int N, int K, int d,
                         cudaStream_t stream);

// Backward of the combine, given dout (N, d) fp32: deout (NK, d) floatX by row
// = gates[t, j] * dout[t]; dgates (N, K) fp32 = dout[t] . eout[row].
void moe_combine_backward(floatX *deout, float *dgates, const float *dout, const floatX *eout, const float *gates,
                          const int *row_of, int N, int K, int d, cudaStream_t stream);

// dh (N, d) fp32 = sum over j < K, in order, of dxe[row_of[t K + j]] (overwritten).
void moe_scatter(float *dh, const floatX *dxe, const int *row_of, int N, int K, int d, cudaStream_t stream);

#endif
