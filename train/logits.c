#include "logits.h"

#include <stdlib.h>

#include "../base/util.h"
#include "formats/h5io.h"

void logits_dump(const char *path, Model *m, const DataLoader *dl) {
    if (data_loader_val_batches(dl, 0) == 0)
        FAIL("domain %s has no validation batch to dump", data_loader_domain_name(dl, 0));
    int32_t *tok = CALLOC(2 * m->N, sizeof *tok);   // a short batch's missing rows stay 0
    size_t rows = data_loader_val_batch(dl, 0, 0, tok, tok + m->N);
    model_clear_noise(m);
    model_set_batch(m, tok, tok + m->N);
    model_forward(m);
    size_t n = rows * m->T, V = (size_t)m->cfg.vocab;
    real *logits = CALLOC(n * V, sizeof *logits);
    m->be->download(logits, m->logits.v, n * V * sizeof *logits);
    hid_t f = h5io_create(path);
    hsize_t bt[2] = {rows, m->T}, nv[2] = {n, V};
    h5io_write_i32(f, "/tokens", tok, 2, bt);
    h5io_write_i32(f, "/targets", tok + m->N, 2, bt);
    h5io_write_real(f, "/logits", logits, 2, nv);
    h5io_close(f);
    printf("logits of %zu x %zu tokens of %s written to %s\n", rows, m->T,
           data_loader_domain_name(dl, 0), path);
    free(logits);
    free(tok);
}
