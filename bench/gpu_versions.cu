// What this machine's CUDA stack is, for the record of a GPU check
// (scripts/gpu_check.sh): the driver and runtime versions, the cuBLAS and
// NCCL libraries actually loaded (not the headers compiled against), and each
// visible GPU. Runs without a GPU too: the libraries still answer, the
// driver is reported as absent and the device list is empty.
//   gpu_versions        lines "key<tab>value"
#include <nccl.h>

#include "kernels/common.cuh" // CUDA_CHECK, CUBLAS_CHECK

int main(void) {
    // The driver answers 0 when none is installed; the runtime is this program's.
    int driver = 0, runtime = 0;
    CUDA_CHECK(cudaDriverGetVersion(&driver));
    CUDA_CHECK(cudaRuntimeGetVersion(&runtime));
    if (driver) printf("cuda_driver_api\t%d.%d\n", driver / 1000, driver % 1000 / 10);
    else printf("cuda_driver_api\tnone (no NVIDIA driver)\n");
    printf("cuda_runtime\t%d.%d\n", runtime / 1000, runtime % 1000 / 10);

    int major, minor, patch;
    CUBLAS_CHECK(cublasGetProperty(MAJOR_VERSION, &major));
    CUBLAS_CHECK(cublasGetProperty(MINOR_VERSION, &minor));
    CUBLAS_CHECK(cublasGetProperty(PATCH_LEVEL, &patch));
    printf("cublas\t%d.%d.%d\n", major, minor, patch);

    // NCCL >= 2.9 encodes major * 10000 + minor * 100 + patch.
    int nccl = 0;
    if (ncclGetVersion(&nccl) != ncclSuccess) FATAL("ncclGetVersion failed");
    printf("nccl\t%d.%d.%d\n", nccl / 10000, nccl % 10000 / 100, nccl % 100);

    // No device (or no driver) is an answer here, not an error.
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
        printf("gpus\t0 (%s)\n", cudaGetErrorString(err));
        return 0;
    }
    printf("gpus\t%d\n", n);
    for (int i = 0; i < n; i++) {
        cudaDeviceProp p;
        CUDA_CHECK(cudaGetDeviceProperties(&p, i));
        printf("gpu%d\t%s (sm_%d%d, %d SMs, %.1f GiB)\n", i, p.name, p.major, p.minor, p.multiProcessorCount,
               p.totalGlobalMem / 1073741824.0);
    }
    return 0;
}
