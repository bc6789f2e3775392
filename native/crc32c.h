/*
 * CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as used by iSCSI,
 * ext4 and the `crc32c` PyPI package. Pure C; safe to call without the GIL.
 */
#ifndef FASTBACKUP_CRC32C_H
#define FASTBACKUP_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/* Continues a finalised CRC `crc` (0 to start) over `len` bytes at `buf`. */
uint32_t fb_crc32c(uint32_t crc, const void *buf, size_t len);

/* Always the portable table path, so tests can check it on any CPU. */
uint32_t fb_crc32c_portable(uint32_t crc, const void *buf, size_t len);

/* Copies `len` bytes from `src` to `dst` (which must not overlap) and
 * returns fb_crc32c(crc, src, len), reading the source once. The stores
 * bypass the cache where the CPU allows: the copy is for another thread to
 * write out, not for this one to read. */
uint32_t fb_crc32c_copy(uint32_t crc, void *dst, const void *src, size_t len);

/* fb_crc32c_copy() on the portable path, for tests. */
uint32_t fb_crc32c_copy_portable(uint32_t crc, void *dst, const void *src,
                                 size_t len);

/* Name of the implementation picked for this CPU, for diagnostics. */
const char *fb_crc32c_impl(void);

#endif
