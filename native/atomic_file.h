#ifndef FASTBACKUP_ATOMIC_FILE_H
#define FASTBACKUP_ATOMIC_FILE_H

#include <Python.h>

/* Spec of the AtomicFile heap type; module.c creates it with PyType_FromSpec. */
extern PyType_Spec fb_atomic_file_spec;

#endif
