// eval.h: validation loss per domain, and which experts each domain uses.
#ifndef MOE_EVAL_H
#define MOE_EVAL_H

#include "../data/loader.h"
#include "../model/model.h"
#include "../model/routing_stats.h"

typedef struct {
    int n_domains;
    double *loss;           // (n_domains + 1): cross-entropy per domain, then their mean
    RoutingStats *usage;    // (n_domains) routing over each domain's validation data
} EvalResult;

void eval_result_init(EvalResult *r, const ModelConfig *cfg, int n_domains);
void eval_result_free(EvalResult *r);
// Runs every full validation batch of every domain without router noise, then restores
// nothing: the caller draws fresh noise before the next training forward.
void eval_run(EvalResult *r, Model *m, const DataLoader *dl);

#endif
