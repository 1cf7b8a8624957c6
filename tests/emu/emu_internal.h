// The CUDA emulator's internal interface (tests/emu; see emu_memory.cc for
// what the emulator is): what its files share -- failing with a message, the
// device-memory bookkeeping and checks, the profile counters.
#ifndef EMU_INTERNAL_H
#define EMU_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "cuda_runtime.h"

#if !defined(__x86_64__) || !defined(__linux__)
#error "the CUDA emulator (tests/emu) switches threads with x86-64 Linux assembly"
#endif

namespace emu {

// Prints "emulator: <message>", the kernel being run and a backtrace, makes
// the other ranks of this process's communicators stop, and aborts.
[[noreturn]] void emu_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

size_t page_size();
size_t round_up(size_t n, size_t a);

// Once per process: the SIGSEGV handler and the EMU_* environment.
void install_handler();

// Device work (a kernel, a copy, a GEMM, a collective) runs between these;
// the device allocations it touches are open until the outermost exit.
void enter_device();
void exit_device();

// Where [p, p + bytes) lives; a device range must lie inside one allocation
// (what: for the message when it does not).
enum Where { WHERE_HOST, WHERE_DEVICE, WHERE_PINNED };
Where where_range(const void *p, size_t bytes, const char *what);
void need_device(const void *p, size_t bytes, const char *what); // stops unless device memory
void need_host(const void *p, const char *what);                 // stops if device memory

// The error cudaGetLastError returns next (the first one set wins).
void set_error(cudaError_t e);

// Profile counters (EMU_PROFILE=1).
enum {
    PROF_STREAM_SYNC, PROF_DEVICE_SYNC, PROF_COPY_SYNC, PROF_COPY_D2H_ASYNC, PROF_COPY_H2D_ASYNC, PROF_COPY_D2D_ASYNC,
    PROF_MEMSET, PROF_GEMM, PROF_LT_MATMUL, PROF_GEMM_STRIDED, PROF_GEMM_GROUPED, PROF_NCCL_ALLREDUCE, PROF_NCCL_BCAST,
    PROF_NCCL_GROUP, PROF_MALLOC, PROF_N
};
void prof_count(int what);
void prof_kernel(const char *name, long long threads);

// emu_kernel.cc: whether a kernel is running on this thread, a line saying
// which (block, thread) for messages, and the EMU_ORDER setting.
bool in_kernel();
void describe_kernel_context(FILE *f);
void order_from_env();

// emu_kernel.cc, for the warp-wide instructions and cp.async (emu_mma.cc):
// a collective of the 32 lanes of the calling warp (see its definition); the
// serial number of the block being run (0 outside kernels); the __syncthreads
// it has completed; whether [p, p + bytes) is shared memory of that block
// (1: its dynamic shared memory, 2: static __shared__ variables, 0: neither).
void warp_collective(const void *mine, void (*between)(const void *const *all, void *ctx), void *ctx);
uint64_t block_serial();
uint64_t block_barriers();
int is_shared(const void *p, size_t bytes);

// emu_nccl.cc: tells the other ranks of this process's communicators that it stops.
void nccl_mark_aborted();

} // namespace emu

#endif
