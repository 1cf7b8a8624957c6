// The CUDA emulator's internal interface (tests/emu; see emu_memory.cc for
// what the emulator is): what its files share -- failing with a message, the
// device-memory bookkeeping and checks, the profile counters.
#ifndef EMU_INTERNAL_H
#define EMU_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <functional>

#include "cuda_runtime.h"

#if !defined(__x86_64__) || !defined(__linux__)
#error "the CUDA emulator (tests/emu) switches threads with x86-64 Linux assembly"
#endif

// A stream (created in emu_memory.cc): its flags tell a blocking stream,
// which the legacy default stream (NULL) waits for, from a
// cudaStreamNonBlocking one. Work runs when it is enqueued, so a stream
// holds nothing else.
struct EmuStream {
    unsigned int flags;
};

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
    PROF_NCCL_GROUP, PROF_MALLOC, PROF_GRAPH_LAUNCH, PROF_N
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

// emu_memory.cc: the number of the next piece of stream-ordered work, and
// completing a stream's pending copies enqueued before such a number.
unsigned long work_seq();
void complete_pending_before(cudaStream_t stream, unsigned long seq);
// emu_event.cc: the host synchronised with a stream (NULL: with every
// stream): the events recorded on it so far are complete.
void events_synced(cudaStream_t stream);
// emu_race.cc: the race build's access checker (docs/gpu.md, "Races and
// exact bounds"). It is on when the program's CUDA code was compiled with
// -fsanitize=thread (make test-emu-race), whose instrumentation reports every
// memory access to it; otherwise these do nothing. The scheduler tells it
// what orders the accesses: the launch, the block, the thread running, the
// barriers that complete.
bool race_on();
void race_launch_begin(const char *name, dim3 grid, dim3 block, void *dyn_smem, size_t dyn_bytes);
void race_block_begin(unsigned int linear_block);
void race_enter(int tid, const void *stack_lo, const void *stack_hi); // thread tid runs until race_leave
void race_leave(int exited);                                          // exited: it has returned
void race_block_barrier();                                            // a __syncthreads completed
void race_warp_sync(int warp, unsigned int lanes);                    // a __syncwarp completed for these lanes
void race_launch_end();
// An access the emulator makes for the running kernel thread (emu_mma.cc: a
// cp.async's source read and shared-memory write, the rows an ldmatrix
// lane names), checked as if the thread's own code had made it; pc: the
// kernel code that asked, for the message.
void race_access(const void *p, size_t bytes, int write, void *pc);

// emu_graph.cc: stream capture (docs/gpu.md, "Graphs"). Every call that
// enqueues work on a stream asks capture_check first: an error is returned
// as the call's own (the work is refused, and the capture it conflicts with
// is invalidated, as CUDA does); *record set: the stream captures, so the
// call validates its arguments as the library would and hands the work to
// capture_record instead of running it; otherwise it runs now. capture_id:
// the capture's id when *record is set (events remember it).
typedef std::function<void(cudaStream_t)> Work; // runs on the stream it is given (the launch stream at replay)
cudaError_t capture_check(cudaStream_t stream, const char *what, bool *record, unsigned long *capture_id = NULL);
void capture_record(cudaStream_t stream, const char *what, Work work);
// The calls that are not stream work but conflict with a capture (CUDA
// Runtime API, cudaThreadExchangeStreamCaptureMode and "Graphs" in the
// Programming Guide); each returns cudaSuccess or the error to return:
cudaError_t capture_unsafe_call(const char *what);                     // cudaMalloc, cudaFree, a synchronous copy...
cudaError_t capture_host_wait(cudaStream_t stream, const char *what);  // cudaStreamSynchronize (NULL: the legacy stream)
cudaError_t capture_device_wait(const char *what);                     // cudaDeviceSynchronize
cudaError_t capture_event_use(unsigned long capture_id, const char *what); // an event last recorded in a capture
void capture_stream_destroyed(cudaStream_t stream);

// emu_memory.cc, for the race checker: the device allocation whose mapping
// (guard pages included) holds p; false if p is not device memory. With
// cell_bytes > 0 also its shadow, cell_bytes per byte it was asked for,
// created zero-filled on first use and freed with the allocation.
struct DevRegion {
    uintptr_t map_lo, map_hi; // the whole mapping
    uintptr_t user;           // what cudaMalloc returned
    size_t size;              // what was asked for
    unsigned long id;
    void *shadow;
};
bool device_region(const void *p, size_t cell_bytes, DevRegion *out);

} // namespace emu

#endif
