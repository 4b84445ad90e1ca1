#include "sample.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../base/util.h"

typedef struct {
    double p;
    int id;
} TokenProb;

static int by_prob_desc(const void *a, const void *b) {
    const TokenProb *x = a, *y = b;
    if (x->p != y->p) return x->p < y->p ? 1 : -1;
    return x->id - y->id;
}

static int pick_token(const real *logits, int V, double temperature, double top_p, Rng *rng) {
    int best = 0;
    for (int i = 1; i < V; i++)
        if (logits[i] > logits[best]) best = i;
    if (temperature <= 0) return best;
    TokenProb *tp = CALLOC((size_t)V, sizeof *tp);
    double sum = 0.0;
    for (int i = 0; i < V; i++) {
        tp[i] = (TokenProb){exp((logits[i] - logits[best]) / temperature), i};
        sum += tp[i].p;
    }
    qsort(tp, (size_t)V, sizeof *tp, by_prob_desc);
    int n = 0;
    double kept = 0.0;
    while (n < V && (n == 0 || kept < top_p * sum)) kept += tp[n++].p;
    double u = rng_uniform(rng) * kept;
    int pick = tp[n - 1].id;
    for (int i = 0; i < n; i++) {
        if ((u -= tp[i].p) <= 0) {
            pick = tp[i].id;
            break;
        }
    }
    free(tp);
    return pick;
}

void sample_text(const Model *m, const char *prompt, int n_tokens, double temperature,
                 double top_p, unsigned long long seed, char *out, size_t out_len) {
    size_t T = (size_t)m->cfg.seq_len, V = (size_t)m->cfg.vocab;
    Model s;
    model_init(&s, &m->cfg, m->be, 1, T);
    real *w = CALLOC(m->layout.total, sizeof *w);
    m->be->download(w, m->params, m->layout.total * sizeof *w);
    s.be->upload(s.params, w, m->layout.total * sizeof *w);
    free(w);
    size_t len = strlen(prompt), cap = len + (size_t)n_tokens;
    int32_t *seq = CALLOC(cap + 1, sizeof *seq), *ctx = CALLOC(2 * T, sizeof *ctx);
    for (size_t i = 0; i < len; i++) seq[i] = (unsigned char)prompt[i];
    if (len == 0) seq[len++] = '\n';
    real *logits = CALLOC(V, sizeof *logits);
    Rng rng;
    rng_init(&rng, seed);
    for (int t = 0; t < n_tokens; t++) {
        size_t start = len > T ? len - T : 0, n = len - start;
        memset(ctx, 0, 2 * T * sizeof *ctx);
        memcpy(ctx, seq + start, n * sizeof *ctx);
        model_set_batch(&s, ctx, ctx + T);
        model_forward(&s);
        s.be->download(logits, tensor_slice(s.logits.v, (n - 1) * V, V), V * sizeof *logits);
        seq[len++] = pick_token(logits, (int)V, temperature, top_p, &rng);
    }
    size_t o = 0;
    for (size_t i = 0; i < len && o + 1 < out_len; i++) out[o++] = (char)seq[i];
    out[o] = '\0';
    free(logits);
    free(seq);
    free(ctx);
    model_free(&s);
}
