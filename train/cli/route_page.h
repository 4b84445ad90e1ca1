// route_page.h: route.html, the page of `moe route` (route.h), and its ESFT figure.
//
// The page holds, in this order: the text of each domain (the tokens tokens.csv dumps),
// each token a <span> coloured by its first-choice expert in the layer the radio buttons
// select (CSS only, no script), its title (hover) listing every layer's experts, gates
// and dropped choices; a legend per layer; then the figures usage.svg (usage per
// domain), coactivation.svg and, when asked, esft.svg, inlined; then the saturation
// table against --compare.
//
// Colours: Paul Tol's 'light' qualitative scheme (8 colours for black text, readable
// with the common colour-vision deficiencies). With more than 8 experts the 8 that are
// most often first choice in the layer (among the tokens shown) get them; the others
// are pale grey, their numbers on hover and in the legend.
#ifndef MOE_ROUTE_PAGE_H
#define MOE_ROUTE_PAGE_H

#include <stdint.h>
#include <stdio.h>

#include "../../kernels/kernels.h"

typedef struct {
    int n_layers, experts, vocab;
    const int *layer_ids;   // (n_layers) the model layer of each MoE layer
    FILE *text;             // the domains' token spans (a memory stream)
    char *text_buf;
    size_t text_len;
    FILE *title;            // the current token's hover text (a memory stream)
    char *title_buf;
    size_t title_len;
    int *tok_first;         // (n_layers) the current token's first choice, -1: none
    uint64_t *first;        // (n_layers, experts) first choices among the shown tokens
    uint64_t shown;         // tokens shown, all domains
    int domain_open;
    double *esft;           // (n_layers, experts, 3) token score, gate score, selected
} RoutePage;

typedef struct {
    const char *ckpt, *compare, *esft;   // compare, esft: NULL when not asked
    int n_domains;
    const char **domains;     // (n_domains)
    const uint64_t *routed;   // (n_domains) tokens routed per domain
    long tokens;              // --tokens: tokens shown per domain at most
    const double *saturation; // (n_domains + 1, n_layers + 1): last row all domains, last
                              // column all layers; NULL without --compare
    const char *plot_why;     // "" or why the figures are missing
} RoutePageInfo;

void route_page_init(RoutePage *p, int n_layers, int experts, const int *layer_ids, int vocab);
void route_page_free(RoutePage *p);
// Starts the text of a domain.
void route_page_domain(RoutePage *p, const char *name);
// One MoE layer of the current token: n choices, slot[i] indexing idx, gates and keep.
void route_page_layer(RoutePage *p, int l, const int32_t *idx, const real *gates,
                      const int32_t *keep, const size_t *slot, size_t n);
// Ends the current token: its span (token id tok, its text piece of len bytes, at offset
// in the domain's stream).
void route_page_token(RoutePage *p, int32_t tok, const char *piece, size_t len,
                      size_t offset);
// Reads the CSV `moe experts` writes (layer, expert, token_score, gate_score, selected):
// every MoE layer and expert once; dies with a one-line error naming the file and line.
void route_page_read_esft(RoutePage *p, const char *path);
// esft.gp and esft.dat in dir: token and gate scores, layer x expert, selected experts
// marked. Returns the script's name.
const char *route_page_esft_figure(const RoutePage *p, const char *dir);
// dir/route.html; dies naming the file when it cannot be written.
void route_page_write(RoutePage *p, const char *dir, const RoutePageInfo *info);

#endif
