/*
 * gateway.c - the gateways at run time (see gateway.h).
 */
#include "gateway.h"
#include "api.h"
#include "log.h"
#include "util.h"

#include <fnmatch.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct gwset {
    uv_loop_t *loop;
    struct gateway **v;
    size_t n;
    int closing;
    unsigned open_handles;
};


void key_fingerprint(const char *token, char out[9])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned len = 0;
    EVP_Digest(token, strlen(token), md, &len, EVP_sha256(), NULL);
    for (int i = 0; i < 4; i++)
        snprintf(out + 2 * i, 3, "%02x", md[i]);
}

gwset *gwset_new(uv_loop_t *loop)
{
    gwset *s = xcalloc(1, sizeof *s);
    s->loop = loop;
    return s;
}

size_t gwset_count(const gwset *s)
{
    return s->n;
}

struct gateway *gwset_at(const gwset *s, size_t i)
{
    return i < s->n ? s->v[i] : NULL;
}

static struct gateway *find_any(const gwset *s, const char *name)
{
    for (size_t i = 0; i < s->n; i++) {
        if (strcmp(s->v[i]->name, name) == 0)
            return s->v[i];
    }
    return NULL;
}

struct gateway *gwset_find_any(const gwset *s, const char *name)
{
    return find_any(s, name);
}

static void own_free(struct gateway_conf *o)
{
    free(o->base_url);
    free(o->dialect);
    free(o->models);
    free(o->ca_file);
    memset(o, 0, sizeof *o);
}

/* The gateway's own copy: a reload frees the configuration it came from,
 * while requests and polls of the gateway may still be out. */
static void own_set(struct gateway *g, const struct gateway_conf *gc)
{
    own_free(&g->own);
    g->own = *gc;
    g->own.name = g->name;
    g->own.base_url = gc->base_url ? xstrdup(gc->base_url) : NULL;
    g->own.dialect = gc->dialect ? xstrdup(gc->dialect) : NULL;
    g->own.models = gc->models ? xstrdup(gc->models) : NULL;
    g->own.ca_file = gc->ca_file ? xstrdup(gc->ca_file) : NULL;
    g->own.token_file = NULL;
    g->own.keys = NULL;
    g->own.nkeys = 0;
    g->conf = &g->own;
}

struct gateway *gwset_find(const gwset *s, const char *name)
{
    struct gateway *g = find_any(s, name);
    return g && !g->retired ? g : NULL;
}

static struct gwkey *key_new(struct gateway *g, const char *token, int64_t ttl_s)
{
    struct gwkey *k = xcalloc(1, sizeof *k);
    char err[160];
    k->g = g;
    k->token = xstrdup(token);
    key_fingerprint(token, k->fp);
    int rc = credential_init(&k->cred, g->dialect, token, ttl_s, err, sizeof err);
    VQ_ASSERT(rc == 0); /* config_load_token checked every key with its dialect */
    (void)rc;
    return k;
}

/* The keys of `gc`: the ones already known keep their state. */
static void set_keys(struct gateway *g, const struct gateway_conf *gc)
{
    for (size_t i = 0; i < g->nkeys; i++)
        g->keys[i]->retired = 1;
    for (size_t j = 0; j < gc->nkeys; j++) {
        struct gwkey *k = NULL;
        for (size_t i = 0; i < g->nkeys && k == NULL; i++) {
            if (strcmp(g->keys[i]->token, gc->keys[j]) == 0)
                k = g->keys[i];
        }
        if (k) {
            k->retired = 0;
            credential_free(&k->cred);
            char err[160];
            int rc = credential_init(&k->cred, g->dialect, k->token, gc->jwt_ttl_ms / 1000, err, sizeof err);
            VQ_ASSERT(rc == 0);
            (void)rc;
        } else {
            g->keys = xrealloc(g->keys, (g->nkeys + 1) * sizeof *g->keys);
            g->keys[g->nkeys++] = key_new(g, gc->keys[j], gc->jwt_ttl_ms / 1000);
        }
    }
}

static void timer_closed(uv_handle_t *h)
{
    struct gateway *g = h->data;
    gwset *s = g->set;
    VQ_ASSERT(s->open_handles > 0);
    if (--s->open_handles == 0 && s->closing) {
        for (size_t i = 0; i < s->n; i++) {
            struct gateway *x = s->v[i];
            for (size_t j = 0; j < x->nkeys; j++) {
                credential_free(&x->keys[j]->cred);
                free(x->keys[j]->token);
                free(x->keys[j]);
            }
            free(x->keys);
            own_free(&x->own);
            free(x->name);
            free(x->probe_url);
            free(x);
        }
        free(s->v);
        free(s);
    }
}

void gwset_configure(gwset *s, const struct config *cfg, void *owner)
{
    for (size_t i = 0; i < s->n; i++)
        s->v[i]->retired = 1;
    for (size_t j = 0; j < cfg->ngw; j++) {
        const struct gateway_conf *gc = &cfg->gw[j];
        struct gateway *g = find_any(s, gc->name);
        if (g == NULL) {
            g = xcalloc(1, sizeof *g);
            g->set = s;
            g->name = xstrdup(gc->name);
            g->owner = owner;
            g->waiting_maybe = 1; /* another run may have parked jobs for it */
            uv_timer_init(s->loop, &g->probe_timer);
            g->probe_timer.data = g;
            s->open_handles++;
            s->v = xrealloc(s->v, (s->n + 1) * sizeof *s->v);
            s->v[s->n++] = g;
        }
        g->retired = 0;
        own_set(g, gc);
        g->dialect = dialect_find(gc->dialect);
        VQ_ASSERT(g->dialect); /* config.c checked the name */
        g->target = (struct http_target){.connect_timeout_ms = gc->connect_timeout_ms,
                                         .timeout_ms = gc->timeout_ms,
                                         .ca_file = g->own.ca_file};
        free(g->probe_url);
        g->probe_url = api_url(gc->base_url, g->dialect->probe_path);
        set_keys(g, gc);
    }
}

struct gateway *gwset_route(const gwset *s, const char *named, const char *model)
{
    if (named)
        return gwset_find(s, named);
    for (size_t i = 0; model && i < s->n; i++) {
        const struct gateway *g = s->v[i];
        if (g->retired || g->conf == NULL || g->conf->models == NULL || strcmp(g->name, "api") == 0)
            continue;
        /* space-separated shell globs */
        const char *p = g->conf->models;
        while (*p) {
            while (*p == ' ' || *p == '\t')
                p++;
            size_t n = strcspn(p, " \t");
            if (n > 0) {
                char glob[256];
                snprintf(glob, sizeof glob, "%.*s", (int)n, p);
                if (fnmatch(glob, model, 0) == 0)
                    return s->v[i];
            }
            p += n;
        }
    }
    return gwset_find(s, "api");
}

struct gwkey *gw_key(const struct gateway *g, const char *fp)
{
    for (size_t i = 0; fp && i < g->nkeys; i++) {
        if (strcmp(g->keys[i]->fp, fp) == 0)
            return g->keys[i];
    }
    return NULL;
}

size_t gw_keys_in_service(const struct gateway *g)
{
    size_t n = 0;
    for (size_t i = 0; i < g->nkeys; i++)
        n += !g->keys[i]->retired && !g->keys[i]->aside;
    return n;
}

struct gwkey *gw_pick_key(struct gateway *g, int64_t now, int force)
{
    struct gwkey *best = NULL, *probe = NULL;
    for (size_t i = 0; i < g->nkeys; i++) {
        struct gwkey *k = g->keys[i];
        if (k->retired)
            continue;
        if (k->aside) {
            if ((force || now >= k->probe_at) && (probe == NULL || k->probe_at < probe->probe_at))
                probe = k;
        } else if (best == NULL || k->in_flight < best->in_flight) {
            best = k;
        }
    }
    if (probe) {
        /* It goes as a probe now; the next one after the delay (doubling to 60 s). */
        probe->probe_at = now + probe->probe_delay_ms;
        probe->probe_delay_ms = probe->probe_delay_ms * 2 < 60000 ? probe->probe_delay_ms * 2 : 60000;
        return probe;
    }
    return best;
}

void gwset_json(const gwset *s, sbuf *out, const char *(*state_of)(const struct gateway *g))
{
    sbuf_putc(out, '{');
    int first = 1;
    for (size_t i = 0; i < s->n; i++) {
        const struct gateway *g = s->v[i];
        if (g->retired)
            continue;
        sbuf_puts(out, first ? "" : ",");
        first = 0;
        sbuf_json_str(out, g->name, strlen(g->name));
        sbuf_puts(out, ":{\"state\":");
        const char *st = state_of(g);
        sbuf_json_str(out, st, strlen(st));
        sbuf_puts(out, ",\"message\":");
        sbuf_json_str(out, g->blocked ? g->block_msg : "", g->blocked ? strlen(g->block_msg) : 0);
        sbuf_printf(out, ",\"in_flight\":%u,\"keys\":{", g->in_flight);
        int kfirst = 1;
        for (size_t j = 0; j < g->nkeys; j++) {
            const struct gwkey *k = g->keys[j];
            if (k->retired)
                continue;
            sbuf_printf(out, "%s\"%s\":{\"state\":\"%s\",\"message\":", kfirst ? "" : ",", k->fp,
                        k->aside ? "aside" : "in_service");
            kfirst = 0;
            sbuf_json_str(out, k->aside ? k->aside_msg : "", k->aside ? strlen(k->aside_msg) : 0);
            sbuf_printf(out, ",\"in_flight\":%u,\"submitted\":%llu,\"refused\":%llu}", k->in_flight,
                        (unsigned long long)k->submitted, (unsigned long long)k->refused);
        }
        sbuf_puts(out, "}}");
    }
    sbuf_putc(out, '}');
}

void gwset_free(gwset *s)
{
    s->closing = 1;
    if (s->n == 0) {
        free(s->v);
        free(s);
        return;
    }
    for (size_t i = 0; i < s->n; i++) {
        uv_timer_stop(&s->v[i]->probe_timer);
        uv_close((uv_handle_t *)&s->v[i]->probe_timer, timer_closed);
    }
}
