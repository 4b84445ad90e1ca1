// plot.h: PNG figures through gnuplot (Debian package gnuplot-nox), run as a child.
//
// Figures are an extra, never a requirement: a command writes its CSV files first, then
// a gnuplot script beside them that names its data and output files relative to that
// directory (so `cd DIR && gnuplot SCRIPT` re-renders or restyles a figure by hand), and
// only then runs gnuplot. A machine without gnuplot gets one line saying what was skipped
// and how to install it.
#ifndef MOE_PLOT_H
#define MOE_PLOT_H

// 1 when an executable `gnuplot` is on PATH.
int plot_available(void);
// Runs `gnuplot SCRIPT` with dir as its working directory. Returns 0, or -1 after a
// one-line warning naming the script.
int plot_render(const char *dir, const char *script);
// The line printed instead of rendering `what` when gnuplot is missing.
void plot_warn_missing(const char *what);

#endif
