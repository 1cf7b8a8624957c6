// The floating-point type of the CPU model. The trainer builds the model code
// in fp32; the finite-difference test builds the same code in fp64 (-DMOE_FP64)
// so that its difference quotients are accurate to ~1e-8.
#ifndef MOE_REAL_H
#define MOE_REAL_H

#include <math.h>

// Math on `real`, so the same source compiles at either precision.
#ifdef MOE_FP64
typedef double real;
#define REAL_NAME "fp64"
#define r_exp exp
#define r_log log
#define r_sqrt sqrt
#else
typedef float real;
#define REAL_NAME "fp32"
#define r_exp expf
#define r_log logf
#define r_sqrt sqrtf
#endif

#endif
