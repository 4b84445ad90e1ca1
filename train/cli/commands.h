// commands.h: the commands that use a trained model: eval, sample (generate.c), experts
// (ESFT), merge (delta onto base), report (a run's report.html again).
#ifndef MOE_COMMANDS_H
#define MOE_COMMANDS_H

int eval_main(int argc, char **argv);
int sample_main(int argc, char **argv);
int experts_main(int argc, char **argv);
int merge_main(int argc, char **argv);
int report_main(int argc, char **argv);

#endif
