/*
 * harden.h - process-level protections for the secrets vidqd holds.
 *
 * vidqd keeps the API bearer token (one or more keys that spend money) in
 * memory for its whole life. A core dump, or another process of the same
 * user reading /proc/PID/mem or attaching with ptrace, would hand it out.
 */
#ifndef VIDQ_HARDEN_H
#define VIDQ_HARDEN_H

/*
 * Make the process non-dumpable and forbid core files. Call it first thing
 * in main(), before the token is read. Never fails the start: it returns 0,
 * or -1 when one of the steps failed (errno set; the caller may log it).
 */
int harden_process(void);

#endif
