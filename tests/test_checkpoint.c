// test_checkpoint.c: HDF5 checkpoints (train/formats/checkpoint.h): round trips of weights,
// AdamW moments, train state and config; delta checkpoints; and every bad file or failed
// save giving its own one-line error while the model, moments and state stay untouched.
//
// The suite links the fp64 build but checkpoints hold float32, so every weight and
// moment here is first rounded to float32: round trips must then be bit-exact.
#include <fcntl.h>
#include <hdf5.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../model/param_groups.h"
#include "../train/formats/checkpoint.h"
#include "../train/formats/h5io.h"
#include "testlib.h"

// Every kind of tensor: a dense layer 0 (mlp), an MoE layer 1 with Shazeer noise
// (router/noise), four experts and a shared expert, and an untied lm_head.
static ModelConfig every_kind_config(void) {
    ModelConfig c = tiny_config();
    c.moe_every = 2;
    c.shared_experts = 1;
    c.shared_ffn_dim = 4;
    c.noise = NOISE_SHAZEER;
    return c;
}

// One run's worth of things a checkpoint holds, in its own temporary directory.
typedef struct {
    char dir[64];
    char path[128]; // <dir>/ckpt.h5
    RunConfig rc;
    Model m;
    AdamW opt;
    TrainState st;
} Fix;

static void round_to_f32(real *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        x[i] = (real)(float)x[i];
}

// Weights from `seed` (model_randomize_weights), moments and state from it too, so two
// fixtures with different seeds differ everywhere. trainable: NULL or one flag a tensor.
static Fix *fix_new(const ModelConfig *cfg, uint64_t seed, const uint8_t *trainable) {
    Fix *f = calloc(1, sizeof *f);
    snprintf(f->dir, sizeof f->dir, "/tmp/moe_ckpt_XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    snprintf(f->path, sizeof f->path, "%s/ckpt.h5", f->dir);
    run_config_defaults(&f->rc);
    f->rc.model = *cfg;
    model_init(&f->m, &f->rc.model, backend_cpu(), 1, 5);
    model_randomize_weights(&f->m, seed);
    round_to_f32(TENSOR_R(f->m.params), f->m.layout.total);
    const OptimConfig *oc = &f->rc.optim;
    ParamGroupRules rules = {oc->decay_norms, oc->decay_embeddings, oc->decay_router,
                             oc->router_lr_mult};
    ParamGroup *groups = param_groups_build(&f->m.layout, trainable, &rules);
    adamw_init(&f->opt, oc, groups, f->m.layout.n_params, backend_cpu());
    free(groups);
    Rng r;
    rng_init(&r, seed + 1000);
    for (size_t i = 0; i < f->opt.n_trainable; i++) {
        TENSOR_R(f->opt.m)[i] = (real)(float)rng_normal(&r);
        TENSOR_R(f->opt.v)[i] = (real)(float)rng_uniform(&r);
    }
    f->st.step = (long)seed * 10;
    f->st.tokens_seen = seed * 123456789ull;
    f->st.data_cursor = seed + 77;
    rng_init(&f->st.noise_rng, seed);
    rng_next(&f->st.noise_rng);
    f->st.best_val = 2.5 + (double)seed;
    return f;
}

static void fix_free(Fix *f) {
    test_remove_tree(f->dir);
    adamw_free(&f->opt);
    model_free(&f->m);
    free(f);
}

static void save_ok(Fix *f, const char *path, const uint8_t *include, uint64_t base) {
    char err[1024] = "";
    int r = ckpt_save(path, &f->rc, &f->m, &f->opt, &f->st, include, base, err, sizeof err);
    if (r != 0) fail_msg("ckpt_save: %s", err);
}

static void load_ok(Fix *f, const char *path, int with_opt, int with_state) {
    char err[1024] = "";
    int r = ckpt_load(path, &f->m, with_opt ? &f->opt : NULL, with_state ? &f->st : NULL, err,
                      sizeof err);
    if (r != 0) fail_msg("ckpt_load: %s", err);
}

static void assert_same_real(const Tensor a, const Tensor b, const char *what) {
    assert_int_equal(a.numel, b.numel);
    if (memcmp(a.data, b.data, a.numel * sizeof(real))) fail_msg("%s differ", what);
}

static void assert_same_state(const TrainState *a, const TrainState *b) {
    assert_int_equal(a->step, b->step);
    assert_int_equal(a->tokens_seen, b->tokens_seen);
    assert_int_equal(a->data_cursor, b->data_cursor);
    assert_memory_equal(a->noise_rng.s, b->noise_rng.s, sizeof a->noise_rng.s);
    assert_true(a->best_val == b->best_val);
}

// A copy of everything a load may change, to prove a failed load changed nothing.
typedef struct {
    real *params, *m, *v;
    TrainState st;
} Snapshot;

static Snapshot snapshot(const Fix *f) {
    Snapshot s = {test_copy(TENSOR_R(f->m.params), f->m.layout.total),
                  test_copy(TENSOR_R(f->opt.m), f->opt.n_trainable),
                  test_copy(TENSOR_R(f->opt.v), f->opt.n_trainable), f->st};
    return s;
}

static void assert_untouched(const Fix *f, Snapshot s) {
    if (memcmp(s.params, f->m.params.data, f->m.layout.total * sizeof(real)))
        fail_msg("a failed load changed the weights");
    if (memcmp(s.m, f->opt.m.data, f->opt.n_trainable * sizeof(real)) ||
        memcmp(s.v, f->opt.v.data, f->opt.n_trainable * sizeof(real)))
        fail_msg("a failed load changed the optimizer moments");
    assert_same_state(&s.st, &f->st);
    free(s.params);
    free(s.m);
    free(s.v);
}

// ckpt_load into f with moments and state must fail with exactly `want`.
static void assert_load_fails(Fix *f, const char *path, const char *want) {
    Snapshot s = snapshot(f);
    char err[1024] = "";
    assert_int_equal(ckpt_load(path, &f->m, &f->opt, &f->st, err, sizeof err), -1);
    if (strcmp(err, want)) fail_msg("error\n  '%s'\nexpected\n  '%s'", err, want);
    assert_untouched(f, s);
}

static void assert_read_config_fails(const char *path, const char *want) {
    static RunConfig rc;
    run_config_defaults(&rc);
    char err[1024] = "";
    assert_int_equal(ckpt_read_config(path, &rc, err, sizeof err), -1);
    if (strcmp(err, want)) fail_msg("error\n  '%s'\nexpected\n  '%s'", err, want);
}

// The paths docs/file-formats.md ("Layout") promises, written out for every_kind_config
// (layout order).
static void test_param_paths(void **state) {
    (void)state;
    char want[64][64];
    size_t n = 0;
    snprintf(want[n++], 64, "/model/embed_tokens");
    for (int l = 0; l < 2; l++) {
        const char *attn[] = {"input_layernorm",  "self_attn/q_proj",
                              "self_attn/k_proj", "self_attn/v_proj",
                              "self_attn/o_proj", "post_attention_layernorm"};
        for (int i = 0; i < 6; i++)
            snprintf(want[n++], 64, "/model/layers/%d/%s", l, attn[i]);
        if (l == 0) {
            snprintf(want[n++], 64, "/model/layers/0/mlp/gate_proj");
            snprintf(want[n++], 64, "/model/layers/0/mlp/up_proj");
            snprintf(want[n++], 64, "/model/layers/0/mlp/down_proj");
            continue;
        }
        snprintf(want[n++], 64, "/model/layers/1/router/gate");
        snprintf(want[n++], 64, "/model/layers/1/router/noise");
        for (int e = 0; e < 5; e++) {
            const char *group = e < 4 ? "experts" : "shared_experts";
            int j = e < 4 ? e : 0;
            snprintf(want[n++], 64, "/model/layers/1/%s/%d/w1", group, j);
            snprintf(want[n++], 64, "/model/layers/1/%s/%d/w3", group, j);
            snprintf(want[n++], 64, "/model/layers/1/%s/%d/w2", group, j);
        }
    }
    snprintf(want[n++], 64, "/model/norm");
    snprintf(want[n++], 64, "/model/lm_head");
    ModelConfig cfg = every_kind_config();
    Layout lay;
    layout_init(&lay, &cfg);
    assert_int_equal(lay.n_params, n);
    char got[192];
    for (size_t i = 0; i < n; i++) {
        ckpt_param_path(&lay.params[i], got, sizeof got);
        if (strcmp(got, want[i]))
            fail_msg("%s -> %s, expected %s", lay.params[i].name, got, want[i]);
    }
    layout_free(&lay);
}

static int h5_exists(hid_t file, const char *path) {
    return H5Lexists(file, path, H5P_DEFAULT) > 0;
}

// Weights, moments (with frozen tensors: embed_tokens and expert 2 of layer 1) and state
// saved, then loaded into a model that differed everywhere: all bit-identical.
static void test_round_trip(void **state) {
    (void)state;
    ModelConfig cfg = every_kind_config();
    Layout lay;
    layout_init(&lay, &cfg);
    uint8_t *trainable = calloc(lay.n_params, 1);
    for (size_t i = 0; i < lay.n_params; i++)
        trainable[i] = lay.params[i].kind != PARAM_EMBED &&
                       !(lay.params[i].kind == PARAM_EXPERT && lay.params[i].expert == 2);
    Fix *a = fix_new(&cfg, 7, trainable), *b = fix_new(&cfg, 99, trainable);
    save_ok(a, a->path, NULL, 0);
    assert_true(ckpt_fingerprint(&a->m) != ckpt_fingerprint(&b->m));
    load_ok(b, a->path, 1, 1);
    assert_same_real(a->m.params, b->m.params, "weights");
    assert_same_real(a->opt.m, b->opt.m, "first moments");
    assert_same_real(a->opt.v, b->opt.v, "second moments");
    assert_same_state(&a->st, &b->st);
    assert_true(ckpt_fingerprint(&a->m) == ckpt_fingerprint(&b->m));
    char err[512];
    uint64_t base = 1;
    assert_int_equal(ckpt_read_base_fingerprint(a->path, &base, err, sizeof err), 0);
    assert_true(base == 0);
    // Frozen tensors hold no optimizer state in the file either.
    hid_t file = H5Fopen(a->path, H5F_ACC_RDONLY, H5P_DEFAULT);
    assert_true(file >= 0);
    assert_false(h5_exists(file, "/optim/m/embed_tokens"));
    assert_false(h5_exists(file, "/optim/v/layers/1/experts/2"));
    assert_true(h5_exists(file, "/optim/v/layers/1/experts/1/w2"));
    assert_true(h5_exists(file, "/optim/m/lm_head"));
    H5Fclose(file);
    fix_free(a);
    fix_free(b);
    free(trainable);
    layout_free(&lay);
}

static char *ini_text(RunConfig *rc) {
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    run_config_write_ini(f, rc);
    fclose(f);
    return text;
}

// Every key of every section comes back, domains in their original order (not sorted
// by name), values holding '=' and '.' intact.
static void test_config_round_trip(void **state) {
    (void)state;
    ModelConfig cfg = every_kind_config();
    Fix *a = fix_new(&cfg, 7, NULL);
    const char *words[] = {"train.steps=77",
                           "optim.lr=0.00123",
                           "router.top_k=1",
                           "train.sample_prompt=a=b.c ",
                           "domain.zeta.train=/z/train.txt",
                           "domain.zeta.val=/z/val.txt",
                           "domain.alpha.weight=2.5",
                           "domain.my.set.kind=csv",
                           "data.val_tokens=1234"};
    char err[512];
    for (size_t i = 0; i < sizeof words / sizeof *words; i++)
        if (run_config_override(&a->rc, words[i], err, sizeof err)) fail_msg("%s", err);
    save_ok(a, a->path, NULL, 0);
    static RunConfig back;
    run_config_defaults(&back);
    if (ckpt_read_config(a->path, &back, err, sizeof err)) fail_msg("%s", err);
    char *want = ini_text(&a->rc), *got = ini_text(&back);
    assert_string_equal(got, want);
    assert_string_equal(back.data.domains[0].name, "zeta");
    free(want);
    free(got);
    fix_free(a);
}

static herr_t count_dataset(hid_t obj, const char *name, const H5O_info_t *info, void *data) {
    (void)obj;
    (void)name;
    if (info->type == H5O_TYPE_DATASET) ++*(size_t *)data;
    return 0;
}

static size_t datasets_under(const char *path, const char *group) {
    hid_t file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    hid_t g = H5Gopen2(file, group, H5P_DEFAULT);
    size_t n = 0;
    H5Ovisit(g, H5_INDEX_NAME, H5_ITER_INC, count_dataset, &n);
    H5Gclose(g);
    H5Fclose(file);
    return n;
}

// A delta holds only the included tensors (expert 2 of layer 1 and the router gate) and
// their moments; loading it over any model replaces those tensors and nothing else.
static void test_delta(void **state) {
    (void)state;
    ModelConfig cfg = every_kind_config();
    Fix *base = fix_new(&cfg, 7, NULL), *tuned = fix_new(&cfg, 7, NULL);
    Fix *other = fix_new(&cfg, 99, NULL);
    const Layout *lay = &tuned->m.layout;
    uint8_t *include = calloc(lay->n_params, 1);
    size_t n_included = 0;
    for (size_t i = 0; i < lay->n_params; i++) {
        const ParamInfo *p = &lay->params[i];
        include[i] = (p->kind == PARAM_EXPERT && p->expert == 2) ||
                     strstr(p->name, "block_sparse_moe.gate.") != NULL;
        n_included += include[i];
        for (size_t j = 0; include[i] && j < p->numel; j++)
            TENSOR_R(tuned->m.params)[p->offset + j] += 0.5;
    }
    round_to_f32(TENSOR_R(tuned->m.params), lay->total);
    assert_int_equal(n_included, 4);
    uint64_t fp = ckpt_fingerprint(&base->m);
    save_ok(tuned, tuned->path, include, fp);
    assert_int_equal(datasets_under(tuned->path, "/model"), n_included);
    assert_int_equal(datasets_under(tuned->path, "/optim"), 2 * n_included);
    char err[512];
    uint64_t stored = 0;
    assert_int_equal(ckpt_read_base_fingerprint(tuned->path, &stored, err, sizeof err), 0);
    assert_true(stored == fp);

    load_ok(base, tuned->path, 0, 0);
    assert_same_real(base->m.params, tuned->m.params, "base + delta and the tuned weights");

    real *before = test_copy(TENSOR_R(other->m.params), lay->total);
    load_ok(other, tuned->path, 0, 0);
    for (size_t i = 0; i < lay->n_params; i++) {
        const ParamInfo *p = &lay->params[i];
        const real *want = (include[i] ? TENSOR_R(tuned->m.params) : before) + p->offset;
        if (memcmp(TENSOR_R(other->m.params) + p->offset, want, p->numel * sizeof(real)))
            fail_msg("%s: wrong after loading the delta", p->name);
    }
    // Moments for every tensor `other` trains are required: the delta lacks most.
    char want[512];
    snprintf(want, sizeof want,
             "%s: no optimizer state for model.embed_tokens.weight, which this run trains",
             tuned->path);
    assert_load_fails(other, tuned->path, want);
    free(before);
    free(include);
    fix_free(base);
    fix_free(tuned);
    fix_free(other);
}

static void test_missing_file(void **state) {
    (void)state;
    ModelConfig cfg = every_kind_config();
    Fix *a = fix_new(&cfg, 7, NULL);
    char path[160], want[256];
    snprintf(path, sizeof path, "%s/none.h5", a->dir);
    snprintf(want, sizeof want, "%s: cannot open: No such file or directory", path);
    assert_load_fails(a, path, want);
    assert_read_config_fails(path, want);
    fix_free(a);
}

static void copy_prefix(const char *from, const char *to, long bytes) {
    FILE *in = fopen(from, "rb"), *out = fopen(to, "wb");
    assert_true(in && out);
    for (long i = 0; i < bytes; i++)
        fputc(fgetc(in), out);
    fclose(in);
    fclose(out);
}

static long file_size(const char *path) {
    struct stat sb;
    assert_int_equal(stat(path, &sb), 0);
    return (long)sb.st_size;
}

static void test_truncated_file(void **state) {
    (void)state;
    ModelConfig cfg = every_kind_config();
    Fix *a = fix_new(&cfg, 7, NULL), *b = fix_new(&cfg, 99, NULL);
    save_ok(a, a->path, NULL, 0);
    char half[160], want[256];
    snprintf(half, sizeof half, "%s/half.h5", a->dir);
    copy_prefix(a->path, half, file_size(a->path) / 2);
    snprintf(want, sizeof want, "%s: not a readable HDF5 file (truncated or corrupt?)", half);
    assert_load_fails(b, half, want);
    assert_read_config_fails(half, want);
    fix_free(a);
    fix_free(b);
}

// Flips one byte in the middle of the dataset's only chunk (its data, not its checksum).
static void corrupt_dataset(const char *path, const char *dpath) {
    hid_t file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    hid_t ds = H5Dopen2(file, dpath, H5P_DEFAULT);
    haddr_t addr = HADDR_UNDEF;
    hsize_t size = 0;
    hid_t space = H5Dget_space(ds);
    assert_true(H5Dget_chunk_info(ds, space, 0, NULL, NULL, &addr, &size) >= 0);
    H5Sclose(space);
    H5Dclose(ds);
    H5Fclose(file);
    assert_true(addr != HADDR_UNDEF && size > 8);
    int fd = open(path, O_RDWR);
    unsigned char byte;
    off_t at = (off_t)(addr + size / 2);
    assert_int_equal(pread(fd, &byte, 1, at), 1);
    byte ^= 0x5a;
    assert_int_equal(pwrite(fd, &byte, 1, at), 1);
    close(fd);
}

static void test_corrupt_dataset(void **state) {
    (void)state;
    ModelConfig cfg = every_kind_config();
    Fix *a = fix_new(&cfg, 7, NULL), *b = fix_new(&cfg, 99, NULL);
    save_ok(a, a->path, NULL, 0);
    corrupt_dataset(a->path, "/model/layers/1/experts/2/w3");
    char want[256];
    snprintf(want, sizeof want,
             "%s: checksum mismatch in /model/layers/1/experts/2/w3: the file is corrupt",
             a->path);
    assert_load_fails(b, a->path, want);
    // The moments are checked as well.
    save_ok(a, a->path, NULL, 0);
    corrupt_dataset(a->path, "/optim/v/layers/0/mlp/up_proj");
    snprintf(want, sizeof want,
             "%s: checksum mismatch in /optim/v/layers/0/mlp/up_proj: the file is corrupt",
             a->path);
    assert_load_fails(b, a->path, want);
    fix_free(a);
    fix_free(b);
}

static void rewrite_root_attr(const char *path, const char *name, hid_t type,
                              const void *value) {
    hid_t file = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    assert_true(file >= 0);
    assert_true(H5Adelete(file, name) >= 0);
    hid_t space = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(file, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
    assert_true(a >= 0 && H5Awrite(a, type, value) >= 0);
    H5Aclose(a);
    H5Sclose(space);
    H5Fclose(file);
}

static void test_wrong_version(void **state) {
    (void)state;
    ModelConfig cfg = every_kind_config();
    Fix *a = fix_new(&cfg, 7, NULL), *b = fix_new(&cfg, 99, NULL);
    save_ok(a, a->path, NULL, 0);
    int version = 7;
    rewrite_root_attr(a->path, "version", H5T_NATIVE_INT, &version);
    char want[256];
    snprintf(want, sizeof want, "%s: format version 7, this moe reads version 1", a->path);
    assert_load_fails(b, a->path, want);
    assert_read_config_fails(a->path, want);
    fix_free(a);
    fix_free(b);
}

static void test_wrong_format(void **state) {
    (void)state;
    ModelConfig cfg = every_kind_config();
    Fix *a = fix_new(&cfg, 7, NULL), *b = fix_new(&cfg, 99, NULL);
    save_ok(a, a->path, NULL, 0);
    hid_t str = H5Tcopy(H5T_C_S1);
    H5Tset_size(str, 6);
    rewrite_root_attr(a->path, "format", str, "llm.c");
    H5Tclose(str);
    char want[256];
    snprintf(want, sizeof want,
             "%s: not a moe.c checkpoint (format attribute is not \"moe.c\")", a->path);
    assert_load_fails(b, a->path, want);
    assert_read_config_fails(a->path, want);
    fix_free(a);
    fix_free(b);
}

static void test_config_mismatch(void **state) {
    (void)state;
    ModelConfig small = every_kind_config(), wide = every_kind_config();
    wide.d_model = 16;
    Fix *a = fix_new(&small, 7, NULL), *b = fix_new(&wide, 99, NULL);
    save_ok(a, a->path, NULL, 0);
    char want[256];
    snprintf(want, sizeof want,
             "%s: config mismatch: model.d_model is 8 in the checkpoint, 16 in this run",
             a->path);
    assert_load_fails(b, a->path, want);
    // [router] keys count too.
    Fix *c = fix_new(&small, 99, NULL);
    c->m.cfg.top_k = 1;
    snprintf(want, sizeof want,
             "%s: config mismatch: router.top_k is 2 in the checkpoint, 1 in this run",
             a->path);
    assert_load_fails(c, a->path, want);
    fix_free(a);
    fix_free(b);
    fix_free(c);
}

// Replaces a dataset by a (3) float32 one, as a careless edit with h5py might.
static void test_shape_mismatch(void **state) {
    (void)state;
    ModelConfig cfg = every_kind_config();
    Fix *a = fix_new(&cfg, 7, NULL), *b = fix_new(&cfg, 99, NULL);
    save_ok(a, a->path, NULL, 0);
    hid_t file = H5Fopen(a->path, H5F_ACC_RDWR, H5P_DEFAULT);
    assert_true(H5Ldelete(file, "/model/norm", H5P_DEFAULT) >= 0);
    H5Fclose(file);
    file = H5Fopen(a->path, H5F_ACC_RDWR, H5P_DEFAULT);
    real three[3] = {1, 2, 3};
    hsize_t dims[1] = {3};
    h5io_write_real(file, "/model/norm", three, 1, dims);
    H5Fclose(file);
    char want[256];
    snprintf(want, sizeof want, "%s: /model/norm has shape [3], this model needs [8]", a->path);
    assert_load_fails(b, a->path, want);
    fix_free(a);
    fix_free(b);
}

// A full checkpoint lacking a tensor; one saved without moments or state loaded by a run
// that needs them.
static void test_incomplete_checkpoint(void **state) {
    (void)state;
    ModelConfig cfg = every_kind_config();
    Fix *a = fix_new(&cfg, 7, NULL), *b = fix_new(&cfg, 99, NULL);
    char err[512], want[256];
    save_ok(a, a->path, NULL, 0);
    hid_t file = H5Fopen(a->path, H5F_ACC_RDWR, H5P_DEFAULT);
    assert_true(H5Ldelete(file, "/model/layers/1/experts/3/w2", H5P_DEFAULT) >= 0);
    H5Fclose(file);
    snprintf(
        want, sizeof want,
        "%s: /model/layers/1/experts/3/w2 is missing (a full checkpoint holds every tensor)",
        a->path);
    assert_load_fails(b, a->path, want);

    assert_int_equal(ckpt_save(a->path, &a->rc, &a->m, NULL, &a->st, NULL, 0, err, sizeof err),
                     0);
    snprintf(want, sizeof want,
             "%s: no optimizer state for model.embed_tokens.weight, which this run trains",
             a->path);
    assert_load_fails(b, a->path, want);

    assert_int_equal(ckpt_save(a->path, &a->rc, &a->m, &a->opt, NULL, NULL, 0, err, sizeof err),
                     0);
    snprintf(want, sizeof want, "%s: no train state (/state)", a->path);
    assert_load_fails(b, a->path, want);
    fix_free(a);
    fix_free(b);
}

// A save of b to `path` must fail naming `path` and saying `reason`.
static void assert_save_fails(Fix *b, const char *path, const char *reason) {
    char err[1024] = "";
    assert_int_equal(ckpt_save(path, &b->rc, &b->m, &b->opt, &b->st, NULL, 0, err, sizeof err),
                     -1);
    if (strncmp(err, path, strlen(path)) || !strstr(err, reason))
        fail_msg("error '%s' should name %s and say '%s'", err, path, reason);
}

// After a failed save: no temporary file left, a's checkpoint in place and loadable.
static void assert_previous_intact(Fix *a) {
    char tmp[256];
    snprintf(tmp, sizeof tmp, "%s.tmp", a->path);
    struct stat sb;
    if (stat(tmp, &sb) == 0 && S_ISREG(sb.st_mode)) fail_msg("%s was left behind", tmp);
    Fix *c = fix_new(&a->m.cfg, 5, NULL);
    load_ok(c, a->path, 1, 1);
    assert_same_real(a->m.params, c->m.params, "the previous checkpoint's weights");
    fix_free(c);
}

static void test_failed_save_keeps_previous(void **state) {
    (void)state;
    ModelConfig cfg = every_kind_config();
    Fix *a = fix_new(&cfg, 7, NULL), *b = fix_new(&cfg, 99, NULL);
    save_ok(a, a->path, NULL, 0);
    char tmp[256];
    snprintf(tmp, sizeof tmp, "%s.tmp", a->path);

    // The temporary name is taken by a directory: nothing can be written.
    assert_int_equal(mkdir(tmp, 0755), 0);
    assert_save_fails(b, a->path, "Is a directory");
    assert_int_equal(rmdir(tmp), 0);
    assert_previous_intact(a);

    // The disk fills up half-way through the write (a file size limit; root obeys it).
    struct rlimit old, small;
    assert_int_equal(getrlimit(RLIMIT_FSIZE, &old), 0);
    small = old;
    small.rlim_cur = (rlim_t)file_size(a->path) / 2;
    void (*old_handler)(int) = signal(SIGXFSZ, SIG_IGN);
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &small), 0);
    assert_save_fails(b, a->path, "File too large");
    setrlimit(RLIMIT_FSIZE, &old);
    signal(SIGXFSZ, old_handler);
    assert_previous_intact(a);

    // The parent is a regular file.
    char path[256];
    snprintf(path, sizeof path, "%s/ckpt.h5", a->path);
    assert_save_fails(b, path, "Not a directory");
    assert_previous_intact(a);
    fix_free(a);
    fix_free(b);
}

// For tests/reference/test_checkpoint_h5py.py: writes <dir>/c.h5, a full checkpoint of
// every_kind_config's model (model_randomize_weights seed 7, rounded to float32) with
// moments m = w / 2 and v = w * w and state step 42, and <dir>/slab.h5 whose /slab is the
// parameter slab as one flat float32 array: the one thing Python cannot derive. <dir> is
// $MOE_CKPT_OUT when set, else a temporary directory removed afterwards.
static void test_export_for_h5py(void **state) {
    (void)state;
    ModelConfig cfg = every_kind_config();
    Fix *a = fix_new(&cfg, 7, NULL);
    const real *w = TENSOR_R(a->m.params);
    for (size_t i = 0; i < a->m.layout.n_params; i++) {
        const ParamInfo *p = &a->m.layout.params[i];
        real *m = TENSOR_R(adamw_state_m(&a->opt, i)), *v = TENSOR_R(adamw_state_v(&a->opt, i));
        for (size_t j = 0; j < p->numel; j++) {
            m[j] = w[p->offset + j] / 2;
            v[j] = (real)(float)(w[p->offset + j] * w[p->offset + j]);
        }
    }
    a->st =
        (TrainState){.step = 42, .tokens_seen = 42 * 4096, .data_cursor = 42, .best_val = 1.75};
    rng_init(&a->st.noise_rng, 3);
    const char *dir = getenv("MOE_CKPT_OUT") ? getenv("MOE_CKPT_OUT") : a->dir;
    char ckpt[512], slab[512];
    snprintf(ckpt, sizeof ckpt, "%s/c.h5", dir);
    snprintf(slab, sizeof slab, "%s/slab.h5", dir);
    save_ok(a, ckpt, NULL, 0);
    hid_t f = h5io_create(slab);
    hsize_t n = a->m.layout.total;
    h5io_write_real(f, "/slab", w, 1, &n);
    h5io_close(f);
    fix_free(a);
}

const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_param_paths),
    cmocka_unit_test(test_round_trip),
    cmocka_unit_test(test_config_round_trip),
    cmocka_unit_test(test_delta),
    cmocka_unit_test(test_missing_file),
    cmocka_unit_test(test_truncated_file),
    cmocka_unit_test(test_corrupt_dataset),
    cmocka_unit_test(test_wrong_version),
    cmocka_unit_test(test_wrong_format),
    cmocka_unit_test(test_config_mismatch),
    cmocka_unit_test(test_shape_mismatch),
    cmocka_unit_test(test_incomplete_checkpoint),
    cmocka_unit_test(test_failed_save_keeps_previous),
    cmocka_unit_test(test_export_for_h5py),
};

TEST_MAIN(tests)
