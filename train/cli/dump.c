#include "dump.h"

#include <stdlib.h>
#include <string.h>

#include "../../base/util.h"
#include "../../model/model.h"
#include "../config.h"
#include "../formats/h5io.h"

static void write_config(hid_t f, RunConfig *rc) {
    KeySection s[RUN_CONFIG_MAX_SECTIONS];
    int n = run_config_sections(rc, s);
    char name[160], value[KEY_STRING_MAX + 32];
    for (int i = 0; i < n; i++) {
        for (size_t j = 0; j < s[i].n_keys; j++) {
            snprintf(name, sizeof name, "%s.%s", s[i].section, s[i].keys[j].name);
            keys_format(&s[i], &s[i].keys[j], value, sizeof value);
            h5io_write_attr(f, "/config", name, value);
        }
    }
}

static void write_slab_tensors(hid_t f, const Model *m, Tensor slab, const char *group) {
    real *host = CALLOC(slab.numel, sizeof(real));
    m->be->download(host, slab, slab.numel * sizeof(real));
    char path[192];
    for (size_t i = 0; i < m->layout.n_params; i++) {
        const ParamInfo *p = &m->layout.params[i];
        hsize_t dims[2] = {p->rows, p->cols};
        snprintf(path, sizeof path, "/%s/%s", group, p->name);
        h5io_write_real(f, path, host + p->offset, p->cols ? 2 : 1, dims);
    }
    free(host);
}

static void write_real_tensor(hid_t f, const Model *m, const char *path, Tensor t, size_t rows,
                              size_t cols) {
    size_t n = rows * (cols ? cols : 1);   // cols 0: a vector
    real *host = CALLOC(n, sizeof(real));
    m->be->download(host, t, n * sizeof(real));
    hsize_t dims[2] = {rows, cols};
    h5io_write_real(f, path, host, cols ? 2 : 1, dims);
    free(host);
}

static void write_i32_tensor(hid_t f, const Model *m, const char *path, Tensor t, size_t rows,
                             size_t cols) {
    int32_t *host = CALLOC(rows * cols, sizeof(int32_t));
    m->be->download(host, t, rows * cols * sizeof(int32_t));
    hsize_t dims[2] = {rows, cols};
    h5io_write_i32(f, path, host, 2, dims);
    free(host);
}

// Per-MoE-layer scalars as one array in layer order; skipped when absent.
static void write_layer_losses(hid_t f, const Model *m, const char *path, size_t field) {
    if (m->n_moe == 0) return;
    real *v = CALLOC((size_t)m->n_moe, sizeof(real));
    for (int i = 0; i < m->n_moe; i++) {
        Tensor t = *(const Tensor *)((const char *)&m->moe[i] + field);
        if (!t.data) {
            free(v);
            return;
        }
        m->be->download(&v[i], t, sizeof(real));
    }
    hsize_t dims[1] = {(hsize_t)m->n_moe};
    h5io_write_real(f, path, v, 1, dims);
    free(v);
}

static void write_routing(hid_t f, const Model *m) {
    size_t N = m->N, E = (size_t)m->cfg.experts, C = (size_t)m->cfg.d_model;
    char path[128];
    for (int i = 0; i < m->n_moe; i++) {
        const MoeLayerState *st = &m->moe[i];
        size_t k = st->slots;
        snprintf(path, sizeof path, "/out/topk/layers.%d", st->layer);
        write_i32_tensor(f, m, path, st->idx, N, k);
        snprintf(path, sizeof path, "/out/keep/layers.%d", st->layer);
        write_i32_tensor(f, m, path, st->keep, N, k);
        snprintf(path, sizeof path, "/noise/layers.%d.eps", st->layer);
        if (st->eps.data) write_real_tensor(f, m, path, st->eps, N, E);
        snprintf(path, sizeof path, "/noise/layers.%d.jitter", st->layer);
        if (st->jitter.data) write_real_tensor(f, m, path, st->jitter, N, C);
        snprintf(path, sizeof path, "/state/layers.%d.expert_bias", st->layer);
        if (model_config_has_bias(&m->cfg)) write_real_tensor(f, m, path, st->bias, E, 0);
    }
    write_layer_losses(f, m, "/out/lb", offsetof(MoeLayerState, lb));
    write_layer_losses(f, m, "/out/z", offsetof(MoeLayerState, z));
    write_layer_losses(f, m, "/out/importance", offsetof(MoeLayerState, importance));
    write_layer_losses(f, m, "/out/load", offsetof(MoeLayerState, load));
}

static void write_scalar(hid_t f, const char *path, double v) {
    real r = (real)v;
    h5io_write_real(f, path, &r, 0, NULL);
}

// Random token ids and targets in [0, vocab).
static void random_batch(Model *m, Rng *rng) {
    int32_t *tok = CALLOC(2 * m->N, sizeof(int32_t));
    for (size_t i = 0; i < 2 * m->N; i++) tok[i] = (int32_t)(rng_next(rng) % (uint64_t)m->cfg.vocab);
    model_set_batch(m, tok, tok + m->N);
    free(tok);
}

static void write_dump(const char *path, RunConfig *rc, Model *m) {
    hid_t f = h5io_create(path);
    write_config(f, rc);
    write_slab_tensors(f, m, m->params, "params");
    write_slab_tensors(f, m, m->grads, "grads");
    write_i32_tensor(f, m, "/batch/tokens", m->tokens, m->B, m->T);
    write_i32_tensor(f, m, "/batch/targets", m->targets, m->B, m->T);
    write_real_tensor(f, m, "/out/logits", m->logits.v, m->N, (size_t)m->cfg.vocab);
    write_scalar(f, "/out/loss", m->losses.total);
    write_scalar(f, "/out/ce", m->losses.ce);
    write_routing(f, m);
    h5io_close(f);
}

int dump_main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help")) {
        fprintf(argc < 2 ? stderr : stdout,
                "usage: moe dump OUT.h5 [section.key=value ...]\n"
                "  Writes a model with test weights, a random batch, router noise, the\n"
                "  forward outputs and every gradient to OUT.h5 for tests/reference/.\n");
        return argc < 2 ? 2 : 0;
    }
    RunConfig rc;
    char err[1024];
    run_config_defaults(&rc);
    for (int i = 2; i < argc; i++)
        if (run_config_override(&rc, argv[i], err, sizeof err) != 0) FAIL("%s", err);
    if (run_config_validate(&rc, err, sizeof err) != 0) FAIL("%s", err);

    Model m;
    model_init(&m, &rc.model, backend_cpu(), (size_t)rc.train.batch_size,
               (size_t)rc.model.seq_len);
    Rng rng;
    rng_init(&rng, (uint64_t)rc.train.seed);
    model_randomize_weights(&m, (uint64_t)rc.train.seed);
    random_batch(&m, &rng);
    model_draw_noise(&m, &rng);
    model_forward(&m);
    model_zero_grad(&m);
    model_backward(&m);
    write_dump(argv[1], &rc, &m);
    printf("wrote %s: loss %.6f (ce %.6f, lb %.6f, z %.6f)\n", argv[1], m.losses.total,
           m.losses.ce, m.losses.lb, m.losses.z);
    model_free(&m);
    return 0;
}
