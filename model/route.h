// Routing of the MoE layer: what selects a token's experts and how their gate
// values and the auxiliary losses are formed. The definitions here are shared
// by the CPU model (model/moe.c), the GPU routing kernels (kernels/routing.cu,
// which follow the same rule), the balancing policy and the tests, so every
// build selects experts by the same rule. See docs/model.md, "MoE layer".
#ifndef MOE_ROUTE_H
#define MOE_ROUTE_H

#include "config.h"

// The auxiliary load-balancing losses (docs/model.md): none, expert-level over
// the whole batch (DeepSeekMoE, arXiv 2401.06066), or sequence-wise with
// affinities normalised per token (DeepSeek-V3, arXiv 2412.19437).
typedef enum { AUX_NONE = 0, AUX_EXPERT = 1, AUX_SEQ = 2 } AuxKind;

// How routing and the auxiliary losses behave; set by the balancing policy
// (model/balance.h), not by the model config.
typedef struct {
    int bias_mult;   // 1: select on s * b (multiplicative rule), 0: on s + b
    int aux_kind;    // an AuxKind
    float aux_alpha; // weight of the auxiliary loss
    int bias_logits; // 1: the bias is added to the router logits u (select on u + b),
                     // 0: to the affinities s = gate(u) (select on s + b or s * b)
} RouteOptions;

// Everything the routing of one MoE layer needs besides its tensors: the
// model's routing fields and the policy's options, passed as one argument.
typedef struct {
    int n_experts;     // E, routed experts
    int top_k;         // K, experts per token
    int gate;          // GATE_SIGMOID or GATE_SOFTMAX: affinity s = gate(router logits)
    int norm_topk;     // 1: the selected gate values are normalised to sum 1
    float route_scale; // constant factor on the gate values
    int bias_mult;     // 1: select on s * b, 0: on s + b
    int aux_kind;      // an AuxKind
    float aux_alpha;   // weight of the auxiliary loss
    int bias_logits;   // 1: select on router logits + b, 0: on the affinities (above)
} RouteParams;

static inline RouteParams route_params(const MoeConfig *c, const RouteOptions *ro) {
    RouteParams rp = { c->n_routed, c->top_k, c->gate, c->norm_topk, c->route_scale,
                       ro->bias_mult, ro->aux_kind, ro->aux_alpha, ro->bias_logits };
    return rp;
}

// The selection score of expert e: affinity plus bias, or affinity times bias
// for the multiplicative rule (Wang et al., arXiv 2408.15664, Table 4). The
// caller evaluates it in its own precision (fp32 in the trainer). With the bias
// on the logits (bias_logits, Han & Zhong's code, arXiv 2512.03915) s is the
// router logit u and the score u + b: the gate is monotone in u, so at b = 0
// both select the same experts, and the gate values stay those of the
// unbiased affinities either way.
#define ROUTE_SCORE(s, b, mult) ((mult) ? (s) * (b) : (s) + (b))

// sel (K) = the K experts with the largest score (E), listed by decreasing
// score; equal scores go to the lower expert index. Scores are passed as double
// (a float widens exactly), so fp32 and fp64 callers share this one function.
static inline void route_topk(const double *score, int E, int K, int *sel) {
    int n = 0; // experts kept so far, sel[0..n) in descending score order
    for (int e = 0; e < E; e++) {
        double sc = score[e];
        if (n == K && !(sc > score[sel[K - 1]])) continue;
        // Insert after every kept score >= sc: earlier (lower) indices win ties.
        int pos = n < K ? n : K - 1;
        while (pos > 0 && score[sel[pos - 1]] < sc) {
            sel[pos] = sel[pos - 1];
            pos--;
        }
        sel[pos] = e;
        if (n < K) n++;
    }
}

// Groups of the auxiliary loss over B sequences: AUX_SEQ one group per
// sequence, AUX_EXPERT one group of the whole micro-batch.
static inline int route_aux_groups(int aux_kind, int B) { return aux_kind == AUX_SEQ ? B : 1; }

#endif
