// tokenize.h: `moe tokenize` (text files to token files for kind = shards or hdf5) and
// `moe tokenizer train|encode|decode` (SentencePiece training; one file's ids and text).
#ifndef MOE_TOKENIZE_H
#define MOE_TOKENIZE_H

int tokenize_main(int argc, char **argv);
int tokenizer_main(int argc, char **argv);

#endif
