// hf_import.c: a transformers MoE directory (config.json, safetensors) of one of the
// families of hf.h as a model.
#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../../base/util.h"
#include "hf.h"
#include "hf_deepseek.h"

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

#define FAM(f) (1u << (f))
#define ALL_FAMILIES (FAM(HF_N_FAMILIES) - 1)
#define QWEN (FAM(HF_QWEN2_MOE) | FAM(HF_QWEN3_MOE))
#define DEEPSEEK (FAM(HF_DEEPSEEK_V2) | FAM(HF_DEEPSEEK_V3))
#define NOT_DEEPSEEK (ALL_FAMILIES & ~DEEPSEEK)

typedef struct {
    const char *hf, *moe;
    HfKind kind;
    const char *fallback;   // the config class's default; NULL: the key is required
    unsigned families;      // FAM bits of the families that have the key
} HfKey;

// Keys another transformers version writes under another name: transformers 5 writes
// Qwen3-MoE's expert count as num_local_experts.
static const char *const HF_ALIASES[][2] = {{"num_experts", "num_local_experts"}};

// Keys that shape the weights are required (transformers writes every key it has).
static const HfKey HF_KEYS[] = {
    {"vocab_size", "model.vocab", HF_INT, NULL, ALL_FAMILIES},
    {"hidden_size", "model.d_model", HF_INT, NULL, ALL_FAMILIES},
    {"num_hidden_layers", "model.layers", HF_INT, NULL, ALL_FAMILIES},
    {"num_attention_heads", "model.heads", HF_INT, NULL, ALL_FAMILIES},
    {"num_key_value_heads", "model.kv_heads", HF_INT, NULL, NOT_DEEPSEEK},
    {"num_experts_per_tok", "router.top_k", HF_INT, NULL, ALL_FAMILIES},
    {"max_position_embeddings", "model.seq_len", HF_INT, NULL, ALL_FAMILIES},
    {"tie_word_embeddings", "model.tie_embeddings", HF_BOOL, "false", ALL_FAMILIES},
    {"initializer_range", "model.init_std", HF_REAL, "0.02", ALL_FAMILIES},
    {"intermediate_size", "model.expert_ffn_dim", HF_INT, NULL,
     FAM(HF_MIXTRAL) | FAM(HF_OLMOE)},
    {"num_local_experts", "model.experts", HF_INT, NULL, FAM(HF_MIXTRAL)},
    {"num_experts", "model.experts", HF_INT, NULL, FAM(HF_OLMOE) | QWEN},
    {"norm_topk_prob", "router.renorm", HF_BOOL, "false", FAM(HF_OLMOE) | QWEN},
    {"moe_intermediate_size", "model.expert_ffn_dim", HF_INT, NULL, QWEN | DEEPSEEK},
    {"intermediate_size", "model.ffn_dim", HF_INT, NULL, QWEN | DEEPSEEK},
    {"decoder_sparse_step", "model.moe_every", HF_INT, "1", QWEN},
    {"shared_expert_intermediate_size", "model.shared_ffn_dim", HF_INT, NULL,
     FAM(HF_QWEN2_MOE)},
    {"rms_norm_eps", "model.norm_eps", HF_REAL, "1e-5", FAM(HF_MIXTRAL) | FAM(HF_OLMOE)},
    {"rms_norm_eps", "model.norm_eps", HF_REAL, "1e-6", QWEN | DEEPSEEK},
    {"rope_theta", "model.rope_theta", HF_REAL, "1e6", FAM(HF_MIXTRAL)},
    {"rope_theta", "model.rope_theta", HF_REAL, "10000", FAM(HF_OLMOE) | QWEN | DEEPSEEK},
    {"router_aux_loss_coef", "router.aux_coef", HF_REAL, "0.001", FAM(HF_MIXTRAL) | QWEN},
    {"router_aux_loss_coef", "router.aux_coef", HF_REAL, "0.01", FAM(HF_OLMOE)},
    // DeepSeek: the config class's defaults where it has the key (DeepSeek's own files
    // have every one).
    {"n_routed_experts", "model.experts", HF_INT, NULL, DEEPSEEK},
    {"kv_lora_rank", "model.kv_lora_rank", HF_INT, NULL, DEEPSEEK},
    {"qk_nope_head_dim", "model.qk_nope_dim", HF_INT, NULL, DEEPSEEK},
    {"qk_rope_head_dim", "model.qk_rope_dim", HF_INT, NULL, DEEPSEEK},
    {"v_head_dim", "model.v_head_dim", HF_INT, NULL, DEEPSEEK},
    {"first_k_dense_replace", "model.first_dense_layers", HF_INT, "0", FAM(HF_DEEPSEEK_V2)},
    {"first_k_dense_replace", "model.first_dense_layers", HF_INT, "3", FAM(HF_DEEPSEEK_V3)},
    {"routed_scaling_factor", "router.gate_scale", HF_REAL, "1", FAM(HF_DEEPSEEK_V2)},
    {"routed_scaling_factor", "router.gate_scale", HF_REAL, "2.5", FAM(HF_DEEPSEEK_V3)},
    {"norm_topk_prob", "router.renorm", HF_BOOL, "true", FAM(HF_DEEPSEEK_V3)},
    // The balance loss's weight: DeepSeek's aux_loss_alpha (V3's paper: 1e-4).
    {"aux_loss_alpha", "router.aux_coef", HF_REAL, "0.001", FAM(HF_DEEPSEEK_V2)},
    {"aux_loss_alpha", "router.aux_coef", HF_REAL, "0.0001", FAM(HF_DEEPSEEK_V3)},
};

// What every family is, whatever moe.c's defaults: softmax top-k, no expert bias, and
// dropless routing as in transformers; then what each family fixes.
static const char *COMMON_FIXED[] = {
    "router.score=softmax", "router.select=topk",       "router.bias_gamma=0",
    "router.noise=none",    "router.capacity_factor=0",
};
static const char *MIXTRAL_FIXED[] = {"model.shared_experts=0", "model.moe_every=1",
                                      "router.renorm=true", NULL};
static const char *OLMOE_FIXED[] = {"model.shared_experts=0", "model.moe_every=1",
                                    "model.qk_norm=full", NULL};
static const char *QWEN2_FIXED[] = {"model.shared_experts=1", "model.shared_gate=true",
                                    "model.qkv_bias=true", NULL};
static const char *QWEN3_FIXED[] = {"model.shared_experts=0", "model.qk_norm=head", NULL};
static const char *DEEPSEEK_V2_FIXED[] = {
    "model.attention=mla", "model.moe_every=1", "router.renorm=false",
    "router.group_score=max", NULL};
// noaux_tc: sigmoid scores, groups by their two best (score + bias), the bias for
// selection only; moe.c does not update it unless router.bias_gamma is set.
static const char *DEEPSEEK_V3_FIXED[] = {
    "model.attention=mla", "model.moe_every=1", "router.score=sigmoid",
    "router.group_score=top2", "router.expert_bias=true", NULL};
static const char *const *FAMILY_FIXED[HF_N_FAMILIES] = {
    [HF_MIXTRAL] = MIXTRAL_FIXED, [HF_OLMOE] = OLMOE_FIXED,
    [HF_QWEN2_MOE] = QWEN2_FIXED, [HF_QWEN3_MOE] = QWEN3_FIXED,
    [HF_DEEPSEEK_V2] = DEEPSEEK_V2_FIXED, [HF_DEEPSEEK_V3] = DEEPSEEK_V3_FIXED};

static void set_key(RunConfig *rc, const char *path, const char *hf, const char *moe,
                    const char *value) {
    char word[256], err[1024];
    snprintf(word, sizeof word, "%s=%s", moe, value);
    if (run_config_override(rc, word, err, sizeof err) != 0)
        FAIL("%s: %s = %s: %s", path, hf, value, err);
}

// The value of key k as config text; the fallback when the key is absent.
static void key_text(const cJSON *j, const HfKey *k, HfFamily f, const char *path, char *out,
                     size_t n) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, k->hf);
    for (size_t i = 0; !v && i < sizeof HF_ALIASES / sizeof *HF_ALIASES; i++)
        if (!strcmp(k->hf, HF_ALIASES[i][0]))
            v = cJSON_GetObjectItemCaseSensitive(j, HF_ALIASES[i][1]);
    if (!v && !k->fallback)
        FAIL("%s: no %s (every %s config.json has it)", path, k->hf, hf_family_name(f));
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

static int is_true(const cJSON *j, const char *key) {
    return cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(j, key));
}

static HfFamily family_of(const cJSON *j, const char *path) {
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(j, "model_type");
    if (!cJSON_IsString(type))
        FAIL("%s: no model_type string (moe import reads mixtral, olmoe, qwen2_moe, "
             "qwen3_moe, deepseek_v2 and deepseek_v3 models)", path);
    int f = hf_family_from_type(type->valuestring);
    if (f < 0)
        FAIL("%s: model_type '%s' is not one moe import reads (mixtral, olmoe, qwen2_moe, "
             "qwen3_moe, deepseek_v2, deepseek_v3)", path, type->valuestring);
    return (HfFamily)f;
}

// transformers 5's per-layer attention kinds: any but full attention masks keys moe.c
// attends to.
static void check_layer_types(const cJSON *j, const char *path) {
    const cJSON *types = cJSON_GetObjectItemCaseSensitive(j, "layer_types"), *t;
    if (!types || cJSON_IsNull(types)) return;
    if (!cJSON_IsArray(types)) FAIL("%s: layer_types is not a list", path);
    cJSON_ArrayForEach(t, types) {
        if (!cJSON_IsString(t) || strcmp(t->valuestring, "full_attention"))
            FAIL("%s: layer_types has %s: moe.c's layers all attend to the whole context",
                 path, cJSON_IsString(t) ? t->valuestring : "a value that is not a string");
    }
}

// Refuses what moe.c would compute differently, naming the key.
static void check_family(const cJSON *j, HfFamily f, const char *path) {
    const char *name = hf_family_name(f);
    const cJSON *act = cJSON_GetObjectItemCaseSensitive(j, "hidden_act");
    if (act && (!cJSON_IsString(act) || strcmp(act->valuestring, "silu")))
        FAIL("%s: hidden_act is not \"silu\": moe.c's experts are SwiGLU", path);
    int deepseek = f == HF_DEEPSEEK_V2 || f == HF_DEEPSEEK_V3;
    if (deepseek) hf_deepseek_check(j, f, path);
    else if (is_set(j, "rope_scaling"))
        FAIL("%s: rope_scaling is set: moe.c's RoPE has no scaling", path);
    if (is_set(j, "quantization_config"))
        FAIL("%s: quantization_config is set: moe import reads F32, BF16 or F16 weights", path);
    const cJSON *hd = cJSON_GetObjectItemCaseSensitive(j, "head_dim");
    const cJSON *hs = cJSON_GetObjectItemCaseSensitive(j, "hidden_size");
    const cJSON *nh = cJSON_GetObjectItemCaseSensitive(j, "num_attention_heads");
    if (!deepseek && cJSON_IsNumber(hd) && cJSON_IsNumber(hs) && cJSON_IsNumber(nh) && nh->valuedouble > 0 &&
        hd->valuedouble != floor(hs->valuedouble / nh->valuedouble))
        FAIL("%s: head_dim = %g differs from hidden_size / num_attention_heads = %g: moe.c's "
             "heads split hidden_size", path, hd->valuedouble,
             floor(hs->valuedouble / nh->valuedouble));
    if (f != HF_QWEN2_MOE && is_true(j, "attention_bias"))
        FAIL("%s: attention_bias is true: moe.c's %s attention has no biases", path, name);
    if (f == HF_OLMOE && is_set(j, "clip_qkv"))
        FAIL("%s: clip_qkv is set: moe.c does not clamp queries, keys and values", path);
    if ((f == HF_QWEN2_MOE || f == HF_QWEN3_MOE) && is_true(j, "use_sliding_window"))
        FAIL("%s: use_sliding_window is true: moe.c attends to the whole context", path);
    const cJSON *qkv_bias = cJSON_GetObjectItemCaseSensitive(j, "qkv_bias");
    if (f == HF_QWEN2_MOE && cJSON_IsFalse(qkv_bias))
        FAIL("%s: qkv_bias is false: moe.c's Qwen2-MoE has q, k and v biases (as every "
             "transformers before 5 does)", path);
    check_layer_types(j, path);
    const cJSON *only = cJSON_GetObjectItemCaseSensitive(j, "mlp_only_layers");
    if ((f == HF_QWEN2_MOE || f == HF_QWEN3_MOE) && only && !cJSON_IsNull(only) &&
        (!cJSON_IsArray(only) || cJSON_GetArraySize(only) > 0))
        FAIL("%s: mlp_only_layers is not empty: moe.c places dense layers by "
             "decoder_sparse_step alone", path);
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

// Mixtral's window applies to every layer: narrower than the context, it would mask keys
// moe.c attends to.
static void check_window(const cJSON *j, const RunConfig *rc, const char *path) {
    const cJSON *w = cJSON_GetObjectItemCaseSensitive(j, "sliding_window");
    if (!w || cJSON_IsNull(w)) return;
    if (!cJSON_IsNumber(w)) FAIL("%s: sliding_window is neither null nor a number", path);
    if (w->valuedouble < rc->model.seq_len)
        FAIL("%s: sliding_window = %g is shorter than the context (%d tokens) and moe.c attends "
             "to the whole context; import with --seq-len %g or less", path, w->valuedouble,
             rc->model.seq_len, w->valuedouble);
}

static void set_fixed(RunConfig *rc, const char *const *words) {
    char err[1024];
    for (; *words; words++)
        if (run_config_override(rc, *words, err, sizeof err) != 0) DIE("%s", err);
}

// eos_token_id (an id, or a list whose first id is taken) -> data.eos_id; null: none.
static void eos_from_config(RunConfig *rc, const cJSON *j, const char *path) {
    const cJSON *eos = cJSON_GetObjectItemCaseSensitive(j, "eos_token_id");
    if (cJSON_IsArray(eos)) eos = cJSON_GetArrayItem(eos, 0);
    if (!eos || cJSON_IsNull(eos)) return;
    if (!cJSON_IsNumber(eos) || eos->valuedouble < 0 || eos->valuedouble >= rc->model.vocab ||
        eos->valuedouble != (double)(int)eos->valuedouble)
        FAIL("%s: eos_token_id is not a token id below vocab_size = %d", path, rc->model.vocab);
    rc->data.eos_id = eos->valueint;
}

void hf_import_config(const char *dir, long seq_len, RunConfig *rc) {
    char path[HF_PATH_MAX], value[64], err[1024];
    join_path(path, dir, HF_CONFIG);
    cJSON *j = read_json(path);
    HfFamily f = family_of(j, path);
    check_family(j, f, path);
    run_config_defaults(rc);
    for (size_t i = 0; i < sizeof COMMON_FIXED / sizeof *COMMON_FIXED; i++)
        if (run_config_override(rc, COMMON_FIXED[i], err, sizeof err) != 0) DIE("%s", err);
    set_fixed(rc, FAMILY_FIXED[f]);
    for (size_t i = 0; i < sizeof HF_KEYS / sizeof *HF_KEYS; i++) {
        if (!(HF_KEYS[i].families & FAM(f))) continue;
        key_text(j, &HF_KEYS[i], f, path, value, sizeof value);
        set_key(rc, path, HF_KEYS[i].hf, HF_KEYS[i].moe, value);
    }
    if (f == HF_DEEPSEEK_V2 || f == HF_DEEPSEEK_V3) hf_deepseek_config(j, f, path, rc);
    else rope_from_parameters(rc, j, path);
    const cJSON *jitter = cJSON_GetObjectItemCaseSensitive(j, "router_jitter_noise");
    if (f == HF_MIXTRAL && cJSON_IsNumber(jitter) && jitter->valuedouble > 0) {
        set_key(rc, path, "router_jitter_noise", "router.noise", "jitter");
        snprintf(value, sizeof value, "%.17g", jitter->valuedouble);
        set_key(rc, path, "router_jitter_noise", "router.jitter_eps", value);
    }
    if (seq_len > 0) {
        snprintf(value, sizeof value, "%ld", seq_len);
        set_key(rc, path, "--seq-len", "model.seq_len", value);
    }
    if (f == HF_MIXTRAL) check_window(j, rc, path);
    eos_from_config(rc, j, path);
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

// The index of m's MoE layer `layer`, or -1.
static int moe_index(const Model *m, int layer) {
    for (int i = 0; i < m->n_moe; i++)
        if (m->moe[i].layer == layer) return i;
    return -1;
}

// DeepSeek-V3's e_score_correction_bias of every MoE layer into m->expert_bias.
static void load_bias(Model *m, const HfWeights *w, const char *dir) {
    size_t E = (size_t)m->cfg.experts;
    float *buf = CALLOC(E, sizeof *buf);
    real *host = CALLOC(E, sizeof *host);
    char name[128], err[HF_PATH_MAX + 256];
    for (int i = 0; i < m->n_moe; i++) {
        const StFile *file = NULL;
        hf_bias_name(m->moe[i].layer, name, sizeof name);
        const StTensor *t = locate(w, name, &file);
        if (!t) FAIL("%s: tensor %s is missing (config.json implies it)", dir, name);
        check_shape(file, t, &(ParamInfo){.rows = E});
        if (safetensors_read_f32(file, t, buf, err, sizeof err) != 0) FAIL("%s", err);
        for (size_t e = 0; e < E; e++) {
            if (!isfinite(buf[e])) FAIL("%s: tensor %s holds %g", file->path, name, buf[e]);
            host[e] = (real)buf[e];
        }
        m->be->upload(m->moe[i].bias, host, E * sizeof *host);
    }
    free(host);
    free(buf);
}

// Whether `have` belongs to one of the `mtp` multi-token prediction modules that follow
// the model's layers.
static int is_mtp(const Model *m, int mtp, const char *have) {
    int layer;
    return mtp > 0 && sscanf(have, "model.layers.%d.", &layer) == 1 &&
           layer >= m->cfg.layers && layer < m->cfg.layers + mtp;
}

// Whether a file's tensor `have` is one family f's model of m's config has.
static int expected(const Model *m, HfFamily f, const char *have) {
    char name[160];
    int bias_layer = hf_bias_layer(have);
    if (bias_layer >= 0) return f == HF_DEEPSEEK_V3 && moe_index(m, bias_layer) >= 0;
    return hf_name_import(f, have, name, sizeof name) == 0 && layout_find(&m->layout, name);
}

// Reads every layout tensor into m from family f's names (RoPE rows from interleaved
// pairs when `interleaved`; the tensors of `mtp` prediction modules left out, said on
// stderr); names the first unexpected, missing or misshapen one.
static void load_weights(Model *m, const HfWeights *w, const char *dir, HfFamily f,
                         int interleaved, int mtp) {
    char err[HF_PATH_MAX + 256], name[160];
    size_t skipped = 0;
    for (size_t k = 0; k < w->n_files; k++)
        for (size_t i = 0; i < w->files[k].n_tensors; i++) {
            const char *have = w->files[k].tensors[i].name;
            if (is_mtp(m, mtp, have)) {
                skipped++;
                continue;
            }
            if (!expected(m, f, have))
                FAIL("%s: unexpected tensor %s (a %s model of this config.json has none by "
                     "that name)", w->files[k].path, have, hf_family_name(f));
        }
    size_t largest = 0;
    for (size_t i = 0; i < m->layout.n_params; i++)
        if (m->layout.params[i].numel > largest) largest = m->layout.params[i].numel;
    float *buf = CALLOC(largest, sizeof *buf);
    real *host = CALLOC(m->layout.total, sizeof *host);
    for (size_t i = 0; i < m->layout.n_params; i++) {
        const ParamInfo *p = &m->layout.params[i];
        const StFile *file = NULL;
        hf_name_export(f, p->name, name, sizeof name);
        const StTensor *t = locate(w, name, &file);
        if (!t) FAIL("%s: tensor %s is missing (config.json implies it)", dir, name);
        check_shape(file, t, p);
        if (safetensors_read_f32(file, t, buf, err, sizeof err) != 0) FAIL("%s", err);
        if (interleaved) hf_deepseek_rope_rows(&m->cfg, p->name, p->cols, buf, 0);
        for (size_t j = 0; j < p->numel; j++) host[p->offset + j] = (real)buf[j];
    }
    m->be->upload(m->params, host, m->layout.total * sizeof *host);
    free(host);
    free(buf);
    if (f == HF_DEEPSEEK_V3) load_bias(m, w, dir);
    if (skipped)
        fprintf(stderr, "moe: note: %s: %zu tensors of num_nextn_predict_layers = %d "
                "multi-token prediction module(s) left out (moe.c predicts the next token "
                "only, as transformers does)\n", dir, skipped, mtp);
}

void hf_import_read(const char *dir, long seq_len, RunConfig *rc, Model *m) {
    hf_import_config(dir, seq_len, rc);
    char path[HF_PATH_MAX];
    join_path(path, dir, HF_CONFIG);
    cJSON *j = read_json(path);
    HfFamily f = family_of(j, path);
    int deepseek = f == HF_DEEPSEEK_V2 || f == HF_DEEPSEEK_V3;
    int interleaved = deepseek && hf_deepseek_interleaved(j, f);
    int mtp = deepseek ? hf_deepseek_mtp_layers(j) : 0;
    cJSON_Delete(j);
    HfWeights w;
    open_weights(&w, dir);
    model_init(m, &rc->model, backend_cpu(), 1, 1);   // weights only: the smallest batch
    load_weights(m, &w, dir, f, interleaved, mtp);
    close_weights(&w);
}
