// safetensors.h: Hugging Face's safetensors format: a strict reader and a float32 writer.
//
// A file is: N (u64 little-endian), N bytes of JSON header, then the data area.
//   {"<name>": {"dtype": "F32", "shape": [rows, cols], "data_offsets": [begin, end]}, ...,
//    "__metadata__": {"format": "pt"}}
// The header is padded with spaces to a multiple of 8 (so the data area is aligned);
// each tensor's bytes (row-major, little-endian) lie at [begin, end) of the data area,
// and the ranges tile the area exactly: no overlap, no hole, nothing after the last.
// Opening checks all of that and names the file and the problem on failure, so a
// truncated download or a hand-edited header is refused before any tensor is read.
#ifndef MOE_SAFETENSORS_H
#define MOE_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

// The element types read (F32, BF16, F16) and written (F32, BF16).
typedef enum { ST_F32, ST_BF16, ST_F16 } StDType;

#define ST_NAME_MAX 256
#define ST_RANK_MAX 8
// A header longer than this is taken for corruption, not for a model's table of contents
// (Mixtral-8x22B's largest shard header is under 100 kB).
#define ST_HEADER_MAX 100000000u

typedef struct {
    char name[ST_NAME_MAX];
    StDType dtype;
    int rank;
    size_t shape[ST_RANK_MAX];
    size_t numel;
    uint64_t begin, end;   // byte range within the data area
} StTensor;

typedef struct {
    char *path;
    FILE *f;
    uint64_t data_start;   // 8 + N: file offset of the data area
    StTensor *tensors;     // in header order
    size_t n_tensors;
} StFile;

// A float32 tensor to write: shape [rows, cols], or [rows] when cols == 0.
typedef struct {
    const char *name;
    size_t rows, cols;
    const float *data;
} StOut;

const char *safetensors_dtype_name(StDType dt);   // "F32", "BF16", "F16"
size_t safetensors_dtype_size(StDType dt);

// Opens and validates path. Returns 0, or -1 with err = "<path>: <problem>".
int safetensors_open(StFile *sf, const char *path, char *err, size_t n);
void safetensors_close(StFile *sf);
// The tensor called name, or NULL.
const StTensor *safetensors_find(const StFile *sf, const char *name);
// "[rows, cols]", for messages.
void safetensors_shape_text(const StTensor *t, char *out, size_t len);
// Reads t converted to float32 into out (t->numel values). Returns 0 or -1 with err.
int safetensors_read_f32(const StFile *sf, const StTensor *t, float *out, char *err, size_t n);

// Writes the n tensors, in order, as dtype (ST_F32 or ST_BF16, rounded to nearest even)
// to <path>.tmp, fsyncs it and renames it to path. Returns 0 or -1 with err.
int safetensors_write(const char *path, const StOut *t, size_t n, StDType dtype, char *err,
                      size_t len);
// Bytes tensor t takes as dtype.
uint64_t safetensors_out_bytes(const StOut *t, StDType dtype);

// Round to nearest even (NaN stays NaN), and the exact widening back.
uint16_t safetensors_f32_to_bf16(float x);
float safetensors_bf16_to_f32(uint16_t h);
float safetensors_f16_to_f32(uint16_t h);

#endif
