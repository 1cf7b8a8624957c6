// CPU matrix products for the model: blocked, vectorisable, OpenMP-parallel,
// and deterministic: every output element is summed by one thread in a fixed
// order (k = 0, 1, ...), so results are bit-identical for any thread count.
#ifndef MOE_MATMUL_H
#define MOE_MATMUL_H

#include "real.h"

// C (M, N) (+)= A (M, K) @ B (K, N), all row-major with leading dimensions
// lda, ldb, ldc. accumulate = 0 overwrites C.
void matmul_nn(real *C, const real *A, const real *B, int M, int K, int N, int lda, int ldb, int ldc,
               int accumulate);

// out (N, OC) (+)= inp (N, IC) @ W (OC, IC)^T: a linear layer's forward.
void matmul_forward(real *out, const real *inp, const real *W, int N, int IC, int OC, int accumulate);
// dinp (N, IC) (+)= dout (N, OC) @ W (OC, IC): gradient of the input.
void matmul_backward_input(real *dinp, const real *dout, const real *W, int N, int IC, int OC,
                           int accumulate);
// dW (OC, IC) += dout (N, OC)^T @ inp (N, IC): gradient of the weight.
void matmul_backward_weight(real *dW, const real *dout, const real *inp, int N, int IC, int OC);

// dst (cols, rows) = src (rows, cols)^T, src with leading dimension ld.
void matmul_transpose(real *dst, const real *src, int rows, int cols, int ld);

#endif
