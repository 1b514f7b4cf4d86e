/*
 * main.c - the command-line tool of vidq: submit, watch, progress, results,
 * stats, dead list|requeue|purge, pause, resume (docs/protocol.md §8,
 * issue 4; results: issue 11). This file
 * reads the options before the command and finds the command; each command
 * has its own file, and what they share is in cli.h.
 *
 * Two rules shape the code:
 *   - what vidq writes into Redis is what a producer would write: `submit`
 *     checks every job with job_parse(), the daemon's own validation, and
 *     edits a producer's JSON only by appending members before its closing
 *     brace (or replacing the value of `batch`), so every other byte reaches
 *     the queue - and the API - untouched; `dead requeue` pushes back the
 *     exact bytes of the original job, cut out of the dead entry;
 *   - output for people goes to a terminal, output for scripts is stable:
 *     every subcommand takes --json, and the exit status means the same
 *     thing everywhere (see HELP_MAIN and docs/vidq.1).
 *
 * Exit status: 0 ok, 1 not everything succeeded / nothing matched (where a
 * subcommand says so), 3 batch not done yet (progress --once, results), 64 usage,
 * 65 bad input data, 66 input file unreadable, 69 Redis unavailable or
 * refusing a command, 78 bad configuration, 130 interrupted (progress).
 */
#include "cli.h"

#include <stdio.h>
#include <string.h>

static const char HELP_MAIN[] =
    "Usage: vidq [-c FILE] [-o section.key=value]... COMMAND [ARGS]\n"
    "\n"
    "The command-line tool of vidq, the video-generation job queue.\n"
    "\n"
    "Commands:\n"
    "  submit [FILE|-]        enqueue jobs (JSON lines or one prompt per line)\n"
    "  watch                  follow the results stream\n"
    "  progress BATCH         show a batch's progress until it is done\n"
    "  results --batch B      one row per job of a batch (table, --csv, --json)\n"
    "  stats                  queue depth, instances, retry/dead/tracking sizes\n"
    "  dead list|requeue|purge  inspect and recover dead jobs\n"
    "  pause, resume          stop / restart intake on every instance\n"
    "  cancel                 cancel a batch, or jobs by job_id\n"
    "  budget show|set|reset  spending against the daily, total and batch budgets\n"
    "  web                    serve a web view of batches, jobs, videos, dead list\n"
    "  help [COMMAND]         show the help of a command\n"
    "\n"
    "Options (also accepted after the command):\n"
    "  -c, --config FILE      configuration file (default " CONFIG_DEFAULT_PATH ",\n"
    "                         or $VIDQ_CONFIG); the same file as vidqd's\n"
    "  -o section.key=value   override one configuration key (repeatable)\n"
    "  -h, --help             show this help (or the command's)\n"
    "  -V, --version          show the version\n"
    "\n"
    "Every command takes --json for output that scripts can rely on.\n"
    "Exit status: 0 ok; 1 not all succeeded or nothing matched (where stated);\n"
    "3 batch not done (progress --once, results); 64 usage error; 65 invalid input;\n"
    "66 input file unreadable; 69 Redis unavailable; 78 configuration error.\n"
    "See vidq(1).\n";

static int cmd_help(int argc, char **argv);

static const struct command {
    const char *name;
    int (*fn)(int, char **);
    const char *help;
} commands[] = {
    {"submit", cmd_submit, HELP_SUBMIT},     {"watch", cmd_watch, HELP_WATCH},
    {"progress", cmd_progress, HELP_PROGRESS}, {"results", cmd_results, HELP_RESULTS},
    {"stats", cmd_stats, HELP_STATS},
    {"dead", cmd_dead, HELP_DEAD},           {"pause", cmd_pause, HELP_PAUSE},
    {"resume", cmd_resume, HELP_PAUSE},      {"cancel", cmd_cancel, HELP_CANCEL},
    {"budget", cmd_budget, HELP_BUDGET},     {"help", cmd_help, HELP_MAIN},
    {"web", cmd_web, HELP_WEB},
};

static const struct command *find_command(const char *name)
{
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++) {
        if (strcmp(commands[i].name, name) == 0)
            return &commands[i];
    }
    return NULL;
}

static int cmd_help(int argc, char **argv)
{
    if (argc < 2) {
        fputs(HELP_MAIN, stdout);
        return 0;
    }
    const struct command *c = find_command(argv[1]);
    if (c == NULL)
        die(EX_USAGE, "help: unknown command \"%s\"", argv[1]);
    fputs(c->help, stdout);
    return 0;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"config", required_argument, NULL, 'c'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, "+c:o:hV", opts, NULL)) != -1) {
        if (c == 'V') {
            printf("vidq %s\n", PACKAGE_VERSION);
            return 0;
        }
        common_option(c, HELP_MAIN);
    }
    if (optind >= argc) {
        fputs(HELP_MAIN, stderr);
        return EX_USAGE;
    }
    const struct command *cmdp = find_command(argv[optind]);
    if (cmdp == NULL)
        die(EX_USAGE, "unknown command \"%s\" (vidq --help lists them)", argv[optind]);
    g.cmd = cmdp->name;
    int first = optind;
    optind = 0; /* GNU getopt: start over for the command's own options */
    return cmdp->fn(argc - first, argv + first);
}
