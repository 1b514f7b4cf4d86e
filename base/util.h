/*
 * util.h - small helpers shared by every module of vidq.
 *
 * Allocation wrappers abort on out-of-memory (as tmux and OpenBSD do), so no
 * caller ever handles NULL from malloc. `sbuf` is a growable byte buffer used
 * to build request bodies, Redis arguments and JSON text without sprintf
 * arithmetic scattered around the code.
 */
#ifndef VIDQ_UTIL_H
#define VIDQ_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <stdarg.h>

void *xmalloc(size_t n);
void *xcalloc(size_t nmemb, size_t n);
void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);
char *xstrndup(const char *s, size_t n);

/* Wall clock in unix milliseconds (for event timestamps, due times). */
int64_t now_ms(void);
/* Monotonic milliseconds (for latencies and deadlines). */
int64_t mono_ms(void);
/* Monotonic microseconds (the latency histograms of /metrics). */
int64_t mono_us(void);
/*
 * The UTC day of unix time `ms` as YYYY-MM-DD (daily budgets, docs/protocol.md
 * §10). Builds with crash points honour VIDQ_TEST_DAY_MS: a "day" that
 * long (day N since the epoch is the N-th such span), so the tests can see
 * a day end.
 */
void utc_day(int64_t ms, char out[16]);
/* Where to cut UTF-8 text `s` at most `n` bytes long (s[n] must be
 * readable: the text goes on): n, or less so no character is cut in two. */
size_t utf8_floor(const char *s, size_t n);

typedef struct sbuf {
    char *buf;   /* always NUL-terminated when non-NULL */
    size_t len;
    size_t cap;
} sbuf;

void sbuf_init(sbuf *b);
void sbuf_free(sbuf *b);
void sbuf_reset(sbuf *b);
void sbuf_reserve(sbuf *b, size_t extra);
void sbuf_append(sbuf *b, const void *data, size_t n);
void sbuf_puts(sbuf *b, const char *s);
void sbuf_putc(sbuf *b, char c);
void sbuf_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void sbuf_vprintf(sbuf *b, const char *fmt, va_list ap);
/* Append `s` as a quoted JSON string. Invalid UTF-8 becomes U+FFFD and
 * control characters (NUL included) are escaped, so the result is always
 * valid JSON whatever bytes a producer pushed. */
void sbuf_json_str(sbuf *b, const char *s, size_t n);
/* Take ownership of the buffer (caller frees); `b` is reset. */
char *sbuf_steal(sbuf *b, size_t *len);

/* The value of a hex digit, or -1. */
int hexval(char c);
/* Offset of the first byte of s[0..n) that is not valid UTF-8, or -1. */
long utf8_invalid_at(const char *s, size_t n);

/* True when s[0..n) contains only [A-Za-z0-9._:-] and 1 <= n <= 128
 * (the charset of job ids and batch names, docs/protocol.md §2). */
int id_is_valid(const char *s, size_t n);

/*
 * Invariants. A broken one is a bug in vidq, not bad input: VQ_ASSERT logs
 * the condition and where, then aborts (as Redis's serverAssert does), so
 * the bug shows where it is instead of corrupting what follows. Always on.
 */
#define VQ_ASSERT(cond) ((cond) ? (void)0 : vq_assert_failed(#cond, __FILE__, __LINE__))
void vq_assert_failed(const char *what, const char *file, int line) __attribute__((noreturn));

/*
 * Named crash points, for the crash tests (tests/it_crash.py): in a build
 * configured with --enable-crash-points, VIDQ_CRASH_AT=name[:n] makes the
 * process die by SIGKILL the n-th time (default: the first) it reaches the
 * point `name`. Other builds compile the calls away.
 */
#ifdef VIDQ_CRASH_POINTS
void crash_point(const char *name);
#else
#define crash_point(name) ((void)0)
#endif

#endif
