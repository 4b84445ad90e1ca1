#include "h5io.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "../../base/util.h"

#define H5IO_CHECK(expr, what, path)                                                    \
    do {                                                                             \
        if ((expr) < 0) DIE("HDF5: cannot %s '%s'", (what), (path));                 \
    } while (0)

// Every call here is checked and reported in one line of our own, so HDF5's printing of
// its whole error stack (on by default) is turned off.
hid_t h5io_create(const char *path) {
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    errno = 0;
    hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    if (f < 0)
        FAIL("%s: cannot create the HDF5 file: %s", path,
             errno ? strerror(errno) : "HDF5 refused it");
    return f;
}

void h5io_close(hid_t file) { H5IO_CHECK(H5Fclose(file), "close file", "(hdf5 file)"); }

static hid_t link_props(void) {
    hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
    H5IO_CHECK(H5Pset_create_intermediate_group(lcpl, 1), "set link properties", "-");
    return lcpl;
}

static void write_dataset(hid_t file, const char *path, hid_t mem_type, hid_t file_type,
                          const void *data, int rank, const hsize_t *dims) {
    hid_t space = rank ? H5Screate_simple(rank, dims, NULL) : H5Screate(H5S_SCALAR);
    H5IO_CHECK(space, "create dataspace for", path);
    hid_t lcpl = link_props();
    hid_t ds = H5Dcreate2(file, path, file_type, space, lcpl, H5P_DEFAULT, H5P_DEFAULT);
    H5IO_CHECK(ds, "create dataset", path);
    H5IO_CHECK(H5Dwrite(ds, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data), "write dataset", path);
    H5Dclose(ds);
    H5Pclose(lcpl);
    H5Sclose(space);
}

void h5io_write_real(hid_t file, const char *path, const real *data, int rank,
                     const hsize_t *dims) {
    hid_t mem = sizeof(real) == 8 ? H5T_NATIVE_DOUBLE : H5T_NATIVE_FLOAT;
    write_dataset(file, path, mem, H5T_IEEE_F32LE, data, rank, dims);
}

void h5io_write_i32(hid_t file, const char *path, const int32_t *data, int rank,
                    const hsize_t *dims) {
    write_dataset(file, path, H5T_NATIVE_INT32, H5T_STD_I32LE, data, rank, dims);
}

static hid_t open_or_create_group(hid_t file, const char *path) {
    if (H5Lexists(file, path, H5P_DEFAULT) > 0) return H5Gopen2(file, path, H5P_DEFAULT);
    hid_t lcpl = link_props();
    hid_t g = H5Gcreate2(file, path, lcpl, H5P_DEFAULT, H5P_DEFAULT);
    H5Pclose(lcpl);
    return g;
}

void h5io_write_attr(hid_t file, const char *obj_path, const char *name, const char *value) {
    hid_t g = open_or_create_group(file, obj_path);
    H5IO_CHECK(g, "open group", obj_path);
    hid_t type = H5Tcopy(H5T_C_S1);
    H5Tset_size(type, strlen(value) + 1);
    H5Tset_strpad(type, H5T_STR_NULLTERM);
    hid_t space = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(g, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
    H5IO_CHECK(a, "create attribute on", obj_path);
    H5IO_CHECK(H5Awrite(a, type, value), "write attribute on", obj_path);
    H5Aclose(a);
    H5Sclose(space);
    H5Tclose(type);
    H5Gclose(g);
}
