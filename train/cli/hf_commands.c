// hf_commands.c: `moe export` and `moe import` around formats/hf.h: their arguments, the
// checkpoint read or written, and the summary line.
#include "hf_commands.h"

#include <errno.h>
#include <inttypes.h>
#include <libgen.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../base/util.h"
#include "../formats/checkpoint.h"
#include "../formats/hf.h"
#include "../run.h"

typedef struct {
    const char *ckpt, *dir;
    StDType dtype;
    uint64_t shard_size;
    int force;   // replace an earlier export in a non-empty DIR
} ExportArgs;

static void parse_export_args(ExportArgs *a, int argc, char **argv) {
    *a = (ExportArgs){argv[1], argv[2], ST_F32, HF_SHARD_DEFAULT, 0};
    for (int i = 3; i < argc; i++) {
        if (!strcmp(argv[i], "--force")) {
            a->force = 1;
            continue;
        }
        if (i + 1 >= argc) FAIL("%s needs a value (moe export --help)", argv[i]);
        const char *f = argv[i], *v = argv[++i];
        if (!strcmp(f, "--dtype") && !strcmp(v, "f32")) a->dtype = ST_F32;
        else if (!strcmp(f, "--dtype") && !strcmp(v, "bf16")) a->dtype = ST_BF16;
        else if (!strcmp(f, "--dtype")) FAIL("--dtype %s: expected f32 or bf16", v);
        else if (!strcmp(f, "--shard-size")) {
            char *end;
            errno = 0;
            a->shard_size = strtoull(v, &end, 10);
            if (end == v || *end || errno || a->shard_size == 0 || v[0] == '-')
                FAIL("--shard-size %s: expected a positive number of bytes", v);
        } else FAIL("unknown option %s (moe export --help lists them)", f);
    }
}

static void load_exportable(Model *m, RunConfig *rc, const char *ckpt) {
    char err[1024], why[256];
    uint64_t base;
    if (ckpt_read_base_fingerprint(ckpt, &base, err, sizeof err) != 0) FAIL("%s", err);
    if (base) FAIL("%s is a delta checkpoint: moe merge it onto its base, then export that", ckpt);
    run_load_checkpoint_config(rc, ckpt, 0, NULL);
    if (hf_export_check(&rc->model, why, sizeof why))
        FAIL("%s: cannot export as %s: %s", ckpt, hf_family_name(hf_family_of(&rc->model)),
             why);
    if (rc->model.capacity_factor > 0)
        fprintf(stderr, "moe: warning: router.capacity_factor = %g is not exported: %s "
                "routes every token (dropless)\n", rc->model.capacity_factor,
                hf_family_name(hf_family_of(&rc->model)));
    model_init(m, &rc->model, backend_cpu(), 1, 1);   // weights only: the smallest batch
    if (ckpt_load(ckpt, m, NULL, NULL, err, sizeof err) != 0) FAIL("%s", err);
}

// tokenizer_config.json for transformers' AutoTokenizer: the fast tokenizer straight from
// tokenizer.json, or the SentencePiece LlamaTokenizer over tokenizer.model with nothing
// added around the text (moe.c adds no BOS or EOS either); legacy = false, or its fast
// conversion puts a word-start mark after every special token, which libsentencepiece
// does not (tests/test_tokenizer.py compares the ids). No clean-up of spaces on decode:
// transformers before 4.45 drops the space before punctuation by default, and its text
// would no longer be what moe sample prints.
static const char *const tokenizer_configs[] = {
    [TOKENIZER_HF_BPE] = "{\n  \"tokenizer_class\": \"PreTrainedTokenizerFast\",\n"
                         "  \"clean_up_tokenization_spaces\": false,\n"
                         "  \"model_max_length\": %d\n}\n",
    [TOKENIZER_SENTENCEPIECE] = "{\n  \"tokenizer_class\": \"LlamaTokenizer\",\n"
                                "  \"add_bos_token\": false,\n  \"add_eos_token\": false,\n"
                                "  \"clean_up_tokenization_spaces\": false,\n"
                                "  \"legacy\": false,\n  \"model_max_length\": %d\n}\n",
};

// The checkpoint's tokenizer file and a tokenizer_config.json into dir (force: over an
// earlier export's); nothing for bytes.
static void export_tokenizer(RunConfig *rc, const char *dir, int force) {
    int kind = rc->data.tokenizer;
    if (kind == TOKENIZER_BYTES) return;
    char path[RUN_FILE_MAX], tmp[RUN_FILE_MAX + 8];
    snprintf(path, sizeof path, "%s/%s", dir, run_tokenizer_name(kind));
    if (force && remove(path) != 0 && errno != ENOENT)
        FAIL("%s: cannot replace: %s", path, strerror(errno));
    run_save_tokenizer(rc, dir);
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    FILE *f = run_create_file(path, tmp, sizeof tmp);
    fprintf(f, tokenizer_configs[kind], rc->model.seq_len);
    run_commit_file(f, tmp, path);
}

// `moe export CKPT DIR [--dtype f32|bf16] [--shard-size BYTES]`
int export_main(int argc, char **argv) {
    int help = argc > 1 && !strcmp(argv[1], "--help");
    if (argc < 3 || help) {
        printf("usage: moe export CHECKPOINT DIR [--dtype f32|bf16] [--shard-size BYTES] "
               "[--force]\n"
               "  Writes DIR/config.json and DIR/model.safetensors (shards and\n"
               "  model.safetensors.index.json past --shard-size, default 5000000000) for\n"
               "  transformers' MixtralForCausalLM, or OlmoeForCausalLM (model.qk_norm =\n"
               "  full), Qwen3MoeForCausalLM (qk_norm = head) or Qwen2MoeForCausalLM\n"
               "  (qkv_bias, a gated shared expert). bf16 rounds to nearest even. DIR must\n"
               "  be empty or new; --force replaces an earlier export in it (its\n"
               "  config.json, model*.safetensors and index) and keeps other files.\n"
               "  A checkpoint with a tokenizer (data.tokenizer) adds its tokenizer.json or\n"
               "  tokenizer.model and a tokenizer_config.json for AutoTokenizer.\n");
        return help ? 0 : 2;
    }
    ExportArgs a;
    parse_export_args(&a, argc, argv);
    char ckpt[KEY_STRING_MAX];
    run_resolve_checkpoint(a.ckpt, ckpt, sizeof ckpt);
    RunConfig rc;
    Model m;
    load_exportable(&m, &rc, ckpt);
    uint64_t bytes;
    size_t files = hf_export_write(a.dir, &m, rc.data.eos_id, a.dtype, a.shard_size, a.force, &bytes);
    export_tokenizer(&rc, a.dir, a.force);
    printf("exported %s -> %s: %zu tensors, %" PRIu64 " bytes of %s in %zu file%s\n", ckpt,
           a.dir, m.layout.n_params, bytes, safetensors_dtype_name(a.dtype), files,
           files == 1 ? "" : "s");
    model_free(&m);
    return 0;
}

static long parse_seq_len(int argc, char **argv) {
    if (argc == 3) return 0;
    if (argc != 5 || strcmp(argv[3], "--seq-len"))
        FAIL("import: expected HF_DIR OUT.h5 [--seq-len N]");
    return (long)util_arg_number(argv[3], argv[4], 1, 1 << 20, 1);
}

// An HF directory's tokenizer into rc and beside the checkpoint out: tokenizer.model
// (SentencePiece: Mixtral, Llama-2; their tokenizer.json is not byte-level) before
// tokenizer.json (byte-level BPE: OLMoE, Qwen, Llama-3). Neither: bytes stay.
static void import_tokenizer(RunConfig *rc, const char *hf_dir, const char *out) {
    static const struct { const char *name; int kind; } files[] = {
        {"tokenizer.model", TOKENIZER_SENTENCEPIECE}, {"tokenizer.json", TOKENIZER_HF_BPE}};
    for (size_t i = 0; i < 2; i++) {
        char path[RUN_FILE_MAX];
        snprintf(path, sizeof path, "%s/%s", hf_dir, files[i].name);
        FILE *f = fopen(path, "rb");
        if (!f) continue;
        fclose(f);
        rc->data.tokenizer = files[i].kind;
        snprintf(rc->data.tokenizer_file, sizeof rc->data.tokenizer_file, "%.*s",
                 (int)sizeof rc->data.tokenizer_file - 1, path);
        tokenizer_free(run_open_tokenizer(rc));
        char dir[RUN_FILE_MAX];
        snprintf(dir, sizeof dir, "%s", out);
        run_save_tokenizer(rc, dirname(dir));
        return;
    }
}

// `moe import HF_DIR OUT.h5 [--seq-len N]`
int import_main(int argc, char **argv) {
    int help = argc > 1 && !strcmp(argv[1], "--help");
    if (argc < 3 || help) {
        printf("usage: moe import HF_DIR OUT.h5 [--seq-len N]\n"
               "  Reads a transformers Mixtral, OLMoE, Qwen2-MoE or Qwen3-MoE directory\n"
               "  (config.json, model.safetensors or\n"
               "  its shards; F32, BF16 or F16) into a checkpoint for moe finetune.\n"
               "  model.seq_len is max_position_embeddings unless --seq-len N is given.\n"
               "  Its tokenizer.model (SentencePiece) or else tokenizer.json (byte-level BPE)\n"
               "  is copied beside OUT.h5 and becomes the checkpoint's data.tokenizer.\n");
        return help ? 0 : 2;
    }
    long seq_len = parse_seq_len(argc, argv);
    RunConfig rc;
    Model m;
    hf_import_read(argv[1], seq_len, &rc, &m);
    import_tokenizer(&rc, argv[1], argv[2]);
    TrainState st = {0};
    st.best_val = INFINITY;
    char err[1024];
    if (ckpt_save(argv[2], &rc, &m, NULL, &st, NULL, 0, err, sizeof err) != 0) FAIL("%s", err);
    printf("imported %s -> %s: %zu tensors, %zu parameters, vocab %d, seq_len %d\n", argv[1],
           argv[2], m.layout.n_params, m.layout.total, rc.model.vocab, rc.model.seq_len);
    if (rc.data.tokenizer != TOKENIZER_BYTES)
        printf("tokenizer: %s (data.tokenizer = %s)\n", rc.data.tokenizer_file,
               rc.data.tokenizer == TOKENIZER_HF_BPE ? "hf-bpe" : "sentencepiece");
    model_free(&m);
    return 0;
}
