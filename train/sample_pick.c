// sample_pick.c: greedy, temperature, top-k and top-p choice of the next token.
#include "sample_pick.h"

#include <math.h>
#include <stdlib.h>

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

static int argmax(const real *logits, int V) {
    int best = 0;
    for (int i = 1; i < V; i++)
        if (logits[i] > logits[best]) best = i;
    return best;
}

int sample_pick(const real *logits, int V, const SamplePick *p, Rng *rng) {
    int best = argmax(logits, V);
    if (p->temperature <= 0 || p->top_k == 1) return best;
    TokenProb *tp = CALLOC((size_t)V, sizeof *tp);
    for (int i = 0; i < V; i++)
        tp[i] = (TokenProb){exp((logits[i] - logits[best]) / p->temperature), i};
    qsort(tp, (size_t)V, sizeof *tp, by_prob_desc);
    int k = p->top_k > 0 && p->top_k < V ? p->top_k : V;
    double sum = 0.0;
    for (int i = 0; i < k; i++)
        sum += tp[i].p;
    int n = 0;
    double kept = 0.0;
    while (n < k && (n == 0 || kept < p->top_p * sum)) kept += tp[n++].p;
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
