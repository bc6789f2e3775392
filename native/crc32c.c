/*
 * CRC-32C with a runtime choice between the SSE4.2 `crc32` instruction and a
 * portable slicing-by-8 table. The hardware path runs three independent
 * streams because the instruction has a latency of 3 cycles but a throughput
 * of 1 per cycle; the three partial CRCs are merged by "shifting" the earlier
 * ones over the length of the later blocks with precomputed tables (Mark
 * Adler's crc32c.c, zlib's crc32_combine).
 */
#include "crc32c.h"

#include <pthread.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#  define FB_HAVE_SSE42 1
#  include <nmmintrin.h>
#endif

#define POLY 0x82f63b78u

/* Block sizes of the interleaved hardware loop. LONG keeps the three streams
 * far apart enough to cover most of a buffer; SHORT mops up what is left. */
#define LONG_BLOCK 8192
#define SHORT_BLOCK 256

static uint32_t sw_table[8][256];
static uint32_t shift_long[4][256];
static uint32_t shift_short[4][256];

typedef uint32_t (*crc_fn)(uint32_t, const unsigned char *, size_t);
typedef uint32_t (*copy_fn)(uint32_t, unsigned char *, const unsigned char *,
                            size_t);
static crc_fn crc_impl;
static copy_fn copy_impl;
static const char *crc_impl_name;
static pthread_once_t init_once = PTHREAD_ONCE_INIT;

static uint32_t
gf2_matrix_times(const uint32_t *mat, uint32_t vec)
{
    uint32_t sum = 0;

    while (vec) {
        if (vec & 1)
            sum ^= *mat;
        vec >>= 1;
        mat++;
    }
    return sum;
}

static void
gf2_matrix_square(uint32_t *square, const uint32_t *mat)
{
    for (int n = 0; n < 32; n++)
        square[n] = gf2_matrix_times(mat, mat[n]);
}

/* Operator that advances a CRC register over `len` zero bytes; `len` must be
 * a power of two. */
static void
zeros_operator(uint32_t *even, size_t len)
{
    uint32_t odd[32];
    uint32_t row = 1;

    odd[0] = POLY; /* one zero bit */
    for (int n = 1; n < 32; n++) {
        odd[n] = row;
        row <<= 1;
    }
    gf2_matrix_square(even, odd); /* two zero bits */
    gf2_matrix_square(odd, even); /* four zero bits */
    do {
        gf2_matrix_square(even, odd);
        len >>= 1;
        if (len == 0)
            return;
        gf2_matrix_square(odd, even);
        len >>= 1;
    } while (len);
    memcpy(even, odd, sizeof(odd));
}

static void
build_shift_table(uint32_t table[4][256], size_t len)
{
    uint32_t op[32];

    zeros_operator(op, len);
    for (uint32_t n = 0; n < 256; n++) {
        table[0][n] = gf2_matrix_times(op, n);
        table[1][n] = gf2_matrix_times(op, n << 8);
        table[2][n] = gf2_matrix_times(op, n << 16);
        table[3][n] = gf2_matrix_times(op, n << 24);
    }
}

static inline uint32_t
shift_crc(uint32_t table[4][256], uint32_t crc)
{
    return table[0][crc & 0xff] ^ table[1][(crc >> 8) & 0xff] ^
           table[2][(crc >> 16) & 0xff] ^ table[3][crc >> 24];
}

static uint32_t
crc32c_sw(uint32_t crc, const unsigned char *p, size_t len)
{
    crc = ~crc;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    while (len && ((uintptr_t)p & 7) != 0) {
        crc = sw_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
        len--;
    }
    while (len >= 8) {
        uint64_t word;

        memcpy(&word, p, 8);
        word ^= crc;
        crc = sw_table[7][word & 0xff] ^
              sw_table[6][(word >> 8) & 0xff] ^
              sw_table[5][(word >> 16) & 0xff] ^
              sw_table[4][(word >> 24) & 0xff] ^
              sw_table[3][(word >> 32) & 0xff] ^
              sw_table[2][(word >> 40) & 0xff] ^
              sw_table[1][(word >> 48) & 0xff] ^
              sw_table[0][word >> 56];
        p += 8;
        len -= 8;
    }
#endif
    while (len--)
        crc = sw_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

/* Copies in pieces small enough to stay in the L2 cache, each checksummed
 * from there: the source is read from memory once. */
#define COPY_PIECE (64 * 1024)

static uint32_t
crc32c_copy_sw(uint32_t crc, unsigned char *d, const unsigned char *p,
               size_t len)
{
    while (len) {
        size_t n = len < COPY_PIECE ? len : COPY_PIECE;

        memcpy(d, p, n);
        crc = crc32c_sw(crc, d, n);
        d += n;
        p += n;
        len -= n;
    }
    return crc;
}

#ifdef FB_HAVE_SSE42
/* With a destination, each word read is also stored there with SSE2's
 * movnti, past the cache: a snapshot is written out by another thread long
 * after the copy, so caching it only evicts what training uses. glibc's
 * memcpy streams past the cache only above a size threshold derived from
 * the last-level cache, which a VM may report as hundreds of MiB: a tensor
 * of a few MiB was copied with ordinary stores, at up to 1.7x the time
 * (docs/benchmarks.md). */
#define STREAM64(dst, word) _mm_stream_si64((long long *)(void *)(dst), \
                                            (long long)(word))

/* Three streams of `block` bytes each, from `p` (and to `d` unless NULL),
 * merged into one CRC register. Inlined into both callers, so the test of
 * `d` is resolved at compile time. */
__attribute__((target("sse4.2"), always_inline)) static inline uint64_t
three_streams(uint64_t crc0, unsigned char *d, const unsigned char *p,
              size_t block, uint32_t shift[4][256])
{
    uint64_t crc1 = 0, crc2 = 0;

    for (size_t i = 0; i < block; i += 8) {
        uint64_t w0, w1, w2;

        memcpy(&w0, p + i, 8);
        memcpy(&w1, p + block + i, 8);
        memcpy(&w2, p + 2 * block + i, 8);
        crc0 = _mm_crc32_u64(crc0, w0);
        crc1 = _mm_crc32_u64(crc1, w1);
        crc2 = _mm_crc32_u64(crc2, w2);
        if (d != NULL) {
            STREAM64(d + i, w0);
            STREAM64(d + block + i, w1);
            STREAM64(d + 2 * block + i, w2);
        }
    }
    crc0 = shift_crc(shift, (uint32_t)crc0) ^ (uint32_t)crc1;
    return shift_crc(shift, (uint32_t)crc0) ^ (uint32_t)crc2;
}

/* The CRC of `len` bytes at `p` and, when `d` is not NULL, their copy
 * there: the source is read once for both. */
__attribute__((target("sse4.2"), always_inline)) static inline uint32_t
crc32c_hw(uint32_t crc, unsigned char *d, const unsigned char *p, size_t len)
{
    /* The instruction works on 64-bit values; keeping the CRC in one avoids a
     * zero-extension per step. */
    uint64_t crc0 = (uint32_t)~crc;
    /* Word accesses aligned on the destination when copying (its stores
     * are the costlier), else on the source. */
    uintptr_t aligned_on = d != NULL ? (uintptr_t)d : (uintptr_t)p;

    while (len && (aligned_on & 7) != 0) {
        if (d != NULL)
            *d++ = *p;
        crc0 = _mm_crc32_u8((uint32_t)crc0, *p++);
        aligned_on++;
        len--;
    }
    while (len >= 3 * LONG_BLOCK) {
        crc0 = three_streams(crc0, d, p, LONG_BLOCK, shift_long);
        p += 3 * LONG_BLOCK;
        if (d != NULL)
            d += 3 * LONG_BLOCK;
        len -= 3 * LONG_BLOCK;
    }
    while (len >= 3 * SHORT_BLOCK) {
        crc0 = three_streams(crc0, d, p, SHORT_BLOCK, shift_short);
        p += 3 * SHORT_BLOCK;
        if (d != NULL)
            d += 3 * SHORT_BLOCK;
        len -= 3 * SHORT_BLOCK;
    }
    while (len >= 8) {
        uint64_t w;

        memcpy(&w, p, 8);
        crc0 = _mm_crc32_u64(crc0, w);
        if (d != NULL) {
            STREAM64(d, w);
            d += 8;
        }
        p += 8;
        len -= 8;
    }
    while (len--) {
        if (d != NULL)
            *d++ = *p;
        crc0 = _mm_crc32_u8((uint32_t)crc0, *p++);
    }
    /* Non-temporal stores are weakly ordered: fence them before the buffer
     * is handed to another thread. */
    if (d != NULL)
        _mm_sfence();
    return ~(uint32_t)crc0;
}

__attribute__((target("sse4.2"))) static uint32_t
crc32c_sse42(uint32_t crc, const unsigned char *p, size_t len)
{
    return crc32c_hw(crc, NULL, p, len);
}

__attribute__((target("sse4.2"))) static uint32_t
crc32c_copy_sse42(uint32_t crc, unsigned char *d, const unsigned char *p,
                  size_t len)
{
    return crc32c_hw(crc, d, p, len);
}
#endif

static void
init_tables(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t crc = n;

        for (int k = 0; k < 8; k++)
            crc = (crc & 1) ? (crc >> 1) ^ POLY : crc >> 1;
        sw_table[0][n] = crc;
    }
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t crc = sw_table[0][n];

        for (int k = 1; k < 8; k++) {
            crc = sw_table[0][crc & 0xff] ^ (crc >> 8);
            sw_table[k][n] = crc;
        }
    }

    crc_impl = crc32c_sw;
    copy_impl = crc32c_copy_sw;
    crc_impl_name = "slicing-by-8";
#ifdef FB_HAVE_SSE42
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2")) {
        build_shift_table(shift_long, LONG_BLOCK);
        build_shift_table(shift_short, SHORT_BLOCK);
        crc_impl = crc32c_sse42;
        copy_impl = crc32c_copy_sse42;
        crc_impl_name = "sse4.2";
    }
#endif
}

uint32_t
fb_crc32c(uint32_t crc, const void *buf, size_t len)
{
    pthread_once(&init_once, init_tables);
    return crc_impl(crc, (const unsigned char *)buf, len);
}

uint32_t
fb_crc32c_portable(uint32_t crc, const void *buf, size_t len)
{
    pthread_once(&init_once, init_tables);
    return crc32c_sw(crc, (const unsigned char *)buf, len);
}

uint32_t
fb_crc32c_copy(uint32_t crc, void *dst, const void *src, size_t len)
{
    pthread_once(&init_once, init_tables);
    return copy_impl(crc, (unsigned char *)dst, (const unsigned char *)src,
                     len);
}

uint32_t
fb_crc32c_copy_portable(uint32_t crc, void *dst, const void *src, size_t len)
{
    pthread_once(&init_once, init_tables);
    return crc32c_copy_sw(crc, (unsigned char *)dst,
                          (const unsigned char *)src, len);
}

const char *
fb_crc32c_impl(void)
{
    pthread_once(&init_once, init_tables);
    return crc_impl_name;
}
