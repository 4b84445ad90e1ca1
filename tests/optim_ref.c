// optim_ref.c: runs AdamW over a sequence of gradients given in an HDF5 file, for the
// comparison with torch.optim.AdamW (tests/reference/test_adamw_torch.py).
//
//   optim_ref IN.h5 OUT.h5 [optim.key=value ...]
//
// IN (written by the test with h5py):
//   kind, rows, cols, trainable   (n) int32, one per tensor: kind is the ParamKind value
//                                 (model/layout.h order: embed, norm, attn, router,
//                                 expert, shared, dense, head); cols 0 for a vector
//   params                        (total) float64 initial parameter slab, tensors in order
//   grads                         (steps, total) float64 the gradient of each step
//   grad_scale, total_steps       scalars: the step's gradient factor, the schedule length
// OUT (float64 whatever the build's precision):
//   params (steps, total) after each step; norm (steps) adamw_step's pre-clip norms;
//   lr (steps) optim_lr_at of each step; m/<i>, v/<i> the final state of trainable tensor
//   i (absent for frozen tensors); real_bytes, state_bytes, trainable_params scalars.
// The tensors are grouped by the trainer's rules (model/param_groups.h). Step s trains at
// optim_lr_at(cfg, s, total_steps) with adamw_step(..., s, grad_scale).
//
// Built twice, so the test checks the fp32 build (the trainer's) and the fp64 build:
// build/tests/optim_ref_f32 and build/tests/optim_ref_f64.
#include <hdf5.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../base/util.h"
#include "../model/layout.h"
#include "../model/param_groups.h"
#include "../optim/adamw.h"
#include "../optim/config.h"
#include "../optim/schedule.h"

#define H5_REAL (sizeof(real) == 8 ? H5T_NATIVE_DOUBLE : H5T_NATIVE_FLOAT)

static size_t dataset_numel(hid_t f, const char *name) {
    hid_t ds = H5Dopen2(f, name, H5P_DEFAULT);
    CHECK(ds >= 0, "HDF5: no dataset '%s' in the input", name);
    hid_t space = H5Dget_space(ds);
    hssize_t n = H5Sget_simple_extent_npoints(space);
    H5Sclose(space);
    H5Dclose(ds);
    CHECK(n >= 0, "HDF5: cannot size dataset '%s'", name);
    return (size_t)n;
}

// Reads all of dataset `name`, which must hold n elements, converted to mem_type.
static void read_all(hid_t f, const char *name, hid_t mem_type, void *out, size_t n) {
    CHECK(dataset_numel(f, name) == n, "HDF5: dataset '%s' holds %zu elements, expected %zu",
          name, dataset_numel(f, name), n);
    hid_t ds = H5Dopen2(f, name, H5P_DEFAULT);
    CHECK(H5Dread(ds, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, out) >= 0,
          "HDF5: cannot read '%s'", name);
    H5Dclose(ds);
}

// Writes n elements of mem_type as a float64 (or int64) dataset of the given shape.
static void write_all(hid_t f, const char *name, hid_t mem_type, const void *data, int rank,
                      const hsize_t *dims) {
    hid_t space = rank ? H5Screate_simple(rank, dims, NULL) : H5Screate(H5S_SCALAR);
    hid_t file_type = H5Tget_class(mem_type) == H5T_FLOAT ? H5T_IEEE_F64LE : H5T_STD_I64LE;
    hid_t ds = H5Dcreate2(f, name, file_type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    CHECK(ds >= 0 && H5Dwrite(ds, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) >= 0,
          "HDF5: cannot write '%s'", name);
    H5Dclose(ds);
    H5Sclose(space);
}

static void write_size(hid_t f, const char *name, size_t value) {
    long long v = (long long)value;
    write_all(f, name, H5T_NATIVE_LLONG, &v, 0, NULL);
}

// The tensors described by IN, back to back; trainable flags into *trainable.
static Layout read_layout(hid_t f, uint8_t **trainable) {
    size_t n = dataset_numel(f, "kind");
    int32_t *kind = CALLOC(n, 4), *rows = CALLOC(n, 4), *cols = CALLOC(n, 4);
    int32_t *train = CALLOC(n, 4);
    read_all(f, "kind", H5T_NATIVE_INT32, kind, n);
    read_all(f, "rows", H5T_NATIVE_INT32, rows, n);
    read_all(f, "cols", H5T_NATIVE_INT32, cols, n);
    read_all(f, "trainable", H5T_NATIVE_INT32, train, n);
    Layout lay = {.params = CALLOC(n, sizeof(ParamInfo)), .n_params = n};
    *trainable = CALLOC(n, 1);
    for (size_t i = 0; i < n; i++) {
        CHECK(kind[i] >= PARAM_EMBED && kind[i] <= PARAM_HEAD && rows[i] > 0 && cols[i] >= 0,
              "tensor %zu: bad kind %d or shape (%d, %d)", i, kind[i], rows[i], cols[i]);
        ParamInfo *p = &lay.params[i];
        snprintf(p->name, sizeof p->name, "tensor.%zu", i);
        p->kind = (ParamKind)kind[i];
        p->layer = p->expert = -1;
        p->rows = (size_t)rows[i];
        p->cols = (size_t)cols[i];
        p->numel = p->rows * (p->cols ? p->cols : 1);
        p->offset = lay.total;
        lay.total += p->numel;
        (*trainable)[i] = train[i] != 0;
    }
    free(kind), free(rows), free(cols), free(train);
    return lay;
}

static void parse_overrides(OptimConfig *cfg, int argc, char **argv) {
    KeySection s = optim_config_section(cfg);
    char err[512];
    for (int a = 0; a < argc; a++) {
        char *eq = strchr(argv[a], '=');
        CHECK(eq && !strncmp(argv[a], "optim.", 6), "expected optim.key=value, got '%s'",
              argv[a]);
        *eq = '\0';
        if (keys_parse(&s, argv[a] + 6, eq + 1, err, sizeof err) != 0) FAIL("%s", err);
    }
    if (optim_config_validate(cfg, err, sizeof err) != 0) FAIL("%s", err);
}

static void write_state(hid_t out, const AdamW *opt, size_t n_tensors) {
    H5Gclose(H5Gcreate2(out, "m", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
    H5Gclose(H5Gcreate2(out, "v", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
    for (size_t i = 0; i < n_tensors; i++) {
        Tensor m = adamw_state_m(opt, i), v = adamw_state_v(opt, i);
        if (!m.data) continue;
        char name[32];
        hsize_t dim = m.numel;
        snprintf(name, sizeof name, "m/%zu", i);
        write_all(out, name, H5_REAL, m.data, 1, &dim);
        snprintf(name, sizeof name, "v/%zu", i);
        write_all(out, name, H5_REAL, v.data, 1, &dim);
    }
}

int main(int argc, char **argv) {
    if (argc < 3) FAIL("usage: %s IN.h5 OUT.h5 [optim.key=value ...]", argv[0]);
    OptimConfig cfg;
    optim_config_defaults(&cfg);
    parse_overrides(&cfg, argc - 3, argv + 3);

    hid_t in = H5Fopen(argv[1], H5F_ACC_RDONLY, H5P_DEFAULT);
    CHECK(in >= 0, "HDF5: cannot open '%s'", argv[1]);
    uint8_t *trainable;
    Layout lay = read_layout(in, &trainable);
    size_t total = lay.total, steps = dataset_numel(in, "grads") / (total ? total : 1);
    real *params = CALLOC(total, sizeof(real)), *grads = CALLOC(steps * total, sizeof(real));
    double grad_scale;
    long long total_steps;
    read_all(in, "params", H5_REAL, params, total);
    read_all(in, "grads", H5_REAL, grads, steps * total);
    read_all(in, "grad_scale", H5T_NATIVE_DOUBLE, &grad_scale, 1);
    read_all(in, "total_steps", H5T_NATIVE_LLONG, &total_steps, 1);
    H5Fclose(in);

    const Backend *be = backend_cpu();
    ParamGroupRules rules = {cfg.decay_norms, cfg.decay_embeddings, cfg.decay_router,
                             cfg.router_lr_mult};
    ParamGroup *groups = param_groups_build(&lay, trainable, &rules);
    AdamW opt;
    adamw_init(&opt, &cfg, groups, lay.n_params, be);
    free(groups);
    real *history = CALLOC(steps * total, sizeof(real)); // (steps, total)
    double *norms = CALLOC(steps, sizeof(double)), *lrs = CALLOC(steps, sizeof(double));
    Tensor p = {params, DTYPE_REAL, DEVICE_CPU, total};
    for (size_t s = 0; s < steps; s++) {
        Tensor g = {grads + s * total, DTYPE_REAL, DEVICE_CPU, total};
        lrs[s] = optim_lr_at(&cfg, (long)s, (long)total_steps);
        norms[s] = adamw_step(&opt, p, g, lrs[s], (long)s, grad_scale);
        memcpy(history + s * total, params, total * sizeof(real));
    }

    hid_t out = H5Fcreate(argv[2], H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    CHECK(out >= 0, "HDF5: cannot create '%s'", argv[2]);
    hsize_t dims[2] = {steps, total};
    write_all(out, "params", H5_REAL, history, 2, dims);
    write_all(out, "norm", H5T_NATIVE_DOUBLE, norms, 1, dims);
    write_all(out, "lr", H5T_NATIVE_DOUBLE, lrs, 1, dims);
    write_state(out, &opt, lay.n_params);
    write_size(out, "real_bytes", sizeof(real));
    write_size(out, "state_bytes", adamw_state_bytes(&opt));
    write_size(out, "trainable_params", adamw_trainable_params(&opt));
    H5Fclose(out);

    adamw_free(&opt);
    layout_free(&lay);
    free(trainable), free(params), free(grads), free(history), free(norms), free(lrs);
    return 0;
}
