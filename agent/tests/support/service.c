/* A test service. Built per release with:
 *   -DVERSION="1.2.3"  the version it reports
 *   -DOUT="/path"      a file it appends "<event> <version> <pid>" lines to
 *   -DCRASH            exit(1) at once instead of serving
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
    record("start");
    for (;;) {
        pause();
        while (hups > 0) { hups--; record("hup"); }
    }
#endif
}
