#include "trainable.h"

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../base/util.h"

#define WILDCARD (-1)  // `*` as a layer or expert index
#define SCOPE_ALL (-2) // a bare word: tensors outside layers too (the final norm)
#define N_KINDS (PARAM_HEAD + 1)

#define ALLOWED_ITEMS                                                                          \
    "all, none, embed, head, norm, attn, router, experts, shared, dense, "                     \
    "layers.<L>.<part> (part: attn, router, norm, experts, shared, dense, mlp), "              \
    "layers.<L>.experts.<J>, layers.<L>.shared_experts.<J>; <L> and <J>: an index or *"
#define LAYER_FORMS                                                                            \
    "expected layers.<L>.<part> (part: attn, router, norm, experts, shared, dense, mlp), "     \
    "layers.<L>.experts.<J> or layers.<L>.shared_experts.<J>; <L> and <J>: an index or *"

typedef enum { ITEM_NONE, ITEM_ALL, ITEM_KIND } ItemType;

typedef struct {
    ItemType type;
    ParamKind kind;
    int layer;  // SCOPE_ALL, WILDCARD (every layer) or a layer index
    int expert; // WILDCARD or an expert index
} Item;

typedef struct {
    const char *word;
    ParamKind kind;
} KindWord;

static const KindWord WORDS[] = {
    {"embed", PARAM_EMBED},   {"head", PARAM_HEAD},     {"norm", PARAM_NORM},
    {"attn", PARAM_ATTN},     {"router", PARAM_ROUTER}, {"experts", PARAM_EXPERT},
    {"shared", PARAM_SHARED}, {"dense", PARAM_DENSE},
};

static const KindWord PARTS[] = {
    {"attn", PARAM_ATTN},      {"router", PARAM_ROUTER}, {"norm", PARAM_NORM},
    {"experts", PARAM_EXPERT}, {"shared", PARAM_SHARED}, {"dense", PARAM_DENSE},
};

// ---- bounded text -----------------------------------------------------------------------

// Appends into a fixed buffer; len keeps counting past the end so overflow is visible.
typedef struct {
    char *s;
    size_t n, len;
} Text;

static void text_put(Text *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void text_put(Text *t, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    size_t room = t->len < t->n ? t->n - t->len : 0;
    int w = vsnprintf(room ? t->s + t->len : NULL, room, fmt, ap);
    va_end(ap);
    if (w > 0) t->len += (size_t)w;
}

static void text_sep(Text *t) {
    if (t->len > 0) text_put(t, ", ");
}

// A summary cut short says so rather than looking complete.
static void text_finish(Text *t) {
    if (t->n == 0) return;
    if (t->len == 0) t->s[0] = '\0';
    if (t->len >= t->n && t->n >= 4) memcpy(t->s + t->n - 4, "...", 4);
}

// ---- parsing ----------------------------------------------------------------------------

// "*" -> WILDCARD, digits -> their value (clamped to INT_MAX, which no model reaches).
static int parse_index(const char *s, int *out) {
    if (!strcmp(s, "*")) {
        *out = WILDCARD;
        return 0;
    }
    if (!*s || strspn(s, "0123456789") != strlen(s)) return -1;
    errno = 0;
    long v = strtol(s, NULL, 10);
    *out = (errno == ERANGE || v > INT_MAX) ? INT_MAX : (int)v;
    return 0;
}

// Splits s in place at '.'; returns the number of fields, or max + 1 when there are more.
static int split_fields(char *s, char **fields, int max) {
    int nf = 0;
    for (char *f = s;; f++) {
        if (nf == max) return max + 1;
        fields[nf++] = f;
        f = strchr(f, '.');
        if (!f) return nf;
        *f = '\0';
    }
}

static int parse_word(const char *w, const ModelConfig *cfg, Item *it, char *why, size_t n) {
    it->layer = SCOPE_ALL;
    it->expert = WILDCARD;
    if (!strcmp(w, "all") || !strcmp(w, "none")) {
        it->type = w[0] == 'a' ? ITEM_ALL : ITEM_NONE;
        return 0;
    }
    if (!strcmp(w, "auto")) {
        snprintf(why, n,
                 "ESFT's auto must be expanded by the caller (esft_to_expr) into "
                 "layers.<L>.experts.<J> items before selection");
        return -1;
    }
    for (size_t i = 0; i < sizeof WORDS / sizeof WORDS[0]; i++) {
        if (strcmp(w, WORDS[i].word)) continue;
        it->type = ITEM_KIND;
        it->kind = WORDS[i].kind;
        // A tied lm_head is embed_tokens itself: there is no separate tensor.
        if (it->kind == PARAM_HEAD && cfg->tie_embeddings) it->kind = PARAM_EMBED;
        return 0;
    }
    snprintf(why, n, "unknown item; allowed: %s", ALLOWED_ITEMS);
    return -1;
}

static int parse_part(const char *part, Item *it, char *why, size_t n) {
    if (!strcmp(part, "mlp")) part = "dense"; // Hugging Face's name for the dense MLP
    for (size_t i = 0; i < sizeof PARTS / sizeof PARTS[0]; i++) {
        if (strcmp(part, PARTS[i].word)) continue;
        it->kind = PARTS[i].kind;
        return 0;
    }
    snprintf(why, n, "%s", LAYER_FORMS);
    return -1;
}

static int parse_expert(const char *part, const char *index, const ModelConfig *cfg, Item *it,
                        char *why, size_t n) {
    int shared = !strcmp(part, "shared_experts");
    if (!shared && strcmp(part, "experts")) {
        snprintf(why, n, "%s", LAYER_FORMS);
        return -1;
    }
    it->kind = shared ? PARAM_SHARED : PARAM_EXPERT;
    int count = shared ? cfg->shared_experts : cfg->experts;
    if (parse_index(index, &it->expert)) {
        snprintf(why, n, "expert '%s' is not an index or *", index);
        return -1;
    }
    if (shared && count == 0) {
        snprintf(why, n, "the model has no shared experts (model.shared_experts = 0)");
        return -1;
    }
    if (it->expert >= count) {
        snprintf(why, n, "the model has %d %s%s per MoE layer (0..%d)", count,
                 shared ? "shared expert" : "expert", count == 1 ? "" : "s", count - 1);
        return -1;
    }
    return 0;
}

// Parses one item (trimmed, NUL-terminated, modified in place). Returns 0, or -1 with the
// reason (without the item) in why.
static int parse_item(char *s, const ModelConfig *cfg, Item *it, char *why, size_t n) {
    char *f[4];
    int nf = split_fields(s, f, 4);
    if (nf == 1) return parse_word(f[0], cfg, it, why, n);
    if (strcmp(f[0], "layers")) {
        snprintf(why, n, "unknown item; allowed: %s", ALLOWED_ITEMS);
        return -1;
    }
    if (nf < 3 || nf > 4) {
        snprintf(why, n, "%s", LAYER_FORMS);
        return -1;
    }
    it->type = ITEM_KIND;
    it->expert = WILDCARD;
    if (parse_index(f[1], &it->layer)) {
        snprintf(why, n, "layer '%s' is not an index or *", f[1]);
        return -1;
    }
    if (it->layer >= cfg->layers) {
        snprintf(why, n, "the model has %d layer%s (0..%d)", cfg->layers,
                 cfg->layers == 1 ? "" : "s", cfg->layers - 1);
        return -1;
    }
    return nf == 3 ? parse_part(f[2], it, why, n) : parse_expert(f[2], f[3], cfg, it, why, n);
}

// ---- matching ---------------------------------------------------------------------------

static int item_matches(const Item *it, const ParamInfo *p) {
    if (it->type != ITEM_KIND) return it->type == ITEM_ALL;
    if (p->kind != it->kind) return 0;
    if (it->layer == SCOPE_ALL) return 1;
    if (it->layer == WILDCARD ? p->layer < 0 : p->layer != it->layer) return 0;
    return it->expert == WILDCARD || p->expert == it->expert;
}

// The layers that are (moe = 1) or are not MoE, e.g. "1, 3, 5", or "none".
static void list_layers(const ModelConfig *cfg, int moe, char *out, size_t n) {
    Text t = {out, n, 0};
    for (int l = 0; l < cfg->layers; l++)
        if (model_config_is_moe_layer(cfg, l) == moe)
            text_put(&t, "%s%d", t.len ? ", " : "", l);
    if (t.len == 0) text_put(&t, "none");
    text_finish(&t);
}

// Why a well-formed item matched nothing: the part does not exist where it points.
static void explain_empty(const Item *it, const ModelConfig *cfg, char *why, size_t n) {
    int moe_part =
        it->kind == PARAM_ROUTER || it->kind == PARAM_EXPERT || it->kind == PARAM_SHARED;
    char layers[128];
    if (it->kind == PARAM_SHARED && cfg->shared_experts == 0) {
        snprintf(why, n, "the model has no shared experts (model.shared_experts = 0)");
    } else if (it->layer >= 0 && (moe_part || it->kind == PARAM_DENSE)) {
        char fdl[64] = "";
        list_layers(cfg, moe_part, layers, sizeof layers);
        if (cfg->first_dense_layers)
            snprintf(fdl, sizeof fdl, ", model.first_dense_layers = %d", cfg->first_dense_layers);
        snprintf(why, n, "layer %d is a %s layer; %s layers: %s (model.moe_every = %d%s)",
                 it->layer, moe_part ? "dense" : "MoE", moe_part ? "MoE" : "dense", layers,
                 cfg->moe_every, fdl);
    } else if (it->kind == PARAM_DENSE) {
        snprintf(why, n, "the model has no dense layers (model.moe_every = 1)");
    } else {
        snprintf(why, n, "matches no tensor of this model");
    }
}

static int is_space(char c) { return c == ' ' || c == '\t'; }

// Marks in hit what the item s[0..len) matches. Returns 0, or -1 with err.
static int match_item(const Layout *lay, const ModelConfig *cfg, const char *expr,
                      const char *s, size_t len, uint8_t *hit, char *err, size_t n) {
    while (len && is_space(*s))
        s++, len--;
    while (len && is_space(s[len - 1]))
        len--;
    if (len == 0) {
        snprintf(err, n, "empty item in '%s' (a comma with nothing before or after it)", expr);
        return -1;
    }
    char buf[128], why[512];
    Item it = {0};
    if (len >= sizeof buf) {
        snprintf(err, n, "%.*s: unknown item; allowed: %s", (int)len, s, ALLOWED_ITEMS);
        return -1;
    }
    memcpy(buf, s, len);
    buf[len] = '\0';
    if (parse_item(buf, cfg, &it, why, sizeof why)) {
        snprintf(err, n, "%.*s: %s", (int)len, s, why);
        return -1;
    }
    size_t matched = 0;
    for (size_t i = 0; i < lay->n_params; i++) {
        if (!item_matches(&it, &lay->params[i])) continue;
        hit[i] = 1;
        matched++;
    }
    if (matched == 0 && it.type != ITEM_NONE) {
        explain_empty(&it, cfg, why, sizeof why);
        snprintf(err, n, "%.*s: %s", (int)len, s, why);
        return -1;
    }
    return 0;
}

static int is_blank(const char *s) {
    while (is_space(*s))
        s++;
    return *s == '\0';
}

int trainable_apply(const Layout *lay, const ModelConfig *cfg, const char *expr, uint8_t *flags,
                    uint8_t value, char *err, size_t n) {
    if (is_blank(expr)) return 0;
    uint8_t *hit = CALLOC(lay->n_params, 1);
    int rc = 0;
    for (const char *s = expr;;) {
        const char *comma = strchr(s, ',');
        size_t len = comma ? (size_t)(comma - s) : strlen(s);
        rc = match_item(lay, cfg, expr, s, len, hit, err, n);
        if (rc || !comma) break;
        s = comma + 1;
    }
    int matched = 0;
    // Flags change only once every item is known good: an error leaves them as they were.
    for (size_t i = 0; i < lay->n_params && rc == 0; i++) {
        if (!hit[i]) continue;
        flags[i] = value;
        matched++;
    }
    free(hit);
    return rc ? -1 : matched;
}

int trainable_select(const Layout *lay, const ModelConfig *cfg, const char *train_expr,
                     const char *freeze_expr, uint8_t *trainable, char *err, size_t n) {
    char why[768];
    const char *train = train_expr ? train_expr : "all";
    const char *freeze = freeze_expr ? freeze_expr : "";
    memset(trainable, 0, lay->n_params);
    if (trainable_apply(lay, cfg, train, trainable, 1, why, sizeof why) < 0) {
        snprintf(err, n, "train: %s", why);
        return -1;
    }
    if (trainable_apply(lay, cfg, freeze, trainable, 0, why, sizeof why) < 0) {
        snprintf(err, n, "freeze: %s", why);
        return -1;
    }
    // A run that can update nothing is a mistake in the expressions, not a job to run.
    if (!memchr(trainable, 1, lay->n_params)) {
        snprintf(err, n, "train '%s' minus freeze '%s' leaves no tensor to train", train,
                 freeze);
        return -1;
    }
    return 0;
}

// ---- describing -------------------------------------------------------------------------

// Whether the expert whose tensors start at i (a run of one kind, layer and expert)
// trains completely; *next is the index after the run.
static int expert_complete(const Layout *lay, const uint8_t *trainable, size_t i,
                           size_t *next) {
    const ParamInfo *p = &lay->params[i];
    int complete = 1;
    size_t j = i;
    for (; j < lay->n_params && lay->params[j].kind == p->kind &&
           lay->params[j].layer == p->layer && lay->params[j].expert == p->expert;
         j++)
        complete &= trainable[j] != 0;
    *next = j;
    return complete;
}

// Complete experts of one kind in layer tensors [b, e) as "layers.L.experts.{1,5}", then
// the trainable tensors of incomplete ones by name.
static void describe_experts(const Layout *lay, const uint8_t *trainable, ParamKind kind,
                             size_t b, size_t e, Text *t) {
    int listed = 0;
    size_t next;
    for (size_t i = b; i < e; i = next) {
        next = i + 1;
        if (lay->params[i].kind != kind || !expert_complete(lay, trainable, i, &next)) continue;
        if (!listed) {
            text_sep(t);
            text_put(t, "layers.%d.%s.{", lay->params[i].layer,
                     kind == PARAM_SHARED ? "shared_experts" : "experts");
        }
        text_put(t, "%s%d", listed++ ? "," : "", lay->params[i].expert);
    }
    if (listed) text_put(t, "}");
    for (size_t i = b; i < e; i = next) {
        next = i + 1;
        if (lay->params[i].kind != kind || expert_complete(lay, trainable, i, &next)) continue;
        for (size_t j = i; j < next; j++) {
            if (!trainable[j]) continue;
            text_sep(t);
            text_put(t, "%s", lay->params[j].name);
        }
    }
}

// The trainable tensors of layer tensors [b, e) whose kind is not already named whole.
static void describe_layer(const Layout *lay, const uint8_t *trainable, const int *full,
                           size_t b, size_t e, Text *t) {
    for (size_t k = 0; k < sizeof PARTS / sizeof PARTS[0]; k++) {
        ParamKind kind = PARTS[k].kind;
        size_t total = 0, on = 0;
        for (size_t i = b; i < e; i++) {
            total += lay->params[i].kind == kind;
            on += lay->params[i].kind == kind && trainable[i];
        }
        if (full[kind] || on == 0) continue;
        if (on == total) {
            text_sep(t);
            text_put(t, "layers.%d.%s", lay->params[b].layer, PARTS[k].word);
        } else if (kind == PARAM_EXPERT || kind == PARAM_SHARED) {
            describe_experts(lay, trainable, kind, b, e, t);
        } else {
            for (size_t i = b; i < e; i++) {
                if (lay->params[i].kind != kind || !trainable[i]) continue;
                text_sep(t);
                text_put(t, "%s", lay->params[i].name);
            }
        }
    }
}

void trainable_describe(const Layout *lay, const uint8_t *trainable, char *out, size_t n) {
    Text t = {out, n, 0};
    size_t total[N_KINDS] = {0}, on[N_KINDS] = {0}, n_on = 0;
    for (size_t i = 0; i < lay->n_params; i++) {
        total[lay->params[i].kind]++;
        on[lay->params[i].kind] += trainable[i] != 0;
        n_on += trainable[i] != 0;
    }
    if (n_on == lay->n_params || n_on == 0) {
        text_put(&t, n_on ? "all" : "none");
        text_finish(&t);
        return;
    }
    int full[N_KINDS];
    for (int k = 0; k < N_KINDS; k++)
        full[k] = total[k] > 0 && on[k] == total[k];
    for (size_t w = 0; w < sizeof WORDS / sizeof WORDS[0]; w++) {
        if (!full[WORDS[w].kind]) continue;
        text_sep(&t);
        text_put(&t, "%s", WORDS[w].word);
    }
    // Layer blocks are contiguous in the layout; tensors outside them (the final norm)
    // only show up by name when their kind is not already named whole.
    for (size_t i = 0, e; i < lay->n_params; i = e) {
        int layer = lay->params[i].layer;
        e = i + 1;
        if (layer < 0) {
            if (trainable[i] && !full[lay->params[i].kind]) {
                text_sep(&t);
                text_put(&t, "%s", lay->params[i].name);
            }
            continue;
        }
        while (e < lay->n_params && lay->params[e].layer == layer)
            e++;
        describe_layer(lay, trainable, full, i, e, &t);
    }
    text_finish(&t);
}
