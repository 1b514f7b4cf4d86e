/*
 * pause.c - vidq pause and resume: set or delete the paused key that stops
 * every vidqd instance of the queue from taking new jobs.
 */
#include "cli.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char HELP_PAUSE[] =
    "Usage: vidq pause [--json]\n"
    "       vidq resume [--json]\n"
    "\n"
    "pause stops every vidqd instance of this queue from taking new jobs\n"
    "(jobs in flight finish); resume lets them take jobs again. Both print\n"
    "the new state.\n";

static void print_state(int json, const char *paused)
{
    if (json) {
        struct jw w;
        jw_begin(&w);
        jw_bool(&w, "paused", paused != NULL);
        jw_str(&w, "paused_by", paused);
        jw_print(&w);
        return;
    }
    if (paused == NULL) {
        printf("queue %s: running (instances take jobs)\n", g.cfg.prefix);
        return;
    }
    sbuf b;
    sbuf_init(&b);
    put_clean(&b, paused, strlen(paused));
    printf("queue %s: paused (%s)\n", g.cfg.prefix, sb_str(&b));
    sbuf_free(&b);
}

/* Set (pause) or delete (resume) the paused key; the web view's too. */
void pause_set(int pause)
{
    if (pause) {
        sbuf v;
        sbuf_init(&v);
        who_text(&v, "pause");
        /* NX: pausing twice keeps who paused first. */
        freeReplyObject(cmd("SET", k.paused, v.buf, "NX", NULL));
        sbuf_free(&v);
    } else {
        freeReplyObject(cmd("DEL", k.paused, NULL));
    }
}

static int pause_resume(int argc, char **argv, int pause)
{
    int json = json_only_command(argc, argv, HELP_PAUSE);
    pause_set(pause);
    redisReply *rep = cmd("GET", k.paused, NULL);
    print_state(json, rep->type == REDIS_REPLY_STRING ? rep->str : NULL);
    freeReplyObject(rep);
    teardown();
    return 0;
}

int cmd_pause(int argc, char **argv)
{
    return pause_resume(argc, argv, 1);
}

int cmd_resume(int argc, char **argv)
{
    return pause_resume(argc, argv, 0);
}
