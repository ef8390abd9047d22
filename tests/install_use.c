/*
 * tests/install_use.c - a program that knows libkdkit only as installed
 * (<kdkit/...> headers, pkg-config): opens a tracker in argv[1], records a
 * step, closes, and checks session.json appeared.  Driven by
 * tests/install_test.sh.
 */
#include <kdkit/tracker.h>
#include <stdio.h>

int main(int argc, char **argv)
{
    if (argc != 2)
        return 2;
    kd_tracker *t;
    kd_err e;
    if (kd_tracker_open(&t, argv[1], "{\"installed\": true}", 10, NULL, &e) != KD_OK) {
        fprintf(stderr, "install_use: %s\n", e.msg);
        return 1;
    }
    kd_metrics m;
    kd_metrics_init(&m);
    m.step = 1;
    m.loss = 2.0;
    if (kd_tracker_update_metrics(t, &m) != KD_OK || kd_tracker_close(t) != KD_OK)
        return 1;
    char p[4200];
    snprintf(p, sizeof p, "%s/session.json", argv[1]);
    FILE *f = fopen(p, "r");
    if (!f) {
        fprintf(stderr, "install_use: %s was not written\n", p);
        return 1;
    }
    fclose(f);
    return 0;
}
