// Routing of one token: TopK selection over biased affinities. Shared by the
// CPU model, the GPU kernels' host-side tests and the balancing tests, so every
// build selects experts by the same rule.
#ifndef MOE_ROUTE_H
#define MOE_ROUTE_H

// The selection score of expert e: affinity plus bias, or affinity times bias
// for the multiplicative rule (Wang et al., arXiv 2408.15664, Table 4). The
// caller evaluates it in its own precision (fp32 in the trainer).
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

#endif
