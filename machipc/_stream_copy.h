/* Copies of large payloads with streaming (non-temporal) stores, for machipc/_unix.pyx.
 *
 * A large payload is copied into memory that this CPU will not read again soon:
 * the sender's copy into an arena is read by the receiver on another CPU, and a
 * receiver's copy-out of many MiB does not fit in the cache anyway. Ordinary
 * stores first read every destination line into the cache (a read for
 * ownership) and evict what was there; streaming stores write the lines to
 * memory directly. glibc switches to them only above
 * glibc.cpu.x86_non_temporal_threshold, which is hundreds of MiB on some
 * machines. SSE2 is part of x86-64; elsewhere this is memcpy.
 */
#ifndef MACHIPC_STREAM_COPY_H
#define MACHIPC_STREAM_COPY_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

static inline void machipc_stream_copy(void *dst, const void *src, size_t n)
{
#if defined(__SSE2__)
    unsigned char *d = (unsigned char *)dst;
    const unsigned char *s = (const unsigned char *)src;
    size_t head = (16 - ((uintptr_t)d & 15)) & 15; /* streaming stores need 16-byte alignment */
    if (n < head + 64) {
        memcpy(d, s, n);
        return;
    }
    memcpy(d, s, head);
    d += head;
    s += head;
    n -= head;
    for (; n >= 64; d += 64, s += 64, n -= 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)s);
        __m128i b = _mm_loadu_si128((const __m128i *)(s + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(s + 32));
        __m128i e = _mm_loadu_si128((const __m128i *)(s + 48));
        _mm_stream_si128((__m128i *)d, a);
        _mm_stream_si128((__m128i *)(d + 16), b);
        _mm_stream_si128((__m128i *)(d + 32), c);
        _mm_stream_si128((__m128i *)(d + 48), e);
    }
    _mm_sfence(); /* the streamed lines are visible before anything this thread stores next */
    memcpy(d, s, n);
#else
    memcpy(dst, src, n);
#endif
}

#endif
