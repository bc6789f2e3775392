/*
 * AtomicFile: write a file next to its final name and rename it into place,
 * so that a crash leaves either the old or the new file, never a torn one.
 * fastbackup/_pynative.py follows the same protocol in pure Python.
 *
 * Every syscall runs with the GIL released. While it is released the object
 * is marked busy so that another thread cannot close the descriptor or free
 * the paths underneath us; the released sections touch only C fields.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#if defined(__linux__) || defined(__APPLE__)
#  include <sys/random.h>
#endif

#include "atomic_file.h"
#include "crc32c.h"
#include "failpoint.h"

/* Checksumming a chunk right before writing it means write(2) copies from a
 * warm cache instead of reading the buffer from memory a second time. */
#define CHUNK_SIZE ((size_t)4 << 20)

/* Linux caps one write(2) at 0x7ffff000 bytes and some other kernels reject
 * counts above INT_MAX, so no single call is given more than this. */
#define MAX_WRITE ((size_t)1 << 30)

/* A collision of 64 random bits means something else is going on (a broken
 * random source); give up rather than loop. */
#define TEMP_ATTEMPTS 8
#define RANDOM_BYTES 8

/* O_DIRECT wants the buffer address, the count and the file offset aligned to
 * the logical block size; 4096 is a multiple of every common one (512, 4096),
 * so it works without asking the device. */
#define DIRECT_ALIGN ((size_t)4096)

/* Large enough that each O_DIRECT write(2) keeps the disk busy (a few ms at
 * 2 GB/s), small enough to allocate once per AtomicFile without thought. */
#define BOUNCE_SIZE ((size_t)8 << 20)

/* Direct mode copies into the bounce buffer in pieces this size and checksums
 * each right before copying it, so the user's data is pulled from memory once
 * and the copy reads it from L2 (4 MiB here); 8 MiB would not stay hot. */
#define COPY_PIECE ((size_t)256 << 10)

/* Direct mode writes a buffer that starts on a DIRECT_ALIGN boundary, at an
 * aligned file offset, straight from the caller's memory (no bounce copy)
 * when at least this much of it is aligned. Below that, one more write(2)
 * (the bounce buffer's pending blocks go first) costs more than copying. */
#define ZERO_COPY_MIN ((size_t)256 << 10)

typedef enum { AF_OPEN, AF_COMMITTED, AF_ABORTED } af_state;

typedef enum {
    STEP_FLUSH,
    STEP_FSYNC,
    STEP_CLOSE,
    STEP_RENAME,
    STEP_DIRFSYNC,
} commit_step;

typedef struct {
    PyObject_HEAD
    int fd;
    af_state state;
    int sync;
    int busy;
    /* Direct mode: set when the descriptor accepted O_DIRECT at open. Data
     * then goes through `bounce` (BOUNCE_SIZE bytes, DIRECT_ALIGN-aligned,
     * holding `bounce_fill` bytes not yet written). `odirect_on` tracks the
     * descriptor flag, which is cleared for an unaligned tail or short write. */
    int direct;
    int odirect_on;
    char *bounce;
    size_t bounce_fill;
    /* Logical bytes: in direct mode this includes bytes still in `bounce`. */
    unsigned long long bytes_written;
    /* C copies for the GIL-free sections, str copies for errors/properties. */
    char *dir_c;
    char *temp_c;
    char *final_c;
    PyObject *dir_s;
    PyObject *temp_s;
    PyObject *final_s;
} AtomicFileObject;

static void
raise_errno(int err, PyObject *filename, PyObject *filename2)
{
    errno = err;
    if (filename2 != NULL)
        PyErr_SetFromErrnoWithFilenameObjects(PyExc_OSError, filename, filename2);
    else
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, filename);
}

static int
fill_random(unsigned char *buf, size_t len)
{
#ifdef __linux__
    while (len > 0) {
        ssize_t n = getrandom(buf, len, 0);

        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
#else
    return getentropy(buf, len);
#endif
}

/* Opens a fresh temporary file, rewriting the 16 hex digits at `hex_at` in
 * `path` for each attempt. Returns the descriptor, or -1 with *err set. */
static int
open_temp(char *path, size_t hex_at, int *err)
{
    static const char hex[] = "0123456789abcdef";
    const int flags = O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC;

    for (int attempt = 0; attempt < TEMP_ATTEMPTS; attempt++) {
        unsigned char rnd[RANDOM_BYTES];
        int fd, injected;

        if (fill_random(rnd, sizeof(rnd)) < 0) {
            *err = errno;
            return -1;
        }
        for (int i = 0; i < RANDOM_BYTES; i++) {
            path[hex_at + 2 * i] = hex[rnd[i] >> 4];
            path[hex_at + 2 * i + 1] = hex[rnd[i] & 0xf];
        }
        injected = fb_failpoint_hit(FB_FP_OPEN);
        if (injected) {
            errno = injected;
            fd = -1;
        }
        else {
            do {
                fd = open(path, flags, 0644);
            } while (fd < 0 && errno == EINTR);
        }
        if (fd >= 0)
            return fd;
        if (errno != EEXIST) {
            *err = errno;
            return -1;
        }
    }
    *err = EEXIST;
    return -1;
}

#ifdef O_DIRECT
/* Turns O_DIRECT on or off for `fd`. Returns 0 or an errno.
 *
 * Turning it on after a plain open rather than passing it to open(2) matters:
 * on a filesystem that refuses O_DIRECT (ramfs, some FUSE) open(2) with
 * O_CREAT|O_EXCL|O_DIRECT fails with EINVAL *after* creating the file, which
 * would leave a stray temp file and make a buffered retry of the same name
 * fail with EEXIST. F_SETFL runs the same capability check without that. */
static int
set_odirect(int fd, int on)
{
    int fl = fcntl(fd, F_GETFL);

    if (fl < 0)
        return errno;
    fl = on ? (fl | O_DIRECT) : (fl & ~O_DIRECT);
    if (fcntl(fd, F_SETFL, fl) < 0)
        return errno;
    return 0;
}
#endif

/* One write(2), or the "write" failpoint's error in its place. Returns the
 * bytes written (> 0), or -1 with errno set. EINTR is retried. */
static ssize_t
write_once(int fd, const char *p, size_t n)
{
    for (;;) {
        int injected = fb_failpoint_hit(FB_FP_WRITE);
        ssize_t done;

        if (injected) {
            errno = injected;
            done = -1;
        }
        else {
            done = write(fd, p, n);
        }
        if (done < 0 && errno == EINTR)
            continue;
        /* A regular file never returns 0 for a non-empty write; without this
         * the callers' loops would spin forever if one did. */
        if (done == 0) {
            errno = EIO;
            return -1;
        }
        return done;
    }
}

/* Returns 0 or an errno. Advances over short writes: any buffer over 2 GiB
 * always gets one on Linux. */
static int
write_all(AtomicFileObject *self, const char *p, size_t len)
{
    while (len > 0) {
        size_t n = fb_failpoint_cap_write(len < MAX_WRITE ? len : MAX_WRITE);
        ssize_t done = write_once(self->fd, p, n);

        if (done < 0)
            return errno;
        p += done;
        len -= (size_t)done;
        self->bytes_written += (unsigned long long)done;
    }
    return 0;
}

/* Writes `len` bytes from `buf`, a DIRECT_ALIGN-aligned address, at the
 * current file offset, which is aligned too while O_DIRECT is on. Returns 0
 * or an errno. Whatever O_DIRECT cannot take (an unaligned tail, a short
 * write that left the offset unaligned, a failpoint cap under one block) is
 * written buffered after clearing O_DIRECT for the rest of the file:
 * correctness over speed on paths that are rare or test-only. Does not touch
 * bytes_written. */
static int
write_aligned(AtomicFileObject *self, const char *buf, size_t len)
{
    size_t off = 0;

    while (off < len) {
        size_t n = fb_failpoint_cap_write(len - off);
        ssize_t done;

#ifdef O_DIRECT
        if (self->odirect_on) {
            if (off % DIRECT_ALIGN == 0 && n >= DIRECT_ALIGN) {
                n -= n % DIRECT_ALIGN;
            }
            else {
                int err = set_odirect(self->fd, 0);

                if (err)
                    return err;
                self->odirect_on = 0;
            }
        }
#endif
        done = write_once(self->fd, buf + off, n);
        if (done < 0)
            return errno;
        off += (size_t)done;
    }
    return 0;
}

/* Writes the first `len` bytes of the bounce buffer (see write_aligned);
 * bytes_written counted them when they were copied in. */
static int
flush_bounce(AtomicFileObject *self, size_t len)
{
    return write_aligned(self, self->bounce, len);
}

/* Direct mode, zero copy: writes the aligned part of a buffer that starts
 * on an aligned address at an aligned file offset straight from the caller's
 * memory, checksumming each CHUNK_SIZE piece just before its write(2) so the
 * CRC and the DMA read it close together. Pending bounce blocks go first to
 * keep the file in order. Returns the bytes consumed (a multiple of
 * DIRECT_ALIGN, possibly 0) and sets *err. */
static size_t
write_zero_copy(AtomicFileObject *self, const char *p, size_t len,
                uint32_t *crc, int *err)
{
    size_t aligned = len - len % DIRECT_ALIGN, done = 0;

    *err = 0;
    if (!self->odirect_on || aligned < ZERO_COPY_MIN ||
        (uintptr_t)p % DIRECT_ALIGN != 0 ||
        self->bounce_fill % DIRECT_ALIGN != 0)
        return 0;
    if (self->bounce_fill > 0) {
        *err = flush_bounce(self, self->bounce_fill);
        if (*err)
            return 0;
        self->bounce_fill = 0;
    }
    while (done < aligned) {
        size_t n = aligned - done < CHUNK_SIZE ? aligned - done : CHUNK_SIZE;

        if (crc != NULL)
            *crc = fb_crc32c(*crc, p + done, n);
        *err = write_aligned(self, p + done, n);
        if (*err)
            return done;
        done += n;
        self->bytes_written += n;
    }
    return done;
}

/* Direct mode: writes an aligned buffer's aligned part from where it is
 * (write_zero_copy), and streams everything else through the bounce buffer,
 * writing it each time it fills; a partial block waits there for the next
 * write() or commit(). Returns 0 or an errno. */
static int
write_views_direct(AtomicFileObject *self, const Py_buffer *views,
                   Py_ssize_t count, uint32_t *crcs)
{
    for (Py_ssize_t i = 0; i < count; i++) {
        const char *p = views[i].buf;
        size_t left = (size_t)views[i].len;
        uint32_t crc = 0;
        int err;
        size_t direct = write_zero_copy(self, p, left,
                                        crcs != NULL ? &crc : NULL, &err);

        if (err)
            return err;
        p += direct;
        left -= direct;

        while (left > 0) {
            size_t n = BOUNCE_SIZE - self->bounce_fill;

            if (n > left)
                n = left;
            if (n > COPY_PIECE)
                n = COPY_PIECE;
            if (crcs != NULL)
                crc = fb_crc32c(crc, p, n);
            memcpy(self->bounce + self->bounce_fill, p, n);
            self->bounce_fill += n;
            self->bytes_written += n;
            p += n;
            left -= n;
            if (self->bounce_fill == BOUNCE_SIZE) {
                int err = flush_bounce(self, BOUNCE_SIZE);

                if (err)
                    return err;
                self->bounce_fill = 0;
            }
        }
        if (crcs != NULL)
            crcs[i] = crc;
    }
    return 0;
}

static int
write_views(AtomicFileObject *self, const Py_buffer *views, Py_ssize_t count,
            uint32_t *crcs)
{
    if (self->direct)
        return write_views_direct(self, views, count, crcs);
    for (Py_ssize_t i = 0; i < count; i++) {
        const char *p = views[i].buf;
        size_t left = (size_t)views[i].len;
        uint32_t crc = 0;
        int err;

        if (crcs == NULL) {
            err = write_all(self, p, left);
            if (err)
                return err;
            continue;
        }
        while (left > 0) {
            size_t chunk = left < CHUNK_SIZE ? left : CHUNK_SIZE;

            crc = fb_crc32c(crc, p, chunk);
            err = write_all(self, p, chunk);
            if (err)
                return err;
            p += chunk;
            left -= chunk;
        }
        crcs[i] = crc;
    }
    return 0;
}

static void
free_bounce(AtomicFileObject *self)
{
    free(self->bounce);
    self->bounce = NULL;
    self->bounce_fill = 0;
}

/* Best effort: the caller is already reporting a failure, or is aborting.
 * Returns the unlink errno other than ENOENT, for abort() to report. */
static int
discard_temp(AtomicFileObject *self)
{
    int err = 0;

    free_bounce(self);
    if (self->fd >= 0) {
        close(self->fd);
        self->fd = -1;
    }
    if (unlink(self->temp_c) != 0 && errno != ENOENT)
        err = errno;
    return err;
}

static int
sync_data(int fd)
{
#if defined(__APPLE__)
    /* macOS fsync does not flush the drive cache; F_FULLFSYNC does. */
    if (fcntl(fd, F_FULLFSYNC) == 0)
        return 0;
    return fsync(fd);
#elif defined(__linux__)
    /* The size change is metadata fdatasync still flushes; mtime is not
     * needed to read the file back. */
    return fdatasync(fd);
#else
    return fsync(fd);
#endif
}

/* Makes the rename durable: syncing the file does not sync its directory
 * entry (fsync(2)). Returns 0 or an errno. */
static int
sync_directory(const char *dir)
{
    int dfd, rc, err = 0, injected;

    injected = fb_failpoint_hit(FB_FP_DIRFSYNC);
    if (injected)
        return injected;
    do {
        dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    } while (dfd < 0 && errno == EINTR);
    if (dfd < 0)
        return errno;
    rc = fsync(dfd);
    /* Some filesystems cannot fsync a directory at all; PostgreSQL's
     * fsync_fname_ext ignores these two for the same reason. */
    if (rc != 0 && errno != EINVAL && errno != EBADF)
        err = errno;
    /* Nothing was written through a read-only descriptor, so its close
     * cannot lose data. */
    close(dfd);
    return err;
}

/* Returns 0 or an errno, with *step telling which stage failed. A failure
 * before the rename leaves no temporary file behind. */
static int
commit_file(AtomicFileObject *self, commit_step *step)
{
    int err = 0;

    if (self->direct) {
        /* The last partial block: its aligned prefix goes out with O_DIRECT,
         * the remainder buffered (flush_bounce clears O_DIRECT for it). */
        *step = STEP_FLUSH;
        err = flush_bounce(self, self->bounce_fill);
        free_bounce(self);
        if (err)
            goto cleanup;
    }

    if (self->sync) {
        /* Never retried, not even on EINTR: after a failed fsync Linux may
         * have marked the dirty pages clean, so a second call can "succeed"
         * without the data being on disk (fsyncgate). */
        *step = STEP_FSYNC;
        err = fb_failpoint_hit(FB_FP_FSYNC);
        if (!err && sync_data(self->fd) != 0)
            err = errno;
        if (err)
            goto cleanup;
    }

    /* close can report deferred write errors (NFS); the descriptor is gone
     * whatever it returns, so it is never retried either. */
    *step = STEP_CLOSE;
    err = fb_failpoint_hit(FB_FP_CLOSE);
    if (err)
        close(self->fd);
    else if (close(self->fd) != 0)
        err = errno;
    self->fd = -1;
    if (err)
        goto cleanup;

    *step = STEP_RENAME;
    err = fb_failpoint_hit(FB_FP_RENAME);
    if (!err && rename(self->temp_c, self->final_c) != 0)
        err = errno;
    if (err)
        goto cleanup;

    if (self->sync) {
        *step = STEP_DIRFSYNC;
        err = sync_directory(self->dir_c);
    }

cleanup:
    if (err && *step != STEP_DIRFSYNC)
        discard_temp(self);
    return err;
}

static int
check_usable(AtomicFileObject *self)
{
    if (self->state == AF_COMMITTED) {
        PyErr_SetString(PyExc_ValueError,
                        "AtomicFile is closed (already committed)");
        return -1;
    }
    if (self->state == AF_ABORTED) {
        PyErr_SetString(PyExc_ValueError, "AtomicFile is closed (aborted)");
        return -1;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError,
                        "AtomicFile is in use by another thread");
        return -1;
    }
    return 0;
}

static char *
concat(const char *a, size_t alen, const char *b, size_t blen)
{
    char *out = PyMem_Malloc(alen + blen + 1);

    if (out == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    memcpy(out, a, alen);
    memcpy(out + alen, b, blen);
    out[alen + blen] = '\0';
    return out;
}

static int
validate_name(const char *name, Py_ssize_t len)
{
    if (len == 0 || (len == 1 && name[0] == '.') ||
        (len == 2 && name[0] == '.' && name[1] == '.') ||
        memchr(name, '/', (size_t)len) != NULL ||
        memchr(name, '\0', (size_t)len) != NULL) {
        PyErr_SetString(PyExc_ValueError,
                        "final_name must be a plain file name: not empty, "
                        "'.' or '..', and without '/' or NUL");
        return -1;
    }
    return 0;
}

static PyObject *
AtomicFile_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"directory", "final_name", "sync", "direct",
                             NULL};
    PyObject *dir_b = NULL, *name_obj = NULL, *name_b = NULL, *result = NULL;
    AtomicFileObject *self = NULL;
    const char *dir, *name;
    Py_ssize_t dir_len, name_len;
    char *prefix = NULL, *temp_name = NULL;
    size_t prefix_len, hex_at;
    int sync = 1, direct = 0, fd, err = 0;
    allocfunc alloc;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&U|$pp:AtomicFile",
                                     kwlist, PyUnicode_FSConverter, &dir_b,
                                     &name_obj, &sync, &direct))
        goto cleanup;
    name_b = PyUnicode_EncodeFSDefault(name_obj);
    if (name_b == NULL)
        goto cleanup;
    if (PyBytes_AsStringAndSize(dir_b, (char **)&dir, &dir_len) < 0 ||
        PyBytes_AsStringAndSize(name_b, (char **)&name, &name_len) < 0)
        goto cleanup;
    if (validate_name(name, name_len) < 0)
        goto cleanup;

    alloc = (allocfunc)PyType_GetSlot(type, Py_tp_alloc);
    self = (AtomicFileObject *)alloc(type, 0);
    if (self == NULL)
        goto cleanup;
    /* Until the open succeeds there is nothing for dealloc to unlink. */
    self->fd = -1;
    self->state = AF_ABORTED;
    self->sync = sync;

    /* os.path.join semantics: an empty directory means the current one. */
    if (dir_len == 0) {
        prefix = concat("", 0, "", 0);
        self->dir_c = concat(".", 1, "", 0);
    }
    else if (dir[dir_len - 1] == '/') {
        prefix = concat(dir, (size_t)dir_len, "", 0);
        self->dir_c = concat(dir, (size_t)dir_len, "", 0);
    }
    else {
        prefix = concat(dir, (size_t)dir_len, "/", 1);
        self->dir_c = concat(dir, (size_t)dir_len, "", 0);
    }
    if (prefix == NULL || self->dir_c == NULL)
        goto cleanup;
    prefix_len = strlen(prefix);
    self->final_c = concat(prefix, prefix_len, name, (size_t)name_len);
    if (self->final_c == NULL)
        goto cleanup;

    /* ".{final_name}.{16 hex}.tmp"; the hex digits are filled in per attempt. */
    temp_name = PyMem_Malloc((size_t)name_len + 2 * RANDOM_BYTES + 7);
    if (temp_name == NULL) {
        PyErr_NoMemory();
        goto cleanup;
    }
    temp_name[0] = '.';
    memcpy(temp_name + 1, name, (size_t)name_len);
    temp_name[1 + name_len] = '.';
    memset(temp_name + 2 + name_len, '0', 2 * RANDOM_BYTES);
    memcpy(temp_name + 2 + name_len + 2 * RANDOM_BYTES, ".tmp", 5);
    self->temp_c = concat(prefix, prefix_len, temp_name, strlen(temp_name));
    if (self->temp_c == NULL)
        goto cleanup;
    hex_at = prefix_len + 2 + (size_t)name_len;

#ifndef O_DIRECT
    /* No O_DIRECT on this platform: direct=True is plain buffered I/O. */
    direct = 0;
#endif
    /* Allocated before the open so that running out of memory leaves no
     * file to clean up. */
    if (direct) {
        void *mem = NULL;
        int rc = posix_memalign(&mem, DIRECT_ALIGN, BOUNCE_SIZE);

        if (rc != 0) {
            PyErr_NoMemory();
            goto cleanup;
        }
        self->bounce = mem;
    }

    Py_BEGIN_ALLOW_THREADS
    fd = open_temp(self->temp_c, hex_at, &err);
#ifdef O_DIRECT
    if (fd >= 0 && direct) {
        /* A filesystem that refuses O_DIRECT answers EINVAL: carry on
         * buffered, and say so through the `direct` property. Any other
         * error is unexpected and fails the open. */
        int derr = set_odirect(fd, 1);

        if (derr == 0) {
            self->direct = 1;
            self->odirect_on = 1;
        }
        else if (derr != EINVAL) {
            close(fd);
            unlink(self->temp_c);
            fd = -1;
            err = derr;
        }
    }
#endif
    if (!self->direct)
        free_bounce(self);
    Py_END_ALLOW_THREADS

    self->dir_s = PyUnicode_DecodeFSDefault(self->dir_c);
    self->temp_s = PyUnicode_DecodeFSDefault(self->temp_c);
    self->final_s = PyUnicode_DecodeFSDefault(self->final_c);
    if (fd >= 0) {
        self->fd = fd;
        self->state = AF_OPEN;
    }
    if (self->dir_s == NULL || self->temp_s == NULL || self->final_s == NULL)
        goto cleanup;
    if (fd < 0) {
        raise_errno(err, self->temp_s, NULL);
        goto cleanup;
    }
    result = (PyObject *)self;
    self = NULL;

cleanup:
    /* Dealloc unlinks the temp file if it was opened but we still fail. */
    Py_XDECREF((PyObject *)self);
    PyMem_Free(prefix);
    PyMem_Free(temp_name);
    Py_XDECREF(dir_b);
    Py_XDECREF(name_b);
    return result;
}

static void
AtomicFile_dealloc(AtomicFileObject *self)
{
    PyTypeObject *tp = Py_TYPE((PyObject *)self);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);

    /* A writer dropped without commit() must not leave a temp file behind. */
    if (self->state == AF_OPEN)
        discard_temp(self);
    free_bounce(self);
    PyMem_Free(self->dir_c);
    PyMem_Free(self->temp_c);
    PyMem_Free(self->final_c);
    Py_XDECREF(self->dir_s);
    Py_XDECREF(self->temp_s);
    Py_XDECREF(self->final_s);
    tp_free(self);
    Py_DECREF(tp);
}

PyDoc_STRVAR(write_doc,
"write(buffers, *, checksum=True) -> list[int]\n\n"
"Write each C-contiguous buffer in order and return the CRC-32C of each\n"
"(an empty list when checksum is False). On any error the temporary file\n"
"is removed, the AtomicFile is closed and OSError is raised. In direct\n"
"mode up to 8 MiB stay in memory until the next write() or commit().");

static PyObject *
AtomicFile_write(AtomicFileObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"buffers", "checksum", NULL};
    PyObject *buffers, *seq = NULL, *result = NULL;
    Py_buffer *views = NULL;
    uint32_t *crcs = NULL;
    Py_ssize_t count = 0, acquired = 0;
    int checksum = 1, err;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|$p:write", kwlist,
                                     &buffers, &checksum))
        goto cleanup;
    if (check_usable(self) < 0)
        goto cleanup;
    /* bytes and numpy arrays are sequences too; iterating one would give
     * ints, so say what went wrong instead. */
    if (PyObject_CheckBuffer(buffers)) {
        PyErr_SetString(PyExc_TypeError,
                        "write() takes a sequence of buffers; wrap a single "
                        "buffer in a list");
        goto cleanup;
    }
    seq = PySequence_Tuple(buffers);
    if (seq == NULL)
        goto cleanup;
    count = PyTuple_Size(seq);
    views = PyMem_Calloc(count ? (size_t)count : 1, sizeof(Py_buffer));
    crcs = PyMem_Calloc(count ? (size_t)count : 1, sizeof(uint32_t));
    if (views == NULL || crcs == NULL) {
        PyErr_NoMemory();
        goto cleanup;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        if (PyObject_GetBuffer(PyTuple_GetItem(seq, i), &views[i],
                               PyBUF_SIMPLE) < 0)
            goto cleanup;
        acquired++;
        if (!PyBuffer_IsContiguous(&views[i], 'C')) {
            PyErr_Format(PyExc_BufferError,
                         "buffer %zd is not C-contiguous", i);
            goto cleanup;
        }
    }

    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    err = write_views(self, views, count, checksum ? crcs : NULL);
    if (err)
        discard_temp(self);
    Py_END_ALLOW_THREADS
    self->busy = 0;

    if (err) {
        self->state = AF_ABORTED;
        raise_errno(err, self->temp_s, NULL);
        goto cleanup;
    }
    result = PyList_New(checksum ? count : 0);
    if (result == NULL || !checksum)
        goto cleanup;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *value = PyLong_FromUnsignedLong(crcs[i]);

        if (value == NULL) {
            Py_CLEAR(result);
            goto cleanup;
        }
        PyList_SetItem(result, i, value);
    }

cleanup:
    for (Py_ssize_t i = 0; i < acquired; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(crcs);
    Py_XDECREF(seq);
    return result;
}

PyDoc_STRVAR(commit_doc,
"commit() -> None\n\n"
"fdatasync (if sync), close, rename over the final name, fsync the\n"
"directory (if sync). A failure up to the rename removes the temporary\n"
"file; a directory fsync failure leaves the file in place but not known\n"
"durable and names the directory. The AtomicFile is closed afterwards.");

static PyObject *
AtomicFile_commit(AtomicFileObject *self, PyObject *Py_UNUSED(ignored))
{
    commit_step step = STEP_FSYNC;
    int err;

    if (check_usable(self) < 0)
        return NULL;
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    err = commit_file(self, &step);
    Py_END_ALLOW_THREADS
    self->busy = 0;

    if (err == 0) {
        self->state = AF_COMMITTED;
        Py_RETURN_NONE;
    }
    if (step == STEP_DIRFSYNC) {
        self->state = AF_COMMITTED;
        raise_errno(err, self->dir_s, NULL);
    }
    else {
        self->state = AF_ABORTED;
        raise_errno(err, self->temp_s,
                    step == STEP_RENAME ? self->final_s : NULL);
    }
    return NULL;
}

PyDoc_STRVAR(abort_doc,
"abort() -> None\n\n"
"Close and remove the temporary file. Does nothing once committed or\n"
"aborted.");

static PyObject *
AtomicFile_abort(AtomicFileObject *self, PyObject *Py_UNUSED(ignored))
{
    int err;

    if (self->state != AF_OPEN)
        Py_RETURN_NONE;
    if (check_usable(self) < 0)
        return NULL;
    self->state = AF_ABORTED;
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    err = discard_temp(self);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (err) {
        raise_errno(err, self->temp_s, NULL);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
AtomicFile_enter(AtomicFileObject *self, PyObject *Py_UNUSED(ignored))
{
    Py_INCREF((PyObject *)self);
    return (PyObject *)self;
}

static PyObject *
AtomicFile_exit(AtomicFileObject *self, PyObject *Py_UNUSED(args))
{
    PyObject *res = AtomicFile_abort(self, NULL);

    if (res == NULL)
        return NULL;
    Py_DECREF(res);
    Py_RETURN_FALSE;
}

static PyObject *
AtomicFile_repr(AtomicFileObject *self)
{
    static const char *const names[] = {"open", "committed", "aborted"};

    return PyUnicode_FromFormat("<fastbackup AtomicFile %R (%s)>",
                                self->final_s, names[self->state]);
}

static PyObject *
get_temp_path(AtomicFileObject *self, void *Py_UNUSED(closure))
{
    Py_INCREF(self->temp_s);
    return self->temp_s;
}

static PyObject *
get_final_path(AtomicFileObject *self, void *Py_UNUSED(closure))
{
    Py_INCREF(self->final_s);
    return self->final_s;
}

static PyObject *
get_bytes_written(AtomicFileObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(self->bytes_written);
}

static PyObject *
get_direct(AtomicFileObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->direct);
}

static PyObject *
get_closed(AtomicFileObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->state != AF_OPEN);
}

static PyObject *
get_committed(AtomicFileObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->state == AF_COMMITTED);
}

static PyGetSetDef AtomicFile_getset[] = {
    {"temp_path", (getter)get_temp_path, NULL,
     "Path of the temporary file being written.", NULL},
    {"final_path", (getter)get_final_path, NULL,
     "Path the file is renamed to by commit().", NULL},
    {"bytes_written", (getter)get_bytes_written, NULL,
     "Bytes given to write() so far (in direct mode up to 8 MiB of them\n"
     "may still be buffered in memory until the next write() or commit()).", NULL},
    {"direct", (getter)get_direct, NULL,
     "True if the temporary file was opened with O_DIRECT: direct=True was\n"
     "asked for and the filesystem accepted it.", NULL},
    {"closed", (getter)get_closed, NULL,
     "True once committed, aborted or failed.", NULL},
    {"committed", (getter)get_committed, NULL,
     "True once the file has been renamed into place (even if the "
     "directory fsync then failed).", NULL},
    {NULL},
};

static PyMethodDef AtomicFile_methods[] = {
    {"write", (PyCFunction)(void (*)(void))AtomicFile_write,
     METH_VARARGS | METH_KEYWORDS, write_doc},
    {"commit", (PyCFunction)AtomicFile_commit, METH_NOARGS, commit_doc},
    {"abort", (PyCFunction)AtomicFile_abort, METH_NOARGS, abort_doc},
    {"__enter__", (PyCFunction)AtomicFile_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)AtomicFile_exit, METH_VARARGS, NULL},
    {NULL},
};

PyDoc_STRVAR(AtomicFile_doc,
"AtomicFile(directory, final_name, *, sync=True, direct=False)\n\n"
"Write a file crash-safely: data goes to a temporary file\n"
"'.{final_name}.{16 hex}.tmp' in `directory`, which commit() syncs and\n"
"renames over `final_name`. Leaving a `with` block, abort() or dropping the\n"
"object without commit() removes the temporary file.\n\n"
"direct=True writes with O_DIRECT, sparing the calling thread the\n"
"page-cache copy: a buffer that starts on a 4096-byte boundary, at a file\n"
"offset that is one too, goes out from where it is (its whole blocks, if\n"
"at least 256 KiB); everything else goes through an 8 MiB aligned bounce\n"
"buffer, whose last partial block is written at commit(). Where the\n"
"filesystem refuses O_DIRECT the file\n"
"is written buffered and the `direct` property is False. Because data\n"
"waits in the bounce buffer, a write error may surface only at commit().");

static PyType_Slot AtomicFile_slots[] = {
    {Py_tp_new, AtomicFile_new},
    {Py_tp_dealloc, AtomicFile_dealloc},
    {Py_tp_repr, AtomicFile_repr},
    {Py_tp_methods, AtomicFile_methods},
    {Py_tp_getset, AtomicFile_getset},
    {Py_tp_doc, (void *)AtomicFile_doc},
    {0, NULL},
};

PyType_Spec fb_atomic_file_spec = {
    .name = "fastbackup._native.AtomicFile",
    .basicsize = sizeof(AtomicFileObject),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = AtomicFile_slots,
};
