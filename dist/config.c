#include "config.h"

#include <stddef.h>

#define DC(field) offsetof(DistConfig, field)

static const ConfigKey dist_keys[] = {
    {"zero", KEY_INT, DC(zero), "0", 0, 1, NULL,
     "1: ZeRO-1 under mpirun: each rank keeps AdamW's state of its share of the trainable "
     "values (gradients reduce-scattered, updated weights all-gathered); 0: every rank "
     "keeps all of it"},
};

KeySection dist_config_section(DistConfig *cfg) {
    return (KeySection){"dist", dist_keys, sizeof dist_keys / sizeof *dist_keys, cfg};
}
