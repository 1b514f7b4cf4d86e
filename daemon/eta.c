/*
 * eta.c - adaptive polling: the typical duration of a model's tasks (see eta.h).
 */
#include "eta.h"
#include "util.h"

#include <stdlib.h>
#include <string.h>

#define ETA_MODELS 64 /* models remembered; the least recently learned one goes */

struct model {
    char *name;
    int64_t took[ETA_SAMPLES]; /* a ring of the last durations */
    int n, next;
    uint64_t used; /* learning order, for eviction */
};

struct eta {
    struct model m[ETA_MODELS];
    int n;
    uint64_t clock;
};

eta *eta_new(void)
{
    return xcalloc(1, sizeof(eta));
}

void eta_free(eta *e)
{
    if (e == NULL)
        return;
    for (int i = 0; i < e->n; i++)
        free(e->m[i].name);
    free(e);
}

static struct model *find(const eta *e, const char *model)
{
    for (int i = 0; i < e->n; i++) {
        if (strcmp(e->m[i].name, model) == 0)
            return (struct model *)&e->m[i];
    }
    return NULL;
}

void eta_learn(eta *e, const char *model, int64_t took_ms)
{
    if (took_ms <= 0)
        return;
    model = model ? model : "";
    struct model *m = find(e, model);
    if (m == NULL) {
        if (e->n < ETA_MODELS) {
            m = &e->m[e->n++];
        } else {
            m = &e->m[0];
            for (int i = 1; i < e->n; i++) {
                if (e->m[i].used < m->used)
                    m = &e->m[i];
            }
            free(m->name);
        }
        memset(m, 0, sizeof *m);
        m->name = xstrdup(model);
    }
    m->took[m->next] = took_ms;
    m->next = (m->next + 1) % ETA_SAMPLES;
    if (m->n < ETA_SAMPLES)
        m->n++;
    m->used = ++e->clock;
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

int64_t eta_typical(const eta *e, const char *model)
{
    const struct model *m = find(e, model ? model : "");
    if (m == NULL || m->n < ETA_MIN_SAMPLES)
        return -1;
    int64_t v[ETA_SAMPLES];
    memcpy(v, m->took, (size_t)m->n * sizeof v[0]);
    qsort(v, (size_t)m->n, sizeof v[0], cmp_i64);
    return v[(m->n - 1) / 4]; /* the 25th percentile: most take longer */
}

void eta_learn_seen(eta *e, const char *model, int64_t age_ms, int64_t interval_ms)
{
    int64_t typical = eta_typical(e, model);
    if (typical > 0 && age_ms <= typical + interval_ms)
        eta_learn(e, model, typical * 3 / 4);
    else
        eta_learn(e, model, age_ms);
}

int64_t eta_next_poll(const eta *e, const char *model, int64_t age_ms, int64_t interval_ms, int64_t ceiling_ms)
{
    int64_t typical = eta_typical(e, model);
    if (ceiling_ms > 0 && typical > ceiling_ms)
        typical = ceiling_ms;
    if (typical < 0 || age_ms >= typical)
        return interval_ms;
    int64_t wait = typical - age_ms;
    return wait > interval_ms ? wait : interval_ms;
}
