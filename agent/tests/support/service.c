/* A test service. Built per release with:
 *   -DVERSION="1.2.3"  the version it reports
 *   -DOUT="/path"      a file it appends "<event> <version> <pid> [value]" lines to
 *   -DCRASH            exit(1) at once instead of serving
 *   -DCHATTY           print 10 MiB of log lines to stdout first
 * It records "start" when it starts, then its working directory ("cwd"),
 * each argument ("arg") and each environment variable ("env"), with "\\"
 * and newlines escaped; "hup" on every SIGHUP; and "stop SIGNAME" when
 * SIGTERM, SIGINT or SIGQUIT ends it. It records its user id ("uid"), and
 * for each argument --try-write=PATH whether it could open PATH for writing
 * ("write ok PATH" or "write denied PATH"): what a compromised service
 * would try.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern char **environ;

static volatile sig_atomic_t hups = 0;
static volatile sig_atomic_t stop_signal = 0;
static void on_hup(int sig) { (void)sig; hups++; }
static void on_stop(int sig) { stop_signal = sig; }

static void record_value(const char *event, const char *value) {
    FILE *f = fopen(OUT, "a");
    if (!f) return;
    fprintf(f, "%s %s %d", event, VERSION, (int)getpid());
    if (value) {
        fputc(' ', f);
        for (const char *c = value; *c; c++) {
            if (*c == '\\') fputs("\\\\", f);
            else if (*c == '\n') fputs("\\n", f);
            else fputc(*c, f);
        }
    }
    fputc('\n', f);
    fclose(f);
}

static void record(const char *event) { record_value(event, NULL); }

int main(int argc, char **argv) {
#ifdef CRASH
    (void)argc; (void)argv;
    record("crash");
    return 1;
#else
    signal(SIGHUP, on_hup);
    signal(SIGTERM, on_stop);
    signal(SIGINT, on_stop);
    signal(SIGQUIT, on_stop);
#ifdef CHATTY
    /* 64-byte lines, like an access log. */
    for (int i = 0; i < 10 * 16384; i++)
        printf("%06d 192.0.2.1 GET /index.html 200 ............................\n", i);
    fflush(stdout);
#endif
    record("start");
    char cwd[4096];
    if (getcwd(cwd, sizeof cwd)) record_value("cwd", cwd);
    for (int i = 1; i < argc; i++) record_value("arg", argv[i]);
    for (char **e = environ; *e; e++) record_value("env", *e);
    char uid[32];
    snprintf(uid, sizeof uid, "%d", (int)getuid());
    record_value("uid", uid);
    for (int i = 1; i < argc; i++) {
        if (strncmp(argv[i], "--try-write=", 12) != 0) continue;
        FILE *w = fopen(argv[i] + 12, "a");
        char result[4200];
        snprintf(result, sizeof result, "%s %s", w ? "ok" : "denied", argv[i] + 12);
        if (w) fclose(w);
        record_value("write", result);
    }
    for (;;) {
        pause();
        while (hups > 0) { hups--; record("hup"); }
        if (stop_signal) {
            record_value("stop", stop_signal == SIGTERM ? "SIGTERM"
                               : stop_signal == SIGINT ? "SIGINT" : "SIGQUIT");
            return 0;
        }
    }
#endif
}
