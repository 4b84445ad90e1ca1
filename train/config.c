#include "config.h"

#include <errno.h>
#include <ini.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "../base/util.h"

#define TK(field) offsetof(TrainConfig, field)

static const ConfigKey train_keys[] = {
    {"batch_size", KEY_INT, TK(batch_size), "8", 1, 1 << 20, NULL,
     "sequences per micro-batch B"},
    {"grad_accum", KEY_INT, TK(grad_accum), "1", 1, 1 << 16, NULL,
     "micro-batches accumulated per optimizer step"},
    {"steps", KEY_INT, TK(steps), "1000", 1, 1 << 30, NULL, "optimizer steps"},
    {"eval_every", KEY_INT, TK(eval_every), "100", 0, 1 << 30, NULL,
     "steps between validation passes (0: only at the end)"},
    {"log_every", KEY_INT, TK(log_every), "10", 1, 1 << 30, NULL,
     "steps between log lines when stdout is not a terminal"},
    {"threads", KEY_INT, TK(threads), "0", 0, 4096, NULL, "OpenMP threads (0: all cores)"},
    {"device", KEY_ENUM, TK(device), "cpu", 0, 0, "cpu|cuda",
     "where the run computes: cpu, or cuda (GPU 0; the build needs nvcc)"},
    {"precision", KEY_ENUM, TK(precision), "auto", 0, 0, "auto|fp32|bf16",
     "matrix products: bf16 operands with fp32 accumulation (cuda only), or fp32; auto: "
     "bf16 on cuda, fp32 on cpu"},
    {"expert_gemm", KEY_ENUM, TK(expert_gemm), "loop", 0, 0, "loop|grouped",
     "cuda: the experts' products as one cuBLAS call per expert (loop) or one grouped GEMM "
     "per product over the experts (grouped); make bench-gpu times both"},
    {"keep_activations", KEY_BOOL, TK(keep_activations), "true", 0, 1, NULL,
     "grad_accum > 1 with router.aux_scope = batch: keep each micro-batch's activations "
     "for its backward (grad_accum - 1 more activation arenas) instead of a second "
     "forward pass"},
    {"seed", KEY_INT, TK(seed), "1337", 0, 2147483647, NULL,
     "seed for weights, data order and router noise"},
    {"name", KEY_STRING, TK(name), "", 0, 0, NULL,
     "run name (default: the config file's base name)"},
    {"out_dir", KEY_STRING, TK(out_dir), "checkpoints", 0, 0, NULL,
     "runs are written to <out_dir>/<name>/"},
    {"ckpt_every", KEY_INT, TK(ckpt_every), "0", 0, 1 << 30, NULL,
     "steps between checkpoints in the run directory (0: only at the end)"},
    {"keep", KEY_INT, TK(keep), "3", 1, 1 << 20, NULL,
     "step checkpoints kept (best.h5, the best validation loss, is kept besides)"},
    {"sample_tokens", KEY_INT, TK(sample_tokens), "240", 0, 1 << 20, NULL,
     "tokens sampled from the model at the end (0: none)"},
    {"sample_temperature", KEY_DOUBLE, TK(sample_temperature), "0.8", 0, 100, NULL,
     "sampling temperature (0: greedy)"},
    {"sample_prompt", KEY_STRING, TK(sample_prompt), "The ", 0, 0, NULL,
     "text the sample starts from"},
    {"on_nonfinite", KEY_ENUM, TK(on_nonfinite), "abort", 0, 0, "abort|skip|rollback",
     "a step with a non-finite loss or gradient: stop with an error naming it, skip the "
     "update (weights, moments and expert bias untouched), or reload the last checkpoint "
     "at a lower learning rate"},
    {"rollback_lr_factor", KEY_DOUBLE, TK(rollback_lr_factor), "0.5", 1e-9, 1, NULL,
     "on_nonfinite = rollback: each rollback multiplies the learning rate by this (0, 1]"},
    {"max_rollbacks", KEY_INT, TK(max_rollbacks), "3", 1, 1000, NULL,
     "on_nonfinite = rollback: rollbacks to the same checkpoint before the run stops with "
     "an error"},
};

#define FK(field) offsetof(FinetuneConfig, field)

static const ConfigKey finetune_keys[] = {
    {"init", KEY_STRING, FK(init), "", 0, 0, NULL,
     "checkpoint to start from (moe finetune; a run directory means its latest)"},
    {"train", KEY_STRING, FK(train), "all", 0, 0, NULL,
     "what trains: all, none, embed, head, norm, attn, router, experts, shared, dense, "
     "layers.L.PART, layers.L.experts.J (L, J: number or *), or auto (ESFT)"},
    {"freeze", KEY_STRING, FK(freeze), "", 0, 0, NULL, "what stays frozen (same grammar)"},
    {"delta", KEY_BOOL, FK(delta), "false", 0, 1, NULL,
     "checkpoints hold only the trained tensors (apply with moe merge)"},
    {"select", KEY_ENUM, FK(select), "token", 0, 0, "token|gate",
     "train = auto: rank experts by token selection ratio or by mean gate"},
    {"p", KEY_DOUBLE, FK(p), "0.2", 1e-9, 1, NULL,
     "train = auto: per layer, the fewest experts whose normalised score reaches p"},
    {"select_batches", KEY_INT, FK(select_batches), "16", 1, 1 << 20, NULL,
     "train = auto: training batches routed to score the experts"},
};

int run_config_sections(RunConfig *rc, KeySection out[RUN_CONFIG_MAX_SECTIONS]) {
    model_config_sections(&rc->model, out);
    int n = MODEL_CONFIG_SECTIONS;
    out[n++] =
        (KeySection){"train", train_keys, sizeof train_keys / sizeof *train_keys, &rc->train};
    out[n++] = optim_config_section(&rc->optim);
    out[n++] = (KeySection){"finetune", finetune_keys, sizeof finetune_keys / sizeof *finetune_keys,
                            &rc->finetune};
    out[n++] = data_config_section(&rc->data);
    out[n++] = dist_config_section(&rc->dist);
    for (int d = 0; d < rc->data.n_domains; d++)
        out[n++] = data_domain_section(&rc->data.domains[d]);
    return n;
}

void run_config_defaults(RunConfig *rc) {
    memset(rc, 0, sizeof *rc);
    KeySection s[RUN_CONFIG_MAX_SECTIONS];
    int n = run_config_sections(rc, s);
    for (int i = 0; i < n; i++) keys_set_defaults(&s[i]);
}

// "domain NAME" sections are created on first sight; every other section must exist.
static int set_key(RunConfig *rc, const char *section, const char *key, const char *value,
                   char *err, size_t err_len) {
    if (!strncmp(section, "domain ", 7)) {
        const char *name = section + 7;
        int found = 0;
        for (int d = 0; d < rc->data.n_domains; d++)
            found |= !strcmp(rc->data.domains[d].name, name);
        if (!found && !data_config_add_domain(&rc->data, name, err, err_len)) return -1;
    }
    KeySection s[RUN_CONFIG_MAX_SECTIONS];
    int n = run_config_sections(rc, s);
    for (int i = 0; i < n; i++)
        if (!strcmp(s[i].section, section)) return keys_parse(&s[i], key, value, err, err_len);
    snprintf(err, err_len,
             "unknown section [%s]; sections are model, router, train, optim, finetune, data "
             "and 'domain NAME'",
             section);
    return -1;
}

// The reader libinih calls once per line: it counts lines (libinih's handler does not
// get them) and notes what the handler needs to tell a continuation line from a key.
typedef struct {
    char name[192];   // "section.key"
    int line;
} SeenKey;

typedef struct {
    RunConfig *rc;
    const char *path;
    FILE *f;
    int line;           // the line libinih is parsing
    int indented;       // it starts with a blank
    int long_line;      // the first line longer than libinih's buffer, or 0
    int err_line;       // the line whose key failed, or 0
    char last[192];     // the key of the previous line in this section
    SeenKey *seen;
    size_t n_seen;
    char *err;
    size_t err_len;
} IniCtx;

static char *ini_read_line(char *str, int num, void *stream) {
    IniCtx *ctx = stream;
    if (!fgets(str, num, ctx->f)) return NULL;
    ctx->line++;
    size_t n = strlen(str);
    if (n && str[n - 1] != '\n') {
        int c = getc(ctx->f);
        if (c != EOF && c != '\n') {
            ctx->long_line = ctx->line;
            return NULL;   // ends the parse; libinih would read the rest as a new line
        }
    }
    const char *start = str + strspn(str, " \t");
    ctx->indented = start > str;
    if (*start == '[') ctx->last[0] = '\0';
    return str;
}

// The line `name` was first set on, after noting this one; 0 the first time.
static int ini_seen_before(IniCtx *ctx, const char *name) {
    for (size_t i = 0; i < ctx->n_seen; i++)
        if (!strcmp(ctx->seen[i].name, name)) return ctx->seen[i].line;
    SeenKey *grown = realloc(ctx->seen, (ctx->n_seen + 1) * sizeof *grown);
    if (!grown) DIE("out of memory");
    ctx->seen = grown;
    snprintf(ctx->seen[ctx->n_seen].name, sizeof ctx->seen->name, "%s", name);
    ctx->seen[ctx->n_seen++].line = ctx->line;
    return 0;
}

static int config_ini_key(void *user, const char *section, const char *name,
                          const char *value) {
    IniCtx *ctx = user;
    if (ctx->err_line) return 1;   // report the first error, not the last
    char full[192];
    snprintf(full, sizeof full, "%s.%s", section, name);
    // libinih reads an indented line after a key as more of that key's value, and hands
    // only the new line over: the first part would be lost.
    if (ctx->indented && !strcmp(full, ctx->last)) {
        snprintf(ctx->err, ctx->err_len, "an indented line continues %s (values are one "
                 "line); remove the indentation", full);
        ctx->err_line = ctx->line;
        return 0;
    }
    snprintf(ctx->last, sizeof ctx->last, "%s", full);
    int first = ini_seen_before(ctx, full);
    if (first)
        fprintf(stderr, "moe: warning: %s:%d: %s is set again (first at %s:%d); this later "
                "value is used\n", ctx->path, ctx->line, full, ctx->path, first);
    if (set_key(ctx->rc, section, name, value, ctx->err, ctx->err_len) == 0) return 1;
    ctx->err_line = ctx->line;
    return 0;
}

static FILE *ini_open(const char *path, char *err, size_t err_len) {
    FILE *f = fopen(path, "r");
    struct stat sb;
    if (!f) snprintf(err, err_len, "%s: cannot open config file: %s", path, strerror(errno));
    else if (fstat(fileno(f), &sb) == 0 && S_ISDIR(sb.st_mode)) {
        snprintf(err, err_len, "%s: is a directory, not an INI config file", path);
        fclose(f);
        f = NULL;
    }
    return f;
}

int run_config_load_ini(RunConfig *rc, const char *path, char *err, size_t err_len) {
    char inner[768] = "";
    IniCtx ctx = {.rc = rc, .path = path, .err = inner, .err_len = sizeof inner};
    ctx.f = ini_open(path, err, err_len);
    if (!ctx.f) return -1;
    int line = ini_parse_stream(ini_read_line, &ctx, config_ini_key, &ctx);
    int read_failed = ferror(ctx.f);
    fclose(ctx.f);
    free(ctx.seen);
    if (read_failed) return snprintf(err, err_len, "%s: cannot read config file", path), -1;
    if (line > 0) {
        if (line != ctx.err_line) snprintf(inner, sizeof inner, "syntax error");
        return snprintf(err, err_len, "%s:%d: %s", path, line, inner), -1;
    }
    if (ctx.long_line)
        return snprintf(err, err_len, "%s:%d: line longer than %d characters", path,
                        ctx.long_line, INI_MAX_LINE - 1), -1;
    return 0;
}

// "a.b=v" -> section "a"; "domain.NAME.key=v" -> section "domain NAME".
int run_config_override(RunConfig *rc, const char *word, char *err, size_t err_len) {
    const char *eq = strchr(word, '=');
    const char *dot = NULL;
    for (const char *p = word; eq && p < eq; p++)
        if (*p == '.') dot = p;
    if (!eq || !dot)
        return snprintf(err, err_len, "override '%s': expected section.key=value", word), -1;
    char section[128], key[64];
    size_t ns = (size_t)(dot - word), nk = (size_t)(eq - dot - 1);
    if (ns >= sizeof section || nk >= sizeof key)
        return snprintf(err, err_len, "override '%s': name too long", word), -1;
    memcpy(section, word, ns);
    section[ns] = '\0';
    memcpy(key, dot + 1, nk);
    key[nk] = '\0';
    if (!strncmp(section, "domain.", 7)) section[6] = ' ';
    return set_key(rc, section, key, eq + 1, err, err_len);
}

int run_config_validate(const RunConfig *rc, char *err, size_t err_len) {
    if (model_config_validate(&rc->model, err, err_len) != 0 ||
        data_config_validate(&rc->data, err, err_len) != 0)
        return -1;
    return optim_config_validate(&rc->optim, err, err_len);
}

void run_config_write_ini(FILE *f, RunConfig *rc) {
    KeySection s[RUN_CONFIG_MAX_SECTIONS];
    int n = run_config_sections(rc, s);
    for (int i = 0; i < n; i++) {
        keys_write_ini(f, &s[i]);
        fputc('\n', f);
    }
}

void run_config_print_help(FILE *f) {
    static RunConfig rc;
    KeySection s[RUN_CONFIG_MAX_SECTIONS];
    run_config_defaults(&rc);
    data_config_add_domain(&rc.data, "NAME", NULL, 0);
    int n = run_config_sections(&rc, s);
    fprintf(f, "  %-28s %-12s %-22s %s\n", "key", "default", "allowed", "meaning");
    for (int i = 0; i < n; i++) keys_print_help(f, &s[i]);
}
