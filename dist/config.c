#include "config.h"

#include <stddef.h>

#define DC(field) offsetof(DistConfig, field)

static const ConfigKey dist_keys[] = {
    {"zero", KEY_INT, DC(zero), "0", 0, 1, NULL,
     "1: ZeRO-1 under mpirun: each rank keeps AdamW's state of its share of the trainable "
     "values (gradients reduce-scattered, updated weights all-gathered; under expert "
     "parallelism over the ranks holding the same experts); 0: every rank keeps all of it"},
    {"expert_parallel", KEY_INT, DC(expert_parallel), "1", 1, 65536, NULL,
     "ranks the routed experts are spread over (each holds and computes its experts for "
     "its group's tokens, rows exchanged by MPI_Alltoallv; CPU); the rank count is a "
     "multiple of it: P / EP groups of EP consecutive ranks"},
};

KeySection dist_config_section(DistConfig *cfg) {
    return (KeySection){"dist", dist_keys, sizeof dist_keys / sizeof *dist_keys, cfg};
}

void dist_config_defaults(DistConfig *cfg) {
    KeySection s = dist_config_section(cfg);
    keys_set_defaults(&s);
}
