/*
 * Two nodes of one network, from C: node "a" runs an echo isolate, node "b" watches the
 * network, finds "a:/echo", calls it and sends to it, then sees node "a" leave. Plus the
 * errors of ic_cluster_join_network. Both nodes live in this one process (each has its own
 * Zenoh session); they meet through unix sockets in the directory given as argv[1].
 *
 * Built and run by `cargo test -p isolate-cluster-ffi` (ffi/tests/c_api.rs) against the
 * library built with its `zenoh` feature. Exits non-zero at the first failed check.
 */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "check.h"
#include "isolate_cluster.h"

enum { TAG_ECHO = 7, TAG_NOTE = 8 };

static atomic_int notes = 0;

/* Answers TAG_ECHO requests with the same bytes; counts TAG_NOTE messages. */
static void echo_entry(ic_inbox inbox, void *user) {
    (void)user;
    ic_message m;
    while (ic_recv(inbox, -1, &m) == IC_OK) {
        if (m.kind == IC_EVENT_MESSAGE && m.tag == TAG_ECHO)
            EXPECT(ic_reply(inbox, &m, m.tag, m.data, m.len), IC_OK);
        if (m.kind == IC_EVENT_MESSAGE && m.tag == TAG_NOTE)
            atomic_fetch_add(&notes, 1);
        EXPECT(ic_message_release(inbox, &m), IC_OK);
    }
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Waits up to 10 s for an event of `kind` about node `node` on `inbox`. */
static void expect_node_event(ic_inbox inbox, uint32_t kind, const char *node) {
    double until = now_s() + 10;
    while (now_s() < until) {
        ic_message m;
        ic_error e = ic_recv(inbox, 100000, &m);
        if (e == IC_ERR_TIMEOUT)
            continue;
        CHECK(e == IC_OK);
        int found = m.kind == kind && m.path != NULL && strcmp(m.path, node) == 0;
        EXPECT(ic_message_release(inbox, &m), IC_OK);
        if (found)
            return;
    }
    fprintf(stderr, "no event %u for node %s within 10 s\n", kind, node);
    exit(1);
}

static ic_error join(const char *node, const char *network, const char *dir, ic_cluster *out) {
    ic_config cfg;
    EXPECT(ic_config_init(&cfg), IC_OK);
    cfg.node_name = node;
    cfg.core_policy = IC_CORES_UNPINNED;
    return ic_cluster_join_network(&cfg, network, NULL, dir, 2000, out);
}

int main(int argc, char **argv) {
    CHECK(argc == 2);
    const char *dir = argv[1];
    char network[32];
    snprintf(network, sizeof network, "c-net-%ld", (long)(now_s() * 1000) % 1000000);

    /* Errors, before any session opens. */
    ic_cluster bad = 0;
    EXPECT(ic_cluster_join_network(NULL, network, NULL, dir, 0, NULL), IC_ERR_NULL);
    EXPECT(ic_cluster_join_network(NULL, NULL, NULL, dir, 0, &bad), IC_ERR_NULL);
    EXPECT(ic_cluster_join_network(NULL, "no spaces", NULL, dir, 0, &bad),
           IC_ERR_INVALID_ARGUMENT);
    EXPECT(join("bad/name", network, dir, &bad), IC_ERR_INVALID_ARGUMENT);
    EXPECT(ic_cluster_join_network(NULL, network, "{ this is not json5", dir, 0, &bad),
           IC_ERR_INVALID_ARGUMENT);
    CHECK(strstr(ic_last_error(), "Zenoh") != NULL);
    EXPECT(join("c", network, "/proc/no/such/dir", &bad), IC_ERR_NETWORK);
    CHECK(bad == 0);

    /* Node a with an echo isolate; node b watches the network from a mailbox. */
    ic_cluster a = 0, b = 0;
    EXPECT(join("a", network, dir, &a), IC_OK);
    EXPECT(ic_spawn(a, "/echo", NULL, 0, echo_entry, NULL, NULL), IC_OK);
    EXPECT(join("b", network, dir, &b), IC_OK);
    ic_cluster twin = 0;
    EXPECT(join("a", network, dir, &twin), IC_ERR_DUPLICATE);
    CHECK(twin == 0);
    ic_inbox mb = 0;
    EXPECT(ic_mailbox_open(b, &mb), IC_OK);
    EXPECT(ic_watch_nodes(mb), IC_OK);
    expect_node_event(mb, IC_EVENT_NODE_UP, "a");

    /* "a:/echo" appears once a's announcement has arrived. */
    ic_isolate echo = 0;
    double until = now_s() + 10;
    ic_error e;
    while ((e = ic_lookup(b, "a:/echo", &echo)) == IC_ERR_NOT_FOUND && now_s() < until) {
        struct timespec pause = {0, 5000000};
        nanosleep(&pause, NULL);
    }
    EXPECT(e, IC_OK);
    EXPECT(ic_lookup(b, "a:/nobody", &bad), IC_ERR_NOT_FOUND);

    /* Calls across the nodes, each answered with the bytes it carried. */
    for (uint64_t i = 0; i < 200; i++) {
        uint64_t v = i * 0x9e3779b97f4a7c15u;
        ic_message r;
        EXPECT(ic_call(mb, echo, TAG_ECHO, &v, sizeof v, 5000, &r), IC_OK);
        CHECK(r.kind == IC_EVENT_MESSAGE && r.tag == TAG_ECHO && r.len == sizeof v);
        uint64_t back;
        memcpy(&back, r.data, sizeof back);
        CHECK(back == v);
        EXPECT(ic_message_release(mb, &r), IC_OK);
    }
    /* One-way messages, then a call behind them: all arrived when it is answered. */
    for (int i = 0; i < 100; i++)
        EXPECT(ic_send(mb, echo, TAG_NOTE, "n", 1), IC_OK);
    ic_message r;
    EXPECT(ic_call(mb, echo, TAG_ECHO, "x", 1, 5000, &r), IC_OK);
    EXPECT(ic_message_release(mb, &r), IC_OK);
    CHECK(atomic_load(&notes) == 100);

    /* Node a leaves: b sees it go, and the reference stops working. */
    EXPECT(ic_cluster_free(a), IC_OK);
    expect_node_event(mb, IC_EVENT_NODE_DOWN, "a");
    e = ic_call(mb, echo, TAG_ECHO, "x", 1, 1000, &r);
    CHECK(e == IC_ERR_DISCONNECTED || e == IC_ERR_TARGET_DOWN || e == IC_ERR_STALE_HANDLE);

    EXPECT(ic_isolate_release(echo), IC_OK);
    EXPECT(ic_mailbox_close(mb), IC_OK);
    EXPECT(ic_cluster_free(b), IC_OK);
    printf("net_test: all %d checks passed\n", checks);
    return 0;
}
