// config.h: the distributed run's settings (the [dist] INI section).
//
// Defines DistConfig and its key table. The rank count itself comes from the launcher
// (mpirun -np P), not from a key.
#ifndef MOE_DIST_CONFIG_H
#define MOE_DIST_CONFIG_H

#include "../base/keys.h"

typedef struct {
    int zero;              // 1: ZeRO-1, AdamW's state sharded over the ranks
    int expert_parallel;   // EP: ranks the routed experts are spread over (1: none)
} DistConfig;

KeySection dist_config_section(DistConfig *cfg);
void dist_config_defaults(DistConfig *cfg);

#endif
