/*
 * harden.c - keep the API token out of core dumps and other processes.
 *
 * Two independent steps, because each covers a case the other misses:
 *
 *   - prctl(PR_SET_DUMPABLE, 0): the kernel writes no core for the process
 *     whatever core_pattern says (a pipe to systemd-coredump or apport would
 *     otherwise ignore RLIMIT_CORE and store the memory, token included, in
 *     /var/lib/systemd/coredump for anyone in the right group); it also makes
 *     /proc/PID/mem, /proc/PID/environ (VIDQ_API_TOKEN) and ptrace attach
 *     unavailable to other processes of the same user.
 *   - setrlimit(RLIMIT_CORE, 0): a second lock, inherited by anything vidqd
 *     might exec, and effective even where the dumpable flag is reset (the
 *     kernel resets it on execve and on some credential changes).
 *
 * The systemd unit also sets LimitCORE=0; this file covers vidqd started by
 * hand, from a container entrypoint or another supervisor.
 */
#include "harden.h"

#include <errno.h>
#include <sys/prctl.h>
#include <sys/resource.h>

int harden_process(void)
{
    int result = 0;
    int saved = 0;
    struct rlimit none = {0, 0};
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0) {
        result = -1;
        saved = errno;
    }
    if (setrlimit(RLIMIT_CORE, &none) != 0) {
        result = -1;
        saved = errno;
    }
    if (result != 0)
        errno = saved;
    return result;
}
