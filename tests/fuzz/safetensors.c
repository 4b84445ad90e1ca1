// Fuzz target: a safetensors file (train/formats/safetensors.c): the header's checks,
// then every tensor it announces read as float32.
#include <stdlib.h>

#include "../../train/formats/safetensors.h"
#include "fuzzlib.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    StFile sf;
    char err[1024];
    if (safetensors_open(&sf, fuzz_write_file(data, size), err, sizeof err) != 0)
        return fuzz_check_error(err), 0;
    for (size_t i = 0; i < sf.n_tensors; i++) {
        const StTensor *t = &sf.tensors[i];
        float *out = malloc(t->numel ? t->numel * sizeof *out : 1);
        if (safetensors_read_f32(&sf, t, out, err, sizeof err) != 0) fuzz_check_error(err);
        free(out);
    }
    safetensors_close(&sf);
    return 0;
}
