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

/* Name of the implementation picked for this CPU, for diagnostics. */
const char *fb_crc32c_impl(void);

#endif
