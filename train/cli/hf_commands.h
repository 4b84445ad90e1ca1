// hf_commands.h: `moe export` writes a checkpoint as a transformers Mixtral model
// directory; `moe import` reads one into a checkpoint that `moe finetune` starts from
// (the format: formats/hf.h).
#ifndef MOE_HF_COMMANDS_H
#define MOE_HF_COMMANDS_H

int export_main(int argc, char **argv);
int import_main(int argc, char **argv);

#endif
