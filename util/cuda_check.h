// CUDA_CHECK(call): every CUDA runtime call of the project goes through it, in
// the CUDA files (kernels/common.cuh includes this) and in the C files that
// call the runtime (parallel/comm_nccl.c). A failure prints the error, file,
// line and the call itself, and exits.
#ifndef MOE_CUDA_CHECK_H
#define MOE_CUDA_CHECK_H

#include <cuda_runtime_api.h>

#include "util.h"

#define CUDA_CHECK(call)                                                                                    \
    do {                                                                                                    \
        cudaError_t cuda_err_ = (call);                                                                     \
        if (cuda_err_ != cudaSuccess)                                                                       \
            util_fatal(__FILE__, __LINE__, "CUDA error %s: %s\n  in: %s", cudaGetErrorName(cuda_err_),      \
                       cudaGetErrorString(cuda_err_), #call);                                               \
    } while (0)

#endif
