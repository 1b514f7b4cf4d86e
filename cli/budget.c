/*
 * budget.c - vidq budget show|set|reset (docs/protocol.md §10).
 *
 * Amounts live in Redis in millionths of the operator's unit (exact sums:
 * a budget must not be passed by a rounding error): spend:day:<YYYY-MM-DD>
 * and spend:total hold what is reserved or spent, a batch hash its
 * `budget` and `spent`. What is reserved right now (requests in flight) is
 * the "$<token>" fields of the instances' sending hashes (queue.c
 * SETTLE_LUA); show adds them up, so "spent" is what is no longer in
 * flight. vidqd alone adds to the counters, in its SEND step; this command
 * only sets caps and resets -- to what is in flight, so the releases that
 * come later cannot take a counter below what was spent since.
 */
#include "cli.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char HELP_BUDGET[] =
    "Usage: vidq budget show [--batch B] [--json]\n"
    "       vidq budget set --batch B AMOUNT|none [--json]\n"
    "       vidq budget reset [--total | --today | --batch B] [--json]\n"
    "\n"
    "show: today's spending (UTC) and the total against budget.daily and\n"
    "budget.total, and each batch with a budget or spending, as cap, reserved\n"
    "(requests in flight) and spent. set: the budget of batch B (none: no\n"
    "cap); jobs it stopped as over_budget go again with\n"
    "`vidq dead requeue --error over_budget`. reset: the total spent back to\n"
    "0 (default), or today's, or a batch's -- to what is in flight, so the\n"
    "cap still holds for it; an instance stopped by that budget resumes\n"
    "within seconds. The daily and total caps are set in the\n"
    "configuration (budget.daily, budget.total; SIGHUP applies them).\n";

static int64_t get_amount(const char *k1, const char *field)
{
    redisReply *rep = field ? cmd("HGET", k1, field, NULL) : cmd("GET", k1, NULL);
    int64_t v = rep->type == REDIS_REPLY_STRING ? strtoll(rep->str, NULL, 10) : -1;
    freeReplyObject(rep);
    return v;
}

static void money(char *buf, size_t n, int64_t micro)
{
    if (micro < 0)
        snprintf(buf, n, "none");
    else
        format_money(micro, buf, n);
}

/* One line (or JSON object) of show: what counts, against which cap. */
static void show_line(int json, const char *what, const char *name, int64_t cap, int64_t committed, int64_t reserved)
{
    char c[32], s[32], r[32], all[32];
    if (committed < 0)
        committed = 0;
    if (reserved > committed)
        reserved = committed;
    money(c, sizeof c, cap);
    money(all, sizeof all, committed);
    money(r, sizeof r, reserved);
    money(s, sizeof s, committed - reserved);
    if (json) {
        struct jw w;
        jw_begin(&w);
        jw_str(&w, "budget", what);
        if (name)
            jw_str(&w, what, name);
        if (cap >= 0)
            jw_raw(&w, "cap", c, strlen(c));
        else
            jw_null(&w, "cap");
        jw_raw(&w, "reserved", r, strlen(r));
        jw_raw(&w, "spent", s, strlen(s));
        jw_print(&w);
        return;
    }
    sbuf b;
    sbuf_init(&b);
    sbuf_printf(&b, "%s%s%s: %s", what, name ? " " : "", name ? name : "", all);
    if (cap >= 0)
        sbuf_printf(&b, " of %s", c);
    else
        sbuf_puts(&b, " (no cap)");
    sbuf_printf(&b, "  (reserved %s, spent %s)", r, s);
    if (cap >= 0 && committed >= cap)
        sbuf_puts(&b, "  REACHED");
    puts(b.buf);
    sbuf_free(&b);
}

/*
 * What is in flight for a counter: the reservations under the instances'
 * marks that count in it (KEYS[1]: a spend key, or a batch hash), added up
 * in one script. With ARGV[3] "reset" the counter is then set to that, so
 * that a release after the reset subtracts only what the reset left: the
 * cap holds across a reset. KEYS[2] the instances; ARGV the prefix,
 * "string" or "batch", "sum" or "reset", and a TTL in seconds for a day
 * key ("" none).
 */
static const char IN_FLIGHT_LUA[] = CLI_LUA_EXPECT KEYS_LUA
    "local batch = ARGV[2] == 'batch'\n"
    "expect(KEYS[1], batch and 'hash' or 'string')\n"
    "expect(KEYS[2], 'set')\n"
    "local inflight = 0\n"
    "for _, name in ipairs(redis.call('SMEMBERS', KEYS[2])) do\n"
    "  local h = redis.call('HGETALL', key(ARGV[1], KIND.sending, name))\n"
    "  for i = 1, #h - 1, 2 do\n"
    "    if string.sub(h[i], 1, 1) == '$' then\n"
    "      local amount, day, total, bk = string.match(h[i + 1], " RESERVATION_LUA_PATTERN ")\n"
    "      if amount and ((batch and bk == KEYS[1]) or (not batch and (day == KEYS[1] or total == KEYS[1]))) then\n"
    "        inflight = inflight + tonumber(amount)\n"
    "      end\n"
    "    end\n"
    "  end\n"
    "end\n"
    "if ARGV[3] ~= 'reset' then return inflight end\n"
    "local v = string.format('%d', inflight)\n"
    "if batch then\n"
    "  if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'spent', v) end\n"
    "elseif ARGV[4] ~= '' then\n"
    "  redis.call('SET', KEYS[1], v, 'EX', ARGV[4])\n"
    "else\n"
    "  redis.call('SET', KEYS[1], v)\n"
    "end\n"
    "return inflight\n";

static int64_t in_flight(const char *counter, int batch, const char *what, const char *ttl)
{
    const char *argv[] = {"EVAL", IN_FLIGHT_LUA, "2", counter, k.instances, g.cfg.prefix,
                          batch ? "batch" : "string", what, ttl};
    redisReply *rep = cmdv(9, argv, NULL);
    int64_t n = reply_int(rep);
    freeReplyObject(rep);
    return n;
}

static void show_batch(int json, const char *name)
{
    char *bk = key(KEY_BATCH, name);
    show_line(json, "batch", name, get_amount(bk, "budget"), get_amount(bk, "spent"), in_flight(bk, 1, "sum", ""));
    free(bk);
}

static int budget_show(int json, const char *batch)
{
    char day[16];
    utc_day(now_ms(), day);
    char *dk = key(KEY_SPEND_DAY, day), *tk = key(KEY_SPEND_TOTAL, NULL);
    show_line(json, "today", day, g.cfg.budget_daily, get_amount(dk, NULL), in_flight(dk, 0, "sum", ""));
    show_line(json, "total", NULL, g.cfg.budget_total, get_amount(tk, NULL), in_flight(tk, 0, "sum", ""));
    free(dk);
    free(tk);
    if (batch) {
        show_batch(json, batch);
    } else {
        /* the batches that have a budget or spent something */
        char *pattern = key(KEY_BATCH, "*");
        size_t plen = strlen(pattern) - 1;
        char cursor[32] = "0";
        do {
            redisReply *rep = cmd("SCAN", cursor, "MATCH", pattern, "COUNT", "1000", NULL);
            if (rep->type != REDIS_REPLY_ARRAY || rep->elements != 2)
                die(EX_UNAVAILABLE, "unexpected reply to SCAN");
            snprintf(cursor, sizeof cursor, "%s", rep->element[0]->str);
            for (size_t i = 0; i < rep->element[1]->elements; i++) {
                const char *bk = rep->element[1]->element[i]->str;
                if (get_amount(bk, "budget") >= 0 || get_amount(bk, "spent") > 0)
                    show_batch(json, bk + plen);
            }
            freeReplyObject(rep);
        } while (strcmp(cursor, "0") != 0);
        free(pattern);
    }
    return 0;
}

static const char *batch_arg(const char *b)
{
    if (b && !id_is_valid(b, strlen(b)))
        die(EX_USAGE, "--batch \"%s\": a batch name is 1-128 characters of [A-Za-z0-9._:-]", b);
    return b;
}

int cmd_budget(int argc, char **argv)
{
    enum { OPT_TOTAL = 512, OPT_TODAY };
    static const struct option opts[] = {
        COMMON_OPTIONS, {"batch", required_argument, NULL, OPT_BATCH}, {"total", no_argument, NULL, OPT_TOTAL},
        {"today", no_argument, NULL, OPT_TODAY}, {NULL, 0, NULL, 0},
    };
    const char *batch = NULL;
    int json = 0, total = 0, today = 0, c;
    if (argc < 2 || argv[1][0] == '-') {
        if (argc >= 2 && (strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0)) {
            fputs(HELP_BUDGET, stdout);
            return 0;
        }
        die(EX_USAGE, "budget needs show, set or reset (vidq help budget)");
    }
    const char *sub = argv[1];
    argc--;
    argv++;
    optind = 0;
    while ((c = getopt_long(argc, argv, "c:o:h", opts, NULL)) != -1) {
        switch (c) {
        case OPT_BATCH: batch = batch_arg(optarg); break;
        case OPT_TOTAL: total = 1; break;
        case OPT_TODAY: today = 1; break;
        case OPT_JSON: json = 1; break;
        default: common_option(c, HELP_BUDGET);
        }
    }
    if (strcmp(sub, "show") == 0) {
        no_more_args(argc, argv);
        if (total || today)
            die(EX_USAGE, "show takes --batch and --json only");
        setup();
        budget_show(json, batch);
    } else if (strcmp(sub, "set") == 0) {
        if (batch == NULL || optind + 1 != argc)
            die(EX_USAGE, "usage: vidq budget set --batch B AMOUNT|none (the daily and total caps are "
                          "budget.daily and budget.total in the configuration)");
        const char *a = argv[optind];
        int64_t micro = -1;
        if (strcmp(a, "none") != 0 && parse_money(a, &micro) != 0)
            die(EX_USAGE, "invalid amount \"%s\" (expected e.g. 30 or 12.50, at most 6 decimals, or none)", a);
        setup();
        char *bk = key(KEY_BATCH, batch);
        char v[32];
        snprintf(v, sizeof v, "%lld", (long long)micro);
        freeReplyObject(micro >= 0 ? cmd("HSET", bk, "budget", v, NULL) : cmd("HDEL", bk, "budget", NULL));
        free(bk);
        show_batch(json, batch);
    } else if (strcmp(sub, "reset") == 0) {
        no_more_args(argc, argv);
        if (total + today + (batch != NULL) > 1)
            die(EX_USAGE, "reset one of --total (the default), --today, --batch B");
        setup();
        char day[16];
        utc_day(now_ms(), day);
        if (batch) {
            char *bk = key(KEY_BATCH, batch);
            in_flight(bk, 1, "reset", "");
            free(bk);
            show_batch(json, batch);
        } else {
            char *kk = today ? key(KEY_SPEND_DAY, day) : key(KEY_SPEND_TOTAL, NULL);
            in_flight(kk, 0, "reset", today ? "3456000" : "");
            free(kk);
            budget_show(json, NULL);
        }
    } else {
        die(EX_USAGE, "unknown budget command \"%s\" (show, set or reset)", sub);
    }
    teardown();
    return 0;
}
