/*
 * libFuzzer target: parsing gateway answers (daemon/api.c): submit answers,
 * error envelopes, task status in every shape, and the classification of a
 * 2xx answer with that body.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *body = (const char *)data;
    char *task = NULL, *status = NULL;
    if (api_parse_submit(body, size, &task, &status) == 0 && (task == NULL || task[0] == '\0'))
        abort();
    free(task);
    free(status);
    free(api_error_message(body, size));
    struct task_status ts;
    if (api_parse_task(body, size, &ts) == 0) {
        if (ts.status == NULL || ts.progress == NULL)
            abort();
        if (ts.state == TASK_FAILED && ts.message == NULL)
            abort();
        task_status_free(&ts);
    }
    struct http_result res = {0};
    res.status = 200 + (long)(size % 4) * 100; /* 200, 300, 400, 500 */
    res.body = body;
    res.body_len = size;
    res.retry_after_ms = -1;
    struct outcome o;
    api_classify_submit(&res, &o);
    if (o.kind == OUT_SUBMITTED && o.task_id == NULL)
        abort();
    outcome_free(&o);
    return 0;
}
