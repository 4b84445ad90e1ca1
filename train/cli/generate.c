// generate.c: `moe sample`: a checkpoint continues one prompt or a batch of them through
// its KV cache (train/sample.h), with temperature, top-k, top-p, stop strings and EOS.
#include "commands.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../base/util.h"
#include "../formats/checkpoint.h"
#include "../run.h"
#include "../sample.h"

// Every prompt and stop string is a copy, freed with the arguments.
typedef struct {
    const char **prompts;   // n_prompts (the default "The " until one is given)
    int n_prompts;
    const char **stops;
    int n_stops;
    int32_t *eos;           // n_eos ids from --eos, replacing data.eos_id; NULL: that key
    int n_eos;
    int threads;
    SampleOptions o;
} SampleArgs;

// Appends a copy of s (len bytes) to list.
static void push_str(const char ***list, int *n, const char *s, size_t len) {
    *list = realloc(*list, (size_t)(*n + 1) * sizeof **list);
    CHECK(*list, "out of memory");
    char *copy = CALLOC(len + 1, 1);
    memcpy(copy, s, len);
    (*list)[(*n)++] = copy;
}

static void free_strs(const char **list, int n) {
    for (int i = 0; i < n; i++)
        free((char *)list[i]);
    free(list);
}

// A stop string with \n, \t and \\ read as the characters they name (a shell word cannot
// easily hold a newline), appended to a's stops.
static void push_stop(SampleArgs *a, const char *s) {
    char *out = CALLOC(strlen(s) + 1, 1), *o = out;
    for (; *s; s++) {
        if (*s == '\\' && (s[1] == 'n' || s[1] == 't' || s[1] == '\\')) {
            s++;
            *o++ = *s == 'n' ? '\n' : *s == 't' ? '\t' : '\\';
        } else {
            *o++ = *s;
        }
    }
    if (!out[0]) FAIL("--stop: an empty stop string would stop before the first token");
    push_str(&a->stops, &a->n_stops, out, strlen(out));
    free(out);
}

// Every line of path (without its newline; empty lines skipped) as a prompt.
static void read_prompts(SampleArgs *a, const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) FAIL("--prompts %s: cannot read", path);
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    while ((len = getline(&line, &cap, f)) >= 0) {
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r')) line[--len] = '\0';
        if (len > 0) push_str(&a->prompts, &a->n_prompts, line, (size_t)len);
    }
    free(line);
    fclose(f);
    if (a->n_prompts == 0) FAIL("--prompts %s: no prompt in it (one per line)", path);
}

static void parse_sample_args(SampleArgs *a, int argc, char **argv) {
    memset(a, 0, sizeof *a);
    a->o = (SampleOptions){.tokens = 240, .pick = {0.8, 0, 0.95}, .seed = 1337};
    for (int i = 2; i < argc; i++) {
        if (i + 1 >= argc) FAIL("%s needs a value", argv[i]);
        const char *f = argv[i], *v = argv[++i];
        if (!strcmp(f, "--prompt")) push_str(&a->prompts, &a->n_prompts, v, strlen(v));
        else if (!strcmp(f, "--prompts")) read_prompts(a, v);
        else if (!strcmp(f, "--tokens")) a->o.tokens = (int)util_arg_number(f, v, 0, 1 << 20, 1);
        else if (!strcmp(f, "--temperature"))
            a->o.pick.temperature = util_arg_number(f, v, 0, 100, 0);
        else if (!strcmp(f, "--top-p")) a->o.pick.top_p = util_arg_number(f, v, 1e-9, 1, 0);
        else if (!strcmp(f, "--top-k")) a->o.pick.top_k = (int)util_arg_number(f, v, 0, 1e9, 1);
        else if (!strcmp(f, "--seed"))
            a->o.seed = (unsigned long long)util_arg_number(f, v, 0, 1e18, 1);
        else if (!strcmp(f, "--stop")) push_stop(a, v);
        else if (!strcmp(f, "--eos")) {
            a->eos = realloc(a->eos, (size_t)(a->n_eos + 1) * sizeof *a->eos);
            CHECK(a->eos, "out of memory");
            a->eos[a->n_eos++] = (int32_t)util_arg_number(f, v, -1, 2147483647, 1);
        } else if (!strcmp(f, "--threads")) a->threads = (int)util_arg_number(f, v, 1, 4096, 1);
        else if (!strcmp(f, "--dump-logits")) a->o.dump = v;
        else FAIL("unknown option %s (moe sample --help lists them)", f);
    }
    if (a->n_prompts == 0) push_str(&a->prompts, &a->n_prompts, "The ", 4);
}

static void sample_args_free(SampleArgs *a) {
    free_strs(a->prompts, a->n_prompts);
    free_strs(a->stops, a->n_stops);
    free(a->eos);
}

// The EOS ids: --eos (-1 among them: none at all), else data.eos_id when set.
static void resolve_eos(SampleArgs *a, const RunConfig *rc, const char *ckpt) {
    if (!a->eos && rc->data.eos_id >= 0) {
        a->eos = CALLOC(1, sizeof *a->eos);
        a->eos[a->n_eos++] = rc->data.eos_id;
    }
    for (int i = 0; i < a->n_eos; i++) {
        if (a->eos[i] < 0) a->n_eos = 0;
        else if (a->eos[i] >= rc->model.vocab)
            FAIL("--eos %d (or data.eos_id of %s): not below model.vocab = %d", a->eos[i], ckpt,
                 rc->model.vocab);
    }
    a->o.eos = a->eos;
    a->o.n_eos = a->n_eos;
}

static const char USAGE[] =
    "usage: moe sample CHECKPOINT [--prompt TEXT]... [--prompts FILE] [--tokens 240]\n"
    "                  [--temperature 0.8] [--top-k 0] [--top-p 0.95] [--seed 1337]\n"
    "                  [--stop TEXT]... [--eos ID]... [--threads N] [--dump-logits FILE]\n"
    "  Continues each prompt by up to --tokens tokens, encoded and decoded with the\n"
    "  checkpoint's tokenizer, all prompts in one batch through a KV cache.\n"
    "  --prompt TEXT (repeatable) and --prompts FILE (one per line) give the prompts.\n"
    "  --temperature 0: greedy; else temperature, then the --top-k most probable tokens\n"
    "  (0: all), then the fewest of those reaching --top-p of their probability.\n"
    "  --stop TEXT (repeatable; \\n, \\t, \\\\ escapes): the continuation ends before it.\n"
    "  --eos ID (repeatable; -1: none): ids that end a sequence, instead of data.eos_id.\n"
    "  --seed S: prompt i samples with seed S + i. --threads N: OpenMP threads.\n"
    "  --dump-logits FILE: every prompt's ids and the cached decode's logits (HDF5).\n"
    "  Several prompts print as '=== i/n ===' blocks; one prints its text alone.\n";

int sample_main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help")) {
        fputs(USAGE, stdout);
        return argc < 2 ? 2 : 0;
    }
    SampleArgs a;
    parse_sample_args(&a, argc, argv);
    char ckpt[KEY_STRING_MAX];
    run_resolve_checkpoint(argv[1], ckpt, sizeof ckpt);
    RunConfig rc;
    run_load_checkpoint_config(&rc, ckpt, 0, NULL);
    if (rc.data.tokenizer == TOKENIZER_BYTES && rc.model.vocab != 256)
        FAIL("%s: vocab %d with the bytes tokenizer (data.tokenizer): its ids above 255 "
             "have no text\nHINT: moe import picks up an HF directory's tokenizer", ckpt,
             rc.model.vocab);
    resolve_eos(&a, &rc, ckpt);
    rc.train.threads = a.threads;
    run_set_threads(&rc.train);
    a.o.stops = a.stops;
    a.o.n_stops = a.n_stops;
    Tokenizer *tok = run_open_tokenizer(&rc);
    // The weights only (one row of one token: no window of activations); sample_batch
    // copies them into its decode model.
    Model m;
    char err[1024];
    model_init(&m, &rc.model, backend_cpu(), 1, 1);
    if (ckpt_load(ckpt, &m, NULL, NULL, err, sizeof err) != 0) FAIL("%s", err);
    char **texts = CALLOC((size_t)a.n_prompts, sizeof *texts);
    if (sample_batch(&m, tok, a.prompts, a.n_prompts, &a.o, texts, err, sizeof err) != 0)
        FAIL("--prompt: %s", err);
    for (int i = 0; i < a.n_prompts; i++) {
        if (a.n_prompts > 1) printf("=== %d/%d ===\n", i + 1, a.n_prompts);
        printf("%s\n", texts[i]);
        free(texts[i]);
    }
    free(texts);
    tokenizer_free(tok);
    model_free(&m);
    sample_args_free(&a);
    return 0;
}
