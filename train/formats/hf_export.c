// hf_export.c: a model as a transformers directory (config.json, safetensors) of the
// family hf_family_of picks.
#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../../base/util.h"
#include "hf.h"
#include "hf_deepseek.h"

#define HF_PATH_MAX 4096

static int is_deepseek(HfFamily f) { return f == HF_DEEPSEEK_V2 || f == HF_DEEPSEEK_V3; }

// What no family expresses: moe.c's router variants.
static int check_router(const ModelConfig *c, const char *fam, char *why, size_t n) {
    if (c->score != SCORE_SOFTMAX)
        snprintf(why, n, "router.score = sigmoid: %s scores experts with a softmax", fam);
    else if (c->noise == NOISE_SHAZEER)
        snprintf(why, n, "router.noise = shazeer: %s has no learned noise weights", fam);
    else if (c->select != SELECT_TOPK)
        snprintf(why, n, "router.select = %s: %s routes by token-choice top-k",
                 c->select == SELECT_HASH ? "hash" : "expert_choice", fam);
    else if (c->bias_gamma > 0)
        snprintf(why, n, "router.bias_gamma = %g: %s has no expert-selection bias "
                 "(DeepSeek-V3)", c->bias_gamma, fam);
    else if (c->expert_bias)
        snprintf(why, n, "router.expert_bias = true: %s has no expert-selection bias "
                 "(DeepSeek-V3)", fam);
    else if (c->groups > 1 && (c->topk_groups == 0 ? c->groups : c->topk_groups) < c->groups)
        snprintf(why, n, "router.topk_groups = %d < router.groups = %d: %s has no group-limited "
                 "routing (DeepSeek)", c->topk_groups, c->groups, fam);
    else if (c->gate_scale != 1.0)
        snprintf(why, n, "router.gate_scale = %g: %s does not scale its gates (DeepSeek's "
                 "routed_scaling_factor)", c->gate_scale, fam);
    else if (c->first_dense_layers > 0)
        snprintf(why, n, "model.first_dense_layers = %d: %s has no leading dense layers "
                 "(DeepSeek's first_k_dense_replace)", c->first_dense_layers, fam);
    else return 0;
    return -1;
}

// Qwen2-MoE: one shared expert behind its sigmoid gate, q/k/v biases, no QK-norm.
static int check_qwen2(const ModelConfig *c, char *why, size_t n) {
    if (c->shared_experts != 1)
        snprintf(why, n, "model.shared_experts = %d: Qwen2-MoE has exactly one shared expert "
                 "(and Mixtral none)", c->shared_experts);
    else if (!c->shared_gate)
        snprintf(why, n, "model.shared_gate = false: Qwen2-MoE gates its shared expert with a "
                 "sigmoid (and Mixtral has no shared experts)");
    else if (!c->qkv_bias)
        snprintf(why, n, "model.qkv_bias = false: Qwen2-MoE's q, k and v projections have "
                 "biases");
    else if (c->qk_norm != QK_NORM_NONE)
        snprintf(why, n, "model.qk_norm = %s: Qwen2-MoE has no QK-norm",
                 c->qk_norm == QK_NORM_HEAD ? "head" : "full");
    else return 0;
    return -1;
}

int hf_export_check(const ModelConfig *c, char *why, size_t n) {
    HfFamily f = hf_family_of(c);
    if (is_deepseek(f)) return hf_deepseek_export_check(c, f, why, n);
    if (check_router(c, hf_family_name(f), why, n)) return -1;
    if (f == HF_QWEN2_MOE) return check_qwen2(c, why, n);
    if (f == HF_QWEN3_MOE) return 0;   // dense layers: decoder_sparse_step
    if (c->moe_every > 1)
        snprintf(why, n, "model.moe_every = %d: %s has no dense layers (every layer is MoE)",
                 c->moe_every, hf_family_name(f));
    else if (f == HF_MIXTRAL && !c->renorm)
        snprintf(why, n, "router.renorm = false: Mixtral always renormalises the top-k gates "
                 "(with top_k = 1 its gate is 1.0)");
    else return 0;
    return -1;
}

void hf_json_add_float(cJSON *j, const char *key, double v) {
    char text[40];
    for (int digits = 15; digits <= 17; digits++) {
        snprintf(text, sizeof text, "%.*g", digits, v);
        if (strtod(text, NULL) == v) break;
    }
    if (!strpbrk(text, ".eEn")) strcat(text, ".0");
    CHECK(cJSON_AddRawToObject(j, key, text), "out of memory writing %s", key);
}

// The keys every family's config class has.
static cJSON *common_config(const ModelConfig *c, HfFamily f) {
    cJSON *j = cJSON_CreateObject();
    cJSON_AddItemToArray(cJSON_AddArrayToObject(j, "architectures"),
                         cJSON_CreateString(hf_family_class(f)));
    cJSON_AddStringToObject(j, "model_type", hf_family_type(f));
    cJSON_AddNumberToObject(j, "vocab_size", c->vocab);
    cJSON_AddNumberToObject(j, "hidden_size", c->d_model);
    cJSON_AddNumberToObject(j, "num_hidden_layers", c->layers);
    cJSON_AddNumberToObject(j, "num_attention_heads", c->heads);
    if (!is_deepseek(f)) {   // DeepSeek's heads: hf_deepseek_config_out
        cJSON_AddNumberToObject(j, "num_key_value_heads", c->kv_heads);
        cJSON_AddNumberToObject(j, "head_dim", c->d_model / c->heads);
        hf_json_add_float(j, "router_aux_loss_coef", c->aux_coef);
    }
    cJSON_AddNumberToObject(j, "num_experts_per_tok", c->top_k);
    cJSON_AddNumberToObject(j, "max_position_embeddings", c->seq_len);
    hf_json_add_float(j, "rms_norm_eps", c->norm_eps);
    hf_json_add_float(j, "rope_theta", c->rope_theta);
    cJSON_AddBoolToObject(j, "tie_word_embeddings", c->tie_embeddings);
    cJSON_AddStringToObject(j, "hidden_act", "silu");
    cJSON_AddBoolToObject(j, "output_router_logits", 0);
    hf_json_add_float(j, "initializer_range", c->init_std);
    hf_json_add_float(j, "attention_dropout", 0.0);
    return j;
}

// The family's own keys: expert counts and widths, routing, attention features.
static void family_config(cJSON *j, const ModelConfig *c, HfFamily f) {
    if (is_deepseek(f)) {
        hf_deepseek_config_out(j, c, f);
        return;
    }
    if (f == HF_MIXTRAL || f == HF_OLMOE)
        cJSON_AddNumberToObject(j, "intermediate_size", c->expert_ffn_dim);
    if (f == HF_MIXTRAL) {
        cJSON_AddNumberToObject(j, "num_local_experts", c->experts);
        hf_json_add_float(j, "router_jitter_noise", c->noise == NOISE_JITTER ? c->jitter_eps : 0.0);
        cJSON_AddNullToObject(j, "sliding_window");
        return;
    }
    cJSON_AddNumberToObject(j, "num_experts", c->experts);
    cJSON_AddBoolToObject(j, "norm_topk_prob", c->renorm);
    cJSON_AddBoolToObject(j, "attention_bias", 0);
    if (f == HF_OLMOE) {
        cJSON_AddNullToObject(j, "clip_qkv");
        cJSON_AddNullToObject(j, "pad_token_id");
        return;
    }
    cJSON_AddNumberToObject(j, "intermediate_size", c->ffn_dim);
    cJSON_AddNumberToObject(j, "moe_intermediate_size", c->expert_ffn_dim);
    if (f == HF_QWEN2_MOE)
        cJSON_AddNumberToObject(j, "shared_expert_intermediate_size", c->shared_ffn_dim);
    cJSON_AddNumberToObject(j, "decoder_sparse_step", c->moe_every);
    cJSON_AddArrayToObject(j, "mlp_only_layers");
    cJSON_AddBoolToObject(j, "use_sliding_window", 0);
    cJSON_AddNullToObject(j, "sliding_window");
    cJSON_AddNumberToObject(j, "max_window_layers", c->layers);
}

static cJSON *hf_config(const ModelConfig *c, StDType dtype, int eos_id) {
    HfFamily f = hf_family_of(c);
    cJSON *j = common_config(c, f);
    family_config(j, c, f);
    // Written even when absent: the config classes' defaults (Mixtral's 1 and 2, OLMoE's
    // 50279) would make generate() stop at a byte of a byte-level model.
    cJSON_AddNullToObject(j, "bos_token_id");
    if (eos_id >= 0) cJSON_AddNumberToObject(j, "eos_token_id", eos_id);
    else cJSON_AddNullToObject(j, "eos_token_id");
    cJSON_AddBoolToObject(j, "use_cache", 1);
    cJSON_AddStringToObject(j, "torch_dtype", dtype == ST_BF16 ? "bfloat16" : "float32");
    return j;
}

static void join_path(char *out, const char *dir, const char *name) {
    if (snprintf(out, HF_PATH_MAX, "%s/%s", dir, name) >= HF_PATH_MAX)
        FAIL("%s/%s: path too long", dir, name);
}

// Writes text to dir/name through a fsynced temporary file and a rename.
static void write_text(const char *dir, const char *name, const char *text) {
    char path[HF_PATH_MAX], tmp[HF_PATH_MAX + 8];
    join_path(path, dir, name);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    int ok = f && fputs(text, f) >= 0 && fputc('\n', f) != EOF && fflush(f) == 0 &&
             fsync(fileno(f)) == 0;
    if (f && fclose(f) != 0) ok = 0;
    if (!ok || rename(tmp, path) != 0) {
        unlink(tmp);
        FAIL("%s: cannot write: %s", path, strerror(errno));
    }
}

static void write_json(const char *dir, const char *name, cJSON *j) {
    char *text = cJSON_Print(j);
    CHECK(text, "out of memory printing %s", name);
    write_text(dir, name, text);
    free(text);
}

static void make_dir(const char *dir) {
    struct stat sb;
    if (mkdir(dir, 0755) != 0 && (errno != EEXIST || stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode)))
        FAIL("%s: cannot create the export directory: %s", dir,
             errno == EEXIST ? "a file has that name" : strerror(errno));
}

// Renames are durable only once the directory itself is synced.
static void sync_dir(const char *dir) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY);
    if (fd < 0 || fsync(fd) != 0) FAIL("%s: cannot sync the directory: %s", dir, strerror(errno));
    close(fd);
}

// The files an export writes or an earlier one may have left; the directory's other
// files are not ours to touch.
static int is_export_file(const char *name) {
    return !strcmp(name, HF_CONFIG) || !strcmp(name, HF_INDEX) ||
           fnmatch("model*.safetensors", name, 0) == 0;
}

static void shard_name(char *out, size_t n, size_t k, size_t n_shards) {
    snprintf(out, n, "model-%05zu-of-%05zu.safetensors", k + 1, n_shards);
}

// Whether this export (n_shards weight files) wrote `name`.
static int is_written(const char *name, size_t n_shards) {
    if (!strcmp(name, HF_CONFIG)) return 1;
    if (n_shards == 1) return !strcmp(name, HF_WEIGHTS);
    if (!strcmp(name, HF_INDEX)) return 1;
    char shard[64];
    for (size_t k = 0; k < n_shards; k++) {
        shard_name(shard, sizeof shard, k, n_shards);
        if (!strcmp(name, shard)) return 1;
    }
    return 0;
}

// Files another model left would mix with this one (transformers prefers
// model.safetensors over an index; shards of another count stay listed nowhere).
static void check_target(const char *dir, int force) {
    DIR *d = opendir(dir);
    if (!d) return;   // missing: make_dir creates it or says why not
    struct dirent *e;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..") && !force) {
            char name[256];
            snprintf(name, sizeof name, "%s", e->d_name);
            closedir(d);
            FAIL("%s: the directory is not empty (it holds %s); moe export --force replaces "
                 "an earlier export there (config.json, model*.safetensors, "
                 "model.safetensors.index.json) and keeps other files", dir, name);
        }
    closedir(d);
}

// Once the new files are in place: the export files this export did not write.
static void remove_stale(const char *dir, size_t n_shards) {
    DIR *d = opendir(dir);
    if (!d) FAIL("%s: cannot list the export directory: %s", dir, strerror(errno));
    struct dirent *e;
    char path[HF_PATH_MAX];
    while ((e = readdir(d))) {
        if (!is_export_file(e->d_name) || is_written(e->d_name, n_shards)) continue;
        join_path(path, dir, e->d_name);
        if (unlink(path) != 0 && errno != ENOENT)
            FAIL("%s: cannot remove: %s", path, strerror(errno));
    }
    closedir(d);
}

typedef struct {
    size_t first, count;
    uint64_t bytes;
} Shard;

// transformers' split: tensors in order, a new shard whenever the next tensor would take
// the current one past the limit (a tensor larger than the limit gets a shard alone).
static size_t plan_shards(const StOut *t, size_t n, StDType dtype, uint64_t limit, Shard *out) {
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t b = safetensors_out_bytes(&t[i], dtype);
        if (k == 0 || out[k - 1].bytes + b > limit) out[k++] = (Shard){i, 0, 0};
        out[k - 1].count++;
        out[k - 1].bytes += b;
    }
    return k;
}

static void write_tensors(const char *dir, const char *name, const StOut *t, size_t n,
                          StDType dtype) {
    char path[HF_PATH_MAX], err[HF_PATH_MAX + 256];
    join_path(path, dir, name);
    if (safetensors_write(path, t, n, dtype, err, sizeof err) != 0) FAIL("%s", err);
}

// Returns the number of files written.
static size_t write_weights(const char *dir, const StOut *t, size_t n, StDType dtype,
                            uint64_t limit) {
    Shard *s = CALLOC(n, sizeof *s);
    size_t n_shards = plan_shards(t, n, dtype, limit, s);
    if (n_shards == 1) {
        write_tensors(dir, HF_WEIGHTS, t, n, dtype);
        free(s);
        return 1;
    }
    cJSON *index = cJSON_CreateObject();
    cJSON *meta = cJSON_AddObjectToObject(index, "metadata");
    cJSON *map = cJSON_AddObjectToObject(index, "weight_map");
    uint64_t total = 0;
    for (size_t k = 0; k < n_shards; k++) {
        char name[64];
        shard_name(name, sizeof name, k, n_shards);
        write_tensors(dir, name, t + s[k].first, s[k].count, dtype);
        for (size_t i = s[k].first; i < s[k].first + s[k].count; i++)
            cJSON_AddStringToObject(map, t[i].name, name);
        total += s[k].bytes;
    }
    cJSON_AddNumberToObject(meta, "total_size", (double)total);
    write_json(dir, HF_INDEX, index);
    cJSON_Delete(index);
    free(s);
    return n_shards;
}

// Every parameter as float32, in layout order (m->params may hold doubles in tests).
static float *params_f32(const Model *m) {
    real *host = CALLOC(m->layout.total, sizeof *host);
    m->be->download(host, m->params, m->layout.total * sizeof *host);
    float *out = CALLOC(m->layout.total, sizeof *out);
    for (size_t i = 0; i < m->layout.total; i++) out[i] = (float)host[i];
    free(host);
    return out;
}

// DeepSeek-V3's e_score_correction_bias of each MoE layer (n_moe, E), as float32.
static float *bias_f32(const Model *m) {
    size_t nb = (size_t)m->n_moe * (size_t)m->cfg.experts;
    real *host = CALLOC(nb, sizeof *host);
    if (nb) m->be->download(host, m->expert_bias, nb * sizeof *host);
    float *out = CALLOC(nb ? nb : 1, sizeof *out);
    for (size_t i = 0; i < nb; i++) out[i] = (float)host[i];
    free(host);
    return out;
}

size_t hf_export_write(const char *dir, const Model *m, int eos_id, StDType dtype,
                       uint64_t shard_size, int force, uint64_t *bytes) {
    check_target(dir, force);
    make_dir(dir);
    HfFamily f = hf_family_of(&m->cfg);
    size_t n_bias = f == HF_DEEPSEEK_V3 ? (size_t)m->n_moe : 0, E = (size_t)m->cfg.experts;
    size_t n = m->layout.n_params + n_bias;
    float *host = params_f32(m), *bias = bias_f32(m);
    StOut *t = CALLOC(n, sizeof *t);
    char(*names)[160] = CALLOC(n, sizeof *names);
    *bytes = 0;
    for (size_t i = 0; i < m->layout.n_params; i++) {
        const ParamInfo *p = &m->layout.params[i];
        hf_name_export(f, p->name, names[i], sizeof names[i]);
        if (is_deepseek(f)) hf_deepseek_rope_rows(&m->cfg, p->name, p->cols, host + p->offset, 1);
        t[i] = (StOut){names[i], p->rows, p->cols, host + p->offset};
    }
    for (size_t k = 0; k < n_bias; k++) {
        size_t i = m->layout.n_params + k;
        hf_bias_name(m->moe[k].layer, names[i], sizeof names[i]);
        t[i] = (StOut){names[i], E, 0, bias + k * E};
    }
    for (size_t i = 0; i < n; i++) *bytes += safetensors_out_bytes(&t[i], dtype);
    size_t files = write_weights(dir, t, n, dtype, shard_size);
    cJSON *config = hf_config(&m->cfg, dtype, eos_id);
    write_json(dir, HF_CONFIG, config);
    cJSON_Delete(config);
    remove_stale(dir, files);
    sync_dir(dir);
    free(names);
    free(t);
    free(bias);
    free(host);
    return files;
}
