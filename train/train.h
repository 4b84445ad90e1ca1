// train.h: `moe train`: the training loop, from config to trained model.
#ifndef MOE_TRAIN_H
#define MOE_TRAIN_H

int train_main(int argc, char **argv);

#endif
