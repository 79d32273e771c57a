/*
 * Ping-pong through the C API: a "/pong" isolate echoes every request; the main thread
 * calls it round after round and prints the round-trip percentiles.
 *
 * Build and run (from the repository root):
 *   cargo build --release -p isolate-cluster-ffi && cc -O2 -std=c11 -pthread -Iffi/include ffi/examples/pingpong.c target/release/libisolate_cluster.a -ldl -lm -o pingpong && ./pingpong
 *
 * IC_PINGPONG_ROUNDS sets the number of round trips (default 200000).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "isolate_cluster.h"

#define TAG_PING 1

static void pong(ic_inbox inbox, void *user) {
    (void)user;
    ic_message m;
    while (ic_recv(inbox, -1, &m) == IC_OK) {
        if (m.kind == IC_EVENT_MESSAGE && (m.flags & IC_MSG_REQUEST)) {
            ic_reply(inbox, &m, m.tag, m.data, m.len);
        }
        ic_message_release(inbox, &m);
    }
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int fail(const char *what, ic_error e) {
    fprintf(stderr, "%s: %s (%s)\n", what, ic_error_str(e), ic_last_error());
    return 1;
}

int main(void) {
    const char *env = getenv("IC_PINGPONG_ROUNDS");
    size_t rounds = env ? (size_t)strtoull(env, NULL, 10) : 200000;
    if (rounds == 0)
        rounds = 1;
    ic_cluster cluster;
    ic_error e = ic_cluster_new(NULL, &cluster);
    if (e != IC_OK)
        return fail("ic_cluster_new", e);
    ic_isolate target;
    if ((e = ic_spawn(cluster, "/pong", NULL, 0, pong, NULL, &target)) != IC_OK)
        return fail("ic_spawn", e);
    ic_inbox me;
    if ((e = ic_mailbox_open(cluster, &me)) != IC_OK)
        return fail("ic_mailbox_open", e);

    uint64_t *samples = malloc(rounds * sizeof *samples);
    if (!samples)
        return 1;
    for (size_t i = 0; i < rounds; i++) {
        uint64_t v = i, back;
        ic_message r;
        uint64_t t = now_ns();
        if ((e = ic_call(me, target, TAG_PING, &v, sizeof v, 5000, &r)) != IC_OK)
            return fail("ic_call", e);
        memcpy(&back, r.data, sizeof back);
        ic_message_release(me, &r);
        samples[i] = now_ns() - t;
        if (back != i) {
            fprintf(stderr, "round %zu came back as %llu\n", i, (unsigned long long)back);
            return 1;
        }
    }
    qsort(samples, rounds, sizeof *samples, cmp_u64);
    printf("isolate-cluster %s, C API ping-pong\n", ic_version());
    printf("round trips: %zu\n", rounds);
    printf("p50 %llu ns, p99 %llu ns, p99.9 %llu ns, max %llu ns\n",
           (unsigned long long)samples[rounds / 2], (unsigned long long)samples[rounds * 99 / 100],
           (unsigned long long)samples[rounds * 999 / 1000], (unsigned long long)samples[rounds - 1]);
    free(samples);

    ic_mailbox_close(me);
    ic_isolate_release(target);
    ic_cluster_shutdown(cluster);
    if ((e = ic_cluster_join(cluster, 10000)) != IC_OK)
        return fail("ic_cluster_join", e);
    ic_cluster_free(cluster);
    return 0;
}
