// Expert parallelism's bookkeeping, the one definition both trainers and the
// tests use: which parameters a rank holds, and where the rows of a MoE layer
// go on their way to the experts and back. Plain C, no communication (the
// exchanges themselves are the communicator's: parallel/comm.h, comm_nccl.h).
//
// An EP group of P ranks splits the E routed experts of every MoE layer:
// rank r holds experts [r El, (r+1) El), El = E / P. Every other parameter is
// replicated on every rank.
//
// Rows of one MoE layer (see model/moe.h for slots and rows):
//
//   token side, rank q:  its N K rows in expert order: expert 0's rows, then
//                        expert 1's, ...; the rows of experts [p El, (p+1) El)
//                        are contiguous and go to rank p
//   received, rank p:    [source rank q][local expert j][token]   (what the all-to-all-v delivers)
//   expert-major:        [local expert j][source rank q][token]   (what the expert FFNs run on)
//
// exp_src[r] is the received-order index of expert-major row r: the forward
// gathers xe[r] = received[exp_src[r]], the return trip scatters
// back[exp_src[r]] = ye[r] before the reverse all-to-all-v.
#ifndef MOE_EP_LAYOUT_H
#define MOE_EP_LAYOUT_H

#include <stdint.h>

#include "../model/layout.h"

typedef struct {
    int size;     // P: ranks in the EP group (1: every expert is local)
    int rank;     // this rank's position in the group
    int n_local;  // El = E / P: routed experts per rank
} EpShard;

// The shard of rank `rank` in a group of `size` for E routed experts (size must divide E).
static inline EpShard ep_shard(int E, int size, int rank) {
    EpShard s = { size, rank, E / size };
    return s;
}
// The global index of this rank's first local expert.
static inline int ep_first_expert(const EpShard *ep) { return ep->rank * ep->n_local; }

// ----------------------------------------------------------------------------
// Parameters

// The part of tensor t this rank holds, as [*offset, *offset + *len) of the
// whole model's flat buffer: all of a replicated tensor; of an expert tensor
// (E, ...) the rows of the local experts.
void ep_owned_range(const ParamTensor *t, const EpShard *ep, int64_t *offset, int64_t *len);

// The compact local buffer of a rank: the replicated tensors in layout order,
// then the owned slice of every expert tensor (so that the replicated part and
// the expert part are each one contiguous run, one all-reduce each). Builds
// `local` (offsets into the local buffer; expert tensors with shape[0] = El)
// and global_index (local->n entries, allocated here, freed by the caller):
// the index in `whole` of each local tensor. Returns the number of elements
// of the replicated part (where the expert slices start).
int64_t ep_local_layout(const ParamLayout *whole, const EpShard *ep, ParamLayout *local, int **global_index);

// ----------------------------------------------------------------------------
// Rows of one MoE layer

// offsets (E + 1): this rank's token-side first row of each expert;
// recv_cnt (P, El): rows rank q sends for local expert j (what the counts
// all-to-all delivers). Fills send_rows (P) and recv_rows (P); returns R, the
// rows this rank's experts receive.
int ep_exchange_rows(const EpShard *ep, const int *offsets, const int *recv_cnt, int *send_rows, int *recv_rows);

// The expert-major order of the R received rows: exp_offsets (El + 1) first
// row of each local expert, exp_src (R) as above.
void ep_expert_major_order(const EpShard *ep, const int *recv_cnt, const int *recv_rows, int *exp_offsets,
                           int *exp_src);

#endif
