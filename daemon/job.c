/*
 * job.c - job validation (CONTRACT §2) and request-body construction.
 */
#include "job.h"
#include "util.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const reserved[] = {"job_id", "meta", "batch"};

static int is_reserved(const char *key)
{
    for (size_t i = 0; i < sizeof reserved / sizeof reserved[0]; i++) {
        if (strcmp(key, reserved[i]) == 0)
            return 1;
    }
    return 0;
}

static void set_error(struct job *j, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void set_error(struct job *j, const char *fmt, ...)
{
    if (j->error)
        return; /* the first problem is the one reported */
    sbuf b;
    va_list ap;
    sbuf_init(&b);
    va_start(ap, fmt);
    sbuf_vprintf(&b, fmt, ap);
    va_end(ap);
    j->error = sbuf_steal(&b, NULL);
}

static const char *type_name(const cJSON *v)
{
    if (cJSON_IsString(v))
        return "a string";
    if (cJSON_IsNumber(v))
        return "a number";
    if (cJSON_IsBool(v))
        return "a boolean";
    if (cJSON_IsNull(v))
        return "null";
    if (cJSON_IsArray(v))
        return "an array";
    return "an object";
}

/* ---- raw member spans ------------------------------------------------ */

static const char *skip_ws(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

static const char *skip_string(const char *p, const char *end)
{
    p++; /* opening quote */
    while (p < end && *p != '"') {
        if (*p == '\\')
            p++;
        p++;
    }
    return p < end ? p + 1 : end;
}

/* Skip one JSON value that cJSON already accepted. */
static const char *skip_value(const char *p, const char *end)
{
    if (p >= end)
        return end;
    if (*p == '"')
        return skip_string(p, end);
    if (*p == '{' || *p == '[') {
        int depth = 0;
        while (p < end) {
            if (*p == '"') {
                p = skip_string(p, end);
                continue;
            }
            if (*p == '{' || *p == '[')
                depth++;
            else if (*p == '}' || *p == ']') {
                if (--depth == 0)
                    return p + 1;
            }
            p++;
        }
        return end;
    }
    while (p < end && *p != ',' && *p != '}' && *p != ']' && *p != ' ' && *p != '\t' && *p != '\n' && *p != '\r')
        p++;
    return p;
}

/*
 * Walk the raw top-level object and the parsed one side by side (cJSON keeps
 * member order) and copy every non-reserved member's raw bytes into the body.
 */
static void build_body(struct job *j, const cJSON *obj, const char *default_model, int want_body)
{
    const char *p = j->raw, *end = j->raw + j->raw_len;
    const cJSON *m = obj->child;
    int first = 1;
    sbuf b;
    sbuf_init(&b);
    sbuf_reserve(&b, j->raw_len + 32);
    sbuf_putc(&b, '{');
    p = skip_ws(p, end) + 1; /* '{' */
    for (; m; m = m->next) {
        p = skip_ws(p, end);
        const char *kstart = p;
        p = skip_string(p, end);
        const char *kend = p;
        p = skip_ws(p, end) + 1; /* ':' */
        p = skip_ws(p, end);
        const char *vstart = p;
        p = skip_value(p, end);
        if (strcmp(m->string, "meta") == 0) {
            /* Echo meta exactly as the producer wrote it, too. */
            if (j->meta)
                cJSON_free(j->meta);
            j->meta = cJSON_malloc((size_t)(p - vstart) + 1);
            memcpy(j->meta, vstart, (size_t)(p - vstart));
            j->meta[p - vstart] = '\0';
        }
        if (want_body && !is_reserved(m->string)) {
            if (!first)
                sbuf_putc(&b, ',');
            first = 0;
            sbuf_append(&b, kstart, (size_t)(kend - kstart));
            sbuf_putc(&b, ':');
            sbuf_append(&b, vstart, (size_t)(p - vstart));
        }
        p = skip_ws(p, end);
        if (p < end && *p == ',')
            p++;
    }
    if (!want_body) {
        sbuf_free(&b);
        return;
    }
    if (j->model && default_model && cJSON_GetObjectItemCaseSensitive(obj, "model") == NULL) {
        if (!first)
            sbuf_putc(&b, ',');
        sbuf_puts(&b, "\"model\":");
        sbuf_json_str(&b, default_model, strlen(default_model));
    }
    sbuf_putc(&b, '}');
    j->body = sbuf_steal(&b, &j->body_len);
}

/* ---- validation ------------------------------------------------------ */

static void take_id(struct job *j, const cJSON *obj, const char *key, char **out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (v == NULL)
        return;
    if (cJSON_IsString(v) && id_is_valid(v->valuestring, strlen(v->valuestring)))
        *out = xstrdup(v->valuestring);
    else if (cJSON_IsString(v))
        set_error(j, "field \"%s\" must be 1-128 characters of [A-Za-z0-9._:-]", key);
    else
        set_error(j, "field \"%s\" must be a string, got %s", key, type_name(v));
}

static int is_blank(const char *s)
{
    for (; *s; s++) {
        if (*s != ' ' && *s != '\t' && *s != '\n' && *s != '\r')
            return 0;
    }
    return 1;
}

/* A required-when-present string field: returns the value or NULL. */
static const char *check_string(struct job *j, const cJSON *obj, const char *key, int required)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (v == NULL) {
        if (required)
            set_error(j, "missing required field \"%s\"", key);
        return NULL;
    }
    if (!cJSON_IsString(v)) {
        set_error(j, "field \"%s\" must be a string, got %s", key, type_name(v));
        return NULL;
    }
    if (is_blank(v->valuestring)) {
        set_error(j, "field \"%s\" must not be empty", key);
        return NULL;
    }
    return v->valuestring;
}

static void check_duration(struct job *j, const cJSON *obj)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, "duration");
    if (v == NULL)
        return;
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || v->valuedouble < 1 ||
        v->valuedouble > 86400) {
        set_error(j, "field \"duration\" must be a positive integer (seconds)");
    }
}

/* Duplicate keys would let the API and vidqd read different values. */
static void check_duplicates(struct job *j, const cJSON *obj)
{
    for (const cJSON *a = obj->child; a; a = a->next) {
        for (const cJSON *b = a->next; b; b = b->next) {
            if (strcmp(a->string, b->string) == 0) {
                set_error(j, "duplicate key \"%s\"", a->string);
                return;
            }
        }
    }
}

static void validate(struct job *j, const cJSON *obj, const char *default_model)
{
    take_id(j, obj, "job_id", &j->job_id);
    j->id_given = j->job_id != NULL;
    take_id(j, obj, "batch", &j->batch);
    check_duplicates(j, obj);
    check_string(j, obj, "prompt", 1);
    const char *model = check_string(j, obj, "model", default_model == NULL);
    if (model == NULL && cJSON_GetObjectItemCaseSensitive(obj, "model") == NULL)
        model = default_model;
    if (model)
        j->model = xstrdup(model);
    check_duration(j, obj);
    const cJSON *img = cJSON_GetObjectItemCaseSensitive(obj, "image");
    if (img && !cJSON_IsString(img))
        set_error(j, "field \"image\" must be a string (URL, base64 or data URI), got %s", type_name(img));
}

/* Length of an RFC 8259 number at s, or 0 when the token is not one. */
static size_t rfc_number(const char *s, size_t len)
{
    size_t i = 0;
    if (i < len && s[i] == '-')
        i++;
    if (i < len && s[i] == '0')
        i++;
    else if (i < len && s[i] >= '1' && s[i] <= '9')
        while (i < len && s[i] >= '0' && s[i] <= '9')
            i++;
    else
        return 0;
    if (i < len && s[i] == '.') {
        size_t d = ++i;
        while (i < len && s[i] >= '0' && s[i] <= '9')
            i++;
        if (i == d)
            return 0;
    }
    if (i < len && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        if (i < len && (s[i] == '+' || s[i] == '-'))
            i++;
        size_t d = i;
        while (i < len && s[i] >= '0' && s[i] <= '9')
            i++;
        if (i == d)
            return 0;
    }
    /* The token must end here: "01" or "1." leave digits or a dot behind. */
    if (i < len && ((s[i] >= '0' && s[i] <= '9') || s[i] == '.' || s[i] == 'e' || s[i] == 'E' || s[i] == '+' ||
                    s[i] == '-'))
        return 0;
    return i;
}

/*
 * cJSON is lenient where RFC 8259 is not: it takes any byte below 0x20 as
 * whitespace, keeps raw control characters inside strings, and reads numbers
 * such as 01, 1. or -01. The body is built from the producer's own bytes, so
 * such input would reach the API as invalid JSON: reject it here, with its
 * position. A \u0000 escape is refused too: C strings end there, so the
 * daemon would read a different job id or prompt than the API. Returns the
 * offset of the first offending byte (and why), or -1.
 */
static long strict_json(const char *s, size_t len, const char **why)
{
    int in_string = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (in_string) {
            if (c == '\\') {
                if (i + 5 < len && memcmp(s + i + 1, "u0000", 5) == 0) {
                    *why = "\\u0000 (NUL) is not accepted";
                    return (long)i;
                }
                i++;
            } else if (c == '"') {
                in_string = 0;
            } else if (c < 0x20) {
                *why = "control character";
                return (long)i;
            }
        } else if (c == '"') {
            in_string = 1;
        } else if (c == '-' || (c >= '0' && c <= '9')) {
            size_t n = rfc_number(s + i, len - i);
            if (n == 0) {
                *why = "malformed number";
                return (long)i;
            }
            i += n - 1;
        } else if (c < 0x20 && c != ' ' && c != '\t' && c != '\n' && c != '\r') {
            *why = "control character";
            return (long)i;
        }
    }
    return -1;
}

void job_parse(struct job *j, const char *raw, size_t len, const char *default_model)
{
    memset(j, 0, sizeof *j);
    j->raw = xstrndup(raw, len);
    j->raw_len = len;
    const char *nul = memchr(raw, '\0', len);
    if (nul) {
        set_error(j, "invalid JSON at byte %zu: NUL byte", (size_t)(nul - raw));
        return;
    }
    if (len == 0 || skip_ws(raw, raw + len) == raw + len) {
        set_error(j, "empty job");
        return;
    }
    const char *end = NULL;
    cJSON *obj = cJSON_ParseWithLengthOpts(j->raw, len, &end, 0);
    const char *why = NULL;
    long bad = obj ? strict_json(j->raw, len, &why) : -1;
    if (bad >= 0) {
        if (strcmp(why, "control character") == 0)
            set_error(j, "invalid JSON at byte %ld: control character 0x%02x", bad, (unsigned char)j->raw[bad]);
        else
            set_error(j, "invalid JSON at byte %ld: %s", bad, why);
        cJSON_Delete(obj);
        return;
    }
    if (obj == NULL) {
        const char *at = cJSON_GetErrorPtr();
        size_t off = at && at >= j->raw && at <= j->raw + len ? (size_t)(at - j->raw) : 0;
        set_error(j, "invalid JSON at byte %zu", off);
        return;
    }
    j->is_json = 1;
    if (end && skip_ws(end, j->raw + len) != j->raw + len) {
        j->is_json = 0;
        set_error(j, "invalid JSON at byte %zu: trailing characters after the object", (size_t)(end - j->raw));
    } else if (!cJSON_IsObject(obj)) {
        set_error(j, "job must be a JSON object, got %s", type_name(obj));
    } else {
        validate(j, obj, default_model);
        /* Also for an invalid job: its meta is echoed, byte for byte. */
        build_body(j, obj, default_model, j->error == NULL);
    }
    cJSON_Delete(obj);
}

void job_free(struct job *j)
{
    free(j->raw);
    free(j->job_id);
    free(j->batch);
    if (j->meta)
        cJSON_free(j->meta);
    free(j->model);
    free(j->body);
    free(j->error);
    memset(j, 0, sizeof *j);
}
