// Fused softmax + cross-entropy + gradient (see classifier.cuh).
#include "classifier.cuh"

static __global__ void classifier_kernel(floatX *logits, double *losses, const int *targets, int V, float dscale,
                                         int write_grad) {
    __shared__ float shm[32];
    int64_t row = blockIdx.x;
    floatX *l = logits + row * V;
    int target = targets[row];
    float mx = -INFINITY;
    for (int v = threadIdx.x; v < V; v += blockDim.x) mx = fmaxf(mx, to_f(l[v]));
    mx = block_max(mx, shm);
    float sum = 0.0f;
    for (int v = threadIdx.x; v < V; v += blockDim.x) sum += expf(to_f(l[v]) - mx);
    sum = block_sum(sum, shm);
    float target_logit = to_f(l[target]);
    if (threadIdx.x == 0) losses[row] = (double)mx + log((double)sum) - (double)target_logit;
    if (!write_grad) return;
    __syncthreads(); // every thread has read l[target] before any overwrites it
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        float p = expf(to_f(l[v]) - mx) / sum;
        l[v] = to_x((p - (v == target ? 1.0f : 0.0f)) * dscale);
    }
}

void classifier_forward(floatX *logits, double *losses, const int *targets, int N, int V, float dscale,
                        int write_grad, cudaStream_t stream) {
    const int threads = 512;
    classifier_kernel<<<N, threads, 0, stream>>>(logits, losses, targets, V, dscale, write_grad);
    KERNEL_CHECK();
}
