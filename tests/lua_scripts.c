/*
 * lua_scripts - print queue.c's Lua scripts for tests/it_lua.py, which runs
 * each one directly against a real Redis: "name<TAB>length\n" then the text.
 */
#include <stdio.h>
#include <string.h>

#include "queue.h"

int main(void)
{
    const char *name, *src;
    for (int i = 0; (src = queue_script(i, &name)) != NULL; i++)
        printf("%s\t%zu\n%s", name, strlen(src), src);
    return 0;
}
