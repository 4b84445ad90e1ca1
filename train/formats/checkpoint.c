#include "checkpoint.h"

#include <errno.h>
#include <fcntl.h>
#include <hdf5.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../../base/util.h"

// A chunk (after the filter appends its checksum) must stay below 4 GiB; 1 GiB also
// bounds the temporary buffer HDF5 allocates to run the filter over one chunk.
#define CHUNK_MAX_BYTES ((hsize_t)1 << 30)
#define ATTR_MAX (KEY_STRING_MAX + 64)
#define DSET_PATH_MAX 192

// One open checkpoint and where its errors go. Every message starts with `path`, the
// name the user gave (never the temporary name).
typedef struct {
    hid_t file;
    const char *path;
    char *err;
    size_t n;
} Ckpt;

static int ckpt_fail(Ckpt *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static int ckpt_fail(Ckpt *c, const char *fmt, ...) {
    int used = snprintf(c->err, c->n, "%s: ", c->path);
    if (used >= 0 && (size_t)used < c->n) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(c->err + used, c->n - (size_t)used, fmt, ap);
        va_end(ap);
    }
    return -1;
}

// HDF5 prints its whole error stack by default; we report one line of our own instead,
// and give the caller's printing back afterwards.
typedef struct {
    H5E_auto2_t fn;
    void *data;
} Quiet;

static Quiet hdf5_quiet(void) {
    Quiet q;
    H5Eget_auto2(H5E_DEFAULT, &q.fn, &q.data);
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    return q;
}

static void hdf5_restore(Quiet q) { H5Eset_auto2(H5E_DEFAULT, q.fn, q.data); }

// Host buffers hold whatever the backend's tensors hold (float in moe, double in the
// fp64 test build); HDF5 converts to and from the file's float32.
static hid_t mem_type(DType dt) {
    CHECK(dt == DTYPE_F32 || dt == DTYPE_F64,
          "checkpoint: tensors must be f32 or f64 on the host");
    return dt == DTYPE_F32 ? H5T_NATIVE_FLOAT : H5T_NATIVE_DOUBLE;
}

// HF name -> checkpoint path: drop ".weight" and "model.", name the router's tensors
// router/*, let experts hang directly under the layer, and turn dots into groups; a
// projection's ".bias" becomes "_bias" beside its weight (q_proj is a dataset).
void ckpt_param_path(const ParamInfo *p, char *out, size_t len) {
    char name[sizeof p->name];
    snprintf(name, sizeof name, "%s", p->name);
    size_t n = strlen(name);
    if (n > 7 && !strcmp(name + n - 7, ".weight")) name[n - 7] = '\0';
    if (n > 5 && !strcmp(name + n - 5, ".bias")) name[n - 5] = '_';
    const char *rest = strncmp(name, "model.", 6) ? name : name + 6;
    char mapped[sizeof p->name];
    const char *moe = strstr(rest, "block_sparse_moe.");
    if (moe) {
        const char *after = moe + strlen("block_sparse_moe.");
        int router = !strncmp(after, "gate", 4) || !strncmp(after, "noise", 5);
        snprintf(mapped, sizeof mapped, "%.*s%s%s", (int)(moe - rest), rest,
                 router ? "router." : "", after);
    } else {
        snprintf(mapped, sizeof mapped, "%s", rest);
    }
    for (char *s = mapped; *s; s++)
        if (*s == '.') *s = '/';
    snprintf(out, len, "/model/%s", mapped);
}

// "/optim/m/layers/0/..." for the parameter at "/model/layers/0/...".
static void moment_path(const ParamInfo *p, const char *which, char *out, size_t len) {
    char param[sizeof p->name + 8];
    ckpt_param_path(p, param, sizeof param);
    snprintf(out, len, "/optim/%s%s", which, param + strlen("/model"));
}

// ---- writing ----------------------------------------------------------------------

// fletcher32 needs chunked storage: one chunk per dataset (row blocks when a tensor
// passes CHUNK_MAX_BYTES), read and checked in one piece.
static hid_t chunked_props(int rank, const hsize_t *dims, size_t elem_bytes) {
    hsize_t row_bytes = (rank == 2 ? dims[1] : 1) * elem_bytes;
    hsize_t chunk[2] = {dims[0], rank == 2 ? dims[1] : 1};
    if (chunk[0] * row_bytes > CHUNK_MAX_BYTES) chunk[0] = CHUNK_MAX_BYTES / row_bytes;
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    if (dcpl < 0) return -1;
    if (H5Pset_chunk(dcpl, rank, chunk) < 0 || H5Pset_fletcher32(dcpl) < 0) {
        H5Pclose(dcpl);
        return -1;
    }
    return dcpl;
}

// dims: rank (1 or 2) entries; groups on the way are created.
static int write_array(Ckpt *c, const char *dpath, hid_t file_type, hid_t mtype,
                       const void *data, int rank, const hsize_t *dims) {
    hid_t space = H5Screate_simple(rank, dims, NULL);
    hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
    hid_t dcpl = chunked_props(rank, dims, H5Tget_size(file_type));
    hid_t ds = -1;
    int ok =
        space >= 0 && lcpl >= 0 && dcpl >= 0 && H5Pset_create_intermediate_group(lcpl, 1) >= 0;
    if (ok) ds = H5Dcreate2(c->file, dpath, file_type, space, lcpl, dcpl, H5P_DEFAULT);
    ok = ok && ds >= 0 && H5Dwrite(ds, mtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) >= 0;
    if (ds >= 0) H5Dclose(ds);
    if (dcpl >= 0) H5Pclose(dcpl);
    if (lcpl >= 0) H5Pclose(lcpl);
    if (space >= 0) H5Sclose(space);
    return ok ? 0 : ckpt_fail(c, "cannot write %s", dpath);
}

static int write_attr(Ckpt *c, hid_t obj, const char *name, hid_t file_type, hid_t mtype,
                      const void *value) {
    hid_t space = H5Screate(H5S_SCALAR);
    hid_t a =
        space >= 0 ? H5Acreate2(obj, name, file_type, space, H5P_DEFAULT, H5P_DEFAULT) : -1;
    int ok = a >= 0 && H5Awrite(a, mtype, value) >= 0;
    if (a >= 0) H5Aclose(a);
    if (space >= 0) H5Sclose(space);
    return ok ? 0 : ckpt_fail(c, "cannot write attribute %s", name);
}

// Fixed-length, NUL-terminated ASCII, like h5io's attributes (h5py reads bytes).
static int write_str_attr(Ckpt *c, hid_t obj, const char *name, const char *value) {
    hid_t type = H5Tcopy(H5T_C_S1);
    if (type < 0 || H5Tset_size(type, strlen(value) + 1) < 0) {
        if (type >= 0) H5Tclose(type);
        return ckpt_fail(c, "cannot write attribute %s", name);
    }
    int r = write_attr(c, obj, name, type, type, value);
    H5Tclose(type);
    return r;
}

static int write_root(Ckpt *c, const TrainState *st, const char *kind, uint64_t base) {
    int32_t version = CKPT_VERSION;
    int64_t step = st ? st->step : 0;
    uint64_t tokens = st ? st->tokens_seen : 0, run_id = st ? st->run_id : 0;
    hid_t root = c->file;
    if (write_str_attr(c, root, "format", CKPT_FORMAT) ||
        write_attr(c, root, "version", H5T_STD_I32LE, H5T_NATIVE_INT32, &version) ||
        write_attr(c, root, "step", H5T_STD_I64LE, H5T_NATIVE_INT64, &step) ||
        write_attr(c, root, "tokens_seen", H5T_STD_U64LE, H5T_NATIVE_UINT64, &tokens) ||
        write_str_attr(c, root, "kind", kind) ||
        write_attr(c, root, "base_fingerprint", H5T_STD_U64LE, H5T_NATIVE_UINT64, &base) ||
        write_attr(c, root, "run_id", H5T_STD_U64LE, H5T_NATIVE_UINT64, &run_id))
        return -1;
    return 0;
}

// Attribute creation order is tracked so that reading replays the keys in the order
// they were written: domains are created in that order, and their order is the run's.
static int write_config(Ckpt *c, RunConfig *rc) {
    hid_t gcpl = H5Pcreate(H5P_GROUP_CREATE);
    hid_t g = -1;
    if (gcpl >= 0 && H5Pset_attr_creation_order(gcpl, H5P_CRT_ORDER_TRACKED) >= 0)
        g = H5Gcreate2(c->file, "/config", H5P_DEFAULT, gcpl, H5P_DEFAULT);
    if (gcpl >= 0) H5Pclose(gcpl);
    if (g < 0) return ckpt_fail(c, "cannot create /config");
    KeySection s[RUN_CONFIG_MAX_SECTIONS];
    int n = run_config_sections(rc, s), r = 0;
    char name[160], value[ATTR_MAX];
    for (int i = 0; i < n && !r; i++) {
        for (size_t j = 0; j < s[i].n_keys && !r; j++) {
            snprintf(name, sizeof name, "%s.%s", s[i].section, s[i].keys[j].name);
            keys_format(&s[i], &s[i].keys[j], value, sizeof value);
            r = write_str_attr(c, g, name, value);
        }
    }
    H5Gclose(g);
    return r;
}

static double value_at(const void *data, DType dt, size_t i) {
    return dt == DTYPE_F64 ? ((const double *)data)[i] : ((const float *)data)[i];
}

// Index of the first non-finite value of a host array of dt, or n when all are finite.
static size_t first_nonfinite(const void *data, DType dt, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(value_at(data, dt, i))) return i;
    return n;
}

// A NaN or infinity in a checkpoint poisons every run that starts from it.
static int check_finite(Ckpt *c, const char *what, const char *dpath, const void *data,
                        DType dt, size_t n) {
    size_t i = first_nonfinite(data, dt, n);
    if (i == n) return 0;
    return ckpt_fail(c, "%s %s holds a non-finite value (%g at index %zu)", what, dpath,
                     value_at(data, dt, i), i);
}

static int write_tensor(Ckpt *c, const char *dpath, const ParamInfo *p, hid_t mtype,
                        const void *data) {
    hsize_t dims[2] = {p->rows, p->cols};
    return write_array(c, dpath, H5T_IEEE_F32LE, mtype, data, p->cols ? 2 : 1, dims);
}

static int write_model(Ckpt *c, const Model *m, const uint8_t *include) {
    size_t esize = dtype_size(m->params.dtype);
    char *host = CALLOC(m->layout.total, esize);
    m->be->download(host, m->params, m->layout.total * esize);
    char dpath[DSET_PATH_MAX];
    int r = 0;
    for (size_t i = 0; i < m->layout.n_params && !r; i++) {
        const ParamInfo *p = &m->layout.params[i];
        if (include && !include[i]) continue;
        ckpt_param_path(p, dpath, sizeof dpath);
        r = write_tensor(c, dpath, p, mem_type(m->params.dtype), host + p->offset * esize);
    }
    free(host);
    return r;
}

// DeepSeek-V3 expert bias: state, not a parameter, so it has no ParamInfo; stored beside
// the router gate it belongs to. Delta checkpoints carry it when they carry the gate.
static void bias_path(const Model *m, int moe_layer, char *out, size_t len) {
    snprintf(out, len, "/model/layers/%d/router/expert_bias", m->moe[moe_layer].layer);
}

static int has_bias(const Model *m) { return model_config_has_bias(&m->cfg) && m->n_moe > 0; }

static int gate_included(const Model *m, int moe_layer, const uint8_t *include) {
    char name[96];
    snprintf(name, sizeof name, "model.layers.%d.block_sparse_moe.gate.weight",
             m->moe[moe_layer].layer);
    const ParamInfo *p = layout_find(&m->layout, name);
    return !include || (p && include[p - m->layout.params]);
}

static int write_bias(Ckpt *c, const Model *m, const uint8_t *include) {
    if (!has_bias(m)) return 0;
    size_t E = (size_t)m->cfg.experts, esize = dtype_size(m->expert_bias.dtype);
    char *host = CALLOC(E, esize), dpath[DSET_PATH_MAX];
    hsize_t dims[1] = {E};
    int r = 0;
    for (int l = 0; l < m->n_moe && !r; l++) {
        if (!gate_included(m, l, include)) continue;
        m->be->download(host, m->moe[l].bias, E * esize);
        bias_path(m, l, dpath, sizeof dpath);
        r = write_array(c, dpath, H5T_IEEE_F32LE, mem_type(m->expert_bias.dtype), host, 1, dims);
    }
    free(host);
    return r;
}

static int write_moment(Ckpt *c, const Model *m, const ParamInfo *p, Tensor t,
                        const char *which, void *scratch) {
    char dpath[DSET_PATH_MAX];
    moment_path(p, which, dpath, sizeof dpath);
    m->be->download(scratch, t, p->numel * dtype_size(t.dtype));
    return write_tensor(c, dpath, p, mem_type(t.dtype), scratch);
}

static int write_optim(Ckpt *c, const Model *m, const AdamW *opt, const uint8_t *include) {
    CHECK(opt->n_tensors == m->layout.n_params,
          "checkpoint: optimizer and model layouts differ");
    size_t largest = 0;
    for (size_t i = 0; i < m->layout.n_params; i++)
        if (m->layout.params[i].numel > largest) largest = m->layout.params[i].numel;
    void *scratch = CALLOC(largest, dtype_size(opt->m.dtype));
    int r = 0;
    for (size_t i = 0; i < m->layout.n_params && !r; i++) {
        const ParamInfo *p = &m->layout.params[i];
        Tensor mt = adamw_state_m(opt, i), vt = adamw_state_v(opt, i);
        if (!mt.data || (include && !include[i])) continue;
        r = write_moment(c, m, p, mt, "m", scratch) || write_moment(c, m, p, vt, "v", scratch);
    }
    free(scratch);
    return r;
}

// Scalars are 1-element arrays so that they too are chunked and checksummed.
static int write_state(Ckpt *c, const TrainState *st) {
    hsize_t four = 4, one = 1;
    int64_t step = st->step;
    double lr_scale = st->lr_scale > 0 ? st->lr_scale : 1.0;
    if (write_array(c, "/state/rng", H5T_STD_U64LE, H5T_NATIVE_UINT64, st->noise_rng.s, 1,
                    &four) ||
        write_array(c, "/state/step", H5T_STD_I64LE, H5T_NATIVE_INT64, &step, 1, &one) ||
        write_array(c, "/state/tokens_seen", H5T_STD_U64LE, H5T_NATIVE_UINT64, &st->tokens_seen,
                    1, &one) ||
        write_array(c, "/state/data_cursor", H5T_STD_U64LE, H5T_NATIVE_UINT64, &st->data_cursor,
                    1, &one) ||
        write_array(c, "/state/best_val", H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, &st->best_val, 1,
                    &one) ||
        write_array(c, "/state/lr_scale", H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, &lr_scale, 1, &one))
        return -1;
    return 0;
}

// Files stay readable by every HDF5 since 1.8. Not the 1.8 format itself (checksummed
// metadata): H5Fget_file_image leaves a stale superblock checksum in it (HDF5 1.10.8).
// STRONG close releases every object still open, which keeps the error paths simple.
static hid_t file_props(void) {
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
    if (fapl < 0) return -1;
    if (H5Pset_libver_bounds(fapl, H5F_LIBVER_EARLIEST, H5F_LIBVER_V18) < 0 ||
        H5Pset_fclose_degree(fapl, H5F_CLOSE_STRONG) < 0) {
        H5Pclose(fapl);
        return -1;
    }
    return fapl;
}

// The in-memory file grows by realloc in steps of this size (large blocks move by
// mremap, so the steps copy nothing).
#define IMAGE_INCREMENT ((size_t)16 << 20)

// The file is built in memory (HDF5's core driver, no backing store) and written by
// write_image: HDF5 cannot recover from a failed write (a file whose close failed
// crashes the library at exit, HDF5 1.10), and our own write can say why (disk full,
// quota). The price: about twice the file's size in host memory while saving.
static int build_image(Ckpt *c, const char *label, RunConfig *rc, const Model *m,
                       const AdamW *opt, const TrainState *st, const uint8_t *include,
                       uint64_t base, char **image, size_t *size) {
    hid_t fapl = file_props();
    if (fapl >= 0 && H5Pset_fapl_core(fapl, IMAGE_INCREMENT, 0) < 0) {
        H5Pclose(fapl);
        fapl = -1;
    }
    c->file = fapl >= 0 ? H5Fcreate(label, H5F_ACC_TRUNC, H5P_DEFAULT, fapl) : -1;
    if (fapl >= 0) H5Pclose(fapl);
    if (c->file < 0) return ckpt_fail(c, "cannot create an HDF5 file in memory");
    int r = write_root(c, st, include ? "delta" : "full", base) || write_config(c, rc) ||
            write_model(c, m, include) || write_bias(c, m, include) ||
            (opt && write_optim(c, m, opt, include)) ||
            (st && write_state(c, st));
    // The image holds only what was flushed.
    ssize_t n = -1;
    if (!r && H5Fflush(c->file, H5F_SCOPE_GLOBAL) >= 0) n = H5Fget_file_image(c->file, NULL, 0);
    if (n > 0) *image = CALLOC((size_t)n, 1);
    if (n > 0 && H5Fget_file_image(c->file, *image, (size_t)n) != n) n = -1;
    H5Fclose(c->file);
    c->file = -1;
    if (!r && n <= 0) r = ckpt_fail(c, "cannot serialise the HDF5 file in memory");
    *size = n > 0 ? (size_t)n : 0;
    return r ? -1 : 0;
}

static int write_image(Ckpt *c, int fd, const char *tmp, const char *image, size_t size) {
    for (size_t done = 0; done < size;) {
        ssize_t w = write(fd, image + done, size - done);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0) return ckpt_fail(c, "cannot write %s: %s", tmp, strerror(errno));
        done += (size_t)w;
    }
    if (fsync(fd) != 0) return ckpt_fail(c, "cannot sync %s: %s", tmp, strerror(errno));
    return 0;
}

static int sync_parent_dir(const char *path) {
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (!slash)
        snprintf(dir, sizeof dir, ".");
    else if (slash == dir)
        dir[1] = '\0';
    else
        *slash = '\0';
    int fd = open(dir, O_RDONLY | O_DIRECTORY);
    if (fd < 0) return -1;
    int r = fsync(fd);
    int saved = errno;
    close(fd);
    errno = saved;
    return r;
}

static int write_file(Ckpt *c, const char *tmp, RunConfig *rc, const Model *m, const AdamW *opt,
                      const TrainState *st, const uint8_t *include, uint64_t base) {
    // Opened first, so that an unwritable place fails before any work.
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return ckpt_fail(c, "cannot create %s: %s", tmp, strerror(errno));
    size_t size = 0;
    char *image = NULL;
    Quiet q = hdf5_quiet();
    int r = build_image(c, tmp, rc, m, opt, st, include, base, &image, &size);
    hdf5_restore(q);
    if (!r) r = write_image(c, fd, tmp, image, size);
    free(image);
    if (close(fd) != 0 && !r) r = ckpt_fail(c, "cannot write %s: %s", tmp, strerror(errno));
    return r;
}

int ckpt_save(const char *path, RunConfig *rc, const Model *m, const AdamW *opt,
              const TrainState *st, const uint8_t *include, uint64_t base_fingerprint,
              char *err, size_t n) {
    Ckpt c = {-1, path, err, n};
    char tmp[4096];
    if ((size_t)snprintf(tmp, sizeof tmp, "%s.tmp", path) >= sizeof tmp)
        return ckpt_fail(&c, "path too long");
    if (write_file(&c, tmp, rc, m, opt, st, include, base_fingerprint) != 0) {
        unlink(tmp); // never a directory that happens to hold the name
        return -1;
    }
    if (rename(tmp, path) != 0) {
        ckpt_fail(&c, "cannot rename %s over it: %s", tmp, strerror(errno));
        unlink(tmp);
        return -1;
    }
    // The new file is complete under its name; without this sync a crash could still
    // bring back the old directory entry.
    if (sync_parent_dir(path) != 0)
        return ckpt_fail(&c, "written, but its directory cannot be synced: %s",
                         strerror(errno));
    return 0;
}

// ---- reading ----------------------------------------------------------------------

// Opens an attribute holding one value: an edited file may hold arrays, which would
// overflow the buffers below.
static hid_t open_single_attr(hid_t obj, const char *name) {
    hid_t a = H5Aopen(obj, name, H5P_DEFAULT);
    if (a < 0) return -1;
    hid_t space = H5Aget_space(a);
    int single = space >= 0 && H5Sget_simple_extent_npoints(space) == 1;
    if (space >= 0) H5Sclose(space);
    if (!single) H5Aclose(a);
    return single ? a : -1;
}

// Reads a string attribute, fixed-length (ours) or variable-length (h5py's).
static int read_str_attr(hid_t obj, const char *name, char *out, size_t len) {
    hid_t a = open_single_attr(obj, name);
    if (a < 0) return -1;
    hid_t ftype = H5Aget_type(a);
    hid_t mtype = H5Tcopy(H5T_C_S1);
    // HDF5 converts between ASCII and UTF-8 strings no more than between strings and ints.
    int ok = ftype >= 0 && mtype >= 0 && H5Tget_class(ftype) == H5T_STRING &&
             H5Tset_cset(mtype, H5Tget_cset(ftype)) >= 0;
    if (ok && H5Tis_variable_str(ftype) > 0) {
        char *s = NULL;
        ok = H5Tset_size(mtype, H5T_VARIABLE) >= 0 && H5Aread(a, mtype, &s) >= 0;
        if (ok) snprintf(out, len, "%s", s ? s : "");
        H5free_memory(s);
    } else if (ok) {
        ok = H5Tset_size(mtype, len) >= 0 && H5Aread(a, mtype, out) >= 0;
        out[len - 1] = '\0';
    }
    if (mtype >= 0) H5Tclose(mtype);
    if (ftype >= 0) H5Tclose(ftype);
    H5Aclose(a);
    return ok ? 0 : -1;
}

static int read_num_attr(hid_t obj, const char *name, hid_t mtype, void *out) {
    hid_t a = open_single_attr(obj, name);
    if (a < 0) return -1;
    int ok = H5Aread(a, mtype, out) >= 0;
    H5Aclose(a);
    return ok ? 0 : -1;
}

// Opens `path` read-only into c->file and checks that it is a checkpoint this build reads.
static int open_checked(Ckpt *c) {
    struct stat sb;
    if (stat(c->path, &sb) != 0) return ckpt_fail(c, "cannot open: %s", strerror(errno));
    if (S_ISDIR(sb.st_mode)) return ckpt_fail(c, "is a directory, not a checkpoint file");
    hid_t fapl = file_props();
    c->file = fapl >= 0 ? H5Fopen(c->path, H5F_ACC_RDONLY, fapl) : -1;
    if (fapl >= 0) H5Pclose(fapl);
    if (c->file < 0) return ckpt_fail(c, "not a readable HDF5 file (truncated or corrupt?)");
    char text[ATTR_MAX];
    int64_t version;
    if (H5Aexists(c->file, "format") <= 0)
        return ckpt_fail(c, "not a %s checkpoint (no format attribute)", CKPT_FORMAT);
    if (read_str_attr(c->file, "format", text, sizeof text) != 0 || strcmp(text, CKPT_FORMAT))
        return ckpt_fail(c, "not a %s checkpoint (format attribute is not \"%s\")", CKPT_FORMAT,
                         CKPT_FORMAT);
    if (read_num_attr(c->file, "version", H5T_NATIVE_INT64, &version) != 0)
        return ckpt_fail(c, "no readable version attribute");
    if (version != CKPT_VERSION)
        return ckpt_fail(c, "format version %lld, this moe reads version %d",
                         (long long)version, CKPT_VERSION);
    if (read_str_attr(c->file, "kind", text, sizeof text) != 0 ||
        (strcmp(text, "full") && strcmp(text, "delta")))
        return ckpt_fail(c, "kind attribute must be \"full\" or \"delta\"");
    return 0;
}

static void close_file(Ckpt *c) {
    if (c->file >= 0) H5Fclose(c->file);
    c->file = -1;
}

static int is_delta(Ckpt *c) {
    char kind[16];
    return read_str_attr(c->file, "kind", kind, sizeof kind) == 0 && !strcmp(kind, "delta");
}

typedef struct {
    Ckpt *c;
    RunConfig *rc;
    int failed;
} ConfigReader;

// One /config attribute "section.key" as the override word "section.key=value"
// ("domain NAME.key" -> "domain.NAME.key", which creates the domain).
static herr_t config_attr(hid_t g, const char *name, const H5A_info_t *info, void *data) {
    (void)info;
    ConfigReader *r = data;
    char value[ATTR_MAX], word[2 * ATTR_MAX], inner[768];
    if (read_str_attr(g, name, value, sizeof value) != 0) {
        r->failed = ckpt_fail(r->c, "/config attribute '%s' is not a string", name);
        return 1;
    }
    snprintf(word, sizeof word, "%s=%s", name, value);
    if (!strncmp(word, "domain ", 7)) word[6] = '.';
    if (run_config_override(r->rc, word, inner, sizeof inner) != 0) {
        r->failed = ckpt_fail(r->c, "/config: %s", inner);
        return 1;
    }
    return 0;
}

static int read_config(Ckpt *c, RunConfig *rc) {
    if (open_checked(c) != 0) return -1;
    hid_t g = H5Gopen2(c->file, "/config", H5P_DEFAULT);
    if (g < 0) return ckpt_fail(c, "no /config group");
    ConfigReader r = {c, rc, 0};
    // Files written elsewhere (h5py) may not track creation order: name order then.
    herr_t it = H5Aiterate2(g, H5_INDEX_CRT_ORDER, H5_ITER_INC, NULL, config_attr, &r);
    if (it < 0 && !r.failed)
        it = H5Aiterate2(g, H5_INDEX_NAME, H5_ITER_INC, NULL, config_attr, &r);
    H5Gclose(g);
    if (r.failed) return -1;
    return it < 0 ? ckpt_fail(c, "cannot read /config") : 0;
}

int ckpt_read_config(const char *path, RunConfig *rc, char *err, size_t n) {
    Ckpt c = {-1, path, err, n};
    Quiet q = hdf5_quiet();
    int r = read_config(&c, rc);
    close_file(&c);
    hdf5_restore(q);
    return r;
}

// Training settings a fine-tune or a resumed run may change: they neither shape the
// weights nor define the architecture the weights were trained as.
static int is_training_setting(const char *name) {
    static const char *keys[] = {"model.init_std",    "router.capacity_factor",
                                 "router.drop_policy", "router.aux_coef",
                                 "router.z_coef",      "router.noise_coef",
                                 "router.jitter_eps", "router.aux_scope",
                                 "router.bias_gamma", "router.lb_type",
                                 "router.expert_bias"};
    for (size_t i = 0; i < sizeof keys / sizeof *keys; i++)
        if (!strcmp(name, keys[i])) return 1;
    return 0;
}

// Whether the stored /config routed with expert biases (bias_gamma > 0 or expert_bias).
static int stored_bias(Ckpt *c, hid_t config, int *on) {
    static const char *names[] = {"router.bias_gamma", "router.expert_bias"};
    char text[ATTR_MAX];
    *on = 0;
    for (int i = 0; i < 2; i++) {
        if (H5Aexists(config, names[i]) <= 0) continue;
        if (read_str_attr(config, names[i], text, sizeof text) != 0)
            return ckpt_fail(c, "/config attribute '%s' is not a string", names[i]);
        double v = 0;
        if (i == 0 && util_parse_number(text, 0, &v) != 0)
            return ckpt_fail(c, "/config attribute '%s' is not a number", names[i]);
        *on |= i == 0 ? v > 0 : !strcmp(text, "true");
    }
    return 0;
}

// router.bias_gamma and router.expert_bias may change between runs (the bias's update
// rate; whether it moves), but not both to off when the checkpoint was trained with
// biases: routing would leave them out, so the model would route otherwise than it was
// trained, silently. Refused instead.
static int check_bias_kept(Ckpt *c, hid_t config, const ModelConfig *cfg) {
    int on = 0;
    if (model_config_has_bias(cfg)) return 0;
    if (stored_bias(c, config, &on)) return -1;
    if (on)
        return ckpt_fail(c, "trained with expert biases steering its routing (router.bias_gamma "
                         "> 0 or router.expert_bias = true): this run would route without them; "
                         "keep router.bias_gamma > 0 (a small value barely moves the biases) or "
                         "set router.expert_bias = true (frozen biases)");
    return 0;
}

// The stored [model] and [router] keys, parsed, against cfg: keys the file lacks are
// taken to agree (a later version may add keys); training settings may differ.
static int check_model_config(Ckpt *c, const ModelConfig *cfg) {
    ModelConfig run = *cfg, stored = *cfg;
    KeySection rs[MODEL_CONFIG_SECTIONS], ss[MODEL_CONFIG_SECTIONS];
    model_config_sections(&run, rs);
    model_config_sections(&stored, ss);
    hid_t g = H5Gopen2(c->file, "/config", H5P_DEFAULT);
    if (g < 0) return ckpt_fail(c, "no /config group");
    char name[160], text[ATTR_MAX], want[ATTR_MAX], got[ATTR_MAX], inner[768];
    int r = 0;
    for (int s = 0; s < MODEL_CONFIG_SECTIONS && !r; s++) {
        for (size_t i = 0; i < ss[s].n_keys && !r; i++) {
            const ConfigKey *k = &ss[s].keys[i];
            snprintf(name, sizeof name, "%s.%s", ss[s].section, k->name);
            if (H5Aexists(g, name) <= 0 || is_training_setting(name)) continue;
            if (read_str_attr(g, name, text, sizeof text) != 0)
                r = ckpt_fail(c, "/config attribute '%s' is not a string", name);
            else if (keys_parse(&ss[s], k->name, text, inner, sizeof inner) != 0)
                r = ckpt_fail(c, "/config: %s", inner);
            if (r) break;
            keys_format(&ss[s], k, got, sizeof got);
            keys_format(&rs[s], &rs[s].keys[i], want, sizeof want);
            if (strcmp(got, want))
                r = ckpt_fail(c, "config mismatch: %s is %s in the checkpoint, %s in this run",
                              name, got, want);
        }
    }
    if (!r) r = check_bias_kept(c, g, cfg);
    H5Gclose(g);
    return r;
}

// True when every group on the way to dpath and dpath itself exist (H5Lexists alone
// fails on a missing intermediate group in HDF5 1.8).
static int path_exists(hid_t file, const char *dpath) {
    char part[DSET_PATH_MAX];
    for (const char *s = strchr(dpath + 1, '/');; s = strchr(s + 1, '/')) {
        size_t len = s ? (size_t)(s - dpath) : strlen(dpath);
        if (len >= sizeof part) return 0;
        memcpy(part, dpath, len);
        part[len] = '\0';
        if (H5Lexists(file, part, H5P_DEFAULT) <= 0) return 0;
        if (!s) return 1;
    }
}

static herr_t note_filter_error(unsigned n, const H5E_error2_t *e, void *data) {
    (void)n;
    if (e->maj_num == H5E_PLINE) *(int *)data = 1;
    return 0;
}

// moe.c writes every dataset chunked with a fletcher32 checksum, in one of four
// little-endian types. Anything else is refused before reading: HDF5 1.10.8 reads past its
// own buffers when it converts from a corrupt stored type.
static int is_as_written(hid_t ds) {
    hid_t dcpl = H5Dget_create_plist(ds), type = H5Dget_type(ds);
    int ok = dcpl >= 0 && type >= 0 && H5Pget_layout(dcpl) == H5D_CHUNKED &&
             (H5Tequal(type, H5T_IEEE_F32LE) > 0 || H5Tequal(type, H5T_IEEE_F64LE) > 0 ||
              H5Tequal(type, H5T_STD_U64LE) > 0 || H5Tequal(type, H5T_STD_I64LE) > 0);
    if (dcpl >= 0) H5Pclose(dcpl);
    if (type >= 0) H5Tclose(type);
    return ok;
}

// Reads the dataset at dpath, which must have exactly the given shape (rank 1 or 2).
static int read_array(Ckpt *c, const char *dpath, hid_t mtype, void *out, int rank,
                      const hsize_t *dims) {
    hid_t ds = H5Dopen2(c->file, dpath, H5P_DEFAULT);
    if (ds < 0) return ckpt_fail(c, "cannot open %s", dpath);
    hid_t space = H5Dget_space(ds);
    hsize_t got[H5S_MAX_RANK];
    int got_rank = space >= 0 ? H5Sget_simple_extent_dims(space, got, NULL) : -1;
    if (space >= 0) H5Sclose(space);
    int same = got_rank == rank;
    for (int d = 0; same && d < rank; d++)
        same = got[d] == dims[d];
    if (!same) {
        H5Dclose(ds);
        char have[64] = "", need[64];
        for (int d = 0; d < got_rank; d++)
            snprintf(have + strlen(have), sizeof have - strlen(have), "%s%llu", d ? ", " : "",
                     (unsigned long long)got[d]);
        if (rank == 2)
            snprintf(need, sizeof need, "%llu, %llu", (unsigned long long)dims[0],
                     (unsigned long long)dims[1]);
        else
            snprintf(need, sizeof need, "%llu", (unsigned long long)dims[0]);
        return ckpt_fail(c, "%s has shape [%s], this model needs [%s]", dpath, have, need);
    }
    if (!is_as_written(ds)) {
        H5Dclose(ds);
        return ckpt_fail(c, "%s is not stored as moe.c writes it (chunked, with checksums, "
                         "a 64- or 32-bit type): the file is corrupt or not a moe.c checkpoint",
                         dpath);
    }
    herr_t rr = H5Dread(ds, mtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, out);
    int filter_failed = 0;
    // Walked at once: the next HDF5 call clears the error stack.
    if (rr < 0) H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, note_filter_error, &filter_failed);
    H5Dclose(ds);
    if (rr >= 0) return 0;
    if (filter_failed)
        return ckpt_fail(c, "checksum mismatch in %s: the file is corrupt", dpath);
    return ckpt_fail(c, "cannot read %s (corrupt file?)", dpath);
}

static int read_tensor(Ckpt *c, const char *dpath, const ParamInfo *p, hid_t mtype, void *out) {
    hsize_t dims[2] = {p->rows, p->cols};
    return read_array(c, dpath, mtype, out, p->cols ? 2 : 1, dims);
}

// Every tensor the file holds into host (the model's slab, already holding m's weights);
// a full checkpoint must hold them all.
static int read_model(Ckpt *c, const Model *m, char *host) {
    int delta = is_delta(c);
    size_t esize = dtype_size(m->params.dtype);
    char dpath[DSET_PATH_MAX];
    for (size_t i = 0; i < m->layout.n_params; i++) {
        const ParamInfo *p = &m->layout.params[i];
        ckpt_param_path(p, dpath, sizeof dpath);
        if (!path_exists(c->file, dpath)) {
            if (delta) continue;
            return ckpt_fail(c, "%s is missing (a full checkpoint holds every tensor)", dpath);
        }
        char *data = host + p->offset * esize;
        if (read_tensor(c, dpath, p, mem_type(m->params.dtype), data) ||
            check_finite(c, "tensor", dpath, data, m->params.dtype, p->numel))
            return -1;
    }
    return 0;
}

// Expert biases into host (n_moe, E); a full checkpoint of a bias-balanced model must
// hold them, a delta only those of the routers it trained.
static int read_bias(Ckpt *c, const Model *m, char *host) {
    if (!has_bias(m)) return 0;
    size_t E = (size_t)m->cfg.experts, esize = dtype_size(m->expert_bias.dtype);
    char dpath[DSET_PATH_MAX];
    hsize_t dims[1] = {E};
    for (int l = 0; l < m->n_moe; l++) {
        bias_path(m, l, dpath, sizeof dpath);
        if (!path_exists(c->file, dpath)) {
            if (is_delta(c)) continue;
            return ckpt_fail(c, "%s is missing (router.bias_gamma > 0 or router.expert_bias "
                             "= true)", dpath);
        }
        char *data = host + (size_t)l * E * esize;
        if (read_array(c, dpath, mem_type(m->expert_bias.dtype), data, 1, dims) ||
            check_finite(c, "expert bias", dpath, data, m->expert_bias.dtype, E))
            return -1;
    }
    return 0;
}

// host_m, host_v: (n_trainable) in opt's state order.
static int read_optim(Ckpt *c, const Model *m, const AdamW *opt, char *host_m, char *host_v) {
    CHECK(opt->n_tensors == m->layout.n_params,
          "checkpoint: optimizer and model layouts differ");
    size_t esize = dtype_size(opt->m.dtype);
    char dm[DSET_PATH_MAX], dv[DSET_PATH_MAX];
    for (size_t i = 0; i < m->layout.n_params; i++) {
        if (opt->state_offset[i] == ADAMW_FROZEN) continue;
        const ParamInfo *p = &m->layout.params[i];
        size_t at = opt->state_offset[i] * esize;
        moment_path(p, "m", dm, sizeof dm);
        moment_path(p, "v", dv, sizeof dv);
        if (!path_exists(c->file, dm) || !path_exists(c->file, dv))
            return ckpt_fail(c, "no optimizer state for %s, which this run trains", p->name);
        if (read_tensor(c, dm, p, mem_type(opt->m.dtype), host_m + at) ||
            read_tensor(c, dv, p, mem_type(opt->v.dtype), host_v + at) ||
            check_finite(c, "moment", dm, host_m + at, opt->m.dtype, p->numel) ||
            check_finite(c, "moment", dv, host_v + at, opt->v.dtype, p->numel))
            return -1;
    }
    return 0;
}

// Files written before run identities existed have none: 0.
static int read_run_id(Ckpt *c, uint64_t *out) {
    *out = 0;
    if (H5Aexists(c->file, "run_id") > 0 &&
        read_num_attr(c->file, "run_id", H5T_NATIVE_UINT64, out) != 0)
        return ckpt_fail(c, "no readable run_id attribute");
    return 0;
}

static int read_state(Ckpt *c, TrainState *st) {
    hsize_t four = 4, one = 1;
    int64_t step;
    if (!path_exists(c->file, "/state/rng")) return ckpt_fail(c, "no train state (/state)");
    if (read_array(c, "/state/rng", H5T_NATIVE_UINT64, st->noise_rng.s, 1, &four) ||
        read_array(c, "/state/step", H5T_NATIVE_INT64, &step, 1, &one) ||
        read_array(c, "/state/tokens_seen", H5T_NATIVE_UINT64, &st->tokens_seen, 1, &one) ||
        read_array(c, "/state/data_cursor", H5T_NATIVE_UINT64, &st->data_cursor, 1, &one) ||
        read_array(c, "/state/best_val", H5T_NATIVE_DOUBLE, &st->best_val, 1, &one))
        return -1;
    st->step = (long)step;
    // Files written before rollbacks existed have no scale.
    st->lr_scale = 1.0;
    if (path_exists(c->file, "/state/lr_scale") &&
        read_array(c, "/state/lr_scale", H5T_NATIVE_DOUBLE, &st->lr_scale, 1, &one))
        return -1;
    if (!(st->lr_scale > 0 && st->lr_scale <= 1))
        return ckpt_fail(c, "/state/lr_scale is %g, outside (0, 1]", st->lr_scale);
    return read_run_id(c, &st->run_id);
}

// Host copies of everything a load replaces; uploaded only once the whole file read.
typedef struct {
    char *params;
    char *m, *v;
    char *bias;   // (n_moe, E)
    TrainState st;
} Staged;

static int load_staged(Ckpt *c, const Model *m, const AdamW *opt, int want_state, Staged *s) {
    if (open_checked(c) != 0 || check_model_config(c, &m->cfg) != 0) return -1;
    if (read_model(c, m, s->params) != 0 || read_bias(c, m, s->bias) != 0) return -1;
    if (opt && read_optim(c, m, opt, s->m, s->v) != 0) return -1;
    if (want_state && read_state(c, &s->st) != 0) return -1;
    return 0;
}

int ckpt_load(const char *path, Model *m, AdamW *opt, TrainState *st, char *err, size_t n) {
    Ckpt c = {-1, path, err, n};
    size_t pbytes = m->layout.total * dtype_size(m->params.dtype);
    size_t bbytes = m->expert_bias.numel * dtype_size(m->expert_bias.dtype);
    Staged s = {CALLOC(pbytes, 1), NULL, NULL, CALLOC(bbytes ? bbytes : 1, 1), {0}};
    // A delta replaces some tensors: the others keep m's current values.
    m->be->download(s.params, m->params, pbytes);
    if (bbytes) m->be->download(s.bias, m->expert_bias, bbytes);
    size_t mbytes = opt ? opt->n_trainable * dtype_size(opt->m.dtype) : 0;
    if (opt) {
        s.m = CALLOC(mbytes ? mbytes : 1, 1);
        s.v = CALLOC(mbytes ? mbytes : 1, 1);
    }
    Quiet q = hdf5_quiet();
    int r = load_staged(&c, m, opt, st != NULL, &s);
    close_file(&c);
    hdf5_restore(q);
    if (r == 0) {
        m->be->upload(m->params, s.params, pbytes);
        if (bbytes) m->be->upload(m->expert_bias, s.bias, bbytes);
        if (opt && mbytes) {
            opt->be->upload(opt->m, s.m, mbytes);
            opt->be->upload(opt->v, s.v, mbytes);
        }
        if (st) *st = s.st;
    }
    free(s.params);
    free(s.bias);
    free(s.m);
    free(s.v);
    return r;
}

// FNV-1a over each weight as float32, little-endian: the same value in moe (float) and
// in the fp64 test build for weights that float32 represents.
uint64_t ckpt_fingerprint(const Model *m) {
    size_t n = m->layout.total, esize = dtype_size(m->params.dtype);
    char *host = CALLOC(n ? n : 1, esize);
    m->be->download(host, m->params, n * esize);
    uint64_t h = 14695981039346656037ull;
    for (size_t i = 0; i < n; i++) {
        float x =
            m->params.dtype == DTYPE_F64 ? (float)((double *)host)[i] : ((float *)host)[i];
        uint32_t bits;
        memcpy(&bits, &x, sizeof bits);
        for (int b = 0; b < 4; b++) {
            h ^= (bits >> (8 * b)) & 0xffu;
            h *= 1099511628211ull;
        }
    }
    free(host);
    return h;
}

static int read_identity(Ckpt *c, long *step, uint64_t *run_id) {
    if (open_checked(c) != 0) return -1;
    int64_t s;
    if (read_num_attr(c->file, "step", H5T_NATIVE_INT64, &s) != 0)
        return ckpt_fail(c, "no readable step attribute");
    *step = (long)s;
    return read_run_id(c, run_id);
}

int ckpt_read_identity(const char *path, long *step, uint64_t *run_id, char *err, size_t n) {
    Ckpt c = {-1, path, err, n};
    Quiet q = hdf5_quiet();
    int r = read_identity(&c, step, run_id);
    close_file(&c);
    hdf5_restore(q);
    return r;
}

static int read_base_fingerprint(Ckpt *c, uint64_t *out) {
    if (open_checked(c) != 0) return -1;
    if (read_num_attr(c->file, "base_fingerprint", H5T_NATIVE_UINT64, out) != 0)
        return ckpt_fail(c, "no readable base_fingerprint attribute");
    return 0;
}

int ckpt_read_base_fingerprint(const char *path, uint64_t *out, char *err, size_t n) {
    Ckpt c = {-1, path, err, n};
    Quiet q = hdf5_quiet();
    int r = read_base_fingerprint(&c, out);
    close_file(&c);
    hdf5_restore(q);
    return r;
}
