// tensor.c: the buffer descriptor's helpers (see kernels.h).
#include "kernels.h"
#include "../base/util.h"

size_t dtype_size(DType dt) {
    switch (dt) {
    case DTYPE_F32: return 4;
    case DTYPE_F64: return 8;
    case DTYPE_BF16: return 2;
    case DTYPE_I32: return 4;
    }
    DIE("unknown dtype %d", (int)dt);
}

Tensor tensor_none(void) {
    Tensor t = {0};
    t.dtype = DTYPE_REAL;
    return t;
}

Tensor tensor_slice(Tensor t, size_t offset, size_t numel) {
    CHECK(offset + numel <= t.numel || !t.data,
          "tensor slice [%zu, %zu) outside a buffer of %zu elements", offset, offset + numel,
          t.numel);
    Tensor v = t;
    v.numel = numel;
    if (t.data) v.data = (char *)t.data + offset * dtype_size(t.dtype);
    return v;
}
