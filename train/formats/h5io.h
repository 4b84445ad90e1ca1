// h5io.h: small checked wrappers over the HDF5 C API.
//
// Every failure dies with the file, the object path and the source location. Paths may
// contain '/' (groups are created as needed). Real buffers are stored as float32.
#ifndef MOE_H5IO_H
#define MOE_H5IO_H

#include <hdf5.h>
#include <stdint.h>

#include "../../kernels/kernels.h"

hid_t h5io_create(const char *path);   // truncates
void h5io_close(hid_t file);
// dims: rank entries; rank 0 writes a scalar.
void h5io_write_real(hid_t file, const char *path, const real *data, int rank,
                     const hsize_t *dims);
void h5io_write_i32(hid_t file, const char *path, const int32_t *data, int rank,
                    const hsize_t *dims);
// A string attribute on the object at obj_path (a group, created if missing).
void h5io_write_attr(hid_t file, const char *obj_path, const char *name, const char *value);

#endif
