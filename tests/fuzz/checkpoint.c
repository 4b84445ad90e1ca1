// Fuzz target: an HDF5 checkpoint (train/formats/checkpoint.c): the stored config, the
// delta fingerprint, then a full load (weights, expert biases, train state) into a tiny
// model. AdamW moments are left out: they double a seed that is already 80 kB. HDF5 opens files by name, so each input is written to a file first.
//
// MOE_FUZZ_WRITE_SEED=PATH writes that tiny model's checkpoint to PATH and exits: the
// valid seed of tests/fuzz/checkpoint/.
#include <hdf5.h>
#include <stdio.h>
#include <stdlib.h>

#include "../../train/formats/checkpoint.h"
#include "fuzzlib.h"

typedef struct {
    RunConfig rc;
    Model m;
} Tiny;

// As small as a model gets, with attention, a router with expert biases and two experts.
static void tiny_init(Tiny *t) {
    run_config_defaults(&t->rc);
    ModelConfig *c = &t->rc.model;
    fuzz_tiny_model(c);
    c->vocab = 4;
    c->seq_len = 2;
    c->bias_gamma = 0.001;
    model_init(&t->m, c, backend_cpu(), 1, 2);
    model_init_weights(&t->m, 1);
}

static void tiny_write_seed(Tiny *t, const char *path) {
    TrainState st = {.step = 3, .tokens_seen = 12, .data_cursor = 3, .best_val = 1.5};
    rng_init(&st.noise_rng, 7);
    char err[1024];
    if (ckpt_save(path, &t->rc, &t->m, NULL, &st, NULL, 0, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        exit(1);
    }
    exit(0);
}

static Tiny tiny;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    tiny_init(&tiny);
    const char *seed = getenv("MOE_FUZZ_WRITE_SEED");
    if (seed) tiny_write_seed(&tiny, seed);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static RunConfig rc;
    char err[1024];
    uint64_t base;
    TrainState st;
    const char *path = fuzz_write_file(data, size);
    run_config_defaults(&rc);
    if (ckpt_read_config(path, &rc, err, sizeof err) == 0) {
        if (ckpt_read_base_fingerprint(path, &base, err, sizeof err) != 0) fuzz_check_error(err);
        if (ckpt_load(path, &tiny.m, NULL, &st, err, sizeof err) != 0) fuzz_check_error(err);
    } else {
        fuzz_check_error(err);
    }
    // HDF5's allocations are outside LeakSanitizer's view of our code (they are suppressed,
    // tests/sanitizers/lsan.supp): an identifier left open on some path is found here.
    if (H5Fget_obj_count(H5F_OBJ_ALL, H5F_OBJ_ALL) != 0) abort();
    return 0;
}
