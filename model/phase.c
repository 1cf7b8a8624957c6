// The CPU model's phase timer (see phase.h).
#include "phase.h"

#include <string.h>
#include <time.h>

static int phase_on;            // between phase_timer_start and phase_timer_stop
static ProfilePhase phase_cur;  // the phase the clock is charging
static double phase_t0;         // seconds at the last mark
static double phase_ms[PH_COUNT];

static double phase_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void phase_timer_start(void) {
    memset(phase_ms, 0, sizeof phase_ms);
    phase_cur = PH_HOST;
    phase_t0 = phase_now();
    phase_on = 1;
}

void phase_mark(ProfilePhase p) {
    if (!phase_on) return;
    double t = phase_now();
    phase_ms[phase_cur] += 1e3 * (t - phase_t0);
    phase_cur = p;
    phase_t0 = t;
}

void phase_timer_stop(double *ms) {
    phase_mark(PH_HOST);
    phase_on = 0;
    memcpy(ms, phase_ms, sizeof phase_ms);
}
