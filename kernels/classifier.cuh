// Fused classifier: softmax + cross-entropy + the logits' gradient, one block
// per position, in place. The probabilities are never stored: with
// write_grad the logits row is overwritten by its gradient
// dscale * (softmax(logits) - onehot(target)); without it the logits are left
// as they are (evaluation, and the tests read them). The per-position loss is
// logsumexp - logit[target], formed in double from the fp32 max and sum, as
// the CPU model does; the host sums the N values in order.
#ifndef KERNELS_CLASSIFIER_CUH
#define KERNELS_CLASSIFIER_CUH

#include "common.cuh"

// logits (N, V) floatX; losses (N) double; targets (N). dscale = grad_scale / N.
void classifier_forward(floatX *logits, double *losses, const int *targets, int N, int V, float dscale,
                        int write_grad, cudaStream_t stream);

#endif
