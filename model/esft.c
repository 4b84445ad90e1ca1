#include "esft.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../base/util.h"

// Cumulative sums of normalised scores land a few ulps off the exact fraction.
#define ESFT_SLACK 1e-12

static void normalise(double *x, int n) {
    double sum = 0.0;
    for (int i = 0; i < n; i++)
        sum += x[i];
    if (sum <= 0.0) return;
    for (int i = 0; i < n; i++)
        x[i] /= sum;
}

// Marks in sel the shortest prefix of experts, by descending score, whose scores sum to
// at least p. order is scratch for n indices.
static void select_prefix(const double *score, int n, double p, int *order, uint8_t *sel) {
    // Insertion sort is stable, so equal scores keep the lower expert index first.
    for (int i = 0; i < n; i++) {
        int x = i, j = i;
        for (; j > 0 && score[order[j - 1]] < score[x]; j--)
            order[j] = order[j - 1];
        order[j] = x;
    }
    double cum = 0.0;
    for (int j = 0; j < n; j++) {
        sel[order[j]] = 1;
        cum += score[order[j]];
        if (cum >= p - ESFT_SLACK) break;
    }
}

void esft_select(EsftResult *out, const RoutingStats *rs, EsftScore kind, double p) {
    CHECK(p > 0.0 && p <= 1.0, "ESFT threshold p = %g must be in (0, 1]", p);
    CHECK(rs->tokens > 0, "ESFT needs routing statistics over at least one token");
    int E = rs->experts;
    size_t cells = (size_t)rs->n_layers * (size_t)E;
    memset(out, 0, sizeof *out);
    out->n_layers = rs->n_layers;
    out->experts = E;
    out->token = CALLOC(cells, sizeof *out->token);
    out->gate = CALLOC(cells, sizeof *out->gate);
    out->selected = CALLOC(cells, sizeof *out->selected);
    out->score = kind == ESFT_GATE ? out->gate : out->token;
    double tokens = (double)rs->tokens, assignments = tokens * rs->top_k;
    int *order = CALLOC((size_t)E, sizeof *order);
    for (int l = 0; l < rs->n_layers; l++) {
        size_t row = (size_t)l * (size_t)E;
        for (int i = 0; i < E; i++) {
            out->token[row + i] = (double)rs->routed[row + i] / assignments;
            out->gate[row + i] = rs->gate_sum[row + i] / tokens;
        }
        normalise(out->token + row, E);
        normalise(out->gate + row, E);
        select_prefix(out->score + row, E, p, order, out->selected + row);
    }
    free(order);
}

void esft_free(EsftResult *r) {
    free(r->token);
    free(r->gate);
    free(r->selected);
    memset(r, 0, sizeof *r);
}

static int count_selected(const EsftResult *r) {
    int n = 0;
    for (size_t i = 0; i < (size_t)r->n_layers * (size_t)r->experts; i++)
        n += r->selected[i];
    return n;
}

void esft_to_expr(const EsftResult *r, const ModelConfig *cfg, char *out, size_t n) {
    CHECK(n > 0, "esft_to_expr needs room for at least the terminating NUL");
    CHECK(r->n_layers == model_config_moe_layers(cfg) && r->experts == cfg->experts,
          "ESFT result (%d MoE layers x %d experts) does not fit the model (%d x %d)",
          r->n_layers, r->experts, model_config_moe_layers(cfg), cfg->experts);
    size_t len = 0;
    out[0] = '\0';
    for (int m = 0; m < r->n_layers; m++) {
        int layer = model_config_moe_layer(cfg, m);
        for (int j = 0; j < r->experts; j++) {
            if (!r->selected[(size_t)m * (size_t)r->experts + (size_t)j]) continue;
            int w = snprintf(out + len, n - len, "%slayers.%d.experts.%d", len ? ", " : "",
                             layer, j);
            CHECK(w >= 0 && (size_t)w < n - len,
                  "the ESFT selection of %d experts does not fit in %zu bytes",
                  count_selected(r), n);
            len += (size_t)w;
        }
    }
}
