// CUDA emulation on the CPU: the warp-level matrix instructions and the
// asynchronous shared-memory copies of PTX (tests/emu/emu_mma.cc), as the
// tensor-core building blocks of kernels/mma.cuh use them. The nvcc build of
// kernels/mma.cuh issues the PTX instructions (inline asm); its emulator
// build calls these, which implement what the PTX ISA documents for them
// ("Matrix Fragments for mma.m16n8k16 with floating point type",
// "Warp-level matrix load instruction: ldmatrix", "cp.async"). The
// mma and ldmatrix are warp-collective: all 32 lanes of the warp must call
// them together, as .sync.aligned requires.
#ifndef EMU_MMA_H
#define EMU_MMA_H

#include <stddef.h>
#include <stdint.h>

namespace emu {

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {d}, {a}, {b}, {c}:
// D (16 x 8) = A (16 x 16) B (16 x 8) + C, fp32 accumulators. Each lane
// passes its fragment registers: a[4] (two bf16 each, the lower half the
// first element), b[2], c[4]; d[4] receives its part of D (d may be c).
void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]);

// ldmatrix.sync.aligned.m8n8.x{num}[.trans].shared.b16 {r}, [row_addr]:
// num (1, 2 or 4) 8 x 8 matrices of 16-bit elements; lanes 8 i .. 8 i + 7
// give the addresses of the 8 rows of matrix i (16 bytes each, 16-byte
// aligned shared memory); r[i] receives the lane's two elements of matrix i.
void ldmatrix_m8n8(uint32_t *r, int num, int trans, const void *row_addr);

// cp.async.{ca,cg}.shared.global [dst], [src], cp_size, src_size: copies
// src_size bytes (<= cp_size, which is 4, 8 or 16) and zero-fills the rest
// of the cp_size bytes at dst. It lands when the thread waits for its group.
void cp_async(void *dst, const void *src, int cp_size, int src_size);
// cp.async.commit_group: the thread's copies issued since the last commit form a group.
void cp_async_commit();
// cp.async.wait_group n: all but the newest n committed groups have landed.
void cp_async_wait(int n);

// A plain read of shared memory by kernel code (kernels/mma.cuh's lds):
// stops if a cp.async has not yet landed there, or landed by another
// thread's wait with no __syncthreads since.
void smem_read_check(const void *p, size_t bytes);

} // namespace emu

#endif
