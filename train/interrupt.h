// interrupt.h: SIGINT and SIGTERM as requests to stop a run cleanly.
//
// The handler only records the signal (async-signal-safe); the training loop checks it
// after each step, writes a checkpoint and exits 0. A second SIGINT, for a user who
// cannot wait for the step to finish, exits at once: the last checkpoint stays intact.
#ifndef MOE_INTERRUPT_H
#define MOE_INTERRUPT_H

void interrupt_install(void);
// The signal that asked the run to stop (SIGINT, SIGTERM), or 0.
int interrupt_pending(void);
// "SIGINT", "SIGTERM".
const char *interrupt_name(int sig);

#endif
