/*
 * The latency bench's C case: the request/reply ping-pong of `cases::call`, through the C
 * API. "/pong" (core A) answers every request with its bytes; "/ping" (core B) calls it
 * `warmup + samples` times, timing each call, and the samples are printed one per line
 * (nanoseconds) for the Rust harness to record.
 *
 * Usage: call_bench <core A> <core B> <warmup> <samples> <dither: 0 or 1>
 *
 * With dither, each call waits first a pseudo-random 0 to 255 turns of a short loop, as
 * the Rust cases do (see `Dither` in benches/src/lib.rs).
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "isolate_cluster.h"

typedef struct {
    ic_cluster cluster;
    size_t warmup, samples;
    int dither;
    uint64_t *out;
    int done;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    ic_error error;
} run_t;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void pong(ic_inbox inbox, void *user) {
    (void)user;
    ic_message m;
    while (ic_recv(inbox, -1, &m) == IC_OK) {
        if (m.kind == IC_EVENT_MESSAGE)
            ic_reply(inbox, &m, m.tag, m.data, m.len);
        ic_message_release(inbox, &m);
    }
}

static void ping(ic_inbox inbox, void *user) {
    run_t *run = user;
    ic_isolate target;
    ic_error e = ic_lookup(run->cluster, "/pong", &target);
    uint64_t x = 0x9e3779b97f4a7c15u; /* the Rust cases' dither (benches/src/lib.rs) */
    for (size_t i = 0; e == IC_OK && i < run->warmup + run->samples; i++) {
        if (run->dither) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            for (uint64_t k = 0; k < (x >> 56); k++)
                __asm__ volatile("" : "+r"(k)); /* one add per turn, as in Rust */
        }
        uint64_t v = i;
        ic_message r;
        uint64_t t = now_ns();
        e = ic_call(inbox, target, 1, &v, sizeof v, 10000, &r);
        if (e != IC_OK)
            break;
        ic_message_release(inbox, &r);
        if (i >= run->warmup)
            run->out[i - run->warmup] = now_ns() - t;
    }
    run->error = e;
    ic_isolate_release(target);
    pthread_mutex_lock(&run->lock);
    run->done = 1;
    pthread_cond_signal(&run->cond);
    pthread_mutex_unlock(&run->lock);
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: call_bench <core A> <core B> <warmup> <samples> <dither>\n");
        return 2;
    }
    size_t cores[2] = {strtoull(argv[1], NULL, 10), strtoull(argv[2], NULL, 10)};
    run_t run = {0};
    pthread_mutex_init(&run.lock, NULL);
    pthread_cond_init(&run.cond, NULL);
    run.warmup = strtoull(argv[3], NULL, 10);
    run.samples = strtoull(argv[4], NULL, 10);
    run.dither = atoi(argv[5]) != 0;
    run.out = calloc(run.samples ? run.samples : 1, sizeof *run.out);
    ic_config cfg;
    ic_config_init(&cfg);
    cfg.wait_strategy = IC_WAIT_BUSY_SPIN;
    cfg.core_policy = IC_CORES_DEDICATED;
    cfg.cores = cores;
    cfg.n_cores = 2;
    if (ic_cluster_new(&cfg, &run.cluster) != IC_OK ||
        ic_spawn(run.cluster, "/pong", NULL, 0, pong, NULL, NULL) != IC_OK ||
        ic_spawn(run.cluster, "/ping", NULL, 0, ping, &run, NULL) != IC_OK) {
        fprintf(stderr, "set-up failed: %s\n", ic_last_error());
        return 1;
    }
    /* Sleep (not spin) while the two isolates have the two cores. */
    pthread_mutex_lock(&run.lock);
    while (!run.done)
        pthread_cond_wait(&run.cond, &run.lock);
    pthread_mutex_unlock(&run.lock);
    ic_cluster_shutdown(run.cluster);
    ic_cluster_join(run.cluster, 10000);
    ic_cluster_free(run.cluster);
    if (run.error != IC_OK) {
        fprintf(stderr, "call failed: %s\n", ic_error_str(run.error));
        return 1;
    }
    for (size_t i = 0; i < run.samples; i++)
        printf("%llu\n", (unsigned long long)run.out[i]);
    free(run.out);
    return 0;
}
