#include "safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#include "../../base/util.h"

// Tensor bytes are copied between the file and memory as they are.
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors.c assumes a little-endian host (the format's byte order)"
#endif

// JSON numbers are doubles: integers above 2^53 cannot be told apart.
#define ST_JSON_INT_MAX 9007199254740992.0

static const struct {
    const char *name;
    size_t size;
} DTYPES[] = {[ST_F32] = {"F32", 4}, [ST_BF16] = {"BF16", 2}, [ST_F16] = {"F16", 2}};
#define N_DTYPES (sizeof DTYPES / sizeof *DTYPES)

const char *safetensors_dtype_name(StDType dt) { return DTYPES[dt].name; }
size_t safetensors_dtype_size(StDType dt) { return DTYPES[dt].size; }

static int st_fail(char *err, size_t n, const char *path, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int st_fail(char *err, size_t n, const char *path, const char *fmt, ...) {
    int k = snprintf(err, n, "%s: ", path);
    if (k >= 0 && (size_t)k < n) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err + k, n - (size_t)k, fmt, ap);
        va_end(ap);
    }
    return -1;
}

uint16_t safetensors_f32_to_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);   // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1);   // ties go to the even bf16 value
    return (uint16_t)(u >> 16);
}

float safetensors_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

float safetensors_f16_to_f32(uint16_t h) {
    unsigned exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    float mag;
    if (exp == 0) mag = ldexpf((float)man, -24);   // zero and subnormals
    else if (exp == 31) mag = man ? NAN : INFINITY;
    else mag = ldexpf((float)(man | 0x400), (int)exp - 25);
    return (h & 0x8000) ? -mag : mag;
}

// ---- reading ---------------------------------------------------------------------------

void safetensors_shape_text(const StTensor *t, char *out, size_t len) {
    size_t k = (size_t)snprintf(out, len, "[");
    for (int d = 0; d < t->rank && k < len; d++)
        k += (size_t)snprintf(out + k, len - k, d ? ", %zu" : "%zu", t->shape[d]);
    if (k < len) snprintf(out + k, len - k, "]");
}

static int json_uint(const cJSON *j, uint64_t *out) {
    if (!cJSON_IsNumber(j)) return -1;
    double d = j->valuedouble;
    if (!(d >= 0) || d > ST_JSON_INT_MAX || d != floor(d)) return -1;
    *out = (uint64_t)d;
    return 0;
}

static int parse_dtype(StTensor *t, const cJSON *e, const char *path, char *err, size_t n) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    if (!cJSON_IsString(j))
        return st_fail(err, n, path, "tensor '%s' has no dtype string", t->name);
    for (size_t i = 0; i < N_DTYPES; i++)
        if (!strcmp(j->valuestring, DTYPES[i].name)) {
            t->dtype = (StDType)i;
            return 0;
        }
    return st_fail(err, n, path, "tensor '%s': dtype '%s' is not F32, BF16 or F16", t->name,
                   j->valuestring);
}

static int parse_shape(StTensor *t, const cJSON *e, const char *path, char *err, size_t n) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(e, "shape"), *d;
    if (!cJSON_IsArray(j)) return st_fail(err, n, path, "tensor '%s' has no shape array", t->name);
    if (cJSON_GetArraySize(j) > ST_RANK_MAX)
        return st_fail(err, n, path, "tensor '%s': rank %d exceeds %d", t->name,
                       cJSON_GetArraySize(j), ST_RANK_MAX);
    t->numel = 1;
    cJSON_ArrayForEach(d, j) {
        uint64_t v;
        if (json_uint(d, &v) != 0)
            return st_fail(err, n, path, "tensor '%s': shape holds a value that is not a "
                           "non-negative integer", t->name);
        if (__builtin_mul_overflow(t->numel, (size_t)v, &t->numel))
            return st_fail(err, n, path, "tensor '%s': shape overflows", t->name);
        t->shape[t->rank++] = (size_t)v;
    }
    return 0;
}

static int parse_offsets(StTensor *t, const cJSON *e, uint64_t data_size, const char *path,
                         char *err, size_t n) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    if (!cJSON_IsArray(j) || cJSON_GetArraySize(j) != 2 ||
        json_uint(cJSON_GetArrayItem(j, 0), &t->begin) ||
        json_uint(cJSON_GetArrayItem(j, 1), &t->end))
        return st_fail(err, n, path, "tensor '%s': data_offsets is not [begin, end] of "
                       "non-negative integers", t->name);
    if (t->begin > t->end || t->end > data_size)
        return st_fail(err, n, path, "tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64 "] lie "
                       "outside the data area (%" PRIu64 " bytes; truncated file?)", t->name,
                       t->begin, t->end, data_size);
    uint64_t bytes;
    if (__builtin_mul_overflow((uint64_t)t->numel, (uint64_t)DTYPES[t->dtype].size, &bytes) ||
        bytes != t->end - t->begin) {
        char shape[128];
        safetensors_shape_text(t, shape, sizeof shape);
        return st_fail(err, n, path, "tensor '%s': shape %s as %s needs %" PRIu64 " bytes but "
                       "data_offsets [%" PRIu64 ", %" PRIu64 "] span %" PRIu64, t->name, shape,
                       DTYPES[t->dtype].name, (uint64_t)t->numel * DTYPES[t->dtype].size,
                       t->begin, t->end, t->end - t->begin);
    }
    return 0;
}

static int parse_metadata(const cJSON *e, const char *path, char *err, size_t n) {
    const cJSON *v;
    if (!cJSON_IsObject(e)) return st_fail(err, n, path, "__metadata__ is not an object");
    cJSON_ArrayForEach(v, e) if (!cJSON_IsString(v))
        return st_fail(err, n, path, "__metadata__ value '%s' is not a string", v->string);
    return 0;
}

static int parse_entry(StTensor *t, const cJSON *e, uint64_t data_size, const char *path,
                       char *err, size_t n) {
    if (strlen(e->string) >= ST_NAME_MAX)
        return st_fail(err, n, path, "tensor name '%.40s...' is longer than %d bytes", e->string,
                       ST_NAME_MAX - 1);
    snprintf(t->name, sizeof t->name, "%s", e->string);
    if (!cJSON_IsObject(e)) return st_fail(err, n, path, "tensor '%s' is not an object", t->name);
    if (parse_dtype(t, e, path, err, n) || parse_shape(t, e, path, err, n) ||
        parse_offsets(t, e, data_size, path, err, n))
        return -1;
    return 0;
}

static int by_name(const void *a, const void *b) {
    return strcmp((*(const StTensor *const *)a)->name, (*(const StTensor *const *)b)->name);
}

static int by_range(const void *a, const void *b) {
    const StTensor *x = *(const StTensor *const *)a, *y = *(const StTensor *const *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    return x->end < y->end ? -1 : x->end > y->end;
}

// Names unique; ranges tiling [0, data_size) in order, with no overlap and no hole.
static int check_table(StFile *sf, uint64_t header_len, uint64_t file_size, char *err, size_t n) {
    const StTensor **v = CALLOC(sf->n_tensors, sizeof *v);
    for (size_t i = 0; i < sf->n_tensors; i++) v[i] = &sf->tensors[i];
    int r = 0;
    qsort(v, sf->n_tensors, sizeof *v, by_name);
    for (size_t i = 1; i < sf->n_tensors && !r; i++)
        if (!strcmp(v[i - 1]->name, v[i]->name))
            r = st_fail(err, n, sf->path, "tensor '%s' appears twice in the header", v[i]->name);
    qsort(v, sf->n_tensors, sizeof *v, by_range);
    uint64_t at = 0;
    for (size_t i = 0; i < sf->n_tensors && !r; i++) {
        if (v[i]->begin < at)
            r = st_fail(err, n, sf->path, "tensors '%s' and '%s' overlap (bytes %" PRIu64 " to "
                        "%" PRIu64 " of the data area)", v[i - 1]->name, v[i]->name, v[i]->begin,
                        at);
        else if (v[i]->begin > at)
            r = st_fail(err, n, sf->path, "bytes %" PRIu64 " to %" PRIu64 " of the data area "
                        "belong to no tensor (a hole before '%s')", at, v[i]->begin, v[i]->name);
        at = v[i]->end;
    }
    if (!r && 8 + header_len + at != file_size)
        r = st_fail(err, n, sf->path, "file size %" PRIu64 " != 8 + header %" PRIu64 " + tensor "
                    "data %" PRIu64 " (trailing bytes)", file_size, header_len, at);
    free(v);
    return r;
}

static int is_json_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

static int parse_header(StFile *sf, const char *json, uint64_t len, uint64_t file_size, char *err,
                        size_t n) {
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(json, (size_t)len, &end, 0);
    if (!root) {
        const char *at = cJSON_GetErrorPtr();
        return st_fail(err, n, sf->path, "header is not valid JSON (at byte %td of %" PRIu64 ")",
                       at ? at - json : (ptrdiff_t)0, len);
    }
    int r = 0;
    for (const char *c = end; c < json + len && !r; c++)
        if (!is_json_space(*c))
            r = st_fail(err, n, sf->path, "header has bytes after its JSON value (at byte %td)",
                        c - json);
    if (!r && !cJSON_IsObject(root)) r = st_fail(err, n, sf->path, "header is not a JSON object");
    const cJSON *e;
    if (!r) cJSON_ArrayForEach(e, root) sf->n_tensors += strcmp(e->string, "__metadata__") != 0;
    sf->tensors = CALLOC(sf->n_tensors, sizeof *sf->tensors);
    size_t i = 0;
    uint64_t data_size = file_size - 8 - len;
    if (!r) cJSON_ArrayForEach(e, root) {
        r = strcmp(e->string, "__metadata__")
                ? parse_entry(&sf->tensors[i++], e, data_size, sf->path, err, n)
                : parse_metadata(e, sf->path, err, n);
        if (r) break;
    }
    cJSON_Delete(root);
    return r ? r : check_table(sf, len, file_size, err, n);
}

static int read_header(StFile *sf, char *err, size_t n) {
    if (fseeko(sf->f, 0, SEEK_END) != 0) return st_fail(err, n, sf->path, "cannot seek");
    uint64_t size = (uint64_t)ftello(sf->f), len = 0;
    if (size < 8)
        return st_fail(err, n, sf->path, "%" PRIu64 " bytes: shorter than the 8-byte header "
                       "length", size);
    uint8_t b[8];
    rewind(sf->f);
    if (fread(b, 1, 8, sf->f) != 8)
        return st_fail(err, n, sf->path, "cannot read the header length");
    for (int i = 7; i >= 0; i--) len = len << 8 | b[i];
    if (len > ST_HEADER_MAX)
        return st_fail(err, n, sf->path, "header length %" PRIu64 " is absurd (more than %u "
                       "bytes): not a safetensors file?", len, ST_HEADER_MAX);
    if (len > size - 8)
        return st_fail(err, n, sf->path, "header length %" PRIu64 " exceeds the %" PRIu64 " bytes "
                       "after the length field", len, size - 8);
    char *json = CALLOC((size_t)len + 1, 1);
    int r = fread(json, 1, (size_t)len, sf->f) == len
                ? parse_header(sf, json, len, size, err, n)
                : st_fail(err, n, sf->path, "cannot read the %" PRIu64 "-byte header", len);
    free(json);
    sf->data_start = 8 + len;
    return r;
}

int safetensors_open(StFile *sf, const char *path, char *err, size_t n) {
    memset(sf, 0, sizeof *sf);
    sf->f = fopen(path, "rb");
    if (!sf->f) return st_fail(err, n, path, "cannot open: %s", strerror(errno));
    sf->path = strdup(path);
    CHECK(sf->path, "out of memory");
    int r = read_header(sf, err, n);
    if (r) safetensors_close(sf);
    return r;
}

void safetensors_close(StFile *sf) {
    if (sf->f) fclose(sf->f);
    free(sf->path);
    free(sf->tensors);
    memset(sf, 0, sizeof *sf);
}

const StTensor *safetensors_find(const StFile *sf, const char *name) {
    for (size_t i = 0; i < sf->n_tensors; i++)
        if (!strcmp(sf->tensors[i].name, name)) return &sf->tensors[i];
    return NULL;
}

int safetensors_read_f32(const StFile *sf, const StTensor *t, float *out, char *err, size_t n) {
    if (fseeko(sf->f, (off_t)(sf->data_start + t->begin), SEEK_SET) != 0)
        return st_fail(err, n, sf->path, "cannot seek to tensor '%s'", t->name);
    if (t->dtype == ST_F32) {
        if (fread(out, sizeof *out, t->numel, sf->f) != t->numel)
            return st_fail(err, n, sf->path, "cannot read tensor '%s'", t->name);
        return 0;
    }
    uint16_t buf[4096];
    for (size_t i = 0; i < t->numel;) {
        size_t k = t->numel - i < 4096 ? t->numel - i : 4096;
        if (fread(buf, sizeof *buf, k, sf->f) != k)
            return st_fail(err, n, sf->path, "cannot read tensor '%s'", t->name);
        for (size_t j = 0; j < k; j++, i++)
            out[i] = t->dtype == ST_BF16 ? safetensors_bf16_to_f32(buf[j])
                                         : safetensors_f16_to_f32(buf[j]);
    }
    return 0;
}

// ---- writing ---------------------------------------------------------------------------

uint64_t safetensors_out_bytes(const StOut *t, StDType dtype) {
    return (uint64_t)t->rows * (t->cols ? t->cols : 1) * DTYPES[dtype].size;
}

// The header, padded with spaces to a multiple of 8. Written by hand rather than with
// cJSON, which prints numbers as doubles (1e+15 is not an offset the Rust reader takes).
static char *build_header(const StOut *t, size_t n, StDType dtype, size_t *len) {
    size_t cap = 64, k = 0;
    for (size_t i = 0; i < n; i++) cap += strlen(t[i].name) + 128;
    char *h = CALLOC(cap + 8, 1);
    k += (size_t)snprintf(h + k, cap - k, "{\"__metadata__\":{\"format\":\"pt\"}");
    uint64_t at = 0;
    for (size_t i = 0; i < n; i++) {
        CHECK(!strpbrk(t[i].name, "\"\\"), "tensor name %s needs JSON escaping", t[i].name);
        uint64_t end = at + safetensors_out_bytes(&t[i], dtype);
        k += (size_t)snprintf(h + k, cap - k, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[%zu", t[i].name,
                              DTYPES[dtype].name, t[i].rows);
        if (t[i].cols) k += (size_t)snprintf(h + k, cap - k, ",%zu", t[i].cols);
        k += (size_t)snprintf(h + k, cap - k, "],\"data_offsets\":[%" PRIu64 ",%" PRIu64 "]}", at,
                              end);
        at = end;
    }
    k += (size_t)snprintf(h + k, cap - k, "}");
    while (k % 8) h[k++] = ' ';
    *len = k;
    return h;
}

static int write_data(FILE *f, const StOut *t, StDType dtype) {
    size_t numel = t->rows * (t->cols ? t->cols : 1);
    if (dtype == ST_F32) return fwrite(t->data, sizeof(float), numel, f) == numel ? 0 : -1;
    uint16_t buf[4096];
    for (size_t i = 0; i < numel;) {
        size_t k = numel - i < 4096 ? numel - i : 4096;
        for (size_t j = 0; j < k; j++) buf[j] = safetensors_f32_to_bf16(t->data[i + j]);
        if (fwrite(buf, sizeof *buf, k, f) != k) return -1;
        i += k;
    }
    return 0;
}

static int write_file(FILE *f, const StOut *t, size_t n, StDType dtype) {
    size_t len;
    char *header = build_header(t, n, dtype, &len);
    uint8_t b[8];
    for (int i = 0; i < 8; i++) b[i] = (uint8_t)((uint64_t)len >> (8 * i));
    int r = fwrite(b, 1, 8, f) == 8 && fwrite(header, 1, len, f) == len ? 0 : -1;
    free(header);
    for (size_t i = 0; i < n && !r; i++) r = write_data(f, &t[i], dtype);
    if (!r && (fflush(f) != 0 || fsync(fileno(f)) != 0)) r = -1;
    return r;
}

int safetensors_write(const char *path, const StOut *t, size_t n, StDType dtype, char *err,
                      size_t len) {
    CHECK(dtype == ST_F32 || dtype == ST_BF16, "safetensors: writes F32 or BF16 only");
    size_t plen = strlen(path) + 5;
    char *tmp = CALLOC(plen, 1);
    snprintf(tmp, plen, "%s.tmp", path);
    FILE *f = fopen(tmp, "wb");
    int r = f ? write_file(f, t, n, dtype) : -1;
    if (f && fclose(f) != 0) r = -1;
    if (!r && rename(tmp, path) != 0) r = -1;
    if (r) {
        st_fail(err, len, path, "cannot write: %s", strerror(errno));
        unlink(tmp);
    }
    free(tmp);
    return r;
}
