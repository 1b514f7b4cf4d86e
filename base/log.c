/*
 * log.c - leveled text/JSON logging to stderr with journald priorities.
 *
 * Every message and value is escaped on the way out (see put_escaped), so
 * whatever bytes a gateway or a producer sends, each call writes exactly one
 * line of printable UTF-8.
 */
#include "log.h"
#include "util.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

static enum log_level min_level = LOG_INFO;
static int as_json;
static int to_journal;

static const char *level_names[] = {"debug", "info", "notice", "warning", "error"};
/* syslog priorities: debug 7, info 6, notice 5, warning 4, err 3 */
static const int level_prio[] = {7, 6, 5, 4, 3};

int log_level_parse(const char *name, enum log_level *out)
{
    for (int i = 0; i <= LOG_ERROR; i++) {
        if (strcmp(name, level_names[i]) == 0) {
            *out = (enum log_level)i;
            return 0;
        }
    }
    return -1;
}

/* systemd sets JOURNAL_STREAM=dev:inode for a service whose stderr is the journal. */
static int stderr_is_journal(void)
{
    const char *js = getenv("JOURNAL_STREAM");
    unsigned long long dev, ino;
    struct stat st;
    if (js == NULL || sscanf(js, "%llu:%llu", &dev, &ino) != 2)
        return 0;
    if (fstat(2, &st) != 0)
        return 0;
    return (unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino;
}

void log_setup(enum log_level level, int json)
{
    min_level = level;
    as_json = json;
    to_journal = stderr_is_journal();
}

int log_enabled(enum log_level level)
{
    return level >= min_level;
}

static void put_time(sbuf *b)
{
    struct timespec ts;
    struct tm tm;
    char t[32];
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    strftime(t, sizeof t, "%Y-%m-%dT%H:%M:%S", &tm);
    sbuf_printf(b, "%s.%03ldZ", t, ts.tv_nsec / 1000000);
}

/*
 * Escaping. Messages and values carry text from outside: error messages and
 * task ids from the gateway, job ids, Redis errors. Written raw, a CR or LF
 * forges a log line, an ESC sequence rewrites the operator's terminal, and a
 * bidi override reorders what they read. So every byte that is not plain
 * printable text is escaped, in both formats:
 *   - C0 controls and DEL: \n \r \t, else \xHH in text and \u00HH in JSON;
 *   - '\\' always, and '"' in quoted text values and in JSON;
 *   - C1 controls (U+0080-U+009F, which some terminals honour as CSI etc.),
 *     line/paragraph separators and bidi controls: \uHHHH;
 *   - bytes that are not valid UTF-8: \xHH in text (the raw byte stays
 *     recoverable), U+FFFD in JSON (JSON strings cannot carry raw bytes).
 * The result is always one line of printable, valid UTF-8.
 */
enum esc_mode { ESC_MSG, ESC_QUOTED, ESC_JSON };

/* Length of the UTF-8 sequence led by byte c (0: not a lead byte). */
static size_t utf8_lead_len(unsigned char c)
{
    if (c >= 0xc2 && c <= 0xdf)
        return 2;
    if (c >= 0xe0 && c <= 0xef)
        return 3;
    if (c >= 0xf0 && c <= 0xf4)
        return 4;
    return 0;
}

static uint32_t utf8_decode(const unsigned char *p, size_t len)
{
    static const unsigned char lead_mask[5] = {0, 0, 0x1f, 0x0f, 0x07};
    uint32_t cp = p[0] & lead_mask[len];
    for (size_t i = 1; i < len; i++)
        cp = (cp << 6) | (p[i] & 0x3f);
    return cp;
}

/* Valid code points that still must not reach a terminal or a reader raw. */
static int cp_is_hazard(uint32_t cp)
{
    return (cp >= 0x80 && cp <= 0x9f) ||        /* C1 controls */
           cp == 0x2028 || cp == 0x2029 ||       /* line / paragraph separator */
           (cp >= 0x200e && cp <= 0x200f) ||     /* LRM, RLM */
           (cp >= 0x202a && cp <= 0x202e) ||     /* bidi embeddings / overrides */
           (cp >= 0x2066 && cp <= 0x2069);       /* bidi isolates */
}

static void put_ctl(sbuf *b, unsigned char c, enum esc_mode mode)
{
    switch (c) {
    case '\n': sbuf_append(b, "\\n", 2); return;
    case '\r': sbuf_append(b, "\\r", 2); return;
    case '\t': sbuf_append(b, "\\t", 2); return;
    default: break;
    }
    if (mode == ESC_JSON)
        sbuf_printf(b, "\\u%04x", c);
    else
        sbuf_printf(b, "\\x%02x", c);
}

static void put_escaped(sbuf *b, const char *s, enum esc_mode mode)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t n = strlen(s);
    size_t i = 0;
    sbuf_reserve(b, n + 2);
    while (i < n) {
        unsigned char c = p[i];
        size_t j = i;
        /* Plain printable ASCII goes out in one span. */
        while (j < n && p[j] >= 0x20 && p[j] < 0x7f && p[j] != '\\' && (p[j] != '"' || mode == ESC_MSG))
            j++;
        if (j > i) {
            sbuf_append(b, p + i, j - i);
            i = j;
            continue;
        }
        if (c == '\\' || c == '"') {
            char esc[2] = {'\\', (char)c};
            sbuf_append(b, esc, 2);
            i++;
            continue;
        }
        if (c < 0x80) {
            put_ctl(b, c, mode);
            i++;
            continue;
        }
        size_t len = utf8_lead_len(c);
        if (len == 0 || len > n - i || utf8_invalid_at((const char *)p + i, len) != -1) {
            if (mode == ESC_JSON)
                sbuf_append(b, "\\ufffd", 6);
            else
                sbuf_printf(b, "\\x%02x", c);
            i++;
            continue;
        }
        uint32_t cp = utf8_decode(p + i, len);
        if (cp_is_hazard(cp))
            sbuf_printf(b, "\\u%04x", (unsigned)cp);
        else
            sbuf_append(b, p + i, len);
        i += len;
    }
}

/*
 * A text value stays bare when it is plain: non-empty printable ASCII or
 * UTF-8 with no space, quote, '=' or backslash. Anything else is quoted and
 * escaped, so a value can never look like another key=value or a new line.
 */
static int text_value_is_bare(const char *v)
{
    if (*v == '\0')
        return 0;
    for (const unsigned char *p = (const unsigned char *)v; *p; p++) {
        if (*p <= 0x20 || *p == 0x7f || *p == '"' || *p == '=' || *p == '\\')
            return 0;
        if (*p >= 0x80)
            return 0; /* rare in values; the quoted path checks the encoding */
    }
    return 1;
}

static void put_text_value(sbuf *b, const char *v)
{
    if (text_value_is_bare(v)) {
        sbuf_puts(b, v);
        return;
    }
    sbuf_putc(b, '"');
    put_escaped(b, v, ESC_QUOTED);
    sbuf_putc(b, '"');
}

static void put_json_str(sbuf *b, const char *s)
{
    sbuf_putc(b, '"');
    put_escaped(b, s, ESC_JSON);
    sbuf_putc(b, '"');
}

static void emit(enum log_level level, const char *msg, va_list kv)
{
    sbuf b;
    sbuf_init(&b);
    if (to_journal)
        sbuf_printf(&b, "<%d>", level_prio[level]);
    if (as_json) {
        sbuf_puts(&b, "{\"ts\":\"");
        put_time(&b);
        sbuf_printf(&b, "\",\"level\":\"%s\",\"msg\":", level_names[level]);
        put_json_str(&b, msg);
    } else {
        if (!to_journal) {
            put_time(&b);
            sbuf_putc(&b, ' ');
        }
        sbuf_printf(&b, "%-7s ", level_names[level]);
        put_escaped(&b, msg, ESC_MSG);
    }
    for (;;) {
        const char *k = va_arg(kv, const char *);
        if (k == NULL)
            break;
        const char *v = va_arg(kv, const char *);
        if (v == NULL)
            v = "";
        if (as_json) {
            sbuf_putc(&b, ',');
            put_json_str(&b, k);
            sbuf_putc(&b, ':');
            put_json_str(&b, v);
        } else {
            /* Keys are literals of our own code; escape them all the same. */
            sbuf_putc(&b, ' ');
            put_escaped(&b, k, ESC_MSG);
            sbuf_putc(&b, '=');
            put_text_value(&b, v);
        }
    }
    if (as_json)
        sbuf_putc(&b, '}');
    sbuf_putc(&b, '\n');
    /* One write per line so lines of concurrent writers never interleave. */
    fwrite(b.buf, 1, b.len, stderr);
    fflush(stderr);
    sbuf_free(&b);
}

static void emit_kv_none(enum log_level level, const char *msg, ...)
{
    va_list ap;
    va_start(ap, msg);
    emit(level, msg, ap);
    va_end(ap);
}

void log_msg(enum log_level level, const char *fmt, ...)
{
    if (level < min_level)
        return;
    sbuf m;
    va_list ap;
    sbuf_init(&m);
    va_start(ap, fmt);
    sbuf_vprintf(&m, fmt, ap);
    va_end(ap);
    emit_kv_none(level, m.buf ? m.buf : "", (const char *)NULL);
    sbuf_free(&m);
}

void log_kv(enum log_level level, const char *msg, ...)
{
    if (level < min_level)
        return;
    va_list ap;
    va_start(ap, msg);
    emit(level, msg, ap);
    va_end(ap);
}
