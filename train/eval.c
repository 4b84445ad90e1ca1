#include "eval.h"

#include <stdlib.h>

#include "../base/util.h"

void eval_result_init(EvalResult *r, const ModelConfig *cfg, int n_domains) {
    r->n_domains = n_domains;
    r->loss = CALLOC((size_t)n_domains + 1, sizeof *r->loss);
    r->usage = CALLOC((size_t)n_domains, sizeof *r->usage);
    for (int d = 0; d < n_domains; d++) routing_stats_init(&r->usage[d], cfg);
}

void eval_result_free(EvalResult *r) {
    for (int d = 0; d < r->n_domains; d++) routing_stats_free(&r->usage[d]);
    free(r->usage);
    free(r->loss);
}

void eval_run(EvalResult *r, Model *m, const DataLoader *dl) {
    int32_t *tok = CALLOC(2 * m->N, sizeof *tok);
    model_clear_noise(m);
    r->loss[r->n_domains] = 0.0;
    for (int d = 0; d < r->n_domains; d++) {
        routing_stats_reset(&r->usage[d]);
        double sum = 0.0;
        size_t batches = 0, n = data_loader_val_batches(dl, d);
        for (size_t i = 0; i < n; i++) {
            // Only full batches: the loss op averages over all B rows.
            if (data_loader_val_batch(dl, d, i, tok, tok + m->N) < m->B) continue;
            model_set_batch(m, tok, tok + m->N);
            sum += model_forward(m).ce;
            routing_stats_add(&r->usage[d], m, m->B);
            batches++;
        }
        CHECK(batches > 0, "domain %s: no full validation batch of %zu rows",
              data_loader_domain_name(dl, d), m->B);
        r->loss[d] = sum / (double)batches;
        r->loss[r->n_domains] += r->loss[d] / r->n_domains;
    }
    free(tok);
}
