/*
 * Test-only fault injection for the syscalls of AtomicFile.
 *
 * The checks sit on the I/O path of every checkpoint, so the unarmed case is a
 * single relaxed atomic load; everything else lives behind it.
 */
#ifndef FASTBACKUP_FAILPOINT_H
#define FASTBACKUP_FAILPOINT_H

#include <stdatomic.h>
#include <stddef.h>

typedef enum {
    FB_FP_OPEN = 0,   /* open(2) of the temporary file */
    FB_FP_WRITE,      /* each write(2) of the write loop */
    FB_FP_FSYNC,      /* fdatasync(2) of the temporary file */
    FB_FP_CLOSE,      /* close(2) of the temporary file in commit() */
    FB_FP_RENAME,     /* rename(2) onto the final name */
    FB_FP_DIRFSYNC,   /* open(2) + fsync(2) of the directory after rename */
    FB_FP_COUNT
} fb_failpoint_op;

/* Non-zero while any failpoint or the short-write cap is set. */
extern atomic_int fb_failpoints_armed;

int fb_failpoint_hit_slow(fb_failpoint_op op);
size_t fb_failpoint_cap_slow(size_t len);

/* Returns the errno to inject instead of running `op`, or 0 to run it. */
static inline int
fb_failpoint_hit(fb_failpoint_op op)
{
    if (!atomic_load_explicit(&fb_failpoints_armed, memory_order_relaxed))
        return 0;
    return fb_failpoint_hit_slow(op);
}

/* Returns how many of `len` bytes the next write(2) may be given. */
static inline size_t
fb_failpoint_cap_write(size_t len)
{
    if (!atomic_load_explicit(&fb_failpoints_armed, memory_order_relaxed))
        return len;
    return fb_failpoint_cap_slow(len);
}

/* Returns 0, or -1 when `name` is not a known operation. */
int fb_failpoint_set(const char *name, long long nth, int err);
void fb_failpoint_clear(void);

#endif
