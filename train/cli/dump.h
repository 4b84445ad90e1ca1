// dump.h: `moe dump`, the C side of the reference tests.
//
// Builds a model from the config, fills it with test weights, a random batch and router
// noise, runs one forward and backward pass and writes weights, batch, noise, logits,
// losses, routing decisions and every gradient to HDF5 (layout in docs/file-formats.md,
// "moe dump"). tests/reference/ recomputes all of it in PyTorch from the same file.
#ifndef MOE_DUMP_H
#define MOE_DUMP_H

int dump_main(int argc, char **argv);

#endif
