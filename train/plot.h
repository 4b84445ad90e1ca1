// plot.h: figures through gnuplot (Debian package gnuplot-nox), run as a child.
//
// Figures are an extra, never a requirement: a command writes its CSV files first, then
// a gnuplot script beside them that names its data and output files relative to that
// directory (so `cd DIR && gnuplot SCRIPT` re-renders or restyles a figure by hand), and
// only then runs gnuplot. A machine without gnuplot gets one line saying what was skipped
// and how to install it.
//
// A script whose figures start with plot_begin_figure draws PNGs (pngcairo) when run
// plainly and SVGs when run as `gnuplot -e "term='svg'" SCRIPT`: the HTML pages
// (report.h, route_page.h) inline the SVGs and leave the PNGs beside them.
#ifndef MOE_PLOT_H
#define MOE_PLOT_H

#include <stdio.h>

// 1 when an executable `gnuplot` is on PATH.
int plot_available(void);
// Runs `gnuplot SCRIPT` with dir as its working directory. Returns 0, or -1 after a
// one-line warning naming the script.
int plot_render(const char *dir, const char *script);
// The line printed instead of rendering `what` when gnuplot is missing.
void plot_warn_missing(const char *what);

// The terminal lines of one figure: NAME.png (pngcairo), or NAME.svg when the script
// runs with term='svg'; width x height pixels either way.
void plot_begin_figure(FILE *f, const char *name, int width, int height);
// The `using ... with ...` clause of a heatmap of "x y value" rows on an nx x ny grid:
// gnuplot's image where the grid is at least 2 x 2 (its minimum), else a box per cell.
const char *plot_heatmap(int nx, int ny);
// text as a gnuplot single-quoted string (quotes doubled).
void plot_quote(FILE *f, const char *text);
// Renders SCRIPT in dir twice, PNGs then SVGs, gnuplot's messages captured. Returns 0,
// or -1 with why (one line: gnuplot missing, or its last error line).
int plot_render_figures(const char *dir, const char *script, char *why, size_t n);

#endif
