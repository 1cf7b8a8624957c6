// CUDA emulation on the CPU (tests/emu): the C runtime API is all in the emulated cuda_runtime.h.
#include "cuda_runtime.h"
