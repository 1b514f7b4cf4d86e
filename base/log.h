/*
 * log.h - the one logging module of vidq.
 *
 * Lines go to stderr, as text ("2026-11-25T10:00:00.123Z info  message k=v")
 * or as JSON objects, one per line. When stderr is the systemd journal
 * ($JOURNAL_STREAM matches stderr's device and inode) each line starts with a
 * syslog priority prefix such as "<6>" and the timestamp is left out, since the
 * journal records its own.
 *
 * Structured fields are passed as a NULL-terminated list of key/value string
 * pairs so the JSON format can keep them as separate keys.
 */
#ifndef VIDQ_LOG_H
#define VIDQ_LOG_H

enum log_level { LOG_DEBUG = 0, LOG_INFO, LOG_NOTICE, LOG_WARNING, LOG_ERROR };

/* Returns 0, or -1 when the name is not a level. */
int log_level_parse(const char *name, enum log_level *out);
void log_setup(enum log_level level, int json);
int log_enabled(enum log_level level);

void log_msg(enum log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* A message with key/value fields: log_kv(LOG_INFO, "submitted", "job_id", id, NULL). */
void log_kv(enum log_level level, const char *msg, ...) __attribute__((sentinel));

#define log_debug(...) log_msg(LOG_DEBUG, __VA_ARGS__)
#define log_info(...) log_msg(LOG_INFO, __VA_ARGS__)
#define log_notice(...) log_msg(LOG_NOTICE, __VA_ARGS__)
#define log_warning(...) log_msg(LOG_WARNING, __VA_ARGS__)
#define log_error(...) log_msg(LOG_ERROR, __VA_ARGS__)

#endif
