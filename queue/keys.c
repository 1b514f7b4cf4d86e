/*
 * keys.c - the names of every Redis key vidq uses (see keys.h).
 */
#include "keys.h"
#include "util.h"

#include <ctype.h>
#include <stdio.h>
#include <string.h>

struct kind {
    const char *name;
    int per;
};

#define KEY_DEF_(e, name, per) {name, per},
static const struct kind kinds[KEY_COUNT] = {VIDQ_KEYS(KEY_DEF_)};
#undef KEY_DEF_

const char *key_kind_name(enum key_kind k)
{
    VQ_ASSERT(k >= 0 && k < KEY_COUNT);
    return kinds[k].name;
}

int key_kind_per(enum key_kind k)
{
    VQ_ASSERT(k >= 0 && k < KEY_COUNT);
    return kinds[k].per;
}

int key_format(char *buf, size_t size, const char *prefix, enum key_kind k, const char *id)
{
    int n;
    VQ_ASSERT(k >= 0 && k < KEY_COUNT && size > 0);
    if (kinds[k].per == 0)
        n = snprintf(buf, size, "%s" KEY_SEP "%s", prefix, kinds[k].name);
    else if (id == NULL || *id == '\0')
        n = 0, buf[0] = '\0';
    else
        n = snprintf(buf, size, "%s" KEY_SEP "%s" KEY_SEP "%s", prefix, kinds[k].name, id);
    if (n < 0 || (size_t)n >= size) {
        buf[0] = '\0';
        return -1;
    }
    return n;
}

char *key_new(const char *prefix, enum key_kind k, const char *id)
{
    size_t size = strlen(prefix) + strlen(kinds[k].name) + (id ? strlen(id) : 0) + 3;
    char *s = xmalloc(size);
    int n = key_format(s, size, prefix, k, id);
    VQ_ASSERT(n >= 0);
    return s;
}

int key_prefix_check(const char *p, char *why, size_t whylen)
{
    size_t n = p ? strlen(p) : 0;
    if (n >= 2 && p[0] == '{' && p[n - 1] == '}') {
        p++;
        n -= 2;
    }
    int ok = n >= 1 && n <= 64;
    for (size_t i = 0; ok && i < n; i++) {
        unsigned char ch = (unsigned char)p[i];
        ok = isalnum(ch) || ch == '.' || ch == '_' || ch == '-';
    }
    if (ok)
        return 0;
    snprintf(why, whylen,
             "must be 1-64 characters of [A-Za-z0-9._-], optionally inside one {...} (a Redis Cluster hash tag)");
    return -1;
}
