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

char *sample_text(const Model *m, Tokenizer *tok, const char *prompt, int n_tokens,
                  double temperature, double top_p, unsigned long long seed, char *err,
                  size_t n) {
    size_t T = (size_t)m->cfg.seq_len, V = (size_t)m->cfg.vocab;
    Tokenizer *bytes = tok ? NULL : tokenizer_open(TOKENIZER_BYTES, NULL, err, n);
    if (!tok) tok = bytes;
    int32_t *seq = NULL;
    size_t len = 0, cap = 0;
    // An empty prompt starts from a newline, as if a text began there.
    const char *start = prompt[0] ? prompt : "\n";
    if (tokenizer_encode(tok, start, strlen(start), &seq, &len, &cap, err, n) != 0) {
        free(seq);
        tokenizer_free(bytes);
        return NULL;
    }
    Model s;
    model_init(&s, &m->cfg, m->be, 1, T);
    real *w = CALLOC(m->layout.total, sizeof *w);
    m->be->download(w, m->params, m->layout.total * sizeof *w);
    s.be->upload(s.params, w, m->layout.total * sizeof *w);
    free(w);
    int32_t *grown = realloc(seq, (len + (size_t)n_tokens + 1) * sizeof *seq);
    CHECK(grown, "out of memory");
    seq = grown;
    int32_t *ctx = CALLOC(2 * T, sizeof *ctx);
    real *logits = CALLOC(V, sizeof *logits);
    Rng rng;
    rng_init(&rng, seed);
    for (int t = 0; t < n_tokens; t++) {
        size_t from = len > T ? len - T : 0, k = len - from;
        memset(ctx, 0, 2 * T * sizeof *ctx);
        memcpy(ctx, seq + from, k * sizeof *ctx);
        model_set_batch(&s, ctx, ctx + T);
        model_forward(&s);
        s.be->download(logits, tensor_slice(s.logits.v, (k - 1) * V, V), V * sizeof *logits);
        seq[len++] = pick_token(logits, (int)V, temperature, top_p, &rng);
    }
    size_t text_len;
    char *text = tokenizer_decode(tok, seq, len, &text_len);
    free(logits);
    free(seq);
    free(ctx);
    model_free(&s);
    tokenizer_free(bytes);
    return text;
}
