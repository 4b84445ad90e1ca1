// h5tokens.c: token ids from a 1-D integer dataset in an HDF5 file.
#include <hdf5.h>
#include <stdlib.h>

#include "../base/util.h"
#include "sources.h"

#define H5_CHUNK ((hsize_t)1 << 20)   // ids converted per read, bounding the scratch buffer

// Reads dims[0] ids of ds, hyperslab by hyperslab, through a long long buffer: HDF5
// converts any integer type to it exactly (uint64 above LLONG_MAX saturates and is then
// rejected as out of range like any other too-large id).
static int h5_read_ids(hid_t ds, hsize_t count, const char *path, const char *name,
                       TokenStream *out, char *err, size_t n) {
    hid_t file_space = H5Dget_space(ds);
    long long *buf = CALLOC(count < H5_CHUNK ? count : H5_CHUNK, sizeof *buf);
    token_stream_reserve(out, (size_t)count);
    int rc = 0;
    for (hsize_t start = 0; rc == 0 && start < count; start += H5_CHUNK) {
        hsize_t want = count - start < H5_CHUNK ? count - start : H5_CHUNK;
        hid_t mem_space = H5Screate_simple(1, &want, NULL);
        if (H5Sselect_hyperslab(file_space, H5S_SELECT_SET, &start, NULL, &want, NULL) < 0 ||
            H5Dread(ds, H5T_NATIVE_LLONG, mem_space, file_space, H5P_DEFAULT, buf) < 0)
            rc = (snprintf(err, n, "%s: cannot read dataset '%s'", path, name), -1);
        H5Sclose(mem_space);
        for (hsize_t i = 0; rc == 0 && i < want; i++) {
            if (buf[i] < INT32_MIN || buf[i] > INT32_MAX)
                rc = (snprintf(err, n,
                               "%s: dataset '%s' holds %lld at position %llu, not a 32-bit "
                               "token id",
                               path, name, buf[i], (unsigned long long)(start + i)),
                      -1);
            else out->ids[out->n++] = (int32_t)buf[i];
        }
    }
    free(buf);
    H5Sclose(file_space);
    return rc;
}

// Checks that ds is a 1-D integer dataset and reads it.
static int h5_read_dataset(hid_t ds, const char *path, const char *name, TokenStream *out,
                           char *err, size_t n) {
    hid_t type = H5Dget_type(ds), space = H5Dget_space(ds);
    H5T_class_t cls = H5Tget_class(type);
    int rank = H5Sget_simple_extent_ndims(space);
    hsize_t count = 0;
    if (rank == 1) H5Sget_simple_extent_dims(space, &count, NULL);
    H5Tclose(type);
    H5Sclose(space);
    if (cls != H5T_INTEGER)
        return snprintf(err, n, "%s: dataset '%s' does not hold integers (token ids)", path,
                        name),
               -1;
    if (rank != 1)
        return snprintf(err, n, "%s: dataset '%s' has %d dimensions, expected 1", path, name,
                        rank),
               -1;
    return h5_read_ids(ds, count, path, name, out, err, n);
}

static int h5_read_file(const char *path, const char *name, TokenStream *out, char *err,
                        size_t n) {
    if (H5Fis_hdf5(path) <= 0) return snprintf(err, n, "%s: not an HDF5 file", path), -1;
    hid_t file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (file < 0) return snprintf(err, n, "%s: cannot open as HDF5", path), -1;
    int rc = -1;
    // H5Lexists fails rather than answering 0 when an intermediate group is missing:
    // both mean "no such dataset" here.
    if (H5Lexists(file, name, H5P_DEFAULT) <= 0) {
        snprintf(err, n, "%s: no dataset '%s' (set dataset = NAME in the domain's section)",
                 path, name);
    } else {
        hid_t ds = H5Dopen2(file, name, H5P_DEFAULT);
        if (ds < 0) snprintf(err, n, "%s: '%s' is not a dataset", path, name);
        else {
            rc = h5_read_dataset(ds, path, name, out, err, n);
            H5Dclose(ds);
        }
    }
    H5Fclose(file);
    return rc;
}

int source_read_hdf5(const char *path, const char *dataset, TokenStream *out, char *err,
                     size_t n) {
    // Our one-line error replaces HDF5's own error-stack dump; restore its handler after.
    H5E_auto2_t handler;
    void *handler_data;
    H5Eget_auto2(H5E_DEFAULT, &handler, &handler_data);
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    int rc = h5_read_file(path, dataset, out, err, n);
    H5Eset_auto2(H5E_DEFAULT, handler, handler_data);
    return rc;
}
