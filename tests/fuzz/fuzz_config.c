/*
 * libFuzzer target: the configuration reader (daemon/config.c). Any input
 * either loads or fails with a message naming the file.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct config c;
    char err[512] = "";
    config_init(&c);
    if (config_load_buffer(&c, "fuzz.conf", (const char *)data, size, err, sizeof err) != 0) {
        if (strncmp(err, "fuzz.conf", 9) != 0)
            abort();
    } else if (config_finish(&c, config_checks, err, sizeof err) != 0 && err[0] == '\0') {
        abort();
    }
    config_free(&c);
    return 0;
}
