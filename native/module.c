/*
 * fastbackup._native: the I/O and checksum primitives of fastbackup. Nothing
 * here knows about Keras; the Python package builds checkpoints on top.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#include "atomic_file.h"
#include "crc32c.h"
#include "failpoint.h"

/* Below this the GIL round trip costs more than the checksum itself. */
#define CRC_GIL_THRESHOLD (64 * 1024)

typedef struct {
    PyObject *atomic_file_type;
} module_state;

static int
parse_crc_value(PyObject *obj, uint32_t *out)
{
    PyObject *index = NULL;
    unsigned long long value;
    int result = -1;

    index = PyNumber_Index(obj);
    if (index == NULL)
        goto cleanup;
    value = PyLong_AsUnsignedLongLong(index);
    if (value == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            goto cleanup;
        PyErr_Clear();
    }
    else if (value <= UINT32_MAX) {
        *out = (uint32_t)value;
        result = 0;
        goto cleanup;
    }
    PyErr_SetString(PyExc_ValueError, "value must be in range(0, 2**32)");

cleanup:
    Py_XDECREF(index);
    return result;
}

static PyObject *
crc_common(PyObject *args, PyObject *kwargs, const char *format,
           uint32_t (*fn)(uint32_t, const void *, size_t))
{
    static char *kwlist[] = {"data", "value", NULL};
    Py_buffer view = {0};
    PyObject *value_obj = NULL, *result = NULL;
    uint32_t crc = 0;

    /* y* asks for PyBUF_SIMPLE and rejects non-contiguous buffers. */
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, format, kwlist, &view,
                                     &value_obj))
        return NULL;
    if (value_obj != NULL && parse_crc_value(value_obj, &crc) < 0)
        goto cleanup;
    if (view.len >= CRC_GIL_THRESHOLD) {
        Py_BEGIN_ALLOW_THREADS
        crc = fn(crc, view.buf, (size_t)view.len);
        Py_END_ALLOW_THREADS
    }
    else {
        crc = fn(crc, view.buf, (size_t)view.len);
    }
    result = PyLong_FromUnsignedLong(crc);

cleanup:
    PyBuffer_Release(&view);
    return result;
}

PyDoc_STRVAR(crc32c_doc,
"crc32c(data, value=0) -> int\n\n"
"CRC-32C (Castagnoli) of a C-contiguous buffer, continuing from `value`\n"
"(the result of a previous call). crc32c(b'123456789') == 0xE3069283.");

static PyObject *
fb_py_crc32c(PyObject *Py_UNUSED(module), PyObject *args, PyObject *kwargs)
{
    return crc_common(args, kwargs, "y*|O:crc32c", fb_crc32c);
}

static PyObject *
fb_py_crc32c_portable(PyObject *Py_UNUSED(module), PyObject *args,
                      PyObject *kwargs)
{
    return crc_common(args, kwargs, "y*|O:_crc32c_portable", fb_crc32c_portable);
}

static PyObject *
copy_common(PyObject *args, PyObject *kwargs, const char *format,
            uint32_t (*fn)(uint32_t, void *, const void *, size_t))
{
    static char *kwlist[] = {"dst", "src", "value", NULL};
    Py_buffer dst = {0}, src = {0};
    PyObject *value_obj = NULL, *result = NULL;
    uint32_t crc = 0;

    /* w* and y* reject non-contiguous buffers; w* also read-only ones. */
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, format, kwlist, &dst, &src,
                                     &value_obj))
        return NULL;
    if (value_obj != NULL && parse_crc_value(value_obj, &crc) < 0)
        goto cleanup;
    if (dst.len != src.len) {
        PyErr_Format(PyExc_ValueError,
                     "dst and src must have the same size. Received: "
                     "len(dst)=%zd, len(src)=%zd", dst.len, src.len);
        goto cleanup;
    }
    {
        const char *d = dst.buf, *s = src.buf;

        if (dst.len && d < s + src.len && s < d + dst.len) {
            PyErr_SetString(PyExc_ValueError,
                            "dst and src must not overlap");
            goto cleanup;
        }
    }
    if (src.len >= CRC_GIL_THRESHOLD) {
        Py_BEGIN_ALLOW_THREADS
        crc = fn(crc, dst.buf, src.buf, (size_t)src.len);
        Py_END_ALLOW_THREADS
    }
    else {
        crc = fn(crc, dst.buf, src.buf, (size_t)src.len);
    }
    result = PyLong_FromUnsignedLong(crc);

cleanup:
    PyBuffer_Release(&dst);
    PyBuffer_Release(&src);
    return result;
}

PyDoc_STRVAR(crc32c_copy_doc,
"crc32c_copy(dst, src, value=0) -> int\n\n"
"Copies the C-contiguous buffer `src` into `dst` (writable, the same size,\n"
"not overlapping) and returns crc32c(src, value), reading `src` once.\n"
"The stores bypass the CPU cache where the CPU allows (the copy is for\n"
"another thread to write out). The GIL is released for large buffers.");

static PyObject *
fb_py_crc32c_copy(PyObject *Py_UNUSED(module), PyObject *args,
                  PyObject *kwargs)
{
    return copy_common(args, kwargs, "w*y*|O:crc32c_copy", fb_crc32c_copy);
}

static PyObject *
fb_py_crc32c_copy_portable(PyObject *Py_UNUSED(module), PyObject *args,
                           PyObject *kwargs)
{
    return copy_common(args, kwargs, "w*y*|O:_crc32c_copy_portable",
                       fb_crc32c_copy_portable);
}

PyDoc_STRVAR(set_failpoint_doc,
"set_failpoint(op, nth, errno) -> None\n\n"
"Test-only fault injection, process-wide. For op in 'open', 'write',\n"
"'fsync', 'close', 'rename', 'dirfsync' the nth call (1-based, counted\n"
"from now) of that operation fails with `errno` instead of running.\n"
"op 'short_write' caps every write(2) at `nth` bytes (errno ignored).\n"
"clear_failpoints() removes them all.");

static PyObject *
fb_py_set_failpoint(PyObject *Py_UNUSED(module), PyObject *args,
                    PyObject *kwargs)
{
    static char *kwlist[] = {"op", "nth", "errno", NULL};
    const char *op;
    long long nth;
    int err;
    int short_write;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "sLi:set_failpoint", kwlist,
                                     &op, &nth, &err))
        return NULL;
    short_write = strcmp(op, "short_write") == 0;
    if (nth < 1) {
        PyErr_SetString(PyExc_ValueError, "nth must be >= 1");
        return NULL;
    }
    if (!short_write && err <= 0) {
        PyErr_SetString(PyExc_ValueError, "errno must be a positive errno value");
        return NULL;
    }
    if (fb_failpoint_set(op, nth, err) < 0) {
        PyErr_Format(PyExc_ValueError,
                     "unknown failpoint '%s'; expected one of 'open', 'write', "
                     "'fsync', 'close', 'rename', 'dirfsync', 'short_write'",
                     op);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
fb_py_clear_failpoints(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    fb_failpoint_clear();
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"crc32c", (PyCFunction)(void (*)(void))fb_py_crc32c,
     METH_VARARGS | METH_KEYWORDS, crc32c_doc},
    {"_crc32c_portable", (PyCFunction)(void (*)(void))fb_py_crc32c_portable,
     METH_VARARGS | METH_KEYWORDS,
     "crc32c() forced onto the portable table path, for tests."},
    {"crc32c_copy", (PyCFunction)(void (*)(void))fb_py_crc32c_copy,
     METH_VARARGS | METH_KEYWORDS, crc32c_copy_doc},
    {"_crc32c_copy_portable",
     (PyCFunction)(void (*)(void))fb_py_crc32c_copy_portable,
     METH_VARARGS | METH_KEYWORDS,
     "crc32c_copy() forced onto the portable path, for tests."},
    {"set_failpoint", (PyCFunction)(void (*)(void))fb_py_set_failpoint,
     METH_VARARGS | METH_KEYWORDS, set_failpoint_doc},
    {"clear_failpoints", (PyCFunction)fb_py_clear_failpoints, METH_NOARGS,
     "clear_failpoints() -> None\n\nRemove every failpoint and the short-write cap."},
    {NULL},
};

static int
module_exec(PyObject *module)
{
    module_state *state = PyModule_GetState(module);

    state->atomic_file_type = PyType_FromSpec(&fb_atomic_file_spec);
    if (state->atomic_file_type == NULL)
        return -1;
    if (PyModule_AddType(module, (PyTypeObject *)state->atomic_file_type) < 0)
        return -1;
    if (PyModule_AddStringConstant(module, "_crc32c_impl", fb_crc32c_impl()) < 0)
        return -1;
    return 0;
}

static int
module_traverse(PyObject *module, visitproc visit, void *arg)
{
    module_state *state = PyModule_GetState(module);

    Py_VISIT(state->atomic_file_type);
    return 0;
}

static int
module_clear(PyObject *module)
{
    module_state *state = PyModule_GetState(module);

    Py_CLEAR(state->atomic_file_type);
    return 0;
}

static void
module_free(void *module)
{
    module_clear((PyObject *)module);
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "fastbackup._native",
    .m_doc = "Crash-safe file writing and CRC-32C for fastbackup.",
    .m_size = sizeof(module_state),
    .m_methods = module_methods,
    .m_slots = module_slots,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
    .m_free = module_free,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    return PyModuleDef_Init(&native_module);
}
