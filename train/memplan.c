// The device memory a run would allocate (see memplan.h).
#include "memplan.h"

const char *const mem_category_names[MEM_COUNT] = {
    [MEM_MASTER] = "parameters, gradients, AdamW (fp32)",
    [MEM_WEIGHTS_X] = "weight copy for the matmuls",
    [MEM_ACTIVATIONS] = "activations kept for the backward",
    [MEM_SCRATCH] = "scratch",
    [MEM_WORKSPACE] = "library workspaces",
};

void memplan_print(const MemoryPlan *p, int B, int T, FILE *f) {
    const double GiB = 1073741824.0;
    fprintf(f, "device memory per rank, micro-batch %d x %d:\n", B, T);
    for (int i = 0; i < MEM_COUNT; i++) fprintf(f, "  %-38s %9.3f GiB\n", mem_category_names[i], p->bytes[i] / GiB);
    fprintf(f, "  %-38s %9.3f GiB\n", "total", memplan_total(p) / GiB);
}
