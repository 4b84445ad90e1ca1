// Fuzz target: the sample prompt (train/sample.c), the text `moe sample --prompt` and
// train.sample_prompt hand to a byte-level model. The first input byte picks greedy or
// temperature sampling and the number of tokens; the rest, up to a NUL, is the prompt.
#include <stdlib.h>
#include <string.h>

#include "../../train/config.h"
#include "../../train/sample.h"
#include "fuzzlib.h"

static RunConfig rc;
static Model model;

// Byte-level (vocab 256, what sampling requires) and as small as a model gets, with a
// context of 4 so that prompts longer than it slide the window.
int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    run_config_defaults(&rc);
    ModelConfig *c = &rc.model;
    fuzz_tiny_model(c);
    c->seq_len = 4;
    model_init(&model, c, backend_cpu(), 1, 4);
    model_init_weights(&model, 1);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size == 0) return 0;
    int tokens = data[0] % 4;
    double temperature = data[0] & 4 ? 0.8 : 0.0;
    char *prompt = malloc(size);
    memcpy(prompt, data + 1, size - 1);
    prompt[size - 1] = '\0';
    char err[256];
    char *text = sample_text(&model, NULL, prompt, tokens, temperature, 1.0, 1, err, sizeof err);
    if (!text) abort();   // a finding: bytes always encode
    free(text);
    free(prompt);
    return 0;
}
