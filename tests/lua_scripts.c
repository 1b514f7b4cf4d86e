/*
 * lua_scripts - print queue.c's Lua scripts for tests/it_lua.py, which runs
 * each one directly against a real Redis. Each script is a line
 * "name<TAB>keys<TAB>args<TAB>length\n" (keys and args: the names, comma
 * separated, in KEYS/ARGV order; args end with ",..." when more follow),
 * then the text as vidqd loads it.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "queue.h"

int main(void)
{
    const char *name;
    char *src;
    sbuf keys, args;
    sbuf_init(&keys);
    sbuf_init(&args);
    for (int i = 0; (src = queue_script(i, &name, &keys, &args)) != NULL; i++) {
        printf("%s\t%s\t%s\t%zu\n%s", name, keys.buf ? keys.buf : "", args.buf ? args.buf : "", strlen(src), src);
        free(src);
        sbuf_reset(&keys);
        sbuf_reset(&args);
    }
    sbuf_free(&keys);
    sbuf_free(&args);
    return 0;
}
