// plan.h: `moe plan`: the memory a run of a config would allocate, without allocating it.
#ifndef MOE_PLAN_H
#define MOE_PLAN_H

int plan_main(int argc, char **argv);

#endif
