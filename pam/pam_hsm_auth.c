/*
 * pam_hsm_auth.so: the hsm-auth workstation-login PAM module (auth only).
 *
 * The module owns the PAM conversation; the product's logic stays in Python
 * (hsm_auth/pam.py, hsm_auth/login.py). For each pam_authenticate() it first
 * connects to the resident login service (hsm_auth/login_service.py, a root
 * service started by systemd: pam/hsm-auth-login.service) on the UNIX socket
 * given by socket=PATH (default /run/hsm-auth/login.sock; socket=none: never)
 * and speaks the line protocol below with it. The service is trusted only if
 * the socket is not a symlink, is a socket owned by root (or by this
 * process's euid, for tests), every directory above it is root's (or the
 * euid's) and not writable by group or others (a sticky one, like /tmp,
 * excepted above the socket's own directory), and the kernel says the process
 * listening on it runs as uid 0 (or the euid): SO_PEERCRED. A socket that
 * fails one of these is PAM_SYSTEM_ERR, never a silent fallback. When there is
 * no service (no socket, nobody listening, its backlog full) the module runs
 *
 *     HSM_AUTH_PYTHON -I -m hsm_auth.pam
 *
 * instead (socket=none: always), where HSM_AUTH_PYTHON is an absolute path
 * fixed when this file is compiled (never looked up through PATH), with a
 * scrubbed process: the environment is
 * exactly { PATH=/usr/sbin:/usr/bin:/sbin:/bin } (neither the caller's nor the
 * PAM environment; the Python side builds the rest from root's config file),
 * descriptors 0 and 1 are one end of a socketpair, 2 is /dev/null, every other
 * descriptor is closed, signal dispositions and mask are reset, a new session,
 * umask 022, cwd /, and, when running as root, real ids set to the effective
 * ones and no supplementary groups (so the user who ran su cannot signal it).
 * With PAM_SILENT, info and error lines are acknowledged without being shown.
 *
 * Line protocol (version 1). Every line is at most 1024 bytes including its
 * final '\n', has no byte below 0x20 nor 0x7f; anything else is a protocol
 * error (PAM_SYSTEM_ERR, the helper is killed). At most 64 helper lines.
 *
 *   module -> helper, once, at start:
 *     hsm-auth-pam 1
 *     user NAME                 PAM_USER as given
 *     service NAME              PAM_SERVICE
 *     rhost HOST                PAM_RHOST (only when set)
 *     tty TTY                   PAM_TTY (only when set)
 *     ruser NAME                PAM_RUSER (only when set)
 *     caller PID                the PAM application's process id (the service
 *                               ignores it: the kernel's SO_PEERCRED pid is used)
 *     option ARG                each module argument, as written in pam.d
 *     prior-authtok yes         an earlier module set PAM_AUTHTOK (the fact only)
 *     authtok HEX               PAM_AUTHTOK, hex, only with try_first_pass or
 *                               use_first_pass and only when set
 *     end
 *   helper -> module, any number of:
 *     info TEXT                 PAM_TEXT_INFO (a cue, before the wait); reply "ok"
 *     error TEXT                PAM_ERROR_MSG; reply "ok"
 *     secret PROMPT             PAM_PROMPT_ECHO_OFF with PROMPT; reply
 *                               "answer HEX" (the UTF-8 answer in hex, at most
 *                               256 bytes) or "none" (no answer, conversation
 *                               failed)
 *     log TEXT                  syslog at LOG_DEBUG when "debug"; no reply
 *     timeout SECONDS           the effective timeout (the option over root's
 *                               [login] timeout), in (0, 600]: the helper's
 *                               time starts again from it; no reply
 *   helper -> module, last:
 *     result OUTCOME MESSAGE    OUTCOME: SUCCESS AUTH_ERR USER_UNKNOWN IGNORE
 *                               AUTHINFO_UNAVAIL MAXTRIES PERM_DENIED SYSTEM_ERR
 *                               SERVICE_ERR (a bad module argument) (the PAM
 *                               code returned); MESSAGE goes to syslog
 *
 * No secret is ever sent by the helper nor logged. Answers and the authtok
 * travel hex-encoded and every buffer that held them is cleared with
 * explicit_bzero. The helper gets `timeout` seconds (option, default 30,
 * then what its "timeout" line says) plus 5 of grace for its own work, not
 * counting the time the user spends answering; then it is killed (SIGKILL)
 * and the result is PAM_AUTH_ERR. A service child cannot be killed from here:
 * the module closes the connection (same result) and the child's own alarm
 * ends it. A busy service answers "result SYSTEM_ERR busy" at once.
 * Writes use send(MSG_NOSIGNAL) on the socket, so a dead helper never raises
 * SIGPIPE in the application; the module changes no signal disposition of the
 * application and waits only for its own child (waitpid(pid)), tolerating an
 * application SIGCHLD handler that reaped it first.
 *
 * Anything but a well-formed "result" (a crash, EOF, garbage) is a failure;
 * PAM_IGNORE is returned only when the helper says IGNORE (nouserok and the
 * user has no enrollment), never for an error.
 */
#define _GNU_SOURCE
#define PAM_SM_AUTH

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include <security/pam_ext.h>
#include <security/pam_modules.h>

#ifndef HSM_AUTH_PYTHON
#error "compile with -DHSM_AUTH_PYTHON='\"/absolute/path/to/python3\"'"
#endif
#ifndef HSM_AUTH_ENTRY
#define HSM_AUTH_ENTRY "hsm_auth.pam" /* the module run with -m (another one for benchmarks) */
#endif

#define LINE_BYTES 1024     /* a protocol line, '\n' included */
#define MAX_SECRET 256      /* bytes of an answer or authtok */
#define MAX_HELPER_LINES 64
#define DEFAULT_TIMEOUT 30
#define MAX_TIMEOUT 600
#define GRACE_MS 5000
#define SAFE_PATH "PATH=/usr/sbin:/usr/bin:/sbin:/bin"
#define DEFAULT_SOCKET "/run/hsm-auth/login.sock"
#define SOCKET_BYTES 100 /* below sizeof(sun_path), the service's own limit */
#define EXPORT __attribute__((visibility("default")))

enum first_pass { FIRST_PASS_NONE, FIRST_PASS_TRY, FIRST_PASS_USE };

struct opts {
    int debug;
    int silent; /* PAM_SILENT: no info or error messages (prompts still asked) */
    long timeout_ms;
    enum first_pass first_pass;
    char socket[SOCKET_BYTES]; /* the login service's socket; "" with socket=none */
};

struct helper {
    pid_t pid;
    int fd;
    char buf[LINE_BYTES * 2];
    size_t len;
    long budget_ms; /* time the helper may still use */
};

static int printable(const char *s)
{
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c < 0x20 || c == 0x7f)
            return 0;
    }
    return 1;
}

/* What the module itself needs from its arguments (debug, timeout=, *_first_pass);
 * every argument must be printable and short. The Python side owns the names: it
 * answers SERVICE_ERR for an unknown one. 0 on success. */
static int parse_opts(pam_handle_t *pamh, int argc, const char **argv, struct opts *o)
{
    o->debug = 0;
    o->timeout_ms = DEFAULT_TIMEOUT * 1000L;
    o->first_pass = FIRST_PASS_NONE;
    snprintf(o->socket, sizeof o->socket, "%s", DEFAULT_SOCKET);
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (strlen(a) > 512 || !printable(a)) {
            pam_syslog(pamh, LOG_ERR, "an option is too long or not printable");
            return -1;
        }
        if (strcmp(a, "debug") == 0)
            o->debug = 1;
        else if (strcmp(a, "try_first_pass") == 0)
            o->first_pass = FIRST_PASS_TRY;
        else if (strcmp(a, "use_first_pass") == 0)
            o->first_pass = FIRST_PASS_USE;
        else if (strncmp(a, "timeout=", 8) == 0) {
            char *end = NULL;
            double t;
            errno = 0;
            t = strtod(a + 8, &end);
            if (errno || end == a + 8 || *end || !(t > 0) || t > MAX_TIMEOUT) {
                pam_syslog(pamh, LOG_ERR, "timeout= must be seconds in (0, %d]", MAX_TIMEOUT);
                return -1;
            }
            o->timeout_ms = (long)(t * 1000);
        } else if (strncmp(a, "socket=", 7) == 0) {
            const char *path = a + 7;
            if (strcmp(path, "none") == 0)
                o->socket[0] = '\0';
            else if (path[0] != '/' || strlen(path) >= sizeof o->socket) {
                pam_syslog(pamh, LOG_ERR, "socket= must be none or an absolute path shorter "
                                          "than %d bytes", SOCKET_BYTES);
                return -1;
            } else
                snprintf(o->socket, sizeof o->socket, "%s", path);
        }
    }
    return 0;
}

static long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int send_all(int fd, const char *data, size_t len)
{
    while (len > 0) {
        ssize_t n = send(fd, data, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

/* "KEY VALUE\n"; refuses values that would break the framing. */
static int send_line(int fd, const char *key, const char *value)
{
    char line[LINE_BYTES];
    int n;
    if (value && !printable(value))
        return -1;
    n = snprintf(line, sizeof line, value ? "%s %s\n" : "%s\n", key, value);
    if (n < 0 || (size_t)n >= sizeof line)
        return -1;
    return send_all(fd, line, (size_t)n);
}

/* "KEY HEX(secret)\n", the buffer cleared after. */
static int send_secret(int fd, const char *key, const char *secret)
{
    static const char digits[] = "0123456789abcdef";
    char line[LINE_BYTES];
    size_t len = strlen(secret), k = strlen(key), pos;
    int rc;
    if (len > MAX_SECRET || k + 2 + 2 * len >= sizeof line)
        return -1;
    memcpy(line, key, k);
    line[k] = ' ';
    pos = k + 1;
    for (size_t i = 0; i < len; i++) {
        line[pos++] = digits[(unsigned char)secret[i] >> 4];
        line[pos++] = digits[(unsigned char)secret[i] & 0xf];
    }
    line[pos++] = '\n';
    rc = send_all(fd, line, pos);
    explicit_bzero(line, sizeof line);
    return rc;
}

/* One line from the helper into out (no '\n'); 0 ok, -1 EOF/error/bad line, -2 timeout. */
static int read_line(struct helper *h, char *out, size_t cap)
{
    for (;;) {
        char *nl = memchr(h->buf, '\n', h->len);
        if (nl) {
            size_t n = (size_t)(nl - h->buf);
            if (n >= cap)
                return -1;
            memcpy(out, h->buf, n);
            out[n] = '\0';
            memmove(h->buf, nl + 1, h->len - n - 1);
            h->len -= n + 1;
            return printable(out) ? 0 : -1;
        }
        if (h->len >= LINE_BYTES)
            return -1; /* a line longer than the limit */
        if (h->budget_ms <= 0)
            return -2;
        struct pollfd p = {.fd = h->fd, .events = POLLIN};
        long start = now_ms();
        int r = poll(&p, 1, (int)(h->budget_ms > INT_MAX ? INT_MAX : h->budget_ms));
        h->budget_ms -= now_ms() - start;
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -1;
        if (r == 0)
            return -2;
        ssize_t got = recv(h->fd, h->buf + h->len, sizeof h->buf - h->len, 0);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return -1;
        h->len += (size_t)got;
    }
}

/* Reap our child only: wait a little for it to exit, then kill it. */
static void finish(struct helper *h, int kill_now)
{
    if (h->fd >= 0) {
        close(h->fd);
        h->fd = -1;
    }
    if (h->pid <= 0)
        return;
    for (int i = 0; !kill_now && i < 200; i++) { /* up to 2 s after a result */
        pid_t r = waitpid(h->pid, NULL, WNOHANG);
        if (r == h->pid || (r < 0 && errno == ECHILD)) {
            h->pid = -1;
            return;
        }
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    /* Still ours (not reaped, so the pid cannot have been reused). */
    if (waitpid(h->pid, NULL, WNOHANG) == 0) {
        kill(h->pid, SIGKILL);
        while (waitpid(h->pid, NULL, 0) < 0 && errno == EINTR)
            ;
    }
    h->pid = -1;
}

static int spawn(pam_handle_t *pamh, struct helper *h)
{
    char *const argv[] = {(char *)HSM_AUTH_PYTHON, (char *)"-I", (char *)"-m",
                          (char *)HSM_AUTH_ENTRY, NULL};
    char *const envp[] = {(char *)SAFE_PATH, NULL};
    int sv[2], child_fd, devnull;
    sigset_t all, old;
    long max_fd = sysconf(_SC_OPEN_MAX);

    if (max_fd < 0 || max_fd > 65536)
        max_fd = 65536;
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
        pam_syslog(pamh, LOG_ERR, "socketpair: %m");
        return -1;
    }
    /* Keep the child's descriptors above 2 so the dup2 calls below never clobber them. */
    child_fd = fcntl(sv[1], F_DUPFD_CLOEXEC, 3);
    devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (devnull >= 0 && devnull < 3) {
        int moved = fcntl(devnull, F_DUPFD_CLOEXEC, 3);
        close(devnull);
        devnull = moved;
    }
    close(sv[1]);
    if (child_fd < 0 || devnull < 0) {
        pam_syslog(pamh, LOG_ERR, "cannot prepare the helper's descriptors: %m");
        close(sv[0]);
        if (child_fd >= 0)
            close(child_fd);
        if (devnull >= 0)
            close(devnull);
        return -1;
    }
    /* No application signal handler may run in the child between fork and exec. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    h->pid = fork();
    if (h->pid == 0) {
        /* Child: async-signal-safe calls only. */
        struct sigaction dfl;
        sigset_t none;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        for (int s = 1; s < NSIG; s++)
            sigaction(s, &dfl, NULL);
        if (dup2(child_fd, 0) < 0 || dup2(child_fd, 1) < 0 || dup2(devnull, 2) < 0)
            _exit(127);
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 34))
        if (close_range(3, ~0U, 0) < 0)
#endif
            for (long fd = 3; fd < max_fd; fd++)
                close((int)fd);
        if (geteuid() == 0) {
            if (setgroups(0, NULL) < 0 || setresgid(getegid(), getegid(), getegid()) < 0 ||
                setresuid(0, 0, 0) < 0)
                _exit(127);
        }
        setsid();
        umask(022);
        if (chdir("/") < 0)
            _exit(127);
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        execve(HSM_AUTH_PYTHON, argv, envp);
        _exit(127);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    close(child_fd);
    close(devnull);
    if (h->pid < 0) {
        pam_syslog(pamh, LOG_ERR, "fork: %m");
        close(sv[0]);
        return -1;
    }
    h->fd = sv[0];
    return 0;
}

/* Every directory above the socket must be root's (or ours) and not writable by group
 * or others, or an attacker could put a socket of their own there. The socket's own
 * directory must not even be sticky-writable. 0 if so. */
static int check_directories(pam_handle_t *pamh, const char *path, uid_t me)
{
    char dir[SOCKET_BYTES];
    int own = 1;
    snprintf(dir, sizeof dir, "%s", path);
    for (;;) {
        char *slash = strrchr(dir, '/');
        struct stat st;
        if (slash == NULL)
            return 0;
        if (slash == dir)
            slash[1] = '\0'; /* "/" itself */
        else
            *slash = '\0';
        if (stat(dir, &st) < 0 || !S_ISDIR(st.st_mode)) {
            pam_syslog(pamh, LOG_ERR, "the service socket's directory %s: not a directory",
                       dir);
            return -1;
        }
        if ((st.st_uid != 0 && st.st_uid != me) ||
            ((st.st_mode & 022) && (own || !(st.st_mode & S_ISVTX)))) {
            pam_syslog(pamh, LOG_ERR, "the service socket's directory %s is not root's or is "
                                      "writable by group or others: not trusted", dir);
            return -1;
        }
        if (strcmp(dir, "/") == 0)
            return 0;
        own = 0;
    }
}

/* Connect to the login service: 1 connected (h->fd), 0 no service (spawn the helper),
 * -1 a socket that is not trustworthy or cannot be used (PAM_SYSTEM_ERR). */
static int connect_service(pam_handle_t *pamh, const struct opts *o, struct helper *h)
{
    struct sockaddr_un addr;
    struct ucred cred;
    socklen_t len = sizeof cred;
    struct stat st;
    uid_t me = geteuid();
    int fd, flags;

    if (lstat(o->socket, &st) < 0) {
        if (errno == ENOENT || errno == ENOTDIR)
            return 0;
        pam_syslog(pamh, LOG_ERR, "the service socket %s: %m", o->socket);
        return -1;
    }
    if (!S_ISSOCK(st.st_mode) || (st.st_uid != 0 && st.st_uid != me)) {
        pam_syslog(pamh, LOG_ERR, "%s is not a socket owned by root (a symlink, another "
                                  "file or another user's): not trusted", o->socket);
        return -1;
    }
    if (check_directories(pamh, o->socket, me) < 0)
        return -1;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    memcpy(addr.sun_path, o->socket, strlen(o->socket) + 1);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        pam_syslog(pamh, LOG_ERR, "socket: %m");
        return -1;
    }
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        int e = errno;
        close(fd);
        if (e == ECONNREFUSED || e == ENOENT || e == EAGAIN) {
            if (o->debug)
                pam_syslog(pamh, LOG_DEBUG, "the service at %s does not answer (%s)",
                           o->socket, strerror(e));
            return 0;
        }
        pam_syslog(pamh, LOG_ERR, "connect %s: %s", o->socket, strerror(e));
        return -1;
    }
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0 || len != sizeof cred ||
        (cred.uid != 0 && cred.uid != me)) {
        pam_syslog(pamh, LOG_ERR, "the process listening on %s does not run as root: not "
                                  "trusted", o->socket);
        close(fd);
        return -1;
    }
    flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) < 0) {
        pam_syslog(pamh, LOG_ERR, "fcntl: %m");
        close(fd);
        return -1;
    }
    h->fd = fd;
    return 1;
}

static int item_line(pam_handle_t *pamh, struct helper *h, int item, const char *key,
                     int required)
{
    const void *value = NULL;
    if (pam_get_item(pamh, item, &value) != PAM_SUCCESS || value == NULL ||
        *(const char *)value == '\0')
        return required ? -1 : 0;
    return send_line(h->fd, key, (const char *)value);
}

static int send_request(pam_handle_t *pamh, struct helper *h, const char *user, int argc,
                        const char **argv, const struct opts *o)
{
    if (send_line(h->fd, "hsm-auth-pam 1", NULL) < 0 || send_line(h->fd, "user", user) < 0 ||
        item_line(pamh, h, PAM_SERVICE, "service", 1) < 0 ||
        item_line(pamh, h, PAM_RHOST, "rhost", 0) < 0 ||
        item_line(pamh, h, PAM_TTY, "tty", 0) < 0 ||
        item_line(pamh, h, PAM_RUSER, "ruser", 0) < 0)
        return -1;
    const void *tok = NULL;
    char pid[32];
    snprintf(pid, sizeof pid, "%ld", (long)getpid());
    if (send_line(h->fd, "caller", pid) < 0)
        return -1;
    for (int i = 0; i < argc; i++)
        if (send_line(h->fd, "option", argv[i]) < 0)
            return -1;
    if (pam_get_item(pamh, PAM_AUTHTOK, &tok) != PAM_SUCCESS)
        tok = NULL;
    /* The fact that an earlier module set a password always; its value only when asked. */
    if (tok != NULL && send_line(h->fd, "prior-authtok", "yes") < 0)
        return -1;
    if (tok != NULL && o->first_pass != FIRST_PASS_NONE && strlen((const char *)tok) <= MAX_SECRET &&
        send_secret(h->fd, "authtok", (const char *)tok) < 0)
        return -1;
    return send_line(h->fd, "end", NULL);
}

static int converse(pam_handle_t *pamh, int style, const char *text, char **answer)
{
    const struct pam_conv *conv = NULL;
    struct pam_message msg = {.msg_style = style, .msg = text};
    const struct pam_message *msgs[1] = {&msg};
    struct pam_response *resp = NULL;
    int rc;

    *answer = NULL;
    rc = pam_get_item(pamh, PAM_CONV, (const void **)&conv);
    if (rc != PAM_SUCCESS || conv == NULL || conv->conv == NULL)
        return PAM_CONV_ERR;
    rc = conv->conv(1, msgs, &resp, conv->appdata_ptr);
    if (resp != NULL) {
        if (rc == PAM_SUCCESS && resp[0].resp != NULL)
            *answer = resp[0].resp;
        else if (resp[0].resp != NULL) {
            explicit_bzero(resp[0].resp, strlen(resp[0].resp));
            free(resp[0].resp);
        }
        free(resp);
    }
    return rc;
}

static int outcome_code(const char *word)
{
    static const struct {
        const char *name;
        int code;
    } table[] = {
        {"SUCCESS", PAM_SUCCESS},
        {"AUTH_ERR", PAM_AUTH_ERR},
        {"USER_UNKNOWN", PAM_USER_UNKNOWN},
        {"IGNORE", PAM_IGNORE},
        {"AUTHINFO_UNAVAIL", PAM_AUTHINFO_UNAVAIL},
        {"MAXTRIES", PAM_MAXTRIES},
        {"PERM_DENIED", PAM_PERM_DENIED},
        {"SYSTEM_ERR", PAM_SYSTEM_ERR},
        {"SERVICE_ERR", PAM_SERVICE_ERR},
    };
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
        if (strcmp(word, table[i].name) == 0)
            return table[i].code;
    return -1;
}

/* The conversation loop; returns the PAM code. */
static int run(pam_handle_t *pamh, struct helper *h, const struct opts *o)
{
    char line[LINE_BYTES];
    for (int count = 0; count < MAX_HELPER_LINES; count++) {
        int r = read_line(h, line, sizeof line);
        if (r == -2) {
            pam_syslog(pamh, LOG_NOTICE, "the helper timed out (%ld ms); killed",
                       o->timeout_ms);
            finish(h, 1);
            return PAM_AUTH_ERR;
        }
        if (r < 0) {
            pam_syslog(pamh, LOG_ERR, "the helper ended without a result");
            finish(h, 1);
            return PAM_SYSTEM_ERR;
        }
        if (strncmp(line, "result ", 7) == 0) {
            char *word = line + 7, *msg = strchr(word, ' ');
            int code;
            if (msg)
                *msg++ = '\0';
            code = outcome_code(word);
            if (code < 0) {
                pam_syslog(pamh, LOG_ERR, "the helper sent an unknown result");
                finish(h, 1);
                return PAM_SYSTEM_ERR;
            }
            pam_syslog(pamh, code == PAM_SUCCESS ? LOG_INFO : LOG_NOTICE, "%s: %s", word,
                       msg ? msg : "");
            finish(h, 0);
            return code;
        }
        if (strncmp(line, "timeout ", 8) == 0) {
            char *end = NULL;
            double t = strtod(line + 8, &end);
            if (end == line + 8 || *end || !(t > 0) || t > MAX_TIMEOUT) {
                pam_syslog(pamh, LOG_ERR, "the helper sent a bad timeout");
                finish(h, 1);
                return PAM_SYSTEM_ERR;
            }
            h->budget_ms = (long)(t * 1000) + GRACE_MS;
            continue;
        }
        if (strncmp(line, "log ", 4) == 0) {
            if (o->debug)
                pam_syslog(pamh, LOG_DEBUG, "%s", line + 4);
            continue;
        }
        int style = strncmp(line, "info ", 5) == 0     ? PAM_TEXT_INFO
                    : strncmp(line, "error ", 6) == 0  ? PAM_ERROR_MSG
                    : strncmp(line, "secret ", 7) == 0 ? PAM_PROMPT_ECHO_OFF
                                                       : -1;
        if (style < 0) {
            pam_syslog(pamh, LOG_ERR, "the helper broke the protocol");
            finish(h, 1);
            return PAM_SYSTEM_ERR;
        }
        const char *text = strchr(line, ' ') + 1;
        char *answer = NULL;
        int rc = PAM_SUCCESS, sent;
        if (style == PAM_PROMPT_ECHO_OFF || !o->silent)
            rc = converse(pamh, style, text, &answer);
        if (style != PAM_PROMPT_ECHO_OFF) {
            if (answer) {
                explicit_bzero(answer, strlen(answer));
                free(answer);
            }
            sent = send_line(h->fd, "ok", NULL);
        } else if (rc == PAM_SUCCESS && answer != NULL && strlen(answer) <= MAX_SECRET) {
            sent = send_secret(h->fd, "answer", answer);
        } else {
            if (answer != NULL && strlen(answer) > MAX_SECRET)
                pam_syslog(pamh, LOG_NOTICE, "an answer longer than %d bytes was refused",
                           MAX_SECRET);
            sent = send_line(h->fd, "none", NULL);
        }
        if (answer) {
            explicit_bzero(answer, strlen(answer));
            free(answer);
        }
        if (sent < 0) {
            pam_syslog(pamh, LOG_ERR, "the helper went away");
            finish(h, 1);
            return PAM_SYSTEM_ERR;
        }
    }
    pam_syslog(pamh, LOG_ERR, "the helper sent too many lines");
    finish(h, 1);
    return PAM_SYSTEM_ERR;
}

EXPORT int pam_sm_authenticate(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    struct opts o;
    struct helper h = {.pid = -1, .fd = -1, .len = 0};
    const char *user = NULL;
    int rc, via_service;

    if (parse_opts(pamh, argc, argv, &o) < 0)
        return PAM_SERVICE_ERR;
    o.silent = (flags & PAM_SILENT) != 0;
    rc = pam_get_user(pamh, &user, NULL);
    if (rc != PAM_SUCCESS || user == NULL || *user == '\0')
        return rc == PAM_SUCCESS ? PAM_USER_UNKNOWN : rc;
    if (strlen(user) > 256 || !printable(user)) {
        pam_syslog(pamh, LOG_NOTICE, "a user name that is not printable or too long");
        return PAM_USER_UNKNOWN;
    }
    h.budget_ms = o.timeout_ms + GRACE_MS;
    via_service = o.socket[0] ? connect_service(pamh, &o, &h) : 0;
    if (via_service < 0)
        return PAM_SYSTEM_ERR;
    if (o.debug)
        pam_syslog(pamh, LOG_DEBUG, via_service ? "asking the login service at %s"
                                                : "running %s -I -m " HSM_AUTH_ENTRY,
                   via_service ? o.socket : HSM_AUTH_PYTHON);
    if (!via_service && spawn(pamh, &h) < 0)
        return PAM_SYSTEM_ERR;
    if (send_request(pamh, &h, user, argc, argv, &o) < 0) {
        pam_syslog(pamh, LOG_ERR, "cannot send the request to the helper");
        if (!via_service) {
            finish(&h, 1);
            return PAM_SYSTEM_ERR;
        }
        /* A service that is busy answers "result SYSTEM_ERR busy" and closes at once:
         * read what it said. Else (a value that cannot be sent, a child gone) the child
         * sees the end of the request and ends without a result: PAM_SYSTEM_ERR. */
        shutdown(h.fd, SHUT_WR);
    }
    rc = run(pamh, &h, &o);
    explicit_bzero(h.buf, sizeof h.buf);
    return rc;
}

EXPORT int pam_sm_setcred(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)pamh;
    (void)flags;
    (void)argc;
    (void)argv;
    return PAM_SUCCESS;
}
