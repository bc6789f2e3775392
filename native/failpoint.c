/*
 * Process-wide failpoints. A failpoint makes the nth future call of one
 * operation fail with a chosen errno, once; the short-write cap limits every
 * write(2) until cleared. Counters are atomics because the I/O runs with the
 * GIL released and possibly on several threads at once.
 */
#include "failpoint.h"

#include <string.h>

atomic_int fb_failpoints_armed = 0;

/* Countdown to the failing call; 0 means disarmed. */
static atomic_llong countdown[FB_FP_COUNT];
static atomic_int inject_errno[FB_FP_COUNT];
static atomic_size_t write_cap = 0;

static const char *const op_names[FB_FP_COUNT] = {
    [FB_FP_OPEN] = "open",
    [FB_FP_WRITE] = "write",
    [FB_FP_FSYNC] = "fsync",
    [FB_FP_CLOSE] = "close",
    [FB_FP_RENAME] = "rename",
    [FB_FP_DIRFSYNC] = "dirfsync",
};

int
fb_failpoint_hit_slow(fb_failpoint_op op)
{
    long long left = atomic_load(&countdown[op]);

    /* CAS loop so that exactly one caller sees the transition to zero even
     * when several threads race on the same operation. */
    while (left > 0) {
        if (atomic_compare_exchange_weak(&countdown[op], &left, left - 1)) {
            if (left == 1)
                return atomic_load(&inject_errno[op]);
            return 0;
        }
    }
    return 0;
}

size_t
fb_failpoint_cap_slow(size_t len)
{
    size_t cap = atomic_load(&write_cap);

    if (cap != 0 && len > cap)
        return cap;
    return len;
}

int
fb_failpoint_set(const char *name, long long nth, int err)
{
    if (strcmp(name, "short_write") == 0) {
        atomic_store(&write_cap, (size_t)nth);
        atomic_store(&fb_failpoints_armed, 1);
        return 0;
    }
    for (int op = 0; op < FB_FP_COUNT; op++) {
        if (strcmp(name, op_names[op]) == 0) {
            /* errno first: a racing caller that sees the countdown must not
             * inject a stale errno. */
            atomic_store(&inject_errno[op], err);
            atomic_store(&countdown[op], nth);
            atomic_store(&fb_failpoints_armed, 1);
            return 0;
        }
    }
    return -1;
}

void
fb_failpoint_clear(void)
{
    atomic_store(&fb_failpoints_armed, 0);
    atomic_store(&write_cap, 0);
    for (int op = 0; op < FB_FP_COUNT; op++) {
        atomic_store(&countdown[op], 0);
        atomic_store(&inject_errno[op], 0);
    }
}
