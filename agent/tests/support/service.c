/* A test service. Built per release with:
 *   -DVERSION="1.2.3"  the version it reports
 *   -DOUT="/path"      a file it appends "<event> <version> <pid>" lines to
 *   -DCRASH            exit(1) at once instead of serving
 *   -DCHATTY           print 3 MiB of log lines to stdout first
 * It records "start" when it starts and "hup" on every SIGHUP, then waits.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static volatile sig_atomic_t hups = 0;
static void on_hup(int sig) { (void)sig; hups++; }

static void record(const char *event) {
    FILE *f = fopen(OUT, "a");
    if (!f) return;
    fprintf(f, "%s %s %d\n", event, VERSION, (int)getpid());
    fclose(f);
}

int main(void) {
#ifdef CRASH
    record("crash");
    return 1;
#else
    signal(SIGHUP, on_hup);
#ifdef CHATTY
    /* 64-byte lines, like an access log. */
    for (int i = 0; i < 3 * 16384; i++)
        printf("%06d 192.0.2.1 GET /index.html 200 ............................\n", i);
    fflush(stdout);
#endif
    record("start");
    for (;;) {
        pause();
        while (hups > 0) { hups--; record("hup"); }
    }
#endif
}
