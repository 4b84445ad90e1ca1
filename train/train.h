// train.h: `moe train` and `moe finetune`: the training loop, from config (or
// checkpoint) to trained model and checkpoints.
#ifndef MOE_TRAIN_H
#define MOE_TRAIN_H

int train_main(int argc, char **argv);
int finetune_main(int argc, char **argv);

#endif
