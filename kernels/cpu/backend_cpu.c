// backend_cpu.c: the CPU backend table, one entry per KERNEL of the op list.
#include "cpu_ops.h"

static const Backend cpu_backend = {
    .name = "cpu",
    .device = DEVICE_CPU,
#define KERNEL(ret, fn, params) .fn = cpu_##fn,
#define KERNEL_HOOK(ret, fn, params)
#include "../ops.def"
#undef KERNEL
#undef KERNEL_HOOK
    .attention_plan = cpu_attention_plan,
};

const Backend *backend_cpu(void) { return &cpu_backend; }
