// Expert parallelism's bookkeeping (see ep_layout.h).
#include "ep_layout.h"

#include <string.h>

#include "../util/util.h"

void ep_owned_range(const ParamTensor *t, const EpShard *ep, int64_t *offset, int64_t *len) {
    *offset = t->offset;
    *len = t->numel;
    if (!layout_is_expert(t->kind)) return;
    int64_t per_expert = t->numel / t->shape[0];
    *offset += (int64_t)ep_first_expert(ep) * per_expert;
    *len = (int64_t)ep->n_local * per_expert;
}

int64_t ep_local_layout(const ParamLayout *whole, const EpShard *ep, ParamLayout *local, int **global_index) {
    memset(local, 0, sizeof *local);
    local->n_layers = whole->n_layers;
    local->t = xcalloc((size_t)whole->n + 1, sizeof(ParamTensor));
    local->index = xmalloc(sizeof(int) * (size_t)(whole->n_layers + 1) * P_NKINDS);
    *global_index = xcalloc((size_t)whole->n + 1, sizeof(int));
    for (int i = 0; i < (whole->n_layers + 1) * P_NKINDS; i++) local->index[i] = -1;
    int64_t n_replicated = 0;
    // Pass 0 places the replicated tensors, pass 1 the expert slices after them.
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < whole->n; i++) {
            ParamTensor t = whole->t[i];
            if (layout_is_expert(t.kind) != pass) continue;
            if (pass == 1) {
                int64_t off;
                ep_owned_range(&whole->t[i], ep, &off, &t.numel);
                t.shape[0] = ep->n_local;
            }
            t.offset = local->total;
            local->total += t.numel;
            int row = t.layer >= 0 ? t.layer : whole->n_layers;
            local->index[row * P_NKINDS + t.kind] = local->n;
            (*global_index)[local->n] = i;
            local->t[local->n++] = t;
        }
        if (pass == 0) n_replicated = local->total;
    }
    return n_replicated;
}

int ep_exchange_rows(const EpShard *ep, const int *offsets, const int *recv_cnt, int *send_rows, int *recv_rows) {
    int P = ep->size, El = ep->n_local, R = 0;
    for (int p = 0; p < P; p++) {
        send_rows[p] = offsets[(p + 1) * El] - offsets[p * El];
        recv_rows[p] = 0;
        for (int j = 0; j < El; j++) recv_rows[p] += recv_cnt[p * El + j];
        R += recv_rows[p];
    }
    return R;
}

void ep_expert_major_order(const EpShard *ep, const int *recv_cnt, const int *recv_rows, int *exp_offsets,
                           int *exp_src) {
    int P = ep->size, El = ep->n_local, row = 0;
    for (int j = 0; j < El; j++) {
        exp_offsets[j] = row;
        // Rank q's rows for local expert j start after its rows for experts 0..j-1.
        for (int q = 0, base = 0; q < P; base += recv_rows[q], q++) {
            int start = base;
            for (int jj = 0; jj < j; jj++) start += recv_cnt[q * El + jj];
            for (int r = 0; r < recv_cnt[q * El + j]; r++) exp_src[row++] = start + r;
        }
    }
    exp_offsets[El] = row;
}
