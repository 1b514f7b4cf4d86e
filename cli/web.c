/*
 * web.c - vidq web: a small read-mostly web view of the queue for the
 * people who submit the prompts (issue 12): the batches with live progress,
 * spend and counts; a batch's jobs with prompt, status, error and the
 * finished videos playing from track.download_dir; the dead list; the
 * instances with their gateways and keys. Actions (pause, resume, cancel a
 * batch, requeue a dead job) only with --allow-actions.
 *
 * What it shows is what the commands compute, by their own code: the
 * batches are progress --json's objects (batches_json), a batch's jobs the
 * rows of results --json (results_json), the dead list dead list --json's
 * entries, the state stats --json; the actions call pause_set, cancel_batch
 * and dead_requeue_id. The page is rendered here for the first paint and
 * kept up to date by app.js, which polls the /api/ endpoints every 2 s.
 *
 * Threads: libmicrohttpd runs every request on one internal thread (no
 * thread per connection), and that thread alone uses the Redis connection
 * (hiredis is not thread-safe); the main thread only waits for SIGINT or
 * SIGTERM. A Redis error ends vidq web (status 69), as it ends the commands.
 *
 * Security model: loopback by default, no authentication. Every response
 * carries a strict Content-Security-Policy (scripts only from /app.js, media
 * only from this origin), nosniff, no framing. Every request's Host header
 * must name this listener (DNS rebinding). Every string from Redis, a job or
 * a gateway is escaped (html_put here; JSON by the JSON writer; app.js sets
 * textContent and never innerHTML). GET never changes anything; an action is
 * a POST carrying the per-run token (32 random bytes, in a meta tag of the
 * page, compared in constant time) from a page of this origin (Origin, or
 * Referer without it). Videos: only the file a job's succeeded event names,
 * looked up by batch and job id, opened inside the download directory by its
 * base name with O_NOFOLLOW, a regular file.
 */
#include "cli.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define WEB_DEFAULT_LISTEN "127.0.0.1:8750"
#define WEB_BATCHES_MAX 200 /* batches on the page, newest first */
#define WEB_DEAD_MAX 200    /* dead entries on the page, newest first */
#define WEB_BODY_MAX 4096   /* bytes of a POST body (actions take none) */
#define WEB_HOSTS_MAX 8

const char HELP_WEB[] =
    "Usage: vidq web [--listen HOST:PORT] [--download-dir DIR] [--allow-actions]\n"
    "                [--host-name NAME]\n"
    "\n"
    "Serve a web view of the queue: the batches with live progress, spend and\n"
    "counts; a batch's jobs with prompt, status, error and the finished videos\n"
    "(played from the download directory); the dead list; instances, gateways\n"
    "and keys. Pages refresh every 2 s. Prints \"listening on URL\" once ready;\n"
    "runs until SIGINT or SIGTERM.\n"
    "\n"
    "  --listen HOST:PORT   address to serve on (default " WEB_DEFAULT_LISTEN ";\n"
    "                       port 0: any free port). There is no authentication:\n"
    "                       an address other than loopback gets a warning\n"
    "  --download-dir DIR   where finished videos are (default track.download_dir)\n"
    "  --allow-actions      show and accept pause, resume, cancel a batch and\n"
    "                       requeue a dead job (POST with the page's token)\n"
    "  --host-name NAME     also accept Host: NAME[:PORT] (a name this machine\n"
    "                       is reached by; requests naming others are refused)\n"
    "\n"
    "Exit status: 0 stopped by a signal; 64 usage error; 69 Redis unavailable\n"
    "or the address cannot be bound; 78 configuration error.\n";

static struct web {
    int allow_actions;
    char token[65];                /* hex of 32 random bytes */
    int dir_fd;                    /* the download directory, or -1 */
    char *hosts[WEB_HOSTS_MAX];    /* accepted Host header values */
    int nhosts;
} W = {.dir_fd = -1};

/* ---- small helpers ---------------------------------------------------------- */

/* Text for HTML, in an element or a quoted attribute. */
static void html_put(sbuf *o, const char *s)
{
    for (; s && *s; s++) {
        switch (*s) {
        case '&': sbuf_puts(o, "&amp;"); break;
        case '<': sbuf_puts(o, "&lt;"); break;
        case '>': sbuf_puts(o, "&gt;"); break;
        case '"': sbuf_puts(o, "&quot;"); break;
        case '\'': sbuf_puts(o, "&#39;"); break;
        default: sbuf_putc(o, *s);
        }
    }
}

/* A component of a URL (a batch name in a link). */
static void url_put(sbuf *o, const char *s)
{
    for (; s && *s; s++) {
        unsigned char c = (unsigned char)*s;
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || strchr("-._~", c))
            sbuf_putc(o, (char)c);
        else
            sbuf_printf(o, "%%%02X", c);
    }
}

static int jtrue(const cJSON *o, const char *name)
{
    return cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(o, name));
}

/* A money member as the JSON writer wrote it ("1.25"). */
static void money_put(sbuf *o, const cJSON *v)
{
    if (cJSON_IsNumber(v)) {
        char *t = cJSON_PrintUnformatted(v);
        sbuf_puts(o, t);
        free(t);
    } else {
        sbuf_puts(o, "0");
    }
}

/* Constant time: how long it takes does not tell how much of a guess was right. */
static int same_secret(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    unsigned char d = la != lb;
    for (size_t i = 0; i < lb; i++)
        d |= (unsigned char)(a[i % (la ? la : 1)] ^ b[i]);
    return d == 0;
}

/* ---- the embedded page: style and script --------------------------------------- */

static const char APP_CSS[] =
    ":root{font-family:system-ui,sans-serif;color:#1d2330;background:#f6f7f9}\n"
    "body{margin:0 auto;max-width:1200px;padding:16px 24px}\n"
    "header{display:flex;align-items:center;gap:16px;flex-wrap:wrap}\n"
    "h1{font-size:1.4em;margin:8px 0}h2{font-size:1.1em;margin:24px 0 8px}\n"
    "table{border-collapse:collapse;width:100%;background:#fff;box-shadow:0 1px 2px #0002}\n"
    "th,td{text-align:left;padding:6px 10px;border-bottom:1px solid #e4e6eb;vertical-align:top}\n"
    "th{font-size:.85em;color:#5b6270;font-weight:600;background:#fafbfc}\n"
    "td.num{text-align:right;font-variant-numeric:tabular-nums}\n"
    "progress{width:180px;height:14px;vertical-align:middle}\n"
    ".frac{margin:0 16px 0 8px;font-variant-numeric:tabular-nums}\n"
    ".state{padding:2px 8px;border-radius:10px;font-size:.85em;background:#e4e6eb}\n"
    ".s-running,.s-succeeded,.s-in_service{background:#d7f2dd;color:#17602a}\n"
    ".s-paused,.s-tracking,.s-submitted,.s-draining{background:#fff1c9;color:#7a5a00}\n"
    ".s-failed,.s-task_failed,.s-dead,.s-aside,.s-canceled{background:#fbdada;color:#8a1c1c}\n"
    "td.prompt{max-width:420px;white-space:pre-wrap;word-break:break-word}\n"
    "td.error{max-width:260px;word-break:break-word;color:#8a1c1c}\n"
    "video{width:240px;max-height:180px;background:#000;border-radius:4px}\n"
    "button{font:inherit;padding:3px 10px;border-radius:4px;border:1px solid #9aa1ad;background:#fff;cursor:pointer}\n"
    "button:hover{background:#eef}\n"
    ".muted{color:#7a8190}.gw{margin:2px 0 2px 16px;font-size:.9em}\n"
    "footer{margin:24px 0;color:#7a8190;font-size:.85em}\n"
    "#msg{color:#17602a}\n";

/* No data ever reaches innerHTML: elements are built and given textContent. */
static const char APP_JS[] =
    "'use strict';\n"
    "(function () {\n"
    "  const meta = (n) => { const m = document.querySelector('meta[name=\"' + n + '\"]'); return m ? m.content : null; };\n"
    "  const token = meta('vidq-token');\n"
    "  const page = document.body.dataset.page;\n"
    "  function el(tag, cls, text) {\n"
    "    const e = document.createElement(tag);\n"
    "    if (cls) e.className = cls;\n"
    "    if (text !== undefined && text !== null) e.textContent = String(text);\n"
    "    return e;\n"
    "  }\n"
    "  function td(text, cls) { return el('td', cls, text); }\n"
    "  // Data from Redis is not trusted to have its shape: one odd value must not stop the refresh.\n"
    "  function obj(x) { return x !== null && typeof x === 'object' ? x : {}; }\n"
    "  function when(ms) { const t = new Date(Number(ms)); return ms && !isNaN(t) ? t.toISOString().replace('T', ' ').slice(0, 19) : '-'; }\n"
    "  function state(s) { return el('span', 'state s-' + String(s).replace(/[^a-z_]/g, ''), s); }\n"
    "  function button(action, label, data) {\n"
    "    const b = el('button', null, label);\n"
    "    b.dataset.action = action;\n"
    "    for (const k in data) b.dataset[k] = data[k];\n"
    "    return b;\n"
    "  }\n"
    "  async function getJSON(u) {\n"
    "    const r = await fetch(u, {cache: 'no-store'});\n"
    "    if (!r.ok) throw new Error(u + ': HTTP ' + r.status);\n"
    "    return r.json();\n"
    "  }\n"
    "  function fin(b) { return b.total === null ? b.finished + '/?' : b.finished + '/' + b.total; }\n"
    "  function spent(b) { return b.budget === null ? String(b.spent) : b.spent + ' of ' + b.budget; }\n"
    "  function bar(b) {\n"
    "    const p = el('progress');\n"
    "    if (b.total !== null) { p.max = Math.max(b.total, 1); p.value = b.finished; }\n"
    "    return p;\n"
    "  }\n"
    "  function batchState(b) {\n"
    "    if (b.done) return 'done';\n"
    "    let s = 'running';\n"
    "    if (b.rate !== null) s += ', ' + b.rate.toFixed(1) + '/s';\n"
    "    return s;\n"
    "  }\n"
    "  function batchRow(b) {\n"
    "    const tr = el('tr');\n"
    "    tr.dataset.batch = b.batch;\n"
    "    const a = el('a', null, b.batch);\n"
    "    a.href = '/batch?id=' + encodeURIComponent(b.batch);\n"
    "    const name = td(); name.append(a); tr.append(name);\n"
    "    const p = td(); p.append(bar(b), el('span', 'frac', fin(b))); tr.append(p);\n"
    "    tr.append(td(b.submitted, 'num'), td(b.succeeded, 'num'), td(b.failed + b.task_failed, 'num'),\n"
    "              td(b.canceled, 'num'), td(spent(b), 'num'), td(batchState(b)));\n"
    "    if (token) { const c = td(); if (!b.done) c.append(button('cancel', 'Cancel', {batch: b.batch})); tr.append(c); }\n"
    "    return tr;\n"
    "  }\n"
    "  function fill(tbody, rows, empty, cols) {\n"
    "    tbody.replaceChildren(...rows);\n"
    "    if (!rows.length) { const tr = el('tr'); const c = td(empty, 'muted'); c.colSpan = cols; tr.append(c); tbody.append(tr); }\n"
    "  }\n"
    "  function showState(st) {\n"
    "    const p = document.getElementById('paused');\n"
    "    p.replaceChildren(state(st.paused ? 'paused' : 'running'));\n"
    "    if (st.paused && st.paused_by) p.append(el('span', 'muted', ' ' + st.paused_by));\n"
    "    const acts = document.getElementById('queue-actions');\n"
    "    if (acts && token) acts.replaceChildren(st.paused ? button('resume', 'Resume intake', {}) : button('pause', 'Pause intake', {}));\n"
    "    document.getElementById('queue-counts').textContent = st.jobs + ' waiting, ' + st.retry + ' to retry, ' +\n"
    "      st.tracked + ' tracked, ' + st.dead + ' dead; spent today ' + st.spent_today + ', in all ' + st.spent_total;\n"
    "    const box = document.getElementById('instances');\n"
    "    const items = [];\n"
    "    for (const i of st.instances) {\n"
    "      const d = el('div', 'inst');\n"
    "      const age = i.heartbeat_age_ms === null ? '' : ' heartbeat ' + (i.heartbeat_age_ms / 1000).toFixed(1) + ' s ago';\n"
    "      d.append(el('strong', null, i.name), ' ', state(i.state || '?'),\n"
    "               el('span', 'muted', ' in flight ' + (i.in_flight ?? '-') + age), ' ', el('span', null, i.message || ''));\n"
    "      for (const [g, gw0] of Object.entries(obj(i.gateways))) {\n"
    "        const gw = obj(gw0), keys = Object.entries(obj(gw.keys)).map(([fp, k]) => [fp, obj(k)]);\n"
    "        const line = el('div', 'gw');\n"
    "        line.append('gateway ', el('strong', null, g), ' ', state(gw.state || '?'),\n"
    "                    ' keys ' + keys.filter(([, k]) => k.state !== 'aside').length + ' of ' + keys.length + ' in service ',\n"
    "                    el('span', 'muted', gw.message || ''));\n"
    "        for (const [fp, k] of keys) {\n"
    "          if (k.state === 'aside') line.append(el('div', 'gw', 'key ' + fp + ' set aside: ' + (k.message || '')));\n"
    "        }\n"
    "        d.append(line);\n"
    "      }\n"
    "      items.push(d);\n"
    "    }\n"
    "    if (!items.length) items.push(el('p', 'muted', 'no instance'));\n"
    "    box.replaceChildren(...items);\n"
    "  }\n"
    "  function deadRow(d) {\n"
    "    const tr = el('tr');\n"
    "    tr.append(td(when(d.failed_at)), td(d.job_id || '-'), td(d.error || '-'), td(d.http_status || '-', 'num'),\n"
    "              td(d.attempts ?? '-', 'num'), td(d.message || '', 'error'));\n"
    "    if (token) { const c = td(); if (d.job_id) c.append(button('requeue', 'Requeue', {job: d.job_id})); tr.append(c); }\n"
    "    return tr;\n"
    "  }\n"
    "  async function refreshOverview() {\n"
    "    const [b, st, dead] = await Promise.all([getJSON('/api/batches'), getJSON('/api/state'), getJSON('/api/dead')]);\n"
    "    fill(document.querySelector('#batches tbody'), b.batches.map(batchRow), 'no batch', 9);\n"
    "    showState(st);\n"
    "    fill(document.querySelector('#dead tbody'), dead.dead.map(deadRow), 'no dead job', 7);\n"
    "  }\n"
    "  function jobCells(tr, r, batch) {\n"
    "    const [id, st, pr, er, vid] = tr.children;\n"
    "    id.textContent = r.job_id;\n"
    "    st.replaceChildren(state(r.status));\n"
    "    pr.textContent = r.prompt ?? '';\n"
    "    er.textContent = [r.error, r.message].filter((x) => x).join(': ');\n"
    "    const src = r.status === 'succeeded' && r.file && document.body.dataset.videos === '1' ?\n"
    "      '/video/' + encodeURIComponent(batch) + '/' + encodeURIComponent(r.job_id) : null;\n"
    "    const v = vid.querySelector('video');\n"
    "    if (src && (!v || v.getAttribute('src') !== src)) {\n"
    "      const nv = el('video');\n"
    "      nv.src = src; nv.controls = true; nv.muted = true; nv.autoplay = true; nv.loop = true;\n"
    "      nv.playsInline = true; nv.preload = 'auto';\n"
    "      vid.replaceChildren(nv);\n"
    "    } else if (!src) {\n"
    "      vid.textContent = r.status === 'succeeded' ? (r.file ? '' : 'not downloaded') : '';\n"
    "    }\n"
    "  }\n"
    "  async function refreshBatch() {\n"
    "    const batch = document.body.dataset.batch;\n"
    "    const d = await getJSON('/api/batch?id=' + encodeURIComponent(batch));\n"
    "    if (d.progress) {\n"
    "      const b = d.progress;\n"
    "      const bar = document.getElementById('bar');\n"
    "      if (b.total !== null) { bar.max = Math.max(b.total, 1); bar.value = b.finished; }\n"
    "      document.getElementById('frac').textContent = fin(b);\n"
    "      document.getElementById('counts').textContent = 'submitted ' + b.submitted + ', succeeded ' + b.succeeded +\n"
    "        ', failed ' + (b.failed + b.task_failed) + ', canceled ' + b.canceled + ', spent ' + spent(b) + ' - ' + batchState(b);\n"
    "      const c = document.getElementById('batch-actions');\n"
    "      if (c && b.done) c.replaceChildren();\n"
    "    }\n"
    "    const tbody = document.querySelector('#jobs tbody');\n"
    "    const old = new Map();\n"
    "    for (const tr of tbody.querySelectorAll('tr[data-key]')) old.set(tr.dataset.key, tr);\n"
    "    const seen = new Map();\n"
    "    let i = 0;\n"
    "    for (const r of d.jobs) {\n"
    "      const n = seen.get(r.job_id) || 0;\n"
    "      seen.set(r.job_id, n + 1);\n"
    "      const key = r.job_id + '#' + n;\n"
    "      let tr = old.get(key);\n"
    "      if (!tr) {\n"
    "        tr = el('tr');\n"
    "        tr.dataset.key = key;\n"
    "        tr.append(td(null, 'job'), td(null, 'status'), td(null, 'prompt'), td(null, 'error'), td(null, 'video'));\n"
    "      }\n"
    "      old.delete(key);\n"
    "      jobCells(tr, r, batch);\n"
    "      if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] || null);\n"
    "      i++;\n"
    "    }\n"
    "    for (const tr of old.values()) tr.remove();\n"
    "    for (const tr of tbody.querySelectorAll('tr:not([data-key])')) if (d.jobs.length) tr.remove();\n"
    "  }\n"
    "  async function refresh() {\n"
    "    try {\n"
    "      if (page === 'overview') await refreshOverview(); else if (page === 'batch') await refreshBatch();\n"
    "      document.getElementById('updated').textContent = 'updated ' + new Date().toLocaleTimeString();\n"
    "    } catch (e) {\n"
    "      document.getElementById('updated').textContent = 'cannot refresh: ' + e.message;\n"
    "    }\n"
    "  }\n"
    "  document.addEventListener('click', async (e) => {\n"
    "    const b = e.target.closest('button[data-action]');\n"
    "    if (!b || !token) return;\n"
    "    const a = b.dataset.action;\n"
    "    let q = '';\n"
    "    if (b.dataset.batch) q = '?batch=' + encodeURIComponent(b.dataset.batch);\n"
    "    if (b.dataset.job) q = '?job=' + encodeURIComponent(b.dataset.job);\n"
    "    if (a === 'cancel' && !window.confirm('Cancel batch ' + b.dataset.batch + '?')) return;\n"
    "    const r = await fetch('/action/' + a + q, {method: 'POST', headers: {'X-Vidq-Token': token}});\n"
    "    const m = document.getElementById('msg');\n"
    "    m.textContent = r.ok ? (await r.json()).message : a + ': HTTP ' + r.status;\n"
    "    refresh();\n"
    "  });\n"
    "  setInterval(refresh, 2000);\n"
    "  refresh();\n"
    "})();\n";

/* ---- responses ----------------------------------------------------------------- */

static void secure_headers(struct MHD_Response *r, const char *type)
{
    MHD_add_response_header(r, "Content-Type", type);
    MHD_add_response_header(r, "Content-Security-Policy",
                            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                            "media-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
                            "frame-ancestors 'none'");
    MHD_add_response_header(r, "X-Content-Type-Options", "nosniff");
    MHD_add_response_header(r, "Referrer-Policy", "same-origin");
    MHD_add_response_header(r, "X-Frame-Options", "DENY");
    MHD_add_response_header(r, "Cache-Control", "no-store");
}

/* Send `body` (taken) with `status`. */
static enum MHD_Result send_sbuf(struct MHD_Connection *c, unsigned status, const char *type, sbuf *body)
{
    size_t n;
    char *p = sbuf_steal(body, &n);
    struct MHD_Response *r = MHD_create_response_from_buffer(n, p, MHD_RESPMEM_MUST_FREE);
    secure_headers(r, type);
    enum MHD_Result ret = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result send_static(struct MHD_Connection *c, const char *type, const char *text)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(strlen(text), (void *)text, MHD_RESPMEM_PERSISTENT);
    secure_headers(r, type);
    enum MHD_Result ret = MHD_queue_response(c, MHD_HTTP_OK, r);
    MHD_destroy_response(r);
    return ret;
}

/* A plain-text error (its text is ours, never a request's). */
static enum MHD_Result send_error(struct MHD_Connection *c, unsigned status, const char *text)
{
    sbuf b;
    sbuf_init(&b);
    sbuf_printf(&b, "%s\n", text);
    return send_sbuf(c, status, "text/plain; charset=utf-8", &b);
}

/* ---- pages --------------------------------------------------------------------- */

static void page_head(sbuf *o, const char *title, const char *page)
{
    sbuf_puts(o, "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                 "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">");
    if (W.allow_actions)
        sbuf_printf(o, "<meta name=\"vidq-token\" content=\"%s\">", W.token);
    sbuf_puts(o, "<title>");
    html_put(o, title);
    sbuf_puts(o, "</title><link rel=\"stylesheet\" href=\"/app.css\"><script src=\"/app.js\" defer></script>"
                 "</head>\n<body data-page=\"");
    sbuf_puts(o, page);
    sbuf_puts(o, "\"");
}

static void page_foot(sbuf *o)
{
    sbuf_puts(o, "<footer>vidq web, refreshed every 2 s. <span id=\"updated\"></span></footer>\n</body></html>\n");
}

static void cell(sbuf *o, const char *cls, const char *text)
{
    sbuf_puts(o, cls ? "<td class=\"" : "<td");
    if (cls) {
        sbuf_puts(o, cls);
        sbuf_putc(o, '"');
    }
    sbuf_putc(o, '>');
    html_put(o, text);
    sbuf_puts(o, "</td>");
}

static void cell_num(sbuf *o, double v)
{
    sbuf_printf(o, "<td class=\"num\">%.0f</td>", v);
}

static void state_put(sbuf *o, const char *s)
{
    sbuf_puts(o, "<span class=\"state s-");
    for (const char *p = s; *p; p++) {
        if ((*p >= 'a' && *p <= 'z') || *p == '_')
            sbuf_putc(o, *p);
    }
    sbuf_puts(o, "\">");
    html_put(o, s);
    sbuf_puts(o, "</span>");
}

/* "3/10" or "3/?" and the progress bar of a batch object. */
static void progress_put(sbuf *o, const cJSON *b, const char *id)
{
    const cJSON *total = cJSON_GetObjectItemCaseSensitive(b, "total");
    double fin = json_num(b, "finished", 0);
    sbuf_printf(o, "<progress%s%s%s", id ? " id=\"" : "", id ? id : "", id ? "\"" : "");
    if (cJSON_IsNumber(total))
        sbuf_printf(o, " max=\"%.0f\" value=\"%.0f\"", total->valuedouble > 0 ? total->valuedouble : 1, fin);
    sbuf_printf(o, "></progress><span class=\"frac\"%s>", id ? " id=\"frac\"" : "");
    if (cJSON_IsNumber(total))
        sbuf_printf(o, "%.0f/%.0f</span>", fin, total->valuedouble);
    else
        sbuf_printf(o, "%.0f/?</span>", fin);
}

static void spent_put(sbuf *o, const cJSON *b)
{
    money_put(o, cJSON_GetObjectItemCaseSensitive(b, "spent"));
    const cJSON *budget = cJSON_GetObjectItemCaseSensitive(b, "budget");
    if (cJSON_IsNumber(budget)) {
        sbuf_puts(o, " of ");
        money_put(o, budget);
    }
}

static void batch_state_put(sbuf *o, const cJSON *b)
{
    const cJSON *rate = cJSON_GetObjectItemCaseSensitive(b, "rate");
    if (jtrue(b, "done"))
        sbuf_puts(o, "done");
    else if (cJSON_IsNumber(rate))
        sbuf_printf(o, "running, %.1f/s", rate->valuedouble);
    else
        sbuf_puts(o, "running");
}

static void action_button(sbuf *o, const char *action, const char *label, const char *attr, const char *value)
{
    sbuf_printf(o, "<button data-action=\"%s\"", action);
    if (attr) {
        sbuf_printf(o, " data-%s=\"", attr);
        html_put(o, value);
        sbuf_putc(o, '"');
    }
    sbuf_printf(o, ">%s</button>", label);
}

static void batches_html(sbuf *o, const cJSON *batches)
{
    const cJSON *b;
    int n = 0;
    cJSON_ArrayForEach(b, batches)
    {
        const char *name = json_str(b, "batch");
        if (name == NULL)
            continue;
        n++;
        sbuf_puts(o, "<tr data-batch=\"");
        html_put(o, name);
        sbuf_puts(o, "\"><td><a href=\"/batch?id=");
        url_put(o, name);
        sbuf_puts(o, "\">");
        html_put(o, name);
        sbuf_puts(o, "</a></td><td>");
        progress_put(o, b, NULL);
        sbuf_puts(o, "</td>");
        cell_num(o, json_num(b, "submitted", 0));
        cell_num(o, json_num(b, "succeeded", 0));
        cell_num(o, json_num(b, "failed", 0) + json_num(b, "task_failed", 0));
        cell_num(o, json_num(b, "canceled", 0));
        sbuf_puts(o, "<td class=\"num\">");
        spent_put(o, b);
        sbuf_puts(o, "</td><td>");
        batch_state_put(o, b);
        sbuf_puts(o, "</td>");
        if (W.allow_actions) {
            sbuf_puts(o, "<td>");
            if (!jtrue(b, "done"))
                action_button(o, "cancel", "Cancel", "batch", name);
            sbuf_puts(o, "</td>");
        }
        sbuf_puts(o, "</tr>\n");
    }
    if (n == 0)
        sbuf_puts(o, "<tr><td class=\"muted\" colspan=\"9\">no batch</td></tr>\n");
}

static void instances_html(sbuf *o, const cJSON *st)
{
    const cJSON *i;
    int n = 0;
    cJSON_ArrayForEach(i, cJSON_GetObjectItemCaseSensitive(st, "instances"))
    {
        const cJSON *age = cJSON_GetObjectItemCaseSensitive(i, "heartbeat_age_ms");
        const cJSON *fl = cJSON_GetObjectItemCaseSensitive(i, "in_flight");
        const char *state = json_str(i, "state");
        n++;
        sbuf_puts(o, "<div class=\"inst\"><strong>");
        html_put(o, json_str(i, "name"));
        sbuf_puts(o, "</strong> ");
        state_put(o, state ? state : "?");
        if (cJSON_IsNumber(fl))
            sbuf_printf(o, "<span class=\"muted\"> in flight %.0f", fl->valuedouble);
        else
            sbuf_puts(o, "<span class=\"muted\"> in flight -");
        if (cJSON_IsNumber(age))
            sbuf_printf(o, " heartbeat %.1f s ago", age->valuedouble / 1000);
        sbuf_puts(o, "</span> <span>");
        html_put(o, json_str(i, "message"));
        sbuf_puts(o, "</span>");
        const cJSON *gw;
        cJSON_ArrayForEach(gw, cJSON_GetObjectItemCaseSensitive(i, "gateways"))
        {
            const cJSON *kk, *keys = cJSON_GetObjectItemCaseSensitive(gw, "keys");
            int all = 0, aside = 0;
            cJSON_ArrayForEach(kk, keys)
            {
                all++;
                const char *ks = json_str(kk, "state");
                aside += ks && strcmp(ks, "aside") == 0;
            }
            const char *gs = json_str(gw, "state");
            sbuf_puts(o, "<div class=\"gw\">gateway <strong>");
            html_put(o, gw->string);
            sbuf_puts(o, "</strong> ");
            state_put(o, gs ? gs : "?");
            sbuf_printf(o, " keys %d of %d in service <span class=\"muted\">", all - aside, all);
            html_put(o, json_str(gw, "message"));
            sbuf_puts(o, "</span>");
            cJSON_ArrayForEach(kk, keys)
            {
                const char *ks = json_str(kk, "state");
                if (!ks || strcmp(ks, "aside") != 0)
                    continue;
                sbuf_puts(o, "<div class=\"gw\">key ");
                html_put(o, kk->string);
                sbuf_puts(o, " set aside: ");
                html_put(o, json_str(kk, "message"));
                sbuf_puts(o, "</div>");
            }
            sbuf_puts(o, "</div>");
        }
        sbuf_puts(o, "</div>\n");
    }
    if (n == 0)
        sbuf_puts(o, "<p class=\"muted\">no instance</p>\n");
}

static void dead_html(sbuf *o, const cJSON *dead)
{
    const cJSON *d;
    int n = 0;
    cJSON_ArrayForEach(d, dead)
    {
        char when[40] = "-";
        double at = json_num(d, "failed_at", 0), http = json_num(d, "http_status", 0);
        const cJSON *att = cJSON_GetObjectItemCaseSensitive(d, "attempts");
        if (at > 0 && at < 253402300800000.0) { /* before 10000-01-01: the cast and gmtime_r cannot fail */
            time_t t = (time_t)(at / 1000);
            struct tm tm;
            gmtime_r(&t, &tm);
            strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", &tm);
        }
        const char *id = json_str(d, "job_id"), *err = json_str(d, "error");
        n++;
        sbuf_puts(o, "<tr>");
        cell(o, NULL, when);
        cell(o, NULL, id ? id : "-");
        cell(o, NULL, err ? err : "-");
        if (http > 0)
            cell_num(o, http);
        else
            cell(o, "num", "-");
        if (cJSON_IsNumber(att))
            cell_num(o, att->valuedouble);
        else
            cell(o, "num", "-");
        cell(o, "error", json_str(d, "message"));
        if (W.allow_actions) {
            sbuf_puts(o, "<td>");
            if (id)
                action_button(o, "requeue", "Requeue", "job", id);
            sbuf_puts(o, "</td>");
        }
        sbuf_puts(o, "</tr>\n");
    }
    if (n == 0)
        sbuf_puts(o, "<tr><td class=\"muted\" colspan=\"7\">no dead job</td></tr>\n");
}

static cJSON *parsed(sbuf *b)
{
    cJSON *v = cJSON_ParseWithLength(sb_str(b), b->len);
    sbuf_free(b);
    return v;
}

static enum MHD_Result page_overview(struct MHD_Connection *c)
{
    sbuf j, o;
    sbuf_init(&j);
    batches_json(&j, WEB_BATCHES_MAX);
    cJSON *batches = parsed(&j);
    stats_to_json(&j);
    cJSON *st = parsed(&j);
    dead_list_json(&j, WEB_DEAD_MAX);
    cJSON *dead = parsed(&j);

    sbuf_init(&o);
    sbuf t;
    sbuf_init(&t);
    sbuf_printf(&t, "vidq %s", g.cfg.prefix);
    page_head(&o, sb_str(&t), "overview");
    sbuf_free(&t);
    sbuf_puts(&o, "><header><h1>vidq <span class=\"muted\">");
    html_put(&o, g.cfg.prefix);
    sbuf_puts(&o, "</span></h1><span id=\"paused\">");
    const char *paused_by = json_str(st, "paused_by");
    state_put(&o, jtrue(st, "paused") ? "paused" : "running");
    if (jtrue(st, "paused") && paused_by) {
        sbuf_puts(&o, "<span class=\"muted\"> ");
        html_put(&o, paused_by);
        sbuf_puts(&o, "</span>");
    }
    sbuf_puts(&o, "</span>");
    if (W.allow_actions) {
        sbuf_puts(&o, "<span id=\"queue-actions\">");
        if (jtrue(st, "paused"))
            action_button(&o, "resume", "Resume intake", NULL, NULL);
        else
            action_button(&o, "pause", "Pause intake", NULL, NULL);
        sbuf_puts(&o, "</span>");
    }
    sbuf_puts(&o, "<span id=\"msg\"></span></header>\n<p id=\"queue-counts\" class=\"muted\">");
    sbuf_printf(&o, "%.0f waiting, %.0f to retry, %.0f tracked, %.0f dead; spent today ", json_num(st, "jobs", 0),
                json_num(st, "retry", 0), json_num(st, "tracked", 0), json_num(st, "dead", 0));
    money_put(&o, cJSON_GetObjectItemCaseSensitive(st, "spent_today"));
    sbuf_puts(&o, ", in all ");
    money_put(&o, cJSON_GetObjectItemCaseSensitive(st, "spent_total"));
    sbuf_puts(&o, "</p>\n<h2>Batches</h2>\n<table id=\"batches\"><thead><tr><th>Batch</th><th>Progress</th>"
                  "<th>Submitted</th><th>Succeeded</th><th>Failed</th><th>Canceled</th><th>Spent</th>"
                  "<th>State</th>");
    if (W.allow_actions)
        sbuf_puts(&o, "<th></th>");
    sbuf_puts(&o, "</tr></thead><tbody>\n");
    batches_html(&o, batches);
    sbuf_puts(&o, "</tbody></table>\n<h2>Instances, gateways and keys</h2>\n<div id=\"instances\">");
    instances_html(&o, st);
    sbuf_puts(&o, "</div>\n<h2>Dead jobs</h2>\n<table id=\"dead\"><thead><tr><th>Failed at (UTC)</th><th>Job</th>"
                  "<th>Error</th><th>HTTP</th><th>Attempts</th><th>Message</th>");
    if (W.allow_actions)
        sbuf_puts(&o, "<th></th>");
    sbuf_puts(&o, "</tr></thead><tbody>\n");
    dead_html(&o, dead);
    sbuf_puts(&o, "</tbody></table>\n");
    page_foot(&o);
    cJSON_Delete(batches);
    cJSON_Delete(st);
    cJSON_Delete(dead);
    return send_sbuf(c, MHD_HTTP_OK, "text/html; charset=utf-8", &o);
}

static void job_row_html(sbuf *o, const cJSON *r, const char *batch, int n)
{
    const char *id = json_str(r, "job_id"), *status = json_str(r, "status"), *file = json_str(r, "file");
    const char *err = json_str(r, "error"), *msg = json_str(r, "message");
    sbuf_puts(o, "<tr data-key=\"");
    html_put(o, id);
    sbuf_printf(o, "#%d\">", n);
    cell(o, "job", id);
    sbuf_puts(o, "<td class=\"status\">");
    state_put(o, status ? status : "?");
    sbuf_puts(o, "</td>");
    cell(o, "prompt", json_str(r, "prompt"));
    sbuf_puts(o, "<td class=\"error\">");
    html_put(o, err);
    if (err && msg)
        sbuf_puts(o, ": ");
    html_put(o, msg);
    sbuf_puts(o, "</td><td class=\"video\">");
    int ok = status && strcmp(status, "succeeded") == 0;
    if (ok && file && W.dir_fd >= 0) {
        sbuf_puts(o, "<video src=\"/video/");
        url_put(o, batch);
        sbuf_putc(o, '/');
        url_put(o, id);
        sbuf_puts(o, "\" controls muted autoplay loop playsinline preload=\"auto\"></video>");
    } else if (ok && !file) {
        sbuf_puts(o, "not downloaded");
    }
    sbuf_puts(o, "</td></tr>\n");
}

struct row_key {
    const cJSON *row;
    const char *id; /* NULL: a row without a job id (not shown) */
    int pos, n;
};

static int row_key_by_id(const void *a, const void *b)
{
    const struct row_key *x = a, *y = b;
    int c = (x->id == NULL) - (y->id == NULL);
    if (c == 0 && x->id)
        c = strcmp(x->id, y->id);
    return c ? c : x->pos - y->pos;
}

static int row_key_by_pos(const void *a, const void *b)
{
    return ((const struct row_key *)a)->pos - ((const struct row_key *)b)->pos;
}

static enum MHD_Result page_batch(struct MHD_Connection *c, const char *batch)
{
    sbuf j, o;
    int done;
    sbuf_init(&j);
    if (!batch_progress_json(&j, batch)) {
        sbuf_putc(&j, '{'); /* no hash (gone after batch_ttl): the rows alone */
        sbuf_putc(&j, '}');
    }
    cJSON *b = parsed(&j);
    int exists = results_json(&j, batch, &done);
    cJSON *rows = parsed(&j);
    if (!exists) {
        cJSON_Delete(b);
        cJSON_Delete(rows);
        return send_error(c, MHD_HTTP_NOT_FOUND, "no such batch");
    }
    sbuf_init(&o);
    sbuf t;
    sbuf_init(&t);
    sbuf_printf(&t, "vidq batch %s", batch);
    page_head(&o, sb_str(&t), "batch");
    sbuf_free(&t);
    sbuf_puts(&o, " data-batch=\"");
    html_put(&o, batch);
    sbuf_printf(&o, "\" data-videos=\"%d\"><header><a href=\"/\">&larr; all batches</a><h1>Batch ", W.dir_fd >= 0);
    html_put(&o, batch);
    sbuf_puts(&o, "</h1>");
    if (W.allow_actions) {
        sbuf_puts(&o, "<span id=\"batch-actions\">");
        if (!jtrue(b, "done"))
            action_button(&o, "cancel", "Cancel batch", "batch", batch);
        sbuf_puts(&o, "</span>");
    }
    sbuf_puts(&o, "<span id=\"msg\"></span></header>\n<p id=\"summary\">");
    progress_put(&o, b, "bar");
    sbuf_puts(&o, " <span id=\"counts\">");
    sbuf_printf(&o, "submitted %.0f, succeeded %.0f, failed %.0f, canceled %.0f, spent ", json_num(b, "submitted", 0),
                json_num(b, "succeeded", 0), json_num(b, "failed", 0) + json_num(b, "task_failed", 0), json_num(b, "canceled", 0));
    spent_put(&o, b);
    sbuf_puts(&o, " - ");
    batch_state_put(&o, b);
    sbuf_puts(&o, "</span></p>\n<table id=\"jobs\"><thead><tr><th>Job</th><th>Status</th><th>Prompt</th>"
                  "<th>Error</th><th>Video</th></tr></thead><tbody>\n");
    /* The key of a row: its job id and how many rows of that id came before
     * (a duplicate, a requeue), found by sorting the rows by (id, position):
     * linear in the rows after the sort, where a look back at every earlier
     * row took 27 s for a batch of 40,000 and held the one thread meanwhile. */
    int nrows = cJSON_GetArraySize(rows);
    struct row_key *keys = xcalloc((size_t)nrows + 1, sizeof *keys);
    const cJSON *r;
    int nk = 0;
    cJSON_ArrayForEach(r, rows)
    {
        keys[nk].row = r;
        keys[nk].id = json_str(r, "job_id");
        keys[nk].pos = nk;
        nk++;
    }
    qsort(keys, (size_t)nk, sizeof *keys, row_key_by_id);
    for (int i = 0; i < nk; i++)
        keys[i].n = i > 0 && keys[i].id && keys[i - 1].id && strcmp(keys[i].id, keys[i - 1].id) == 0 ? keys[i - 1].n + 1 : 0;
    qsort(keys, (size_t)nk, sizeof *keys, row_key_by_pos);
    nrows = 0;
    for (int i = 0; i < nk; i++) {
        if (keys[i].id) {
            job_row_html(&o, keys[i].row, batch, keys[i].n);
            nrows++;
        }
    }
    free(keys);
    if (nrows == 0)
        sbuf_puts(&o, "<tr><td class=\"muted\" colspan=\"5\">no job has an event yet</td></tr>\n");
    sbuf_puts(&o, "</tbody></table>\n");
    page_foot(&o);
    cJSON_Delete(b);
    cJSON_Delete(rows);
    return send_sbuf(c, MHD_HTTP_OK, "text/html; charset=utf-8", &o);
}

/* ---- JSON endpoints -------------------------------------------------------------- */

static enum MHD_Result api(struct MHD_Connection *c, const char *what, const char *batch)
{
    sbuf o;
    sbuf_init(&o);
    if (strcmp(what, "batches") == 0) {
        sbuf_puts(&o, "{\"batches\":");
        batches_json(&o, WEB_BATCHES_MAX);
        sbuf_putc(&o, '}');
    } else if (strcmp(what, "state") == 0) {
        stats_to_json(&o);
    } else if (strcmp(what, "dead") == 0) {
        sbuf_puts(&o, "{\"dead\":");
        dead_list_json(&o, WEB_DEAD_MAX);
        sbuf_putc(&o, '}');
    } else if (strcmp(what, "batch") == 0) {
        int done;
        if (batch == NULL || !id_is_valid(batch, strlen(batch))) {
            sbuf_free(&o);
            return send_error(c, MHD_HTTP_BAD_REQUEST, "id: a batch name is 1-128 characters of [A-Za-z0-9._:-]");
        }
        sbuf_puts(&o, "{\"progress\":");
        if (!batch_progress_json(&o, batch))
            sbuf_puts(&o, "null");
        sbuf_puts(&o, ",\"jobs\":");
        int exists = results_json(&o, batch, &done);
        sbuf_printf(&o, ",\"done\":%s}", done ? "true" : "false");
        if (!exists) {
            sbuf_free(&o);
            return send_error(c, MHD_HTTP_NOT_FOUND, "no such batch");
        }
    } else {
        sbuf_free(&o);
        return send_error(c, MHD_HTTP_NOT_FOUND, "not found");
    }
    return send_sbuf(c, MHD_HTTP_OK, "application/json", &o);
}

/* ---- videos -------------------------------------------------------------------------- */

static const char *video_type(const char *name)
{
    static const struct {
        const char *ext, *type;
    } types[] = {{".mp4", "video/mp4"}, {".webm", "video/webm"}, {".mov", "video/quicktime"},
                 {".mkv", "video/x-matroska"}, {".gif", "image/gif"}, {".mpg", "video/mpeg"}};
    const char *dot = strrchr(name, '.');
    for (size_t i = 0; dot && i < sizeof types / sizeof types[0]; i++) {
        if (strcasecmp(dot, types[i].ext) == 0)
            return types[i].type;
    }
    return "application/octet-stream";
}

/* The base name of the file the last succeeded row of `job` names, or NULL. */
static char *video_name(const char *batch, const char *job)
{
    sbuf j;
    int done;
    char *name = NULL;
    sbuf_init(&j);
    results_json(&j, batch, &done);
    cJSON *rows = parsed(&j);
    const cJSON *r;
    cJSON_ArrayForEach(r, rows)
    {
        const char *id = json_str(r, "job_id"), *st = json_str(r, "status"), *file = json_str(r, "file");
        if (!id || strcmp(id, job) != 0 || !st || strcmp(st, "succeeded") != 0 || !file)
            continue;
        const char *base = strrchr(file, '/');
        base = base ? base + 1 : file;
        free(name);
        name = xstrdup(base);
    }
    cJSON_Delete(rows);
    /* vidqd names it <job_id>.<ext>: anything else is not one of its downloads */
    if (name && (name[0] == '.' || strncmp(name, job, strlen(job)) != 0 || name[strlen(job)] != '.')) {
        free(name);
        name = NULL;
    }
    return name;
}

/* "bytes=S-E", "bytes=S-", "bytes=-N" of a file of `size` bytes: 1 and the
 * range, 0 when there is none to honour (the whole file), -1 unsatisfiable. */
static int parse_range(const char *h, long long size, long long *start, long long *end)
{
    char *e;
    if (h == NULL || strncmp(h, "bytes=", 6) != 0 || strchr(h, ','))
        return 0;
    h += 6;
    if (*h == '-') {
        long long n = strtoll(h + 1, &e, 10);
        if (e == h + 1 || *e || n <= 0)
            return 0;
        *start = n >= size ? 0 : size - n;
        *end = size - 1;
        return size > 0 ? 1 : -1;
    }
    long long s = strtoll(h, &e, 10);
    if (e == h || *e != '-' || s < 0)
        return 0;
    h = e + 1;
    long long en = size - 1;
    if (*h) {
        en = strtoll(h, &e, 10);
        if (*e || en < s)
            return 0;
        if (en > size - 1)
            en = size - 1;
    }
    if (s >= size)
        return -1;
    *start = s;
    *end = en;
    return 1;
}

static enum MHD_Result video(struct MHD_Connection *c, const char *path)
{
    char batch[130], job[130];
    const char *slash = strchr(path, '/');
    if (W.dir_fd < 0)
        return send_error(c, MHD_HTTP_NOT_FOUND, "no download directory (track.download_dir or --download-dir)");
    if (slash == NULL || (size_t)(slash - path) >= sizeof batch || strlen(slash + 1) >= sizeof job ||
        !id_is_valid(path, (size_t)(slash - path)) || !id_is_valid(slash + 1, strlen(slash + 1)))
        return send_error(c, MHD_HTTP_NOT_FOUND, "not a video: /video/BATCH/JOB_ID");
    memcpy(batch, path, (size_t)(slash - path));
    batch[slash - path] = '\0';
    snprintf(job, sizeof job, "%s", slash + 1);
    char *name = video_name(batch, job);
    if (name == NULL)
        return send_error(c, MHD_HTTP_NOT_FOUND, "no downloaded video for this job");
    int fd = openat(W.dir_fd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        if (fd >= 0)
            close(fd);
        free(name);
        return send_error(c, MHD_HTTP_NOT_FOUND, "the video file is not in the download directory");
    }
    long long size = st.st_size, start = 0, end = size - 1;
    int ranged = parse_range(MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Range"), size, &start, &end);
    if (ranged < 0) {
        close(fd);
        free(name);
        char cr[64];
        snprintf(cr, sizeof cr, "bytes */%lld", size);
        struct MHD_Response *r = MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
        secure_headers(r, "text/plain");
        MHD_add_response_header(r, "Content-Range", cr);
        enum MHD_Result ret = MHD_queue_response(c, MHD_HTTP_RANGE_NOT_SATISFIABLE, r);
        MHD_destroy_response(r);
        return ret;
    }
    if (ranged == 0) {
        start = 0;
        end = size - 1;
    }
    /* MHD closes fd when the response is destroyed */
    struct MHD_Response *r = MHD_create_response_from_fd_at_offset64((uint64_t)(end - start + 1), fd, (uint64_t)start);
    if (r == NULL) {
        close(fd);
        free(name);
        return send_error(c, MHD_HTTP_INTERNAL_SERVER_ERROR, "cannot send the file");
    }
    secure_headers(r, video_type(name));
    MHD_add_response_header(r, "Accept-Ranges", "bytes");
    if (ranged) {
        char cr[96];
        snprintf(cr, sizeof cr, "bytes %lld-%lld/%lld", start, end, size);
        MHD_add_response_header(r, "Content-Range", cr);
    }
    free(name);
    enum MHD_Result ret = MHD_queue_response(c, ranged ? MHD_HTTP_PARTIAL_CONTENT : MHD_HTTP_OK, r);
    MHD_destroy_response(r);
    return ret;
}

/* ---- actions --------------------------------------------------------------------- */

/* Only a page of this origin, with this run's token. */
static int action_allowed(struct MHD_Connection *c, const char *host)
{
    const char *tok = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "X-Vidq-Token");
    const char *origin = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Origin");
    const char *referer = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Referer");
    char self[300];
    snprintf(self, sizeof self, "http://%s", host);
    if (tok == NULL || !same_secret(tok, W.token))
        return 0;
    if (origin)
        return strcmp(origin, self) == 0;
    size_t n = strlen(self);
    return referer && strncmp(referer, self, n) == 0 && referer[n] == '/';
}

static enum MHD_Result action(struct MHD_Connection *c, const char *what, const char *host)
{
    if (!W.allow_actions)
        return send_error(c, MHD_HTTP_FORBIDDEN, "actions are off (vidq web --allow-actions)");
    if (!action_allowed(c, host))
        return send_error(c, MHD_HTTP_FORBIDDEN, "an action needs the page's token, from a page of this origin");
    const char *batch = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "batch");
    const char *job = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "job");
    struct jw w;
    sbuf o, m;
    sbuf_init(&o);
    sbuf_init(&m);
    if (strcmp(what, "pause") == 0 || strcmp(what, "resume") == 0) {
        int p = what[0] == 'p';
        pause_set(p);
        sbuf_puts(&m, p ? "intake paused" : "intake resumed");
    } else if (strcmp(what, "cancel") == 0) {
        long long retries, tracked;
        if (batch == NULL || !id_is_valid(batch, strlen(batch))) {
            sbuf_free(&m);
            return send_error(c, MHD_HTTP_BAD_REQUEST, "cancel needs ?batch=B");
        }
        cancel_batch(batch, &retries, &tracked);
        sbuf_printf(&m, "canceled batch %s: %lld retries and %lld tracked tasks brought forward", batch, retries,
                    tracked);
    } else if (strcmp(what, "requeue") == 0) {
        if (job == NULL || !id_is_valid(job, strlen(job))) {
            sbuf_free(&m);
            return send_error(c, MHD_HTTP_BAD_REQUEST, "requeue needs ?job=ID");
        }
        long n = dead_requeue_id(job);
        sbuf_printf(&m, "requeued %ld entr%s of job %s", n, n == 1 ? "y" : "ies", job);
    } else {
        sbuf_free(&m);
        return send_error(c, MHD_HTTP_NOT_FOUND, "no such action");
    }
    jw_begin(&w);
    jw_bool(&w, "ok", 1);
    jw_str(&w, "message", sb_str(&m));
    jw_end(&w, &o);
    sbuf_free(&m);
    return send_sbuf(c, MHD_HTTP_OK, "application/json", &o);
}

/* ---- requests ---------------------------------------------------------------------- */

struct req {
    size_t body;
};

static int host_ok(const char *host)
{
    for (int i = 0; host && i < W.nhosts; i++) {
        if (strcasecmp(host, W.hosts[i]) == 0)
            return 1;
    }
    return 0;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                                  const char *version, const char *upload, size_t *upload_size, void **state)
{
    (void)cls;
    (void)version;
    (void)upload;
    struct req *rq = *state;
    if (rq == NULL) { /* the headers: wait for the body */
        *state = xcalloc(1, sizeof *rq);
        return MHD_YES;
    }
    if (*upload_size) {
        rq->body += *upload_size;
        *upload_size = 0;
        return MHD_YES;
    }
    const char *host = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Host");
    if (!host_ok(host))
        return send_error(c, MHD_HTTP_FORBIDDEN, "this server does not answer for that Host");
    if (rq->body > WEB_BODY_MAX)
        return send_error(c, MHD_HTTP_CONTENT_TOO_LARGE, "request body too large");
    if (strcmp(method, "POST") == 0) {
        if (strncmp(url, "/action/", 8) == 0)
            return action(c, url + 8, host);
        return send_error(c, MHD_HTTP_METHOD_NOT_ALLOWED, "GET only here");
    }
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0)
        return send_error(c, MHD_HTTP_METHOD_NOT_ALLOWED, "GET, HEAD, or POST to /action/");
    if (strncmp(url, "/action/", 8) == 0)
        return send_error(c, MHD_HTTP_METHOD_NOT_ALLOWED, "an action is a POST");
    if (strcmp(url, "/") == 0)
        return page_overview(c);
    if (strcmp(url, "/batch") == 0) {
        const char *id = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "id");
        if (id == NULL || !id_is_valid(id, strlen(id)))
            return send_error(c, MHD_HTTP_BAD_REQUEST, "id: a batch name is 1-128 characters of [A-Za-z0-9._:-]");
        return page_batch(c, id);
    }
    if (strcmp(url, "/app.js") == 0)
        return send_static(c, "text/javascript; charset=utf-8", APP_JS);
    if (strcmp(url, "/app.css") == 0)
        return send_static(c, "text/css; charset=utf-8", APP_CSS);
    if (strncmp(url, "/api/", 5) == 0)
        return api(c, url + 5, MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "id"));
    if (strncmp(url, "/video/", 7) == 0)
        return video(c, url + 7);
    return send_error(c, MHD_HTTP_NOT_FOUND, "not found");
}

static void on_completed(void *cls, struct MHD_Connection *c, void **state, enum MHD_RequestTerminationCode why)
{
    (void)cls;
    (void)c;
    (void)why;
    free(*state);
    *state = NULL;
}

/* ---- the command ------------------------------------------------------------------- */

static int is_loopback(const struct sockaddr *sa)
{
    if (sa->sa_family == AF_INET)
        return (ntohl(((const struct sockaddr_in *)sa)->sin_addr.s_addr) >> 24) == 127;
    if (sa->sa_family == AF_INET6) {
        const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
        return IN6_IS_ADDR_LOOPBACK(a);
    }
    return 0;
}

static void add_host(const char *name, unsigned port)
{
    if (W.nhosts >= WEB_HOSTS_MAX)
        return;
    sbuf b;
    sbuf_init(&b);
    sbuf_printf(&b, "%s:%u", name, port);
    W.hosts[W.nhosts++] = sbuf_steal(&b, NULL);
}

int cmd_web(int argc, char **argv)
{
    enum { OPT_LISTEN = 400, OPT_DOWNLOAD_DIR, OPT_ALLOW_ACTIONS, OPT_HOST_NAME };
    static const struct option opts[] = {
        COMMON_OPTIONS,
        {"listen", required_argument, NULL, OPT_LISTEN},
        {"download-dir", required_argument, NULL, OPT_DOWNLOAD_DIR},
        {"allow-actions", no_argument, NULL, OPT_ALLOW_ACTIONS},
        {"host-name", required_argument, NULL, OPT_HOST_NAME},
        {NULL, 0, NULL, 0},
    };
    const char *listen = WEB_DEFAULT_LISTEN, *dir = NULL, *host_name = NULL;
    int c;
    while ((c = getopt_long(argc, argv, "c:o:h", opts, NULL)) != -1) {
        switch (c) {
        case OPT_LISTEN: listen = optarg; break;
        case OPT_DOWNLOAD_DIR: dir = optarg; break;
        case OPT_ALLOW_ACTIONS: W.allow_actions = 1; break;
        case OPT_HOST_NAME: host_name = optarg; break;
        case OPT_JSON: die(EX_USAGE, "web: --json does not apply (the view has JSON endpoints under /api/)");
        default: common_option(c, HELP_WEB);
        }
    }
    no_more_args(argc, argv);

    /* HOST:PORT, or [V6]:PORT */
    char host[256];
    const char *colon = strrchr(listen, ':');
    const char *h = listen, *he = colon;
    if (colon && listen[0] == '[' && colon > listen && colon[-1] == ']') {
        h = listen + 1;
        he = colon - 1;
    }
    if (colon == NULL || he <= h || (size_t)(he - h) >= sizeof host || !is_integer(colon + 1, strlen(colon + 1)) ||
        atol(colon + 1) < 0 || atol(colon + 1) > 65535)
        die(EX_USAGE, "--listen %s: expected HOST:PORT (e.g. 127.0.0.1:8750, [::1]:0)", listen);
    memcpy(host, h, (size_t)(he - h));
    host[he - h] = '\0';
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV}, *ai = NULL;
    int gai = getaddrinfo(host, colon + 1, &hints, &ai);
    if (gai != 0)
        die(EX_USAGE, "--listen %s: %s", listen, gai_strerror(gai));
    struct sockaddr_storage sa;
    memcpy(&sa, ai->ai_addr, ai->ai_addrlen);
    freeaddrinfo(ai);
    if (!is_loopback((struct sockaddr *)&sa))
        cli_warn("web: serving on %s, not a loopback address: anyone who reaches it sees the queue (there is no "
                 "authentication)%s",
                 listen, W.allow_actions ? ", and with --allow-actions can load the page and act" : "");

    setup();
    if (dir == NULL)
        dir = g.cfg.download_dir;
    if (dir) {
        W.dir_fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (W.dir_fd < 0)
            cli_warn("web: download directory %s: %s (videos are not shown)", dir, strerror(errno));
    }
    if (W.allow_actions) {
        unsigned char rnd[32];
        if (getrandom(rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd)
            die(EX_UNAVAILABLE, "web: getrandom: %s", strerror(errno));
        for (size_t i = 0; i < sizeof rnd; i++)
            snprintf(W.token + 2 * i, 3, "%02x", rnd[i]);
    }

    /* SIGINT and SIGTERM for sigwait() below: blocked before the server's
     * thread starts, so that it inherits the mask and never takes them. */
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGINT);
    sigaddset(&stop, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stop, NULL);
    signal(SIGPIPE, SIG_IGN); /* a browser closing a video mid-file */

    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_AUTO | MHD_USE_ERROR_LOG;
    if (sa.ss_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    struct MHD_Daemon *d = MHD_start_daemon(
        flags, 0, NULL, NULL, on_request, NULL, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&sa,
        MHD_OPTION_NOTIFY_COMPLETED, on_completed, NULL, MHD_OPTION_CONNECTION_LIMIT, (unsigned)64,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)60, MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)65536,
        MHD_OPTION_END);
    if (d == NULL)
        die(EX_UNAVAILABLE, "web: cannot serve on %s (address in use, or not this machine's?)", listen);
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(d, MHD_DAEMON_INFO_LISTEN_FD);
    struct sockaddr_storage bound;
    socklen_t blen = sizeof bound;
    unsigned port = 0;
    if (info && getsockname(info->listen_fd, (struct sockaddr *)&bound, &blen) == 0)
        port = ntohs(bound.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&bound)->sin6_port
                                                 : ((struct sockaddr_in *)&bound)->sin_port);
    /* The names a browser may use for it: what --listen said, and loopback's. */
    if (sa.ss_family == AF_INET6) {
        sbuf b;
        sbuf_init(&b);
        sbuf_printf(&b, "[%s]", host);
        add_host(b.buf, port);
        sbuf_free(&b);
    } else {
        add_host(host, port);
    }
    if (is_loopback((struct sockaddr *)&sa)) {
        add_host("127.0.0.1", port);
        add_host("localhost", port);
        add_host("[::1]", port);
    }
    if (host_name)
        add_host(host_name, port);
    printf("listening on http://%s/\n", W.hosts[0]);
    fflush(stdout);

    int sig = 0;
    sigwait(&stop, &sig);
    MHD_stop_daemon(d);
    if (W.dir_fd >= 0)
        close(W.dir_fd);
    for (int i = 0; i < W.nhosts; i++)
        free(W.hosts[i]);
    teardown();
    return 0;
}
