/*
 * job.h - what a producer pushed, checked and turned into an API request.
 *
 * A job is validated against docs/protocol.md §2 with cJSON, then the request body
 * is built by copying the producer's own bytes for every non-reserved member
 * (so numbers, unicode escapes and nested values reach the API exactly as
 * written: re-printing through cJSON would round big integers through a
 * double). Pure functions: no I/O, easy to unit-test and to fuzz.
 */
#ifndef VIDQ_JOB_H
#define VIDQ_JOB_H

#include <cjson/cJSON.h>
#include <stddef.h>

struct job {
    char *raw;        /* the exact text taken from Redis (owned) */
    size_t raw_len;
    char *job_id;     /* producer's id, or NULL (the worker assigns one) */
    int id_given;     /* job_id came from the producer (dedup applies) */
    int is_json;      /* raw parsed as JSON (any type): the dead entry embeds it */
    char *batch;      /* or NULL */
    char *gateway;    /* the `gateway` it names (docs/protocol.md §9), or NULL */
    char *meta;       /* JSON text of `meta`, or NULL */
    char *model;      /* the model the request uses, or NULL */
    char *prompt;     /* its prompt (events carry it: vidq results), or NULL */
    long seconds;     /* `duration`, else `seconds` (a number or digits), else 0: per-second prices */
    char *body;       /* request body, when valid */
    size_t body_len;
    char *error;      /* why the job is invalid, or NULL when valid */
};

/*
 * Parse and validate `raw` (copied). Always fills `j`: when the job is
 * invalid, `error` says exactly why and job_id/batch/meta are still taken
 * when they are themselves valid, so the failure event can carry them.
 * `default_model` (api.default_model) may be NULL.
 *
 * `max_bytes` is submit.max_job_bytes (docs/protocol.md §2): a longer job is
 * invalid ("job is N bytes, larger than submit.max_job_bytes (M)") without
 * being parsed; 0 means no cap. Validation is linear in `len` otherwise
 * (duplicate keys are found by sorting, O(n log n)); containers may nest
 * JOB_MAX_DEPTH levels deep at most.
 */
#define JOB_MAX_DEPTH 512
/* A gateway name: 1-32 characters of [A-Za-z0-9_-]. */
int gateway_name_is_valid(const char *s);

void job_parse(struct job *j, const char *raw, size_t len, const char *default_model, size_t max_bytes);
void job_free(struct job *j);

/* Skip JSON whitespace (space, tab, CR, LF) in [p, end). */
const char *json_skip_ws(const char *p, const char *end);
/*
 * Where the value of the top-level member `name` lies in s[0..n), a JSON
 * object that cJSON parsed as `obj` (the raw text and the parse are walked
 * side by side, so the key is compared decoded). Returns 1 and the byte
 * span [*vstart, *vend), or 0. Used to edit a producer's job without
 * re-printing it (re-printing would round big numbers).
 */
int json_member_span(const char *s, size_t n, const cJSON *obj, const char *name, size_t *vstart, size_t *vend);

/*
 * The members of a JSON object text, in order, as raw spans: walk a valid
 * object (a job's body) without a tree, so a dialect can map a job to its
 * request while every value it does not touch goes out byte for byte.
 * *pos starts at 0; returns 0 after the last member.
 */
struct json_member {
    const char *key;  /* with its quotes, as written */
    size_t key_len;
    const char *val;  /* the raw value */
    size_t val_len;
};
int json_next_member(const char *s, size_t n, size_t *pos, struct json_member *m);
/* Whether the member's key, decoded, is `name` ("mod\u0065l" is "model"). */
int json_member_is(const struct json_member *m, const char *name);

#endif
