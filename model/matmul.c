// CPU matrix products. One kernel, C += A @ B with B's rows contiguous, does
// all the work; the three linear-layer products reduce to it by transposing the
// smaller operand into scratch memory. The inner loops run over contiguous
// columns of B and C, which the compiler vectorises without reassociating any
// sum, so the result does not depend on the vector width or thread count.
#include "matmul.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// Register tile: MR rows of C by NR columns, accumulated over a K block.
#define MR 4
#define NR 32
// Cache blocks: a KB x NB panel of B (KB*NB*4 bytes = 128 KiB in fp32) is
// reused by the MB rows of A that one task processes.
#define MB 64
#define NB 128
#define KB 256

static void *matmul_alloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "out of memory allocating %zu bytes for a matmul\n", bytes);
        exit(1);
    }
    return p;
}

// C[0:MR, 0:NR] += A[0:MR, 0:kc] @ B[0:kc, 0:NR] for a full tile.
static inline void matmul_tile_full(real *C, const real *A, const real *B, int kc, int lda, int ldb,
                                    int ldc) {
    real acc[MR][NR];
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < NR; c++) acc[r][c] = C[r * ldc + c];
    for (int k = 0; k < kc; k++) {
        const real *b = B + (size_t)k * ldb;
        for (int r = 0; r < MR; r++) {
            real a = A[r * lda + k];
            for (int c = 0; c < NR; c++) acc[r][c] += a * b[c];
        }
    }
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < NR; c++) C[r * ldc + c] = acc[r][c];
}

// The same for an edge tile of mr <= MR rows and nr <= NR columns.
static void matmul_tile_edge(real *C, const real *A, const real *B, int mr, int nr, int kc, int lda,
                             int ldb, int ldc) {
    for (int r = 0; r < mr; r++) {
        real acc[NR];
        for (int c = 0; c < nr; c++) acc[c] = C[r * ldc + c];
        for (int k = 0; k < kc; k++) {
            real a = A[r * lda + k];
            const real *b = B + (size_t)k * ldb;
            for (int c = 0; c < nr; c++) acc[c] += a * b[c];
        }
        for (int c = 0; c < nr; c++) C[r * ldc + c] = acc[c];
    }
}

void matmul_nn(real *C, const real *A, const real *B, int M, int K, int N, int lda, int ldb, int ldc,
               int accumulate) {
    if (M <= 0 || N <= 0) return;
    if (!accumulate)
        for (int i = 0; i < M; i++) memset(C + (size_t)i * ldc, 0, sizeof(real) * (size_t)N);
    int mblocks = (M + MB - 1) / MB, nblocks = (N + NB - 1) / NB;
    // Tasks own disjoint C blocks; K is walked in order inside each task.
#pragma omp parallel for collapse(2) schedule(static)
    for (int ib = 0; ib < mblocks; ib++) {
        for (int jb = 0; jb < nblocks; jb++) {
            int i0 = ib * MB, i1 = i0 + MB < M ? i0 + MB : M;
            int j0 = jb * NB, j1 = j0 + NB < N ? j0 + NB : N;
            for (int k0 = 0; k0 < K; k0 += KB) {
                int kc = K - k0 < KB ? K - k0 : KB;
                for (int i = i0; i < i1; i += MR) {
                    int mr = i1 - i < MR ? i1 - i : MR;
                    for (int j = j0; j < j1; j += NR) {
                        int nr = j1 - j < NR ? j1 - j : NR;
                        real *c = C + (size_t)i * ldc + j;
                        const real *a = A + (size_t)i * lda + k0;
                        const real *b = B + (size_t)k0 * ldb + j;
                        if (mr == MR && nr == NR) matmul_tile_full(c, a, b, kc, lda, ldb, ldc);
                        else matmul_tile_edge(c, a, b, mr, nr, kc, lda, ldb, ldc);
                    }
                }
            }
        }
    }
}

void matmul_transpose(real *dst, const real *src, int rows, int cols, int ld) {
    // 32x32 blocks keep both the reads and the writes within a few cache lines.
#pragma omp parallel for schedule(static)
    for (int c0 = 0; c0 < cols; c0 += 32)
        for (int r0 = 0; r0 < rows; r0 += 32)
            for (int c = c0; c < c0 + 32 && c < cols; c++)
                for (int r = r0; r < r0 + 32 && r < rows; r++)
                    dst[(size_t)c * rows + r] = src[(size_t)r * ld + c];
}

void matmul_forward(real *out, const real *inp, const real *W, int N, int IC, int OC, int accumulate) {
    if (N <= 0) return;
    real *Wt = matmul_alloc(sizeof(real) * (size_t)IC * OC); // (IC, OC)
    matmul_transpose(Wt, W, OC, IC, IC);
    matmul_nn(out, inp, Wt, N, IC, OC, IC, OC, OC, accumulate);
    free(Wt);
}

void matmul_backward_input(real *dinp, const real *dout, const real *W, int N, int IC, int OC,
                           int accumulate) {
    if (N <= 0) return;
    matmul_nn(dinp, dout, W, N, OC, IC, OC, IC, IC, accumulate);
}

void matmul_backward_weight(real *dW, const real *dout, const real *inp, int N, int IC, int OC) {
    if (N <= 0) return;
    real *doutT = matmul_alloc(sizeof(real) * (size_t)OC * N); // (OC, N)
    matmul_transpose(doutT, dout, N, OC, OC);
    matmul_nn(dW, doutT, inp, OC, N, IC, N, IC, IC, 1);
    free(doutT);
}
