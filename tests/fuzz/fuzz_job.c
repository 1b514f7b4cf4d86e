/*
 * libFuzzer target: job validation and body construction (daemon/job.c).
 * Whatever the bytes, job_parse must not crash, and a valid job's body must
 * be a JSON object that cJSON parses, without the reserved keys.
 */
#include <cjson/cJSON.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "job.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct job j;
    job_parse(&j, (const char *)data, size, size % 2 ? "default-model" : NULL, size % 3 ? 0 : 4096);
    if (j.error == NULL) {
        for (size_t i = 0; i < j.body_len; i++) {
            unsigned char c = (unsigned char)j.body[i];
            if (c < 0x20 && c != '\t' && c != '\n' && c != '\r')
                abort(); /* strict JSON only goes upstream */
        }
        cJSON *body = cJSON_ParseWithLength(j.body, j.body_len);
        if (!cJSON_IsObject(body) || cJSON_GetObjectItemCaseSensitive(body, "job_id") ||
            cJSON_GetObjectItemCaseSensitive(body, "meta") || cJSON_GetObjectItemCaseSensitive(body, "batch") ||
            !cJSON_IsString(cJSON_GetObjectItemCaseSensitive(body, "prompt")))
            abort();
        cJSON_Delete(body);
    } else if (j.error[0] == '\0') {
        abort(); /* an error must say something */
    }
    job_free(&j);
    return 0;
}
