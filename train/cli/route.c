// route.c: `moe route`: expert usage per domain, a token-level routing dump,
// co-activation and router saturation (outputs and definitions in route.h).
#include "route.h"

#include <csv.h>
#include <ctype.h>
#include <errno.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "../../base/util.h"
#include "../html.h"
#include "../plot.h"
#include "../run.h"
#include "route_page.h"

#define ROUTE_MAX_WORDS 64
// --tokens past the data's length dumps every token; the bound only keeps it a count.
#define ROUTE_MAX_TOKENS 1e12

typedef struct {
    const char *ckpt, *compare, *out, *esft;
    long tokens; // token-dump rows per domain (times layers)
    const char *data[DATA_MAX_DOMAINS];
    int n_data;
    char *words[ROUTE_MAX_WORDS]; // section.key=value overrides
    int n_words;
} RouteArgs;

// ---- one forward's routing, read back from the model --------------------------------

typedef struct {
    int n_layers;
    size_t N, slots;
    int choice;          // expert choice: a slot is an expert's pick only when kept
    int32_t *idx, *keep; // (n_layers, N, slots)
    real *gates;         // (n_layers, N, slots)
} Routes;

static void routes_init(Routes *r, const Model *m) {
    r->n_layers = m->n_moe;
    r->N = m->N;
    r->slots = model_config_slots(&m->cfg);
    r->choice = m->cfg.select == SELECT_EXPERT_CHOICE;
    size_t n = (size_t)r->n_layers * r->N * r->slots;
    r->idx = CALLOC(n, sizeof *r->idx);
    r->keep = CALLOC(n, sizeof *r->keep);
    r->gates = CALLOC(n, sizeof *r->gates);
}

static void routes_free(Routes *r) {
    free(r->idx);
    free(r->keep);
    free(r->gates);
}

static void routes_read(Routes *r, const Model *m) {
    size_t n = r->N * r->slots;
    for (int l = 0; l < r->n_layers; l++) {
        const MoeLayerState *st = &m->moe[l];
        m->be->download(r->idx + l * n, st->idx, n * sizeof *r->idx);
        m->be->download(r->keep + l * n, st->keep, n * sizeof *r->keep);
        m->be->download(r->gates + l * n, st->gates, n * sizeof *r->gates);
    }
}

// The slots of token t in layer l that hold a choice; returns how many went into slot.
static size_t routes_chosen(const Routes *r, int l, size_t t, size_t *slot) {
    size_t base = ((size_t)l * r->N + t) * r->slots, n = 0;
    for (size_t s = 0; s < r->slots; s++)
        if (!r->choice || r->keep[base + s]) slot[n++] = base + s;
    return n;
}

// ---- counts over all domains ----------------------------------------------------------

typedef struct {
    int n_domains, n_layers, experts;
    uint64_t *tokens;  // (D) tokens routed
    uint64_t *usage;   // (D, L, E) choices per expert
    uint64_t *coact;   // (L, E, E) tokens choosing both experts
    uint64_t *sat_hit; // (D, L) OTHER's choices that CHECKPOINT makes too
    uint64_t *sat_all; // (D, L) OTHER's choices
} RouteCounts;

static void counts_init(RouteCounts *c, int D, int L, int E) {
    c->n_domains = D;
    c->n_layers = L;
    c->experts = E;
    c->tokens = CALLOC((size_t)D, sizeof *c->tokens);
    c->usage = CALLOC((size_t)D * L * E, sizeof *c->usage);
    c->coact = CALLOC((size_t)L * E * E, sizeof *c->coact);
    c->sat_hit = CALLOC((size_t)D * L, sizeof *c->sat_hit);
    c->sat_all = CALLOC((size_t)D * L, sizeof *c->sat_all);
}

static void counts_free(RouteCounts *c) {
    free(c->tokens);
    free(c->usage);
    free(c->coact);
    free(c->sat_hit);
    free(c->sat_all);
}

// ---- the token dump -------------------------------------------------------------------

// The text ids[t] adds to the one before it (in its window): SentencePiece drops the
// leading space of a word that decodes alone. A pair whose text does not begin with the
// first token's (a character split across byte tokens) gives the token's text alone.
// Returns it malloc'ed, *len bytes.
static char *token_piece(const Tokenizer *tok, const int32_t *ids, size_t t, size_t T,
                         size_t *len) {
    if (t % T == 0 || tokenizer_kind(tok) != TOKENIZER_SENTENCEPIECE)
        return tokenizer_decode(tok, ids + t, 1, len);
    size_t first_len, pair_len;
    char *first = tokenizer_decode(tok, ids + t - 1, 1, &first_len);
    char *pair = tokenizer_decode(tok, ids + t - 1, 2, &pair_len);
    char *piece = NULL;
    if (pair_len >= first_len && !memcmp(pair, first, first_len)) {
        *len = pair_len - first_len;
        piece = CALLOC(*len + 1, 1);
        memcpy(piece, pair + first_len, *len);
    }
    free(first);
    free(pair);
    return piece ? piece : tokenizer_decode(tok, ids + t, 1, len);
}

// A token's text (its bytes through the tokenizer) as one readable cell: valid UTF-8 as
// itself, newline, tab and backslash as C escapes, any other control or invalid byte as
// \xNN. Returns out, malloc'ed.
static char *token_cell(const char *piece, size_t len) {
    char *out = CALLOC(4 * len + 1, 1), *o = out;
    const unsigned char *s = (const unsigned char *)piece;
    while (len > 0) {
        size_t n = html_utf8_len(s, len);
        if (n > 1 || (n == 1 && isprint(*s) && *s != '\\'))
            o += sprintf(o, "%.*s", (int)n, (const char *)s);
        else if (*s == '\n')
            o += sprintf(o, "\\n");
        else if (*s == '\t')
            o += sprintf(o, "\\t");
        else if (*s == '\\')
            o += sprintf(o, "\\\\");
        else
            o += sprintf(o, "\\x%02x", *s);
        n = n ? n : 1;
        s += n;
        len -= n;
    }
    return out;
}

static void csv_cell(FILE *f, const char *text, int first) {
    if (!first) fputc(',', f);
    csv_fwrite(f, text, strlen(text));
}

static void dump_row(FILE *f, const char *domain, size_t offset, size_t pos, int32_t tok,
                     const char *text, int layer, const Routes *r, const size_t *slot,
                     size_t n) {
    char experts[1024] = "", gates[2048] = "", kept[1024] = "";
    for (size_t i = 0; i < n; i++) {
        const char *sep = i ? " " : "";
        snprintf(experts + strlen(experts), sizeof experts - strlen(experts), "%s%d", sep,
                 r->idx[slot[i]]);
        snprintf(gates + strlen(gates), sizeof gates - strlen(gates), "%s%.4f", sep,
                 (double)r->gates[slot[i]]);
        snprintf(kept + strlen(kept), sizeof kept - strlen(kept), "%s%d", sep,
                 r->keep[slot[i]] != 0);
    }
    csv_cell(f, domain, 1);
    fprintf(f, ",%zu,%zu,%d,", offset, pos, tok);
    csv_fwrite(f, text, strlen(text));
    fprintf(f, ",%d,%s,%s,%s\n", layer, experts, gates, kept);
}

// ---- routing the data -----------------------------------------------------------------

typedef struct {
    const RouteArgs *args;
    RunConfig *rc;
    Model m, other; // other: --compare, else unused
    Tokenizer *tok;  // the checkpoint's: the text of the tokens shown
    int compare;
    DataLoader *dl;
    Routes ra, rb;
    RouteCounts c;
    FILE *dump;
    RoutePage page;
    int *layer_ids;   // (n_moe) the model layer of each MoE layer
    double *sat;      // (D + 1, L + 1) saturation: domains then all, layers then all
} RouteRun;

// Usage and co-activation of one token in one layer from ra; saturation against rb.
// Returns how many choices of ra went into sa.
static size_t count_token(RouteRun *rr, int d, int l, size_t t, size_t *sa, size_t *sb) {
    RouteCounts *c = &rr->c;
    size_t E = (size_t)c->experts, L = (size_t)c->n_layers;
    size_t na = routes_chosen(&rr->ra, l, t, sa);
    for (size_t i = 0; i < na; i++) {
        size_t e = (size_t)rr->ra.idx[sa[i]];
        c->usage[((size_t)d * L + l) * E + e]++;
        for (size_t j = 0; j < na; j++)
            if (j != i) c->coact[((size_t)l * E + e) * E + (size_t)rr->ra.idx[sa[j]]]++;
    }
    if (!rr->compare) return na;
    size_t nb = routes_chosen(&rr->rb, l, t, sb);
    for (size_t i = 0; i < nb; i++)
        for (size_t j = 0; j < na; j++)
            if (rr->rb.idx[sb[i]] == rr->ra.idx[sa[j]]) c->sat_hit[(size_t)d * L + l]++;
    c->sat_all[(size_t)d * L + l] += nb;
    return na;
}

static void forward_batch(RouteRun *rr, const int32_t *tok, const int32_t *tgt) {
    model_set_batch(&rr->m, tok, tgt);
    model_forward(&rr->m);
    routes_read(&rr->ra, &rr->m);
    if (!rr->compare) return;
    model_set_batch(&rr->other, tok, tgt);
    model_forward(&rr->other);
    routes_read(&rr->rb, &rr->other);
}

static void route_domain(RouteRun *rr, int d) {
    Model *m = &rr->m;
    size_t B = m->B, T = m->T,
           slots = rr->ra.slots > rr->rb.slots ? rr->ra.slots : rr->rb.slots;
    int32_t *tok = CALLOC(2 * m->N, sizeof *tok), *tgt = tok + m->N;
    size_t *sa = CALLOC(slots, sizeof *sa), *sb = CALLOC(slots, sizeof *sb);
    const char *name = data_loader_domain_name(rr->dl, d);
    size_t batches = data_loader_val_batches(rr->dl, d);
    route_page_domain(&rr->page, name);
    for (size_t i = 0; i < batches; i++) {
        // A short last batch: the rows past it are zero tokens, routed but not counted.
        memset(tok, 0, 2 * m->N * sizeof *tok);
        size_t rows = data_loader_val_batch(rr->dl, d, i, tok, tgt);
        forward_batch(rr, tok, tgt);
        for (size_t t = 0; t < rows * T; t++) {
            size_t offset = i * B * T + t, len = 0;
            int shown = (long)offset < rr->args->tokens;
            char *piece = shown ? token_piece(rr->tok, tok, t, T, &len) : NULL;
            char *cell = shown ? token_cell(piece, len) : NULL;
            for (int l = 0; l < m->n_moe; l++) {
                size_t n = count_token(rr, d, l, t, sa, sb);
                if (!shown) continue;
                dump_row(rr->dump, name, offset, t % T, tok[t], cell, m->moe[l].layer,
                         &rr->ra, sa, n);
                route_page_layer(&rr->page, l, rr->ra.idx, rr->ra.gates, rr->ra.keep, sa, n);
            }
            if (shown) route_page_token(&rr->page, tok[t], piece, len, offset);
            free(piece);
            free(cell);
        }
        rr->c.tokens[d] += rows * T;
    }
    free(tok);
    free(sa);
    free(sb);
}

// ---- outputs --------------------------------------------------------------------------

static FILE *open_out(const char *dir, const char *name) {
    char path[RUN_FILE_MAX];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    if (!f) FAIL("%s: cannot write", path);
    return f;
}

static void close_out(FILE *f, const char *dir, const char *name) {
    if (fclose(f) != 0) FAIL("%s/%s: cannot write (disk full?)", dir, name);
}

static double usage_fraction(const RouteCounts *c, int d, int l, int e) {
    const uint64_t *u = c->usage + ((size_t)d * c->n_layers + l) * c->experts;
    uint64_t total = 0;
    for (int j = 0; j < c->experts; j++)
        total += u[j];
    return total ? (double)u[e] / (double)total : 0.0;
}

static void write_usage(const RouteRun *rr, const char *dir) {
    const RouteCounts *c = &rr->c;
    FILE *f = open_out(dir, "usage.csv");
    fputs("domain,layer,expert,tokens,fraction\n", f);
    for (int d = 0; d < c->n_domains; d++)
        for (int l = 0; l < c->n_layers; l++)
            for (int e = 0; e < c->experts; e++) {
                csv_cell(f, data_loader_domain_name(rr->dl, d), 1);
                fprintf(f, ",%d,%d,%llu,%.6f\n", rr->m.moe[l].layer, e,
                        (unsigned long long)
                            c->usage[((size_t)d * c->n_layers + l) * c->experts + e],
                        usage_fraction(c, d, l, e));
            }
    close_out(f, dir, "usage.csv");
}

static void write_coactivation(const RouteRun *rr, const char *dir) {
    const RouteCounts *c = &rr->c;
    size_t E = (size_t)c->experts;
    FILE *f = open_out(dir, "coactivation.csv");
    fputs("layer,expert", f);
    for (size_t e = 0; e < E; e++)
        fprintf(f, ",e%zu", e);
    fputc('\n', f);
    for (int l = 0; l < c->n_layers; l++)
        for (size_t a = 0; a < E; a++) {
            fprintf(f, "%d,%zu", rr->m.moe[l].layer, a);
            for (size_t b = 0; b < E; b++)
                fprintf(f, ",%llu", (unsigned long long)c->coact[((size_t)l * E + a) * E + b]);
            fputc('\n', f);
        }
    close_out(f, dir, "coactivation.csv");
}

static double ratio(uint64_t a, uint64_t b) { return b ? (double)a / (double)b : 0.0; }

// Rows per domain and layer, then per domain over layers, then over all domains.
static void write_saturation(RouteRun *rr, const char *dir) {
    const RouteCounts *c = &rr->c;
    int D = c->n_domains, L = c->n_layers;
    FILE *f = open_out(dir, "saturation.csv");
    fputs("domain,layer,saturation\n", f);
    printf("router saturation vs %s (share of its top choices that %s makes too):\n",
           rr->args->compare, rr->args->ckpt);
    for (int d = 0; d <= D; d++) {
        const char *name = d < D ? data_loader_domain_name(rr->dl, d) : "all";
        uint64_t hit = 0, tot = 0;
        printf("  %-12.12s", name);
        for (int l = 0; l < L; l++) {
            uint64_t h = 0, t = 0;
            for (int k = d < D ? d : 0; k < (d < D ? d + 1 : D); k++) {
                h += c->sat_hit[(size_t)k * L + l];
                t += c->sat_all[(size_t)k * L + l];
            }
            csv_cell(f, name, 1);
            fprintf(f, ",%d,%.6f\n", rr->m.moe[l].layer, ratio(h, t));
            rr->sat[(size_t)d * (L + 1) + l] = ratio(h, t);
            printf(" L%d %.3f", rr->m.moe[l].layer, ratio(h, t));
            hit += h;
            tot += t;
        }
        csv_cell(f, name, 1);
        fprintf(f, ",all,%.6f\n", ratio(hit, tot));
        rr->sat[(size_t)d * (L + 1) + L] = ratio(hit, tot);
        printf(" | all %.3f\n", ratio(hit, tot));
    }
    close_out(f, dir, "saturation.csv");
}

// Layers down, experts across, one panel per domain, a shared colour scale.
static void write_heatmap(const RouteRun *rr, const char *dir) {
    const RouteCounts *c = &rr->c;
    int D = c->n_domains, L = c->n_layers, E = c->experts;
    double max = 0.0;
    FILE *f = open_out(dir, "usage.dat");
    for (int d = 0; d < D; d++) {
        for (int l = 0; l < L; l++) {
            for (int e = 0; e < E; e++) {
                double x = usage_fraction(c, d, l, e);
                max = x > max ? x : max;
                fprintf(f, "%d %d %.6f\n", e, l, x);
            }
            fputc('\n', f);
        }
        fputc('\n', f);
    }
    close_out(f, dir, "usage.dat");
    f = open_out(dir, "usage.gp");
    fprintf(f, "# moe route: expert usage per domain. Render again with: cd %s && gnuplot "
               "usage.gp\n", dir);
    plot_begin_figure(f, "usage", 80 + 360 * D, 160 + 32 * L);
    fprintf(f, "set multiplot layout 1,%d title 'share of each MoE layer''s assignments per "
               "expert: '.", D);
    plot_quote(f, rr->args->ckpt);
    fprintf(f,
            "\nset palette defined (0 '#ffffff', 0.5 '#6baed6', 1 '#08306b')\n"
            "set cbrange [0:%g]\nset xrange [-0.5:%d.5]\nset yrange [%d.5:-0.5]\n"
            "set xlabel 'expert'\nset ylabel 'layer'\nset xtics 1\nset ytics (",
            max > 0 ? max : 1.0, E - 1, L - 1);
    for (int l = 0; l < L; l++)
        fprintf(f, "%s'%d' %d", l ? ", " : "", rr->m.moe[l].layer, l);
    fputs(")\n", f);
    for (int d = 0; d < D; d++) {
        fputs("set title ", f);
        plot_quote(f, data_loader_domain_name(rr->dl, d));
        fprintf(f, "\nplot 'usage.dat' index %d %s notitle\n", d, plot_heatmap(E, L));
    }
    fputs("unset multiplot\n", f);
    close_out(f, dir, "usage.gp");
}

// Per layer an expert x expert panel of the share of routed tokens choosing both.
static void write_coactivation_figure(const RouteRun *rr, const char *dir) {
    const RouteCounts *c = &rr->c;
    int L = c->n_layers, E = c->experts, cols = L < 4 ? L : 4;
    uint64_t tokens = 0;
    for (int d = 0; d < c->n_domains; d++) tokens += c->tokens[d];
    double max = 0.0;
    FILE *f = open_out(dir, "coactivation.dat");
    for (int l = 0; l < L; l++) {
        for (int b = 0; b < E; b++) {
            for (int a = 0; a < E; a++) {
                double x = ratio(c->coact[((size_t)l * E + a) * E + b], tokens);
                max = x > max ? x : max;
                fprintf(f, "%d %d %.6f\n", a, b, x);
            }
            fputc('\n', f);
        }
        fputc('\n', f);
    }
    close_out(f, dir, "coactivation.dat");
    f = open_out(dir, "coactivation.gp");
    fprintf(f, "# moe route: expert co-activation per layer. Render again with: cd %s && "
               "gnuplot coactivation.gp\n", dir);
    plot_begin_figure(f, "coactivation", 40 + 260 * cols, 60 + 250 * ((L + cols - 1) / cols));
    fprintf(f,
            "set multiplot layout %d,%d title 'share of routed tokens whose choices include "
            "both experts'\nset palette defined (0 '#ffffff', 0.5 '#6baed6', 1 '#08306b')\n"
            "set cbrange [0:%g]\nset xrange [-0.5:%d.5]\nset yrange [%d.5:-0.5]\n"
            "set size ratio -1\nset xlabel 'expert'\nset ylabel 'expert'\n%s",
            (L + cols - 1) / cols, cols, max > 0 ? max : 1.0, E - 1, E - 1,
            E <= 16 ? "set xtics 1\nset ytics 1\n" : "");
    for (int l = 0; l < L; l++)
        fprintf(f, "set title 'layer %d'\nplot 'coactivation.dat' index %d %s notitle\n",
                rr->m.moe[l].layer, l, plot_heatmap(E, E));
    fputs("unset multiplot\n", f);
    close_out(f, dir, "coactivation.gp");
}

// Renders the page's figures (PNG and SVG); returns why they are missing, or "".
static void render_figures(RouteRun *rr, const char *dir, char *why, size_t n) {
    write_heatmap(rr, dir);
    write_coactivation_figure(rr, dir);
    const char *scripts[3] = {"usage.gp", "coactivation.gp",
                              rr->args->esft ? route_page_esft_figure(&rr->page, dir) : NULL};
    why[0] = '\0';
    for (int i = 0; i < 3 && scripts[i] && !why[0]; i++)
        plot_render_figures(dir, scripts[i], why, n);
    if (!plot_available())
        plot_warn_missing("usage.png, coactivation.png and the figures of route.html");
    else if (why[0])
        fprintf(stderr, "moe: warning: %s; the CSV files are written\n", why);
}

// The usage table on stdout: percent of each domain's assignments per expert.
static void print_usage(const RouteRun *rr) {
    const RouteCounts *c = &rr->c;
    printf("expert usage (%% of each domain's assignments per MoE layer):\n%-16s",
           "layer/domain");
    for (int e = 0; e < c->experts; e++)
        printf(" e%-3d", e);
    printf("\n");
    for (int l = 0; l < c->n_layers; l++)
        for (int d = 0; d < c->n_domains; d++) {
            printf("L%-2d %-12.12s", rr->m.moe[l].layer, data_loader_domain_name(rr->dl, d));
            for (int e = 0; e < c->experts; e++)
                printf(" %4.0f", 100.0 * usage_fraction(c, d, l, e));
            printf("\n");
        }
}

// ---- setup ------------------------------------------------------------------------------

// A DATA argument's domain name: its base name without extension; a split file
// (train.*, val.*) is named after its directory: data/default/python/val.txt -> python.
static void domain_name_of(const char *path, char *out, size_t n) {
    char copy[KEY_STRING_MAX];
    snprintf(copy, sizeof copy, "%s", path);
    for (size_t len = strlen(copy); len > 1 && copy[len - 1] == '/';)
        copy[--len] = '\0';
    char *base = basename(copy), *dot = strrchr(base, '.');
    if (dot && dot != base) *dot = '\0';
    if (strcmp(base, "train") && strcmp(base, "val")) {
        snprintf(out, n, "%s", base);
        return;
    }
    snprintf(copy, sizeof copy, "%s", path);
    snprintf(out, n, "%s", basename(dirname(copy)));
}

static void use_data_args(RunConfig *rc, const RouteArgs *a) {
    char err[1024], name[DATA_NAME_MAX];
    rc->data.n_domains = 0;
    for (int i = 0; i < a->n_data; i++) {
        domain_name_of(a->data[i], name, sizeof name);
        DomainConfig *d = data_config_add_domain(&rc->data, name, err, sizeof err);
        if (!d) FAIL("%s: %s (domains are named after the DATA base names)", a->data[i], err);
        d->kind = DATA_TEXT;
        snprintf(d->train, sizeof d->train, "%s", a->data[i]);
        snprintf(d->val, sizeof d->val, "%s", a->data[i]);
    }
}

static int is_override(const char *w) { return strchr(w, '=') && strchr(w, '.'); }

static void parse_route_args(RouteArgs *a, int argc, char **argv) {
    memset(a, 0, sizeof *a);
    a->ckpt = argv[1];
    a->tokens = 256;
    for (int i = 2; i < argc; i++) {
        const char *w = argv[i];
        if (!strncmp(w, "--", 2)) {
            if (i + 1 >= argc) FAIL("%s needs a value (moe route --help)", w);
            const char *v = argv[++i];
            if (!strcmp(w, "--out"))
                a->out = v;
            else if (!strcmp(w, "--compare"))
                a->compare = v;
            else if (!strcmp(w, "--esft"))
                a->esft = v;
            else if (!strcmp(w, "--tokens"))
                a->tokens = (long)util_arg_number(w, v, 0, ROUTE_MAX_TOKENS, 1);
            else
                FAIL("unknown option %s (moe route --help lists them)", w);
        } else if (is_override(w)) {
            if (a->n_words == ROUTE_MAX_WORDS) FAIL("more than %d overrides", ROUTE_MAX_WORDS);
            a->words[a->n_words++] = argv[i];
        } else {
            if (a->n_data == DATA_MAX_DOMAINS)
                FAIL("more than %d DATA arguments", DATA_MAX_DOMAINS);
            a->data[a->n_data++] = w;
        }
    }
}

static void make_dir(const char *path) {
    if (mkdir(path, 0755) != 0 && errno != EEXIST)
        FAIL("%s: cannot create the output directory: %s", path, strerror(errno));
}

// The --compare model: its own weights and config, the same batch shape; the shapes
// saturation compares must agree.
static void open_other(RouteRun *rr, const char *path) {
    char ckpt[KEY_STRING_MAX];
    run_resolve_checkpoint(path, ckpt, sizeof ckpt);
    RunConfig *orc = CALLOC(1, sizeof *orc);
    run_load_checkpoint_config(orc, ckpt, 0, NULL);
    const ModelConfig *a = &rr->rc->model, *b = &orc->model;
    if (model_config_moe_layers(a) != model_config_moe_layers(b) || a->experts != b->experts ||
        a->seq_len != b->seq_len || a->vocab != b->vocab)
        FAIL("%s cannot be compared with %s: MoE layers %d vs %d, experts %d vs %d, seq_len %d "
             "vs %d, vocab %d vs %d must agree",
             ckpt, rr->args->ckpt, model_config_moe_layers(b), model_config_moe_layers(a),
             b->experts, a->experts, b->seq_len, a->seq_len, b->vocab, a->vocab);
    run_model_from_checkpoint(&rr->other, orc, ckpt, rr->m.B);
    model_clear_noise(&rr->other);
    routes_init(&rr->rb, &rr->other);
    rr->compare = 1;
    free(orc);
}

static void write_page(RouteRun *rr, const char *dir, const char *why) {
    int D = rr->c.n_domains;
    const char *names[DATA_MAX_DOMAINS];
    for (int d = 0; d < D; d++) names[d] = data_loader_domain_name(rr->dl, d);
    RoutePageInfo info = {.ckpt = rr->args->ckpt,
                          .compare = rr->compare ? rr->args->compare : NULL,
                          .esft = rr->args->esft,
                          .n_domains = D,
                          .domains = names,
                          .routed = rr->c.tokens,
                          .tokens = rr->args->tokens,
                          .saturation = rr->compare ? rr->sat : NULL,
                          .plot_why = why};
    route_page_write(&rr->page, dir, &info);
}

static void print_route_help(void) {
    printf(
        "usage: moe route CHECKPOINT [DATA ...] [--out DIR] [--compare OTHER] [--tokens 256]\n"
        "                 [--esft ESFT.csv] [section.key=value ...]\n"
        "  Expert usage per domain and layer (usage.csv, usage.png heatmap), the routing of\n"
        "  the first N tokens of each domain (tokens.csv), co-activation of experts\n"
        "  (coactivation.csv) and, with --compare, router saturation against OTHER\n"
        "  (saturation.csv). DATA: text files or directories, one domain each (default: the\n"
        "  checkpoint's domains); their validation windows are routed. DIR defaults to\n"
        "  <checkpoint's directory>/route. route.html shows it all: the tokens coloured by\n"
        "  expert, the figures (coactivation.png too) and, with --esft, the scores moe\n"
        "  experts wrote to ESFT.csv.\n");
}

int route_main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        print_route_help();
        return argc < 2 ? 2 : 0;
    }
    static RouteRun rr;
    RouteArgs a;
    parse_route_args(&a, argc, argv);
    rr.args = &a;
    char ckpt[KEY_STRING_MAX], out[RUN_PATH_MAX];
    run_resolve_checkpoint(a.ckpt, ckpt, sizeof ckpt);
    rr.rc = CALLOC(1, sizeof *rr.rc);
    run_load_checkpoint_config(rr.rc, ckpt, a.n_words, a.words);
    if (a.n_data) use_data_args(rr.rc, &a);
    run_model_from_checkpoint(&rr.m, rr.rc, ckpt, (size_t)rr.rc->train.batch_size);
    model_clear_noise(&rr.m);
    routes_init(&rr.ra, &rr.m);
    if (a.compare) open_other(&rr, a.compare);
    rr.dl = run_open_data(rr.rc, &rr.m, (uint64_t)rr.rc->train.seed);
    rr.tok = run_open_tokenizer(rr.rc);
    char dir[KEY_STRING_MAX];
    snprintf(dir, sizeof dir, "%s", ckpt);
    if (a.out)
        snprintf(out, sizeof out, "%s", a.out);
    else
        snprintf(out, sizeof out, "%s/route", dirname(dir));
    make_dir(out);
    int D = data_loader_domains(rr.dl), L = rr.m.n_moe;
    counts_init(&rr.c, D, L, rr.rc->model.experts);
    rr.layer_ids = CALLOC((size_t)L, sizeof *rr.layer_ids);
    for (int l = 0; l < L; l++) rr.layer_ids[l] = rr.m.moe[l].layer;
    route_page_init(&rr.page, L, rr.rc->model.experts, rr.layer_ids, rr.rc->model.vocab);
    if (a.esft) route_page_read_esft(&rr.page, a.esft);
    rr.sat = CALLOC((size_t)(D + 1) * (L + 1), sizeof *rr.sat);
    rr.dump = open_out(out, "tokens.csv");
    fputs("domain,offset,position,token,char,layer,experts,gates,kept\n", rr.dump);
    printf("route: %s on", ckpt);
    for (int d = 0; d < D; d++) {
        route_domain(&rr, d);
        printf(" %s (%llu tokens)", data_loader_domain_name(rr.dl, d),
               (unsigned long long)rr.c.tokens[d]);
    }
    printf("\n");
    close_out(rr.dump, out, "tokens.csv");
    print_usage(&rr);
    write_usage(&rr, out);
    write_coactivation(&rr, out);
    if (rr.compare) write_saturation(&rr, out);
    char why[RUN_FILE_MAX + 512];
    render_figures(&rr, out, why, sizeof why);
    write_page(&rr, out, why);
    printf("route: wrote %s/route.html, usage.csv, tokens.csv, coactivation.csv%s, usage.gp\n",
           out, rr.compare ? ", saturation.csv" : "");
    route_page_free(&rr.page);
    free(rr.layer_ids);
    free(rr.sat);
    counts_free(&rr.c);
    routes_free(&rr.ra);
    if (rr.compare) {
        routes_free(&rr.rb);
        model_free(&rr.other);
    }
    tokenizer_free(rr.tok);
    data_loader_close(rr.dl);
    model_free(&rr.m);
    free(rr.rc);
    return 0;
}
