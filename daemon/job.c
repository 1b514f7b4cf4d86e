/*
 * job.c - job validation (docs/protocol.md §2) and request-body construction.
 */
#include "job.h"
#include "util.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const reserved[] = {"job_id", "meta", "batch", "gateway"};

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

const char *json_skip_ws(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

/*
 * How many bytes of p[0..n) hold no '"', no '\\' and no control byte: the
 * run a string scan may jump over. Eight bytes at a time (the classic
 * "has a zero byte" / "has a byte less than" tests, exact as to whether
 * some byte matches), so a 16 MiB base64 image is not walked byte by byte.
 */
static size_t plain_run(const char *p, size_t n)
{
    const uint64_t ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
    size_t i = 0;
    while (n - i >= 8) {
        uint64_t x, q, b;
        memcpy(&x, p + i, 8);
        q = x ^ (ones * '"');
        b = x ^ (ones * '\\');
        if ((((q - ones) & ~q) | ((b - ones) & ~b) | ((x - ones * 0x20) & ~x)) & highs)
            break;
        i += 8;
    }
    while (i < n) {
        unsigned char ch = (unsigned char)p[i];
        if (ch == '"' || ch == '\\' || ch < 0x20)
            break;
        i++;
    }
    return i;
}

static const char *skip_string(const char *p, const char *end)
{
    p++; /* opening quote */
    while (p < end) {
        p += plain_run(p, (size_t)(end - p));
        if (p >= end || *p == '"')
            break;
        if (*p == '\\')
            p++;
        p++; /* an escape's second byte, or a control byte cJSON let through */
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
int json_next_member(const char *s, size_t n, size_t *pos, struct json_member *m)
{
    const char *end = s + n, *p = s + *pos;
    if (*pos == 0)
        p = json_skip_ws(p, end) + 1; /* '{' */
    p = json_skip_ws(p, end);
    if (p < end && *p == ',')
        p = json_skip_ws(p + 1, end);
    if (p >= end || *p != '"')
        return 0;
    m->key = p;
    p = skip_string(p, end);
    m->key_len = (size_t)(p - m->key);
    p = json_skip_ws(p, end) + 1; /* ':' */
    p = json_skip_ws(p, end);
    m->val = p;
    p = skip_value(p, end);
    m->val_len = (size_t)(p - m->val);
    *pos = (size_t)(p - s);
    return 1;
}

int json_member_is(const struct json_member *m, const char *name)
{
    size_t n = strlen(name);
    if (memchr(m->key, '\\', m->key_len) == NULL)
        return m->key_len == n + 2 && memcmp(m->key + 1, name, n) == 0;
    cJSON *k = cJSON_ParseWithLength(m->key, m->key_len);
    int is = cJSON_IsString(k) && strcmp(k->valuestring, name) == 0;
    cJSON_Delete(k);
    return is;
}

static void build_body(struct job *j, const cJSON *obj, const char *default_model, int want_body)
{
    const char *p = j->raw, *end = j->raw + j->raw_len;
    const cJSON *m = obj->child;
    int first = 1;
    sbuf b;
    sbuf_init(&b);
    sbuf_reserve(&b, j->raw_len + 32);
    sbuf_putc(&b, '{');
    p = json_skip_ws(p, end) + 1; /* '{' */
    for (; m; m = m->next) {
        p = json_skip_ws(p, end);
        const char *kstart = p;
        p = skip_string(p, end);
        const char *kend = p;
        p = json_skip_ws(p, end) + 1; /* ':' */
        p = json_skip_ws(p, end);
        const char *vstart = p;
        p = skip_value(p, end);
        if (strcmp(m->string, "meta") == 0) {
            /* Echo meta exactly as the producer wrote it, too. */
            free(j->meta);
            j->meta = xmalloc((size_t)(p - vstart) + 1);
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
        p = json_skip_ws(p, end);
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

int json_member_span(const char *s, size_t n, const cJSON *obj, const char *name, size_t *vstart, size_t *vend)
{
    const char *p = json_skip_ws(s, s + n), *end = s + n;
    if (p >= end || *p != '{')
        return 0;
    p++;
    for (const cJSON *m = obj->child; m; m = m->next) {
        p = json_skip_ws(p, end);
        p = skip_string(p, end);
        p = json_skip_ws(p, end);
        if (p < end && *p == ':')
            p++;
        p = json_skip_ws(p, end);
        const char *vs = p;
        p = skip_value(p, end);
        if (m->string && strcmp(m->string, name) == 0) {
            *vstart = (size_t)(vs - s);
            *vend = (size_t)(p - s);
            return 1;
        }
        p = json_skip_ws(p, end);
        if (p < end && *p == ',')
            p++;
    }
    return 0;
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

int gateway_name_is_valid(const char *s)
{
    size_t n = strlen(s);
    if (n < 1 || n > 32)
        return 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-'))
            return 0;
    }
    return 1;
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

/* The length a per-second price counts (docs/protocol.md §10): `duration`
 * or `seconds` (OpenAI's, often a string), else 0 (the caller's default). */
static long member_seconds(const cJSON *v)
{
    double d = 0;
    if (cJSON_IsNumber(v))
        d = v->valuedouble;
    else if (cJSON_IsString(v) && v->valuestring[0] >= '0' && v->valuestring[0] <= '9' &&
             strspn(v->valuestring, "0123456789") == strlen(v->valuestring) && strlen(v->valuestring) < 7)
        d = atof(v->valuestring);
    return d >= 1 && d <= 86400 ? (long)ceil(d) : 0;
}

/* The longer of the two when a job has both: a dialect may send either
 * (OpenAI's channels read `seconds`), and the budget must count what can
 * be billed. */
static long job_seconds(const cJSON *obj)
{
    long d = member_seconds(cJSON_GetObjectItemCaseSensitive(obj, "duration"));
    long s = member_seconds(cJSON_GetObjectItemCaseSensitive(obj, "seconds"));
    return d > s ? d : s;
}

/*
 * Duplicate keys would let the API and vidqd read different values.
 *
 * Linear-ish, never quadratic: the top-level keys (decoded, as cJSON holds
 * them) are put in an array with a 64-bit hash each and merge-sorted by
 * (hash, key); equal keys end up adjacent. Merge sort is O(n log n)
 * comparisons whatever the input, and the hash only speeds comparisons up:
 * colliding hashes (even all of them, if someone crafts them) fall back to
 * strcmp, so no input is pathological and no secret seed is needed.
 * The sort is stable, so within a run of equal keys the first entry is the
 * key's first occurrence; the reported key is the one whose first occurrence
 * comes first, as the old pairwise scan reported it.
 */
struct keyref {
    uint64_t hash;
    const char *key;
    size_t idx; /* member position in the object */
};

static uint64_t key_hash(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ULL; /* FNV-1a */
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 0x100000001b3ULL;
    return h;
}

static int keyref_cmp(const struct keyref *a, const struct keyref *b)
{
    if (a->hash != b->hash)
        return a->hash < b->hash ? -1 : 1;
    return strcmp(a->key, b->key);
}

/* Stable bottom-up merge sort of a[0..n) using tmp[0..n). */
static void keyref_sort(struct keyref *a, struct keyref *tmp, size_t n)
{
    struct keyref *src = a, *dst = tmp;
    for (size_t width = 1; width < n; width *= 2) {
        for (size_t lo = 0; lo < n; lo += 2 * width) {
            size_t mid = lo + width < n ? lo + width : n;
            size_t hi = mid + width < n ? mid + width : n;
            size_t i = lo, k = mid, o = lo;
            while (i < mid && k < hi)
                dst[o++] = keyref_cmp(&src[k], &src[i]) < 0 ? src[k++] : src[i++];
            while (i < mid)
                dst[o++] = src[i++];
            while (k < hi)
                dst[o++] = src[k++];
        }
        struct keyref *t = src;
        src = dst;
        dst = t;
    }
    if (src != a)
        memcpy(a, src, n * sizeof *a);
}

static void check_duplicates(struct job *j, const cJSON *obj)
{
    size_t n = 0;
    for (const cJSON *m = obj->child; m; m = m->next)
        n++;
    if (n < 2)
        return;
    struct keyref *a = xmalloc(2 * n * sizeof *a);
    size_t i = 0;
    for (const cJSON *m = obj->child; m; m = m->next, i++) {
        a[i].hash = key_hash(m->string);
        a[i].key = m->string;
        a[i].idx = i;
    }
    keyref_sort(a, a + n, n);
    const char *dup = NULL;
    size_t dup_idx = SIZE_MAX;
    for (i = 1; i < n; i++) {
        /* a[i] repeats a[i - 1]: the run's first entry is the first occurrence */
        if (a[i].hash == a[i - 1].hash && strcmp(a[i].key, a[i - 1].key) == 0) {
            size_t first = i - 1;
            while (i + 1 < n && a[i + 1].hash == a[first].hash && strcmp(a[i + 1].key, a[first].key) == 0)
                i++;
            if (a[first].idx < dup_idx) {
                dup_idx = a[first].idx;
                dup = a[first].key;
            }
        }
    }
    if (dup)
        set_error(j, "duplicate key \"%s\"", dup);
    free(a);
}

static void validate(struct job *j, const cJSON *obj, const char *default_model)
{
    take_id(j, obj, "job_id", &j->job_id);
    j->id_given = j->job_id != NULL;
    take_id(j, obj, "batch", &j->batch);
    const cJSON *gw = cJSON_GetObjectItemCaseSensitive(obj, "gateway");
    if (gw && cJSON_IsString(gw) && gateway_name_is_valid(gw->valuestring))
        j->gateway = xstrdup(gw->valuestring);
    else if (gw)
        set_error(j, "field \"gateway\" must be a gateway name: 1-32 characters of [A-Za-z0-9_-]");
    check_duplicates(j, obj);
    const char *prompt = check_string(j, obj, "prompt", 1);
    if (prompt)
        j->prompt = xstrdup(prompt);
    const char *model = check_string(j, obj, "model", default_model == NULL);
    if (model == NULL && cJSON_GetObjectItemCaseSensitive(obj, "model") == NULL)
        model = default_model;
    if (model)
        j->model = xstrdup(model);
    check_duration(j, obj);
    j->seconds = job_seconds(obj);
    const cJSON *img = cJSON_GetObjectItemCaseSensitive(obj, "image");
    if (img && !cJSON_IsString(img))
        set_error(j, "field \"image\" must be a string (URL, base64 or data URI), got %s", type_name(img));
}

/*
 * A strict RFC 8259 validator that reports where and why input is not
 * JSON. cJSON is lenient where the RFC is not (control bytes taken as
 * whitespace or kept raw in strings, numbers such as 01 or 1.), and its
 * error position is off by one for some errors. The request body is built
 * from the producer's own bytes, so only strictly valid JSON may pass; and
 * a producer deserves "invalid JSON at byte 14: expected a member name".
 * A \u0000 escape is refused too: C strings end there, so the daemon would
 * read a different job id or prompt than the API.
 */
struct scan {
    const char *s;
    size_t len, i;
    const char *why;
    int depth;
};

/*
 * The scanner recurses once per container level, so the depth is capped
 * (JOB_MAX_DEPTH, job.h): 512 levels is far more than any real job needs,
 * costs well under 100 KB of stack, and stays below cJSON's own limit
 * (CJSON_NESTING_LIMIT, 1000), so whatever passes the scan cJSON can hold.
 */
#define STR_(x) #x
#define STR(x) STR_(x)
_Static_assert(JOB_MAX_DEPTH < CJSON_NESTING_LIMIT, "the scanner must refuse what cJSON cannot parse");

static int scan_fail(struct scan *c, const char *why)
{
    if (c->why == NULL)
        c->why = why;
    return -1;
}

static void scan_ws(struct scan *c)
{
    while (c->i < c->len && (c->s[c->i] == ' ' || c->s[c->i] == '\t' || c->s[c->i] == '\n' || c->s[c->i] == '\r'))
        c->i++;
}

static int is_hex(char ch)
{
    return (ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f') || (ch >= 'A' && ch <= 'F');
}

static unsigned hex4(const char *p)
{
    return (unsigned)(hexval(p[0]) << 12 | hexval(p[1]) << 8 | hexval(p[2]) << 4 | hexval(p[3]));
}

static int scan_string(struct scan *c)
{
    c->i++; /* opening quote */
    while (c->i < c->len) {
        c->i += plain_run(c->s + c->i, c->len - c->i);
        if (c->i >= c->len)
            break;
        unsigned char ch = (unsigned char)c->s[c->i];
        if (ch == '"') {
            c->i++;
            return 0;
        }
        if (ch < 0x20)
            return scan_fail(c, "control character in a string");
        if (ch == '\\') {
            c->i++;
            if (c->i >= c->len)
                break;
            char e = c->s[c->i];
            if (e == 'u') {
                if (c->i + 4 >= c->len || !is_hex(c->s[c->i + 1]) || !is_hex(c->s[c->i + 2]) ||
                    !is_hex(c->s[c->i + 3]) || !is_hex(c->s[c->i + 4])) {
                    c->i--; /* point at the backslash */
                    return scan_fail(c, "bad \\u escape");
                }
                if (memcmp(c->s + c->i + 1, "0000", 4) == 0) {
                    c->i--;
                    return scan_fail(c, "\\u0000 (NUL) is not accepted");
                }
                /* UTF-16 surrogates come in pairs: a lone one cannot be decoded
                 * (cJSON and most gateways refuse it), wherever it is. */
                unsigned cp = hex4(c->s + c->i + 1);
                if (cp >= 0xDC00 && cp <= 0xDFFF) {
                    c->i--;
                    return scan_fail(c, "unpaired UTF-16 surrogate escape");
                }
                if (cp >= 0xD800 && cp <= 0xDBFF) {
                    size_t k = c->i + 5; /* the next escape's backslash */
                    if (k + 5 >= c->len || c->s[k] != '\\' || c->s[k + 1] != 'u' || !is_hex(c->s[k + 2]) ||
                        !is_hex(c->s[k + 3]) || !is_hex(c->s[k + 4]) || !is_hex(c->s[k + 5]) ||
                        hex4(c->s + k + 2) < 0xDC00 || hex4(c->s + k + 2) > 0xDFFF) {
                        c->i--;
                        return scan_fail(c, "unpaired UTF-16 surrogate escape");
                    }
                    c->i += 6; /* the low half too */
                }
                c->i += 4;
            } else if (strchr("\"\\/bfnrt", e) == NULL || e == '\0') {
                c->i--;
                return scan_fail(c, "bad escape in a string");
            }
        }
        c->i++;
    }
    return scan_fail(c, "unterminated string");
}

static int scan_number_at(struct scan *c);

/* A bad number is reported where the number starts. */
static int scan_number(struct scan *c)
{
    size_t start = c->i;
    if (scan_number_at(c) == 0)
        return 0;
    c->i = start;
    return -1;
}

static int scan_number_at(struct scan *c)
{
    const char *s = c->s;
    size_t n = c->len;
    if (c->i < n && s[c->i] == '-')
        c->i++;
    if (c->i < n && s[c->i] == '0') {
        c->i++;
    } else if (c->i < n && s[c->i] >= '1' && s[c->i] <= '9') {
        while (c->i < n && s[c->i] >= '0' && s[c->i] <= '9')
            c->i++;
    } else {
        return scan_fail(c, "malformed number");
    }
    if (c->i < n && s[c->i] == '.') {
        c->i++;
        if (c->i >= n || s[c->i] < '0' || s[c->i] > '9')
            return scan_fail(c, "malformed number");
        while (c->i < n && s[c->i] >= '0' && s[c->i] <= '9')
            c->i++;
    }
    if (c->i < n && (s[c->i] == 'e' || s[c->i] == 'E')) {
        c->i++;
        if (c->i < n && (s[c->i] == '+' || s[c->i] == '-'))
            c->i++;
        if (c->i >= n || s[c->i] < '0' || s[c->i] > '9')
            return scan_fail(c, "malformed number");
        while (c->i < n && s[c->i] >= '0' && s[c->i] <= '9')
            c->i++;
    }
    if (c->i < n && (s[c->i] >= '0' && s[c->i] <= '9'))
        return scan_fail(c, "malformed number");
    return 0;
}

static int scan_value(struct scan *c);

static int scan_container(struct scan *c, char close)
{
    if (++c->depth > JOB_MAX_DEPTH)
        return scan_fail(c, "nesting deeper than " STR(JOB_MAX_DEPTH) " levels");
    c->i++; /* '{' or '[' */
    scan_ws(c);
    if (c->i < c->len && c->s[c->i] == close) {
        c->i++;
        c->depth--;
        return 0;
    }
    for (;;) {
        if (close == '}') {
            if (c->i >= c->len || c->s[c->i] != '"')
                return scan_fail(c, c->i >= c->len ? "unexpected end of input" : "expected a member name");
            if (scan_string(c) != 0)
                return -1;
            scan_ws(c);
            if (c->i >= c->len || c->s[c->i] != ':')
                return scan_fail(c, c->i >= c->len ? "unexpected end of input" : "expected ':'");
            c->i++;
        }
        if (scan_value(c) != 0)
            return -1;
        scan_ws(c);
        if (c->i >= c->len)
            return scan_fail(c, "unexpected end of input");
        if (c->s[c->i] == close) {
            c->i++;
            c->depth--;
            return 0;
        }
        if (c->s[c->i] != ',')
            return scan_fail(c, close == '}' ? "expected ',' or '}'" : "expected ',' or ']'");
        c->i++;
        scan_ws(c);
    }
}

static int scan_value(struct scan *c)
{
    scan_ws(c);
    if (c->i >= c->len)
        return scan_fail(c, "unexpected end of input");
    char ch = c->s[c->i];
    if (ch == '{')
        return scan_container(c, '}');
    if (ch == '[')
        return scan_container(c, ']');
    if (ch == '"')
        return scan_string(c);
    if (ch == '-' || (ch >= '0' && ch <= '9'))
        return scan_number(c);
    static const char *const lits[] = {"true", "false", "null"};
    for (size_t k = 0; k < 3; k++) {
        size_t n = strlen(lits[k]);
        if (c->len - c->i >= n && memcmp(c->s + c->i, lits[k], n) == 0) {
            c->i += n;
            return 0;
        }
    }
    if ((unsigned char)ch < 0x20)
        return scan_fail(c, "control character");
    return scan_fail(c, "unexpected character");
}

/* -1 when `s` is one strict JSON value; else the offset of the error. */
static long strict_json(const char *s, size_t len, const char **why)
{
    struct scan c = {s, len, 0, NULL, 0};
    if (scan_value(&c) == 0) {
        scan_ws(&c);
        if (c.i == len)
            return -1;
        c.why = "trailing characters after the value";
    }
    /* Whatever was expected there, a control byte is the clearer news. */
    if (c.i < len && (unsigned char)s[c.i] < 0x20 && s[c.i] != ' ' && s[c.i] != '\t' && s[c.i] != '\n' &&
        s[c.i] != '\r')
        c.why = "control character";
    *why = c.why;
    return (long)c.i;
}

/*
 * The value of a top-level string member `key` of text that could not be
 * parsed, if its first PEEK_BYTES show one with a valid id (docs/protocol.md §2
 * charset): the failed event and the dead entry then carry the job_id and
 * batch the producer knows, and the batch still completes. Nothing else is
 * taken from such a text; it is never sent.
 */
#define PEEK_BYTES 65536
static char *peek_top_string(const char *raw, size_t len, const char *key)
{
    const char *p = raw, *end = raw + (len < PEEK_BYTES ? len : PEEK_BYTES);
    size_t klen = strlen(key);
    int depth = 0, expect_key = 0;
    while (p < end) {
        char c = *p;
        if (c == '"') {
            const char *s = ++p;
            while (p < end && *p != '"')
                p += *p == '\\' ? 2 : 1;
            if (p >= end)
                return NULL;
            size_t n = (size_t)(p - s);
            p++;
            if (depth == 1 && expect_key && n == klen && memcmp(s, key, n) == 0) {
                const char *q = json_skip_ws(p, end);
                if (q >= end || *q != ':')
                    return NULL;
                q = json_skip_ws(q + 1, end);
                if (q >= end || *q != '"')
                    return NULL;
                const char *v = ++q;
                while (q < end && *q != '"' && *q != '\\')
                    q++;
                if (q >= end || *q != '"' || !id_is_valid(v, (size_t)(q - v)))
                    return NULL;
                return xstrndup(v, (size_t)(q - v));
            }
            expect_key = 0;
            continue;
        }
        if (c == '{' || c == '[') {
            depth++;
            expect_key = depth == 1 && c == '{';
        } else if (c == '}' || c == ']') {
            depth--;
        } else if (c == ',' && depth == 1) {
            expect_key = 1;
        }
        p++;
    }
    return NULL;
}

static void peek_ids(struct job *j)
{
    j->job_id = peek_top_string(j->raw, j->raw_len, "job_id");
    j->batch = peek_top_string(j->raw, j->raw_len, "batch");
}

/*
 * cJSON allocates a block per member and per string: a job with 100,000
 * keys costs 300,000 mallocs and frees, most of its parse. While job_parse
 * builds and walks its tree, cJSON allocates from an arena instead (a bump
 * pointer in 256 KiB chunks, all freed at once at the end). vidqd is single
 * threaded and nothing cJSON allocates here outlives the parse.
 */
#define ARENA_CHUNK (256u << 10)
struct arena_chunk {
    struct arena_chunk *next;
    size_t used, cap;
    size_t pad; /* data starts 32 bytes in: 16-byte aligned, like malloc's */
    char data[];
};
_Static_assert(sizeof(struct arena_chunk) % 16 == 0, "arena data must stay 16-byte aligned");
static struct arena_chunk *arena;

static void *arena_alloc(size_t n)
{
    n = (n + 15) & ~(size_t)15;
    if (arena == NULL || arena->cap - arena->used < n) {
        size_t cap = n > ARENA_CHUNK ? n : ARENA_CHUNK;
        struct arena_chunk *c = xmalloc(sizeof *c + cap);
        c->next = arena;
        c->used = 0;
        c->cap = cap;
        arena = c;
    }
    void *p = arena->data + arena->used;
    arena->used += n;
    return p;
}

static void arena_free(void *p)
{
    (void)p; /* all of it goes in arena_end */
}

static void arena_begin(void)
{
    cJSON_Hooks h = {arena_alloc, arena_free};
    cJSON_InitHooks(&h);
}

static void arena_end(void)
{
    cJSON_InitHooks(NULL);
    while (arena) {
        struct arena_chunk *next = arena->next;
        free(arena);
        arena = next;
    }
}

static void parse_tree(struct job *j, size_t len, const char *default_model);

void job_parse(struct job *j, const char *raw, size_t len, const char *default_model, size_t max_bytes)
{
    memset(j, 0, sizeof *j);
    j->raw = xstrndup(raw, len);
    j->raw_len = len;
    if (max_bytes > 0 && len > max_bytes) {
        /* Before any parsing: a huge job costs no scan, no cJSON tree. */
        set_error(j, "job is %zu bytes, larger than submit.max_job_bytes (%zu)", len, max_bytes);
        peek_ids(j);
        return;
    }
    const char *nul = memchr(raw, '\0', len);
    if (nul) {
        set_error(j, "invalid JSON at byte %zu: NUL byte", (size_t)(nul - raw));
        peek_ids(j);
        return;
    }
    if (len == 0 || json_skip_ws(raw, raw + len) == raw + len) {
        set_error(j, "empty job");
        return;
    }
    const char *why = NULL;
    long bad = strict_json(j->raw, len, &why);
    if (bad >= 0) {
        if (strcmp(why, "control character") == 0 || strcmp(why, "control character in a string") == 0)
            set_error(j, "invalid JSON at byte %ld: control character 0x%02x", bad, (unsigned char)j->raw[bad]);
        else
            set_error(j, "invalid JSON at byte %ld: %s", bad, why);
        peek_ids(j);
        return;
    }
    arena_begin();
    parse_tree(j, len, default_model);
    arena_end();
}

/*
 * The top-level object as cJSON, shallow: every member is there, in order,
 * with its decoded key (duplicates are checked on them, build_body walks
 * them), but only the members validation reads get their value parsed; the
 * others hold a null placeholder and go to the body as their raw bytes. So a
 * metadata object with 100,000 keys costs no tree at all. Only for text the
 * strict scanner accepted whose root is an object; allocates in the arena.
 */
static int member_wanted(const char *key)
{
    static const char *const wanted[] = {"job_id", "batch", "prompt", "model", "duration", "seconds", "image", "gateway"};
    for (size_t i = 0; i < sizeof wanted / sizeof wanted[0]; i++) {
        if (strcmp(key, wanted[i]) == 0)
            return 1;
    }
    return 0;
}

static char *decode_key(const char *ks, const char *ke)
{
    size_t n = (size_t)(ke - ks) - 2;
    if (memchr(ks + 1, '\\', n) == NULL) {
        char *k = cJSON_malloc(n + 1);
        memcpy(k, ks + 1, n);
        k[n] = '\0';
        return k;
    }
    cJSON *k = cJSON_ParseWithLength(ks, (size_t)(ke - ks));
    return cJSON_IsString(k) ? k->valuestring : NULL;
}

static cJSON *shallow_object(const char *s, size_t n)
{
    const char *end = s + n, *p = json_skip_ws(s, end) + 1; /* '{' */
    cJSON *obj = cJSON_CreateObject();
    for (;;) {
        p = json_skip_ws(p, end);
        if (p >= end || *p == '}')
            break;
        const char *ks = p;
        p = skip_string(p, end);
        const char *ke = p;
        p = json_skip_ws(json_skip_ws(p, end) + 1, end); /* ':' */
        const char *vs = p;
        p = skip_value(p, end);
        char *key = decode_key(ks, ke);
        cJSON *v = key && member_wanted(key) ? cJSON_ParseWithLength(vs, (size_t)(p - vs)) : cJSON_CreateNull();
        if (key == NULL || v == NULL)
            return NULL; /* cannot happen on scanned text; the arena frees it all */
        cJSON_AddItemToObjectCS(obj, key, v);
        p = json_skip_ws(p, end);
        if (p < end && *p == ',')
            p++;
    }
    return obj;
}

/* The strict scan passed: the tree, validation and the body (in the arena). */
static void parse_tree(struct job *j, size_t len, const char *default_model)
{
    const char *first = json_skip_ws(j->raw, j->raw + len);
    cJSON *obj = *first == '{' ? shallow_object(j->raw, len) : cJSON_ParseWithLength(j->raw, len);
    if (obj == NULL) {
        /* Strict JSON that cJSON cannot hold (it nests at most 1000 deep). */
        set_error(j, "invalid JSON: cannot be parsed");
        return;
    }
    j->is_json = 1;
    if (!cJSON_IsObject(obj)) {
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
    free(j->gateway);
    free(j->meta);
    free(j->model);
    free(j->prompt);
    free(j->body);
    free(j->error);
    memset(j, 0, sizeof *j);
}
