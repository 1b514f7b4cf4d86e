/*
 * log.c - leveled text/JSON logging to stderr with journald priorities.
 */
#include "log.h"
#include "util.h"

#include <stdarg.h>
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

/* A text value needs quotes when it is empty or holds spaces, quotes or '='. */
static void put_text_value(sbuf *b, const char *v)
{
    if (*v != '\0' && strpbrk(v, " \t\n\"=") == NULL)
        sbuf_puts(b, v);
    else
        sbuf_json_str(b, v, strlen(v));
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
        sbuf_json_str(&b, msg, strlen(msg));
    } else {
        if (!to_journal) {
            put_time(&b);
            sbuf_putc(&b, ' ');
        }
        sbuf_printf(&b, "%-7s %s", level_names[level], msg);
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
            sbuf_json_str(&b, k, strlen(k));
            sbuf_putc(&b, ':');
            sbuf_json_str(&b, v, strlen(v));
        } else {
            sbuf_printf(&b, " %s=", k);
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
