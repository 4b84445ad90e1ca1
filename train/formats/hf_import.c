// hf_import.c: a transformers Mixtral directory (config.json, safetensors) as a model.
#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../../base/util.h"
#include "hf.h"

#define HF_PATH_MAX 4096

static void join_path(char *out, const char *dir, const char *name) {
    if (snprintf(out, HF_PATH_MAX, "%s/%s", dir, name) >= HF_PATH_MAX)
        FAIL("%s/%s: path too long", dir, name);
}

static cJSON *read_json(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) FAIL("%s: cannot open: %s", path, strerror(errno));
    if (fseeko(f, 0, SEEK_END) != 0) FAIL("%s: cannot seek", path);
    long size = (long)ftello(f);
    if (size < 0 || size > 100000000) FAIL("%s: %ld bytes: too large for a JSON file", path, size);
    rewind(f);
    char *text = CALLOC((size_t)size + 1, 1);
    if (fread(text, 1, (size_t)size, f) != (size_t)size) FAIL("%s: cannot read", path);
    fclose(f);
    cJSON *j = cJSON_ParseWithLength(text, (size_t)size);
    if (!j) FAIL("%s: not valid JSON (at byte %td)", path, cJSON_GetErrorPtr() - text);
    free(text);
    if (!cJSON_IsObject(j)) FAIL("%s: not a JSON object", path);
    return j;
}

// ---- config.json -> [model] and [router] -------------------------------------------------

typedef enum { HF_INT, HF_REAL, HF_BOOL } HfKind;

typedef struct {
    const char *hf, *moe;
    HfKind kind;
    const char *fallback;   // MixtralConfig's default; NULL: the key is required
} HfKey;

// Keys that shape the weights are required (transformers writes every key it has).
static const HfKey HF_KEYS[] = {
    {"vocab_size", "model.vocab", HF_INT, NULL},
    {"hidden_size", "model.d_model", HF_INT, NULL},
    {"intermediate_size", "model.expert_ffn_dim", HF_INT, NULL},
    {"num_hidden_layers", "model.layers", HF_INT, NULL},
    {"num_attention_heads", "model.heads", HF_INT, NULL},
    {"num_key_value_heads", "model.kv_heads", HF_INT, NULL},
    {"num_local_experts", "model.experts", HF_INT, NULL},
    {"num_experts_per_tok", "router.top_k", HF_INT, NULL},
    {"max_position_embeddings", "model.seq_len", HF_INT, NULL},
    {"tie_word_embeddings", "model.tie_embeddings", HF_BOOL, "false"},
    {"rms_norm_eps", "model.norm_eps", HF_REAL, "1e-5"},
    {"rope_theta", "model.rope_theta", HF_REAL, "1e6"},
    {"router_aux_loss_coef", "router.aux_coef", HF_REAL, "0.001"},
    {"initializer_range", "model.init_std", HF_REAL, "0.02"},
};

// What Mixtral is, whatever moe.c's defaults: every layer MoE, softmax top-k renormalised,
// no shared experts, no bias, and dropless routing as in transformers.
static const char *MIXTRAL_FIXED[] = {
    "model.shared_experts=0", "model.moe_every=1",   "router.score=softmax",
    "router.renorm=true",     "router.select=topk",  "router.bias_gamma=0",
    "router.noise=none",      "router.capacity_factor=0",
};

static void set_key(RunConfig *rc, const char *path, const char *hf, const char *moe,
                    const char *value) {
    char word[256], err[1024];
    snprintf(word, sizeof word, "%s=%s", moe, value);
    if (run_config_override(rc, word, err, sizeof err) != 0)
        FAIL("%s: %s = %s: %s", path, hf, value, err);
}

// The value of key k as config text; the fallback when the key is absent.
static void key_text(const cJSON *j, const HfKey *k, const char *path, char *out, size_t n) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, k->hf);
    if (!v && !k->fallback) FAIL("%s: no %s (a Mixtral config.json has it)", path, k->hf);
    if (!v) snprintf(out, n, "%s", k->fallback);
    else if (k->kind == HF_BOOL && cJSON_IsBool(v))
        snprintf(out, n, "%s", cJSON_IsTrue(v) ? "true" : "false");
    else if (k->kind == HF_INT && cJSON_IsNumber(v) && v->valuedouble == floor(v->valuedouble))
        snprintf(out, n, "%.0f", v->valuedouble);
    else if (k->kind == HF_REAL && cJSON_IsNumber(v)) snprintf(out, n, "%.17g", v->valuedouble);
    else
        FAIL("%s: %s is not %s", path, k->hf,
             k->kind == HF_BOOL ? "true or false" : k->kind == HF_INT ? "an integer" : "a number");
}

static int is_set(const cJSON *j, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, key);
    return v && !cJSON_IsNull(v);
}

// Refuses what moe.c would compute differently.
static void check_mixtral(const cJSON *j, const char *path) {
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(j, "model_type");
    if (!cJSON_IsString(type))
        FAIL("%s: no model_type string (moe import reads Mixtral models only)", path);
    if (strcmp(type->valuestring, "mixtral"))
        FAIL("%s: model_type '%s' is not mixtral (moe import reads Mixtral models only)", path,
             type->valuestring);
    const cJSON *act = cJSON_GetObjectItemCaseSensitive(j, "hidden_act");
    if (act && (!cJSON_IsString(act) || strcmp(act->valuestring, "silu")))
        FAIL("%s: hidden_act is not \"silu\": moe.c's experts are SwiGLU", path);
    if (is_set(j, "rope_scaling"))
        FAIL("%s: rope_scaling is set: moe.c's RoPE has no scaling", path);
    if (is_set(j, "quantization_config"))
        FAIL("%s: quantization_config is set: moe import reads F32, BF16 or F16 weights", path);
    const cJSON *hd = cJSON_GetObjectItemCaseSensitive(j, "head_dim");
    const cJSON *hs = cJSON_GetObjectItemCaseSensitive(j, "hidden_size");
    const cJSON *nh = cJSON_GetObjectItemCaseSensitive(j, "num_attention_heads");
    if (cJSON_IsNumber(hd) && cJSON_IsNumber(hs) && cJSON_IsNumber(nh) && nh->valuedouble > 0 &&
        hd->valuedouble != floor(hs->valuedouble / nh->valuedouble))
        FAIL("%s: head_dim = %g differs from hidden_size / num_attention_heads = %g: moe.c's "
             "heads split hidden_size", path, hd->valuedouble,
             floor(hs->valuedouble / nh->valuedouble));
}

// transformers 5 moves rope_theta into rope_parameters {"rope_type": "default", ...}.
static void rope_from_parameters(RunConfig *rc, const cJSON *j, const char *path) {
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(j, "rope_parameters");
    if (!p || cJSON_IsNull(p) || cJSON_GetObjectItemCaseSensitive(j, "rope_theta")) return;
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(p, "rope_type");
    const cJSON *theta = cJSON_GetObjectItemCaseSensitive(p, "rope_theta");
    if (cJSON_IsString(type) && strcmp(type->valuestring, "default"))
        FAIL("%s: rope_parameters.rope_type = %s: moe.c's RoPE has no scaling", path,
             type->valuestring);
    if (!cJSON_IsNumber(theta)) FAIL("%s: rope_parameters has no rope_theta number", path);
    char value[64];
    snprintf(value, sizeof value, "%.17g", theta->valuedouble);
    set_key(rc, path, "rope_parameters.rope_theta", "model.rope_theta", value);
}

// A window narrower than the context would mask keys moe.c attends to.
static void check_window(const cJSON *j, const RunConfig *rc, const char *path) {
    const cJSON *w = cJSON_GetObjectItemCaseSensitive(j, "sliding_window");
    if (!w || cJSON_IsNull(w)) return;
    if (!cJSON_IsNumber(w)) FAIL("%s: sliding_window is neither null nor a number", path);
    if (w->valuedouble < rc->model.seq_len)
        FAIL("%s: sliding_window = %g is shorter than the context (%d tokens) and moe.c attends "
             "to the whole context; import with --seq-len %g or less", path, w->valuedouble,
             rc->model.seq_len, w->valuedouble);
}

void hf_import_config(const char *dir, long seq_len, RunConfig *rc) {
    char path[HF_PATH_MAX], value[64], err[1024];
    join_path(path, dir, HF_CONFIG);
    cJSON *j = read_json(path);
    check_mixtral(j, path);
    run_config_defaults(rc);
    for (size_t i = 0; i < sizeof MIXTRAL_FIXED / sizeof *MIXTRAL_FIXED; i++)
        if (run_config_override(rc, MIXTRAL_FIXED[i], err, sizeof err) != 0) DIE("%s", err);
    for (size_t i = 0; i < sizeof HF_KEYS / sizeof *HF_KEYS; i++) {
        key_text(j, &HF_KEYS[i], path, value, sizeof value);
        set_key(rc, path, HF_KEYS[i].hf, HF_KEYS[i].moe, value);
    }
    rope_from_parameters(rc, j, path);
    const cJSON *jitter = cJSON_GetObjectItemCaseSensitive(j, "router_jitter_noise");
    if (cJSON_IsNumber(jitter) && jitter->valuedouble > 0) {
        set_key(rc, path, "router_jitter_noise", "router.noise", "jitter");
        snprintf(value, sizeof value, "%.17g", jitter->valuedouble);
        set_key(rc, path, "router_jitter_noise", "router.jitter_eps", value);
    }
    if (seq_len > 0) {
        snprintf(value, sizeof value, "%ld", seq_len);
        set_key(rc, path, "--seq-len", "model.seq_len", value);
    }
    check_window(j, rc, path);
    if (run_config_validate(rc, err, sizeof err) != 0) FAIL("%s: %s", path, err);
    cJSON_Delete(j);
}

// ---- safetensors files -------------------------------------------------------------------

typedef struct {
    StFile *files;
    size_t n_files;
} HfWeights;

static void open_file(StFile *sf, const char *dir, const char *name) {
    char path[HF_PATH_MAX], err[HF_PATH_MAX + 256];
    join_path(path, dir, name);
    if (safetensors_open(sf, path, err, sizeof err) != 0) FAIL("%s", err);
}

static const char *base_name(const char *path) {
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

// Every tensor a shard holds is mapped to that shard, and every mapping holds.
static void check_weight_map(const HfWeights *w, const cJSON *map, const char *path) {
    const cJSON *e;
    cJSON_ArrayForEach(e, map) {
        size_t f = 0;
        while (strcmp(base_name(w->files[f].path), e->valuestring)) f++;
        if (!safetensors_find(&w->files[f], e->string))
            FAIL("%s: weight_map puts %s in %s, which does not hold it", path, e->string,
                 e->valuestring);
    }
    for (size_t f = 0; f < w->n_files; f++)
        for (size_t i = 0; i < w->files[f].n_tensors; i++) {
            const char *name = w->files[f].tensors[i].name;
            const cJSON *to = cJSON_GetObjectItemCaseSensitive(map, name);
            if (!to || strcmp(to->valuestring, base_name(w->files[f].path)))
                FAIL("%s: tensor %s of %s is %s the weight_map", path, name,
                     base_name(w->files[f].path),
                     to ? "mapped to another file in" : "missing from");
        }
}

static void open_sharded(HfWeights *w, const char *dir, const char *path) {
    cJSON *index = read_json(path);
    const cJSON *map = cJSON_GetObjectItemCaseSensitive(index, "weight_map"), *e;
    if (!cJSON_IsObject(map)) FAIL("%s: no weight_map object", path);
    w->files = CALLOC((size_t)cJSON_GetArraySize(map), sizeof *w->files);
    cJSON_ArrayForEach(e, map) {
        if (!cJSON_IsString(e) || !e->valuestring[0] || strchr(e->valuestring, '/') ||
            !strcmp(e->valuestring, ".."))
            FAIL("%s: weight_map entry %s does not name a file in %s", path, e->string, dir);
        size_t f = 0;
        while (f < w->n_files && strcmp(base_name(w->files[f].path), e->valuestring)) f++;
        if (f == w->n_files) open_file(&w->files[w->n_files++], dir, e->valuestring);
    }
    check_weight_map(w, map, path);
    cJSON_Delete(index);
}

// model.safetensors, else the shards model.safetensors.index.json names (transformers'
// order of preference).
static void open_weights(HfWeights *w, const char *dir) {
    char single[HF_PATH_MAX], index[HF_PATH_MAX];
    join_path(single, dir, HF_WEIGHTS);
    join_path(index, dir, HF_INDEX);
    memset(w, 0, sizeof *w);
    if (access(single, F_OK) == 0) {
        w->files = CALLOC(1, sizeof *w->files);
        w->n_files = 1;
        open_file(&w->files[0], dir, HF_WEIGHTS);
    } else if (access(index, F_OK) == 0) {
        open_sharded(w, dir, index);
    } else {
        FAIL("%s: neither %s nor %s", dir, HF_WEIGHTS, HF_INDEX);
    }
}

static void close_weights(HfWeights *w) {
    for (size_t f = 0; f < w->n_files; f++) safetensors_close(&w->files[f]);
    free(w->files);
}

static const StTensor *locate(const HfWeights *w, const char *name, const StFile **file) {
    for (size_t f = 0; f < w->n_files; f++) {
        const StTensor *t = safetensors_find(&w->files[f], name);
        if (t) {
            *file = &w->files[f];
            return t;
        }
    }
    return NULL;
}

static void check_shape(const StFile *f, const StTensor *t, const ParamInfo *p) {
    int ok = p->cols ? t->rank == 2 && t->shape[0] == p->rows && t->shape[1] == p->cols
                     : t->rank == 1 && t->shape[0] == p->rows;
    if (ok) return;
    char have[128], want[64];
    safetensors_shape_text(t, have, sizeof have);
    if (p->cols) snprintf(want, sizeof want, "[%zu, %zu]", p->rows, p->cols);
    else snprintf(want, sizeof want, "[%zu]", p->rows);
    FAIL("%s: tensor %s has shape %s, config.json implies %s", f->path, t->name, have, want);
}

// Reads every layout tensor into m; names the first unexpected, missing or misshapen one.
static void load_weights(Model *m, const HfWeights *w, const char *dir) {
    char err[HF_PATH_MAX + 256];
    for (size_t f = 0; f < w->n_files; f++)
        for (size_t i = 0; i < w->files[f].n_tensors; i++)
            if (!layout_find(&m->layout, w->files[f].tensors[i].name))
                FAIL("%s: unexpected tensor %s (a Mixtral model of this config.json has none by "
                     "that name)", w->files[f].path, w->files[f].tensors[i].name);
    size_t largest = 0;
    for (size_t i = 0; i < m->layout.n_params; i++)
        if (m->layout.params[i].numel > largest) largest = m->layout.params[i].numel;
    float *buf = CALLOC(largest, sizeof *buf);
    real *host = CALLOC(m->layout.total, sizeof *host);
    for (size_t i = 0; i < m->layout.n_params; i++) {
        const ParamInfo *p = &m->layout.params[i];
        const StFile *f = NULL;
        const StTensor *t = locate(w, p->name, &f);
        if (!t) FAIL("%s: tensor %s is missing (config.json implies it)", dir, p->name);
        check_shape(f, t, p);
        if (safetensors_read_f32(f, t, buf, err, sizeof err) != 0) FAIL("%s", err);
        for (size_t j = 0; j < p->numel; j++) host[p->offset + j] = (real)buf[j];
    }
    m->be->upload(m->params, host, m->layout.total * sizeof *host);
    free(host);
    free(buf);
}

void hf_import_read(const char *dir, long seq_len, RunConfig *rc, Model *m) {
    hf_import_config(dir, seq_len, rc);
    HfWeights w;
    open_weights(&w, dir);
    model_init(m, &rc->model, backend_cpu(), 1, 1);   // weights only: the smallest batch
    load_weights(m, &w, dir);
    close_weights(&w);
}
