// route.h: `moe route CHECKPOINT [DATA ...] [--out DIR] [--compare OTHER] [--tokens N]
// [--esft FILE] [section.key=value ...]`: where a trained model sends its tokens.
//
// Routes each domain's validation windows (consecutive windows of model.seq_len tokens
// from the start, at most data.val_tokens tokens per domain, train.batch_size windows per
// forward, no router noise) through the model. The domains are the checkpoint's own, or
// one text domain per DATA file or directory, named after its base name without the
// extension (a split file such as python/val.txt is named after its directory: python).
// Writes into DIR (default <the checkpoint's directory>/route):
//   usage.csv         domain, layer, expert, tokens (assignments to the expert, before
//                     capacity), fraction (of the layer's assignments on the domain)
//   usage.png         heatmap layer x expert of the fractions, one panel per domain
//                     (gnuplot; usage.gp and usage.dat beside it)
//   tokens.csv        the first N (--tokens, default 256) tokens of each domain, one row
//                     per token and MoE layer: domain, offset (in the domain's validation
//                     stream), position (in its window), token (id), char (its text
//                     through the checkpoint's tokenizer; \n, \t, \\ and other control or
//                     invalid bytes as \xNN escaped), layer, experts, gates, kept
//                     (space-separated, best first; kept 0: dropped by capacity)
//   coactivation.csv  layer, expert, then e0..e<E-1>: tokens (all domains) whose choices
//                     in the layer include both experts; symmetric, zero diagonal
//   saturation.csv    with --compare: domain, layer, saturation: the share of OTHER's
//                     (token, layer, expert) choices that CHECKPOINT makes too (OLMoE's
//                     router saturation when OTHER is the final checkpoint), per layer
//                     and overall ("all")
//   coactivation.png  the co-activation matrices as heatmaps (coactivation.gp, .dat)
//   esft.png          with --esft FILE (moe experts' CSV): its scores, layer x expert
//   route.html        all of it on one page (route_page.h): the shown tokens coloured
//                     by first-choice expert per layer, the figures inlined as SVG
// Choices are the router's selection before capacity (under expert choice, the
// (token, expert) pairs the experts picked), so results do not depend on capacity.
#ifndef MOE_ROUTE_H
#define MOE_ROUTE_H

int route_main(int argc, char **argv);

#endif
