/*
 * util.c - allocation wrappers, clocks and the sbuf byte buffer.
 */
#include "util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static void oom(void)
{
    fputs("vidq: out of memory\n", stderr);
    abort();
}

void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (p == NULL)
        oom();
    return p;
}

void *xcalloc(size_t nmemb, size_t n)
{
    void *p = calloc(nmemb ? nmemb : 1, n ? n : 1);
    if (p == NULL)
        oom();
    return p;
}

void *xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (q == NULL)
        oom();
    return q;
}

char *xstrdup(const char *s)
{
    return xstrndup(s, strlen(s));
}

char *xstrndup(const char *s, size_t n)
{
    char *p = xmalloc(n + 1);
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

void utc_day(int64_t ms, char out[16])
{
    int64_t day_ms = 86400000;
#ifdef VIDQ_CRASH_POINTS
    const char *t = getenv("VIDQ_TEST_DAY_MS");
    if (t && atoll(t) > 0)
        day_ms = atoll(t);
#endif
    /* Asked before every send: the text is made once a day (one thread). */
    static int64_t cached_idx = -1, cached_len;
    static char cached[16];
    int64_t idx = ms / day_ms;
    if (idx != cached_idx || day_ms != cached_len) {
        time_t secs = (time_t)(idx * 86400);
        struct tm tm;
        gmtime_r(&secs, &tm);
        snprintf(cached, sizeof cached, "%04d-%02u-%02u", (tm.tm_year + 1900) % 10000, (unsigned)(tm.tm_mon + 1) % 100u,
                 (unsigned)tm.tm_mday % 100u);
        cached_idx = idx;
        cached_len = day_ms;
    }
    memcpy(out, cached, 16);
}

size_t utf8_floor(const char *s, size_t n)
{
    while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80)
        n--;
    return n;
}

int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void sbuf_init(sbuf *b)
{
    b->buf = NULL;
    b->len = 0;
    b->cap = 0;
}

void sbuf_free(sbuf *b)
{
    free(b->buf);
    sbuf_init(b);
}

void sbuf_reset(sbuf *b)
{
    b->len = 0;
    if (b->buf)
        b->buf[0] = '\0';
}

void sbuf_reserve(sbuf *b, size_t extra)
{
    size_t need = b->len + extra + 1;
    if (need <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < need)
        cap *= 2;
    b->buf = xrealloc(b->buf, cap);
    b->cap = cap;
}

void sbuf_append(sbuf *b, const void *data, size_t n)
{
    sbuf_reserve(b, n);
    if (n)
        memcpy(b->buf + b->len, data, n);
    b->len += n;
    b->buf[b->len] = '\0';
}

void sbuf_puts(sbuf *b, const char *s)
{
    sbuf_append(b, s, strlen(s));
}

void sbuf_putc(sbuf *b, char c)
{
    sbuf_append(b, &c, 1);
}

void sbuf_vprintf(sbuf *b, const char *fmt, va_list ap)
{
    va_list cp;
    va_copy(cp, ap);
    int n = vsnprintf(NULL, 0, fmt, cp);
    va_end(cp);
    if (n < 0)
        return;
    sbuf_reserve(b, (size_t)n);
    vsnprintf(b->buf + b->len, (size_t)n + 1, fmt, ap);
    b->len += (size_t)n;
}

void sbuf_printf(sbuf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    sbuf_vprintf(b, fmt, ap);
    va_end(ap);
}

/* Length of the valid UTF-8 sequence at s (1..4), or 0 when invalid. */
static size_t utf8_seq(const unsigned char *s, size_t n)
{
    unsigned char c = s[0];
    size_t len;
    uint32_t cp;
    if (c < 0x80)
        return 1;
    if (c >= 0xc2 && c <= 0xdf) {
        len = 2;
        cp = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
        len = 3;
        cp = c & 0x0f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        len = 4;
        cp = c & 0x07;
    } else {
        return 0;
    }
    if (n < len)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    /* Overlong forms, surrogates and values above U+10FFFF are invalid. */
    if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff)))
        return 0;
    if (cp >= 0xd800 && cp <= 0xdfff)
        return 0;
    return len;
}

long utf8_invalid_at(const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        size_t len = utf8_seq(p + i, n - i);
        if (len == 0)
            return (long)i;
        i += len;
    }
    return -1;
}

int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

void sbuf_json_str(sbuf *b, const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s;
    sbuf_reserve(b, n + 2);
    sbuf_putc(b, '"');
    size_t i = 0;
    while (i < n) {
        unsigned char c = p[i];
        if (c == '"' || c == '\\') {
            char esc[2] = {'\\', (char)c};
            sbuf_append(b, esc, 2);
            i++;
        } else if (c < 0x20) {
            switch (c) {
            case '\n': sbuf_append(b, "\\n", 2); break;
            case '\r': sbuf_append(b, "\\r", 2); break;
            case '\t': sbuf_append(b, "\\t", 2); break;
            default: sbuf_printf(b, "\\u%04x", c); break;
            }
            i++;
        } else if (c < 0x80) {
            size_t j = i + 1;
            while (j < n && p[j] >= 0x20 && p[j] < 0x80 && p[j] != '"' && p[j] != '\\')
                j++;
            sbuf_append(b, p + i, j - i);
            i = j;
        } else {
            size_t len = utf8_seq(p + i, n - i);
            if (len == 0) {
                sbuf_append(b, "\\ufffd", 6);
                i++;
            } else {
                sbuf_append(b, p + i, len);
                i += len;
            }
        }
    }
    sbuf_putc(b, '"');
}

char *sbuf_steal(sbuf *b, size_t *len)
{
    if (b->buf == NULL) {
        sbuf_reserve(b, 0);
        b->buf[0] = '\0';
    }
    char *p = b->buf;
    if (len)
        *len = b->len;
    sbuf_init(b);
    return p;
}

int id_is_valid(const char *s, size_t n)
{
    if (n < 1 || n > 128)
        return 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                 c == '.' || c == '_' || c == ':' || c == '-';
        if (!ok)
            return 0;
    }
    return 1;
}

#ifdef VIDQ_CRASH_POINTS
#include <signal.h>
void crash_point(const char *name)
{
    static long hits;
    const char *at = getenv("VIDQ_CRASH_AT");
    size_t n = strlen(name);
    if (at == NULL || strncmp(at, name, n) != 0 || (at[n] != '\0' && at[n] != ':'))
        return;
    long want = at[n] == ':' ? strtol(at + n + 1, NULL, 10) : 1;
    if (++hits < want)
        return;
    fprintf(stderr, "vidqd: crash point %s reached: SIGKILL\n", name);
    raise(SIGKILL);
}
#endif

void vq_assert_failed(const char *what, const char *file, int line)
{
    fprintf(stderr, "vidq: internal error: assertion failed: %s (%s:%d)\n", what, file, line);
    fflush(stderr);
    abort();
}
