#include "loader.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../base/rng.h"
#include "../base/util.h"
#include "sources.h"

typedef struct {
    char name[DATA_NAME_MAX];
    TokenStream train;        // the whole train stream
    TokenStream val;          // n is capped at val_tokens
    double cum_weight;        // sum of normalised weights of domains 0..d
    size_t val_windows;
} Domain;

struct DataLoader {
    Domain domains[DATA_MAX_DOMAINS];
    int n_domains;
    size_t B, T;
    uint64_t key;             // derived from the seed; mixes with the cursor per batch
    uint64_t cursor;          // batches drawn so far
};

static const char *const split_names[] = {"train", "val"};

// Loads one split of a domain and checks it holds a window of T+1 tokens.
static int load_split(const DomainConfig *c, int split, int vocab, Tokenizer *tok, size_t T,
                      TokenStream *out, char *err, size_t n) {
    char inner[1024];
    const char *spec = split == DATA_SPLIT_VAL ? c->val : c->text[0] ? c->text : c->train;
    if (source_load(c, spec, vocab, tok, out, inner, sizeof inner) != 0)
        return snprintf(err, n, "domain %s (%s): %s", c->name, split_names[split], inner), -1;
    if (out->n < T + 1)
        return snprintf(err, n,
                        "domain %s: %s stream '%s' holds %zu tokens, fewer than one window "
                        "of seq_len + 1 = %zu",
                        c->name, split_names[split], spec, out->n, T + 1),
               -1;
    return 0;
}

// No val source: the last val_fraction of the train stream (rounded up) becomes val.
static int hold_out(Domain *d, const DomainConfig *c, const DataConfig *cfg, size_t T,
                    char *err, size_t n) {
    size_t total = d->train.n, held = (size_t)ceil(cfg->val_fraction * (double)total);
    if (held < T + 1 || total - held < T + 1)
        return snprintf(err, n,
                        "domain %s: %zu tokens are too few to hold out data.val_fraction = "
                        "%g for validation (each part needs seq_len + 1 = %zu)",
                        c->name, total, cfg->val_fraction, T + 1),
               -1;
    token_stream_reserve(&d->val, held);
    memcpy(d->val.ids, d->train.ids + total - held, held * sizeof *d->val.ids);
    d->val.n = held;
    d->train.n = total - held;
    printf("domain %s: no val source: its last %zu of %zu tokens (data.val_fraction = %g) "
           "are held out for validation\n",
           c->name, held, total, cfg->val_fraction);
    return 0;
}

static int open_domain(Domain *d, const DomainConfig *c, const DataConfig *cfg, int vocab,
                       Tokenizer *tok, size_t T, char *err, size_t n) {
    strcpy(d->name, c->name);
    if (load_split(c, DATA_SPLIT_TRAIN, vocab, tok, T, &d->train, err, n) != 0) return -1;
    if (c->val[0] ? load_split(c, DATA_SPLIT_VAL, vocab, tok, T, &d->val, err, n) != 0
                  : hold_out(d, c, cfg, T, err, n) != 0)
        return -1;
    // Validation reads at most val_tokens of it.
    if (d->val.n > (size_t)cfg->val_tokens) d->val.n = (size_t)cfg->val_tokens;
    if (d->val.n < T + 1)
        return snprintf(err, n, "data.val_tokens = %d is less than one window of seq_len + 1 "
                                "= %zu tokens",
                        cfg->val_tokens, T + 1),
               -1;
    d->val_windows = (d->val.n - 1) / T;
    return 0;
}

int data_loader_open(DataLoader **out, const DataConfig *cfg, int vocab, Tokenizer *tok,
                     size_t B, size_t T, uint64_t seed, char *err, size_t n) {
    *out = NULL;
    CHECK(B > 0 && T > 0, "data loader needs B > 0 and T > 0 (got B = %zu, T = %zu)", B, T);
    if (cfg->n_domains == 0) return snprintf(err, n, "no data domain is configured"), -1;
    if (data_config_validate(cfg, err, n) != 0) return -1;
    DataLoader *dl = CALLOC(1, sizeof *dl);
    dl->B = B;
    dl->T = T;
    Rng r;
    rng_init(&r, seed);
    dl->key = rng_next(&r);
    double total = 0, cum = 0;
    for (int i = 0; i < cfg->n_domains; i++) total += cfg->domains[i].weight;
    if (total <= 0) {
        free(dl);
        return snprintf(err, n, "every domain has weight 0: none to train on"), -1;
    }
    for (int i = 0; i < cfg->n_domains; i++) {
        dl->n_domains++;
        if (open_domain(&dl->domains[i], &cfg->domains[i], cfg, vocab, tok, T, err, n) != 0) {
            data_loader_close(dl);
            return -1;
        }
        cum += cfg->domains[i].weight / total;
        dl->domains[i].cum_weight = cum;
    }
    // Rounding must not leave a sliver above the last domain that is trained on, nor
    // give validation-only (weight 0) domains after it any share.
    for (int i = dl->n_domains - 1; i >= 0; i--) {
        dl->domains[i].cum_weight = 1.0;
        if (cfg->domains[i].weight > 0) break;
    }
    *out = dl;
    return 0;
}

void data_loader_close(DataLoader *dl) {
    if (!dl) return;
    for (int i = 0; i < dl->n_domains; i++) {
        token_stream_free(&dl->domains[i].train);
        token_stream_free(&dl->domains[i].val);
    }
    free(dl);
}

static int pick_domain(const DataLoader *dl, double u) {
    int d = 0;
    while (d < dl->n_domains - 1 && u >= dl->domains[d].cum_weight) d++;
    return d;
}

// One window of T+1 tokens starting at w, split into inputs and shifted targets.
static void copy_window(const int32_t *w, size_t T, int32_t *tokens, int32_t *targets) {
    memcpy(tokens, w, T * sizeof *w);
    memcpy(targets, w + 1, T * sizeof *w);
}

void data_loader_next(DataLoader *dl, int32_t *tokens, int32_t *targets, int32_t *row_domain) {
    // An odd multiplier is a bijection, so every cursor seeds a distinct generator.
    Rng r;
    rng_init(&r, dl->key ^ (dl->cursor * 0x9e3779b97f4a7c15ULL));
    for (size_t b = 0; b < dl->B; b++) {
        int d = pick_domain(dl, rng_uniform(&r));
        const TokenStream *s = &dl->domains[d].train;
        size_t start = (size_t)(rng_next(&r) % (uint64_t)(s->n - dl->T));
        copy_window(s->ids + start, dl->T, tokens + b * dl->T, targets + b * dl->T);
        if (row_domain) row_domain[b] = d;
    }
    dl->cursor++;
}

int data_loader_domains(const DataLoader *dl) { return dl->n_domains; }

const char *data_loader_domain_name(const DataLoader *dl, int d) {
    return dl->domains[d].name;
}

size_t data_loader_train_tokens(const DataLoader *dl, int d) {
    return dl->domains[d].train.n;
}

size_t data_loader_val_batches(const DataLoader *dl, int d) {
    return util_ceil_div(dl->domains[d].val_windows, dl->B);
}

size_t data_loader_val_batch(const DataLoader *dl, int d, size_t i, int32_t *tokens,
                             int32_t *targets) {
    const Domain *dom = &dl->domains[d];
    size_t first = i * dl->B;
    CHECK(first < dom->val_windows, "val batch %zu of domain %s out of range (%zu batches)", i,
          dom->name, data_loader_val_batches(dl, d));
    size_t rows = dom->val_windows - first < dl->B ? dom->val_windows - first : dl->B;
    for (size_t r = 0; r < rows; r++)
        copy_window(dom->val.ids + (first + r) * dl->T, dl->T, tokens + r * dl->T,
                    targets + r * dl->T);
    return rows;
}

uint64_t data_loader_cursor(const DataLoader *dl) { return dl->cursor; }

void data_loader_seek(DataLoader *dl, uint64_t batches_drawn) { dl->cursor = batches_drawn; }
