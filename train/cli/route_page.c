#include "route_page.h"

#include <csv.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "../../base/util.h"
#include "../config.h"
#include "../html.h"
#include "../plot.h"

#define PALETTE_SIZE 8
// Paul Tol's 'light' scheme, pale grey (#DDDDDD) kept for the experts beyond it.
static const char *palette[PALETTE_SIZE] = {"#77AADD", "#EE8866", "#EEDD88", "#FFAABB",
                                            "#99DDFF", "#44BB99", "#BBCC33", "#AAAA00"};
static const char *other_colour = "#DDDDDD";

void route_page_init(RoutePage *p, int n_layers, int experts, const int *layer_ids, int vocab) {
    memset(p, 0, sizeof *p);
    p->n_layers = n_layers;
    p->experts = experts;
    p->vocab = vocab;
    p->layer_ids = layer_ids;
    p->text = open_memstream(&p->text_buf, &p->text_len);
    p->title = open_memstream(&p->title_buf, &p->title_len);
    if (!p->text || !p->title) DIE("cannot open a memory stream");
    p->tok_first = CALLOC((size_t)n_layers, sizeof *p->tok_first);
    for (int l = 0; l < n_layers; l++)
        p->tok_first[l] = -1;
    p->first = CALLOC((size_t)n_layers * experts, sizeof *p->first);
}

void route_page_free(RoutePage *p) {
    if (p->text) fclose(p->text);
    if (p->title) fclose(p->title);
    free(p->text_buf);
    free(p->title_buf);
    free(p->tok_first);
    free(p->first);
    free(p->esft);
    memset(p, 0, sizeof *p);
}

// ---- the text -----------------------------------------------------------------------------

static void close_domain(RoutePage *p) {
    if (p->domain_open) fputs("</div>\n</div>\n", p->text);
    p->domain_open = 0;
}

void route_page_domain(RoutePage *p, const char *name) {
    close_domain(p);
    fputs("<div class=\"domain\">\n<h3>", p->text);
    html_text(p->text, name);
    fputs("</h3>\n<div class=\"tokens\">", p->text);
    p->domain_open = 1;
}

void route_page_layer(RoutePage *p, int l, const int32_t *idx, const real *gates,
                      const int32_t *keep, const size_t *slot, size_t n) {
    fprintf(p->title, "\nlayer %d:", p->layer_ids[l]);
    if (n == 0) fputs(" no expert", p->title);
    size_t best = 0;
    for (size_t i = 0; i < n; i++) {
        fprintf(p->title, "%s e%d %.3f%s", i ? "," : "", idx[slot[i]], (double)gates[slot[i]],
                keep[slot[i]] ? "" : " (dropped)");
        if (gates[slot[i]] > gates[slot[best]]) best = i;
    }
    p->tok_first[l] = n ? idx[slot[best]] : -1;
    if (n && p->tok_first[l] >= 0 && p->tok_first[l] < p->experts)
        p->first[(size_t)l * p->experts + p->tok_first[l]]++;
}

// What the span shows of a token's text: valid UTF-8 itself, a newline as a mark (a line
// break follows the span when the text ends in one), any other control or invalid byte
// as \xNN.
static void token_text(FILE *f, const char *piece, size_t len) {
    const unsigned char *s = (const unsigned char *)piece;
    while (len > 0) {
        size_t n = html_utf8_len(s, len);
        if (*s == '\n')
            fputs("\xe2\x86\xb5", f); // U+21B5, downwards arrow with corner
        else if (n > 1 || *s == '\t' || (n == 1 && *s >= 0x20 && *s < 0x7f)) {
            char unit[5] = {0}; // one character, NUL-terminated for html_text
            memcpy(unit, s, n);
            html_text(f, unit);
        } else
            fprintf(f, "<span class=\"esc\">\\x%02x</span>", *s);
        n = n ? n : 1;
        s += n;
        len -= n;
    }
}

static void token_describe(char *out, size_t n, int32_t tok, int vocab, size_t offset) {
    if (vocab != 256)
        snprintf(out, n, "token %d, offset %zu", tok, offset);
    else if (tok >= 0x21 && tok < 0x7f)
        snprintf(out, n, "'%c' (byte %d), offset %zu", (char)tok, tok, offset);
    else
        snprintf(out, n, "byte %d, offset %zu", tok, offset);
}

void route_page_token(RoutePage *p, int32_t tok, const char *piece, size_t len,
                      size_t offset) {
    fflush(p->title);
    char head[128];
    token_describe(head, sizeof head, tok, p->vocab, offset);
    fputs("<span class=\"t", p->text);
    for (int l = 0; l < p->n_layers; l++)
        if (p->tok_first[l] < 0)
            fprintf(p->text, " l%dx", l);
        else
            fprintf(p->text, " l%de%d", l, p->tok_first[l]);
    fputs("\" title=\"", p->text);
    html_text(p->text, head);
    html_text(p->text, p->title_buf);
    fputs("\">", p->text);
    token_text(p->text, piece, len);
    fputs("</span>", p->text);
    if (len > 0 && piece[len - 1] == '\n') fputc('\n', p->text);
    // A fresh stream: a memory stream rewound keeps the longer text of the last token.
    fclose(p->title);
    free(p->title_buf);
    p->title = open_memstream(&p->title_buf, &p->title_len);
    if (!p->title) DIE("cannot open a memory stream");
    for (int l = 0; l < p->n_layers; l++)
        p->tok_first[l] = -1;
    p->shown++;
}

// ---- colours --------------------------------------------------------------------------

// colour[e] of layer l: a palette index, or -1 (pale grey). With E <= 8 expert e takes
// colour e; otherwise the 8 most frequent first choices take them, in that order.
static void layer_colours(const RoutePage *p, int l, int *colour) {
    const uint64_t *first = p->first + (size_t)l * p->experts;
    for (int e = 0; e < p->experts; e++)
        colour[e] = p->experts <= PALETTE_SIZE ? e : -1;
    if (p->experts <= PALETTE_SIZE) return;
    for (int c = 0; c < PALETTE_SIZE; c++) {
        int best = -1;
        for (int e = 0; e < p->experts; e++)
            if (colour[e] < 0 && first[e] && (best < 0 || first[e] > first[best])) best = e;
        if (best < 0) return;
        colour[best] = c;
    }
}

static void write_css(FILE *f, const RoutePage *p) {
    int *colour = CALLOC((size_t)p->experts, sizeof *colour);
    fprintf(f,
            ".tokens{white-space:pre-wrap;overflow-wrap:anywhere;font-family:monospace;"
            "font-size:15px;"
            "line-height:1.7;border:1px solid #ccc;padding:.5em}\n"
            ".t{background:%s}.esc{font-size:.75em}\n"
            ".sw{display:inline-block;font-family:monospace;padding:0 .4em;margin:.1em;"
            "border:1px solid #999}\n.legend{display:none}\n"
            "input[name=layer]:checked+label{font-weight:bold}\n",
            other_colour);
    for (int l = 0; l < p->n_layers; l++) {
        layer_colours(p, l, colour);
        fprintf(f, "#layer-%d:checked~.legend-%d{display:block}\n", l, l);
        fprintf(f, "#layer-%d:checked~.domain .l%dx{background:#fff;color:#888}\n", l, l);
        for (int e = 0; e < p->experts; e++)
            if (colour[e] >= 0)
                fprintf(f, "#layer-%d:checked~.domain .l%de%d{background:%s}\n", l, l, e,
                        palette[colour[e]]);
    }
    free(colour);
}

static void write_legends(FILE *f, const RoutePage *p) {
    int *colour = CALLOC((size_t)p->experts, sizeof *colour);
    for (int l = 0; l < p->n_layers; l++) {
        layer_colours(p, l, colour);
        const uint64_t *first = p->first + (size_t)l * p->experts;
        fprintf(f,
                "<div class=\"legend legend-%d\">Layer %d, share of the shown tokens whose "
                "first choice it is:",
                l, p->layer_ids[l]);
        for (int e = 0; e < p->experts; e++)
            fprintf(f, " <span class=\"sw\" style=\"background:%s\">e%d</span>%.0f%%",
                    colour[e] >= 0 ? palette[colour[e]] : other_colour, e,
                    p->shown ? 100.0 * (double)first[e] / (double)p->shown : 0.0);
        if (p->experts > PALETTE_SIZE)
            fprintf(f,
                    " (grey: experts beyond the %d colours; hover a token for its "
                    "experts)",
                    PALETTE_SIZE);
        fputs("</div>\n", f);
    }
    free(colour);
}

static void write_text_section(FILE *f, RoutePage *p, const RoutePageInfo *info) {
    close_domain(p);
    fflush(p->text);
    fprintf(f,
            "<section id=\"text\">\n<h2>Tokens by first-choice expert</h2>\n<p>At most "
            "the first %ld tokens of each domain (tokens.csv, --tokens), each coloured by the expert with the "
            "largest gate in the selected layer; hover a token for every layer's experts, "
            "gates and dropped choices. A newline shows as \xe2\x86\xb5, a byte that is "
            "not printable ASCII as \\xNN.</p>\n",
            info->tokens);
    // The radio buttons precede the legends and the domains as their siblings: the CSS
    // (write_css) selects through `:checked ~`.
    for (int l = 0; l < p->n_layers; l++)
        fprintf(f,
                "<input type=\"radio\" name=\"layer\" id=\"layer-%d\"%s><label "
                "for=\"layer-%d\">layer %d</label>\n",
                l, l ? "" : " checked", l, p->layer_ids[l]);
    write_legends(f, p);
    fwrite(p->text_buf, 1, p->text_len, f);
    fputs("</section>\n", f);
}

// ---- ESFT scores (moe experts --csv) ----------------------------------------------------

typedef struct {
    RoutePage *p;
    const char *path;
    long line;
    int col;
    double cell[5];
    uint8_t *seen; // (n_layers, experts)
} EsftReader;

static const char *esft_cols[5] = {"layer", "expert", "token_score", "gate_score", "selected"};

static void esft_cell(void *s, size_t len, void *data) {
    EsftReader *r = data;
    char text[64];
    snprintf(text, sizeof text, "%.*s", (int)(len < 63 ? len : 63), (const char *)s);
    if (r->col >= 5)
        FAIL(
            "%s line %ld: more than 5 cells (layer, expert, token_score, gate_score, selected)",
            r->path, r->line);
    if (r->line == 1) {
        if (strcmp(text, esft_cols[r->col]))
            FAIL("%s line 1: column %d is '%s', expected '%s' (the CSV moe experts writes)",
                 r->path, r->col + 1, text, esft_cols[r->col]);
    } else if (util_parse_number(text, r->col == 0 || r->col == 1 || r->col == 4,
                                 &r->cell[r->col]) != 0) {
        FAIL("%s line %ld: %s '%s' is not a %s", r->path, r->line, esft_cols[r->col], text,
             r->col == 2 || r->col == 3 ? "finite number" : "whole number");
    }
    r->col++;
}

static int layer_index(const RoutePage *p, int layer) {
    for (int l = 0; l < p->n_layers; l++)
        if (p->layer_ids[l] == layer) return l;
    return -1;
}

static void esft_row(int c, void *data) {
    (void)c;
    EsftReader *r = data;
    RoutePage *p = r->p;
    if (r->col != 5) FAIL("%s line %ld: %d cells, expected 5", r->path, r->line, r->col);
    if (r->line++ == 1) {
        r->col = 0;
        return;
    }
    r->col = 0;
    int l = layer_index(p, (int)r->cell[0]), e = (int)r->cell[1];
    long line = r->line - 1;
    if (l < 0)
        FAIL("%s line %ld: layer %d is not a MoE layer of this checkpoint", r->path, line,
             (int)r->cell[0]);
    if (e < 0 || e >= p->experts)
        FAIL("%s line %ld: expert %d out of range (the checkpoint has %d experts)", r->path,
             line, e, p->experts);
    if (r->cell[4] != 0 && r->cell[4] != 1)
        FAIL("%s line %ld: selected must be 0 or 1, not %g", r->path, line, r->cell[4]);
    size_t at = (size_t)l * p->experts + (size_t)e;
    if (r->seen[at]++)
        FAIL("%s line %ld: layer %d expert %d twice", r->path, line, (int)r->cell[0], e);
    memcpy(p->esft + 3 * at, r->cell + 2, 3 * sizeof *r->cell);
}

void route_page_read_esft(RoutePage *p, const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f)
        FAIL("%s: cannot read: %s (--esft takes the CSV moe experts writes)", path,
             strerror(errno));
    size_t cells = (size_t)p->n_layers * p->experts;
    p->esft = CALLOC(3 * cells, sizeof *p->esft);
    EsftReader r = {.p = p, .path = path, .line = 1, .seen = CALLOC(cells, 1)};
    struct csv_parser parser;
    csv_init(&parser, CSV_APPEND_NULL);
    char buf[65536];
    size_t got;
    while ((got = fread(buf, 1, sizeof buf, f)) > 0)
        if (csv_parse(&parser, buf, got, esft_cell, esft_row, &r) != got)
            FAIL("%s: %s", path, csv_strerror(csv_error(&parser)));
    csv_fini(&parser, esft_cell, esft_row, &r);
    csv_free(&parser);
    fclose(f);
    for (size_t i = 0; i < cells; i++)
        if (!r.seen[i])
            FAIL("%s: no row for layer %d expert %zu (it holds %ld rows; this checkpoint has "
                 "%d MoE layers x %d experts)",
                 path, p->layer_ids[i / p->experts], i % p->experts, r.line - 2, p->n_layers,
                 p->experts);
    free(r.seen);
}

static FILE *open_file(const char *dir, const char *name) {
    char path[RUN_FILE_MAX];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    if (!f) FAIL("%s: cannot write: %s", path, strerror(errno));
    return f;
}

static void close_file(FILE *f, const char *dir, const char *name) {
    if (fclose(f) != 0) FAIL("%s/%s: cannot write (disk full?)", dir, name);
}

// esft.dat: index 0 token scores, 1 gate scores ("expert layer score" grids), 2 the
// selected (expert, layer) pairs.
const char *route_page_esft_figure(const RoutePage *p, const char *dir) {
    int L = p->n_layers, E = p->experts;
    FILE *f = open_file(dir, "esft.dat");
    for (int k = 0; k < 3; k++) {
        for (int l = 0; l < L; l++) {
            for (int e = 0; e < E; e++) {
                const double *s = p->esft + 3 * ((size_t)l * E + e);
                if (k < 2)
                    fprintf(f, "%d %d %.6f\n", e, l, s[k]);
                else if (s[2] == 1)
                    fprintf(f, "%d %d\n", e, l);
            }
            if (k < 2) fputc('\n', f);
        }
        fputs(k < 2 ? "\n" : "-1 -1\n", f); // gnuplot needs a point; -1 is off the axes
    }
    close_file(f, dir, "esft.dat");
    f = open_file(dir, "esft.gp");
    fprintf(f,
            "# moe route --esft: ESFT scores of moe experts. Render again with: cd %s && "
            "gnuplot esft.gp\n",
            dir);
    plot_begin_figure(f, "esft", 900, 120 + 36 * L);
    fprintf(f,
            "set multiplot layout 1,2 title 'ESFT scores per layer (squares: selected "
            "experts)'\nset palette defined (0 '#ffffff', 0.5 '#6baed6', 1 '#08306b')\n"
            "set xrange [-0.5:%d.5]\nset yrange [%d.5:-0.5]\nset xlabel 'expert'\n"
            "set ylabel 'layer'\nunset key\nset ytics (",
            E - 1, L - 1);
    for (int l = 0; l < L; l++)
        fprintf(f, "%s'%d' %d", l ? ", " : "", p->layer_ids[l], l);
    fputs(")\n", f);
    if (E <= 16) fputs("set xtics 1\n", f);
    static const char *titles[2] = {"token selection ratio", "mean gate"};
    for (int k = 0; k < 2; k++)
        fprintf(f,
                "set title '%s'\nplot 'esft.dat' index %d %s, '' index 2 using 1:2 with "
                "points pt 4 ps 2 lw 2 lc rgb '#000000'\n",
                titles[k], k, plot_heatmap(E, L));
    fputs("unset multiplot\n", f);
    close_file(f, dir, "esft.gp");
    return "esft.gp";
}

// ---- the page -------------------------------------------------------------------------

static void write_saturation(FILE *f, const RoutePage *p, const RoutePageInfo *info) {
    int L = p->n_layers, D = info->n_domains;
    fputs("<section id=\"saturation\">\n<h2>Router saturation</h2>\n<p>Share of ", f);
    html_text(f, info->compare);
    fputs("'s (token, layer, expert) choices that ", f);
    html_text(f, info->ckpt);
    fputs(" makes too (saturation.csv).</p>\n<table>\n<tr><th>domain</th>", f);
    for (int l = 0; l < L; l++)
        fprintf(f, "<th>layer %d</th>", p->layer_ids[l]);
    fputs("<th>all layers</th></tr>\n", f);
    for (int d = 0; d <= D; d++) {
        fputs("<tr><td>", f);
        html_text(f, d < D ? info->domains[d] : "all domains");
        fputs("</td>", f);
        for (int l = 0; l <= L; l++)
            fprintf(f, "<td>%.3f</td>", info->saturation[(size_t)d * (L + 1) + l]);
        fputs("</tr>\n", f);
    }
    fputs("</table>\n</section>\n", f);
}

static void write_esft(FILE *f, const RoutePage *p, const RoutePageInfo *info) {
    int E = p->experts;
    fputs("<section id=\"esft\">\n<h2>ESFT scores</h2>\n<p>From ", f);
    html_text(f, info->esft);
    fputs(" (moe experts): per layer, each expert's token selection ratio and mean gate on "
          "its data; the selected experts:</p>\n<table>\n<tr><th>layer</th><th>selected "
          "(token score, gate score)</th></tr>\n",
          f);
    for (int l = 0; l < p->n_layers; l++) {
        fprintf(f, "<tr><td>%d</td><td>", p->layer_ids[l]);
        for (int e = 0; e < E; e++) {
            const double *s = p->esft + 3 * ((size_t)l * E + e);
            if (s[2] == 1) fprintf(f, "e%d (%.3f, %.3f) ", e, s[0], s[1]);
        }
        fputs("</td></tr>\n", f);
    }
    fputs("</table>\n", f);
}

void route_page_write(RoutePage *p, const char *dir, const RoutePageInfo *info) {
    char tmp[RUN_FILE_MAX];
    snprintf(tmp, sizeof tmp, "%s/route.html.tmp", dir);
    FILE *f = fopen(tmp, "w");
    if (!f) FAIL("%s: cannot write: %s", tmp, strerror(errno));
    char *css;
    size_t css_len;
    FILE *c = open_memstream(&css, &css_len);
    if (!c) DIE("cannot open a memory stream");
    write_css(c, p);
    fclose(c);
    char title[RUN_FILE_MAX];
    snprintf(title, sizeof title, "moe route: %s", info->ckpt);
    html_begin(f, title, css);
    free(css);
    fputs("<p>Domains:", f);
    for (int d = 0; d < info->n_domains; d++) {
        fputs(d ? ", " : " ", f);
        html_text(f, info->domains[d]);
        fprintf(f, " (%llu tokens routed)", (unsigned long long)info->routed[d]);
    }
    fputs(". Choices are the router's before capacity.</p>\n", f);
    write_text_section(f, p, info);
    fputs("<section id=\"usage\">\n<h2>Expert usage per domain</h2>\n", f);
    html_figure(f, dir, "usage",
                "share of each MoE layer's assignments per expert, one "
                "panel per domain (usage.csv)",
                info->plot_why);
    fputs("</section>\n<section id=\"coactivation\">\n<h2>Co-activation</h2>\n", f);
    html_figure(f, dir, "coactivation",
                "share of the routed tokens (all domains) whose "
                "choices in the layer include both experts (coactivation.csv)",
                info->plot_why);
    fputs("</section>\n", f);
    if (info->compare) write_saturation(f, p, info);
    if (info->esft) {
        write_esft(f, p, info);
        html_figure(f, dir, "esft",
                    "ESFT scores, layer x expert; squares mark the "
                    "selected experts",
                    info->plot_why);
        fputs("</section>\n", f);
    }
    html_end(f);
    char path[RUN_FILE_MAX];
    snprintf(path, sizeof path, "%s/route.html", dir);
    if (fclose(f) != 0 || rename(tmp, path) != 0)
        FAIL("%s: cannot write: %s", path, strerror(errno));
}
