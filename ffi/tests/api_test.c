/*
 * Exercises every function of isolate_cluster.h and every error code a caller can
 * provoke (IC_ERR_THREAD and IC_ERR_PANIC cannot be provoked on purpose: they are checked
 * through ic_error_str only). Exits non-zero at the first failed check.
 *
 * Built and run by `cargo test -p isolate-cluster-ffi` (ffi/tests/c_api.rs), normally
 * and under AddressSanitizer.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "check.h"
#include "isolate_cluster.h"

enum { TAG_PING = 1, TAG_TEXT = 2, TAG_FAIL = 3, TAG_DIE = 4, TAG_BUF = 5, TAG_STOP = 6 };

/* --- an echo isolate ----------------------------------------------------------------- */

/* Replies to requests: TAG_PING echoes the bytes, TAG_FAIL answers with an error,
 * TAG_DIE returns without answering, TAG_BUF takes the transferred buffer and replies with
 * its first byte, TAG_STOP stops the receive loop. Plain messages are answered too. */
static _Atomic ic_inbox first_echo_inbox = 0;

static void echo_entry(ic_inbox inbox, void *user) {
    atomic_int *stopped_code = user;
    ic_inbox expected = 0;
    atomic_compare_exchange_strong(&first_echo_inbox, &expected, inbox);
    for (;;) {
        ic_message m;
        ic_error e = ic_recv(inbox, -1, &m);
        if (e == IC_ERR_STOPPED) {
            atomic_store(stopped_code, e);
            return;
        }
        CHECK(e == IC_OK);
        if (m.kind != IC_EVENT_MESSAGE) {
            EXPECT(ic_message_release(inbox, &m), IC_OK);
            continue;
        }
        switch (m.tag) {
        case TAG_PING:
        case TAG_TEXT:
            EXPECT(ic_reply(inbox, &m, m.tag, m.data, m.len), IC_OK);
            break;
        case TAG_FAIL:
            CHECK(m.flags & IC_MSG_REQUEST);
            EXPECT(ic_reply_error(inbox, &m, "no such thing"), IC_OK);
            break;
        case TAG_DIE:
            EXPECT(ic_message_release(inbox, &m), IC_OK);
            return;
        case TAG_BUF: {
            void *data = NULL;
            size_t len = 0;
            ic_free_fn free_fn = NULL;
            void *ctx = NULL;
            CHECK(m.flags & IC_MSG_TRANSFER);
            EXPECT(ic_message_take(inbox, &m, &data, &len, &free_fn, &ctx), IC_OK);
            EXPECT(ic_message_take(inbox, &m, &data, &len, &free_fn, &ctx), IC_ERR_NOT_A_REQUEST);
            uint8_t first = ((uint8_t *)data)[0];
            CHECK(len == 1 << 20);
            CHECK(free_fn != NULL);
            free_fn(data, ctx);
            EXPECT(ic_reply(inbox, &m, TAG_BUF, &first, 1), IC_OK);
            break;
        }
        case TAG_STOP:
            /* A plain message is not a request. */
            EXPECT(ic_reply_error(inbox, &m, "x"), IC_ERR_NOT_A_REQUEST);
            EXPECT(ic_message_take(inbox, &m, NULL, NULL, NULL, NULL), IC_ERR_NULL);
            {
                void *d;
                size_t l;
                EXPECT(ic_message_take(inbox, &m, &d, &l, NULL, NULL), IC_ERR_NOT_A_REQUEST);
            }
            /* An isolate's own inbox is not a mailbox. */
            EXPECT(ic_mailbox_close(inbox), IC_ERR_INVALID_ARGUMENT);
            EXPECT(ic_shutdown_isolate(inbox), IC_OK);
            break;
        default:
            break;
        }
        if (m.handle != 0) {
            EXPECT(ic_message_release(inbox, &m), IC_OK);
        }
        EXPECT(ic_message_release(inbox, &m), IC_ERR_STALE_HANDLE);
    }
}

/* Never reads: lets rings fill. */
static void sleeper_entry(ic_inbox inbox, void *user) {
    (void)user;
    ic_message m;
    /* Wait for the shutdown request only. */
    for (;;) {
        ic_error e = ic_recv(inbox, 10 * 1000 * 1000, &m);
        if (e == IC_ERR_STOPPED)
            return;
        if (e == IC_OK) {
            int shutdown = m.kind == IC_EVENT_SHUTDOWN_REQUESTED;
            EXPECT(ic_message_release(inbox, &m), IC_OK);
            if (shutdown)
                continue;
            /* Hold on: sleep a little between reads so senders find the ring full. */
            struct timespec ts = {0, 50 * 1000 * 1000};
            nanosleep(&ts, NULL);
        }
    }
}

static atomic_int freed = 0;
static void free_buffer(void *data, void *ctx) {
    CHECK(ctx == (void *)&freed);
    free(data);
    atomic_fetch_add(&freed, 1);
}

/* A free function that calls back into the library with the inbox whose call runs it:
 * refused with IC_ERR_IN_USE (the inbox cannot be pulled away under that call). */
static atomic_int reentrant_result = -1;
static void free_reentrant(void *data, void *ctx) {
    uint32_t id;
    atomic_store(&reentrant_result, ic_inbox_id(atomic_load(&first_echo_inbox), &id));
    free_buffer(data, ctx);
}

/* --- a thread that tries to use another thread's mailbox ------------------------------ */
static ic_inbox foreign_inbox;
static ic_error foreign_result;
static void *use_foreign(void *arg) {
    (void)arg;
    uint32_t id;
    foreign_result = ic_inbox_id(foreign_inbox, &id);
    return NULL;
}

/* A thread that opens a mailbox and ends without closing it. */
static ic_cluster leaky_cluster;
static ic_inbox leaked_inbox;
static void *open_and_leave(void *arg) {
    (void)arg;
    CHECK(ic_mailbox_open(leaky_cluster, &leaked_inbox) == IC_OK);
    return NULL;
}

int main(void) {
    /* Library. */
    CHECK(strlen(ic_version()) > 0);
    for (int code = 0; code <= 21; code++) {
        CHECK(strncmp(ic_error_str(code), "IC_", 3) == 0);
    }
    CHECK(strstr(ic_error_str(IC_ERR_THREAD), "thread") != NULL);
    CHECK(strstr(ic_error_str(IC_ERR_PANIC), "panic") != NULL);
    CHECK(strcmp(ic_error_str(-1), "unknown error code") == 0);
    CHECK(strstr(ic_error_str(IC_ERR_NETWORK), "network") != NULL);
    CHECK(strstr(ic_error_str(IC_ERR_UNSUPPORTED), "network support") != NULL);
    CHECK(strcmp(ic_error_str(22), "unknown error code") == 0);

    /* Config and cluster. */
    EXPECT(ic_config_init(NULL), IC_ERR_NULL);
    ic_config cfg;
    EXPECT(ic_config_init(&cfg), IC_OK);
    CHECK(cfg.ring_capacity == 65536 && cfg.wait_strategy == IC_WAIT_SPIN_THEN_PARK);
    cfg.wait_strategy = 99;
    ic_cluster bad;
    EXPECT(ic_cluster_new(&cfg, &bad), IC_ERR_INVALID_ARGUMENT);
    CHECK(strstr(ic_last_error(), "wait_strategy") != NULL);
    /* An explicit core list: NULL with a count is refused, one core works. */
    EXPECT(ic_config_init(&cfg), IC_OK);
    cfg.n_cores = 1;
    EXPECT(ic_cluster_new(&cfg, &bad), IC_ERR_NULL);
    size_t one_core[1] = {0};
    cfg.cores = one_core;
    EXPECT(ic_cluster_new(&cfg, &bad), IC_OK);
    EXPECT(ic_cluster_free(bad), IC_OK);
    EXPECT(ic_config_init(&cfg), IC_OK);
    cfg.ring_capacity = 4096;
    cfg.core_policy = IC_CORES_UNPINNED;
    cfg.node_name = "c-test";
    EXPECT(ic_cluster_new(&cfg, NULL), IC_ERR_NULL);
    ic_cluster cluster;
    EXPECT(ic_cluster_new(&cfg, &cluster), IC_OK);
    CHECK(cluster != 0);

    /* Spawn, lookup, isolate handles. */
    static atomic_int echo_stopped = 0;
    ic_property props[] = {{"type", "echo"}, {"lang", "c"}};
    ic_isolate echo;
    EXPECT(ic_spawn(cluster, "/echo", props, 2, echo_entry, &echo_stopped, &echo), IC_OK);
    EXPECT(ic_spawn(cluster, "/echo", NULL, 0, echo_entry, &echo_stopped, NULL), IC_ERR_DUPLICATE);
    EXPECT(ic_spawn(cluster, "no-slash", NULL, 0, echo_entry, NULL, NULL), IC_ERR_INVALID_PATH);
    EXPECT(ic_spawn(cluster, NULL, NULL, 0, echo_entry, NULL, NULL), IC_ERR_NULL);
    EXPECT(ic_spawn(cluster, "/x", NULL, 0, NULL, NULL, NULL), IC_ERR_NULL);
    EXPECT(ic_spawn(cluster, "/x", NULL, 1, echo_entry, NULL, NULL), IC_ERR_NULL);
    EXPECT(ic_spawn(0, "/x", NULL, 0, echo_entry, NULL, NULL), IC_ERR_STALE_HANDLE);
    ic_isolate found;
    EXPECT(ic_lookup(cluster, "/echo", &found), IC_OK);
    uint32_t id1, id2;
    EXPECT(ic_isolate_id(echo, &id1), IC_OK);
    EXPECT(ic_isolate_id(found, &id2), IC_OK);
    CHECK(id1 == id2 && id1 != 0);
    EXPECT(ic_isolate_id(echo, NULL), IC_ERR_NULL);
    EXPECT(ic_lookup(cluster, "/nobody", &found), IC_ERR_NOT_FOUND);
    EXPECT(ic_lookup(cluster, "", &found), IC_ERR_INVALID_PATH);
    int32_t alive = -1;
    EXPECT(ic_isolate_alive(echo, &alive), IC_OK);
    CHECK(alive == 1);

    /* Mailbox. */
    ic_inbox mb;
    EXPECT(ic_mailbox_open(cluster, &mb), IC_OK);
    ic_inbox mb2;
    EXPECT(ic_mailbox_open(cluster, &mb2), IC_ERR_IN_USE);
    uint32_t my_id;
    EXPECT(ic_inbox_id(mb, &my_id), IC_OK);
    CHECK(my_id != 0 && my_id != id1);
    foreign_inbox = mb;
    pthread_t t;
    pthread_create(&t, NULL, use_foreign, NULL);
    pthread_join(t, NULL);
    CHECK(foreign_result == IC_ERR_WRONG_THREAD);
    EXPECT(ic_inbox_id(12345, &my_id), IC_ERR_STALE_HANDLE);
    /* A mailbox its thread left open is closed when that thread ends. */
    leaky_cluster = cluster;
    pthread_create(&t, NULL, open_and_leave, NULL);
    pthread_join(t, NULL);
    CHECK(leaked_inbox != 0);
    EXPECT(ic_mailbox_close(leaked_inbox), IC_ERR_STALE_HANDLE);

    /* Send and receive: plain message, echoed back to the mailbox. */
    const char text[] = "hello";
    EXPECT(ic_send(mb, echo, TAG_TEXT, text, sizeof text), IC_OK);
    ic_message m;
    EXPECT(ic_recv(mb, 5 * 1000 * 1000, &m), IC_OK);
    CHECK(m.kind == IC_EVENT_MESSAGE && m.tag == TAG_TEXT && m.len == sizeof text);
    CHECK(memcmp(m.data, text, sizeof text) == 0 && m.sender_id == id1);
    CHECK(m.reply_to_id == id1);
    CHECK((m.flags & IC_MSG_REQUEST) == 0);
    EXPECT(ic_message_release(mb, &m), IC_OK);
    CHECK(m.handle == 0);
    EXPECT(ic_message_release(mb, &m), IC_ERR_STALE_HANDLE);
    EXPECT(ic_message_release(mb, NULL), IC_ERR_NULL);
    EXPECT(ic_recv(mb, 0, &m), IC_ERR_TIMEOUT);
    EXPECT(ic_recv(mb, 1000, &m), IC_ERR_TIMEOUT);
    EXPECT(ic_recv(mb, 0, NULL), IC_ERR_NULL);
    EXPECT(ic_send(mb, echo, 1ull << 63, text, 1), IC_ERR_INVALID_ARGUMENT);
    EXPECT(ic_send(mb, echo, TAG_TEXT, NULL, 4), IC_ERR_NULL);
    EXPECT(ic_send(mb, 777, TAG_TEXT, text, 1), IC_ERR_STALE_HANDLE);
    EXPECT(ic_try_send(mb, echo, TAG_TEXT, text, sizeof text), IC_OK);
    EXPECT(ic_recv(mb, -1, &m), IC_OK);
    EXPECT(ic_message_release(mb, &m), IC_OK);

    /* Message handles are unique across inboxes: a message of one inbox released
     * through another thread-local inbox is a stale handle there, not someone else's. */
    {
        ic_cluster c2;
        EXPECT(ic_cluster_new(&cfg, &c2), IC_OK);
        static atomic_int e2_stopped = 0;
        ic_isolate e2;
        EXPECT(ic_spawn(c2, "/echo", NULL, 0, echo_entry, &e2_stopped, &e2), IC_OK);
        ic_inbox mb2;
        EXPECT(ic_mailbox_open(c2, &mb2), IC_OK);
        ic_message in1, in2;
        EXPECT(ic_send(mb2, e2, TAG_TEXT, text, sizeof text), IC_OK);
        EXPECT(ic_recv(mb2, 5 * 1000 * 1000, &in2), IC_OK);
        EXPECT(ic_send(mb, echo, TAG_TEXT, text, sizeof text), IC_OK);
        EXPECT(ic_recv(mb, 5 * 1000 * 1000, &in1), IC_OK);
        EXPECT(ic_message_release(mb, &in2), IC_ERR_STALE_HANDLE);
        EXPECT(ic_message_release(mb2, &in1), IC_ERR_STALE_HANDLE);
        CHECK(memcmp(in1.data, text, sizeof text) == 0);
        EXPECT(ic_message_release(mb2, &in2), IC_OK);
        EXPECT(ic_message_release(mb, &in1), IC_OK);
        EXPECT(ic_mailbox_close(mb2), IC_OK);
        EXPECT(ic_isolate_release(e2), IC_OK);
        EXPECT(ic_cluster_free(c2), IC_OK);
    }

    /* Calls: a reply, a remote error, a target that dies, many in a row. */
    uint64_t x = 0x1234;
    ic_message r;
    EXPECT(ic_call(mb, echo, TAG_PING, &x, sizeof x, 5000, &r), IC_OK);
    CHECK(r.len == sizeof x && memcmp(r.data, &x, sizeof x) == 0 && r.tag == TAG_PING);
    EXPECT(ic_message_release(mb, &r), IC_OK);
    for (uint64_t i = 0; i < 1000; i++) {
        EXPECT(ic_call(mb, echo, TAG_PING, &i, sizeof i, 5000, &r), IC_OK);
        uint64_t back;
        memcpy(&back, r.data, sizeof back);
        CHECK(back == i);
        EXPECT(ic_message_release(mb, &r), IC_OK);
    }
    EXPECT(ic_call(mb, echo, TAG_FAIL, NULL, 0, 5000, &r), IC_ERR_REMOTE);
    CHECK(strcmp(ic_last_error(), "no such thing") == 0);
    EXPECT(ic_call(mb, echo, TAG_PING, &x, sizeof x, 5000, NULL), IC_ERR_NULL);

    /* Transfer: a 1 MiB buffer moves to the echo isolate, which takes and frees it. */
    uint8_t *buf = malloc(1 << 20);
    buf[0] = 42;
    ic_inbox dummy = 0;
    EXPECT(ic_transfer(dummy, echo, TAG_BUF, buf, 1 << 20, free_buffer, &freed), IC_ERR_STALE_HANDLE);
    EXPECT(ic_transfer(mb, echo, TAG_BUF, buf, 1 << 20, free_buffer, &freed), IC_OK);
    EXPECT(ic_recv(mb, 5 * 1000 * 1000, &m), IC_OK);
    CHECK(m.len == 1 && m.data[0] == 42);
    EXPECT(ic_message_release(mb, &m), IC_OK);
    CHECK(atomic_load(&freed) == 1);
    /* A transfer nobody takes is freed when its message is released. */
    uint8_t *buf2 = malloc(16);
    memset(buf2, 9, 16);
    EXPECT(ic_transfer(mb, echo, TAG_TEXT, buf2, 16, free_reentrant, &freed), IC_OK);
    /* (The echo isolate answers TAG_TEXT with the bytes it sees: the buffer's.) */
    EXPECT(ic_recv(mb, 5 * 1000 * 1000, &m), IC_OK);
    CHECK(m.len == 16);
    CHECK(m.data[0] == 9);
    EXPECT(ic_message_release(mb, &m), IC_OK);
    /* The echo isolate releases its message (and so frees the buffer) after replying. */
    for (int i = 0; i < 5000 && atomic_load(&freed) < 2; i++) {
        struct timespec ts = {0, 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    CHECK(atomic_load(&freed) == 2);
    CHECK(atomic_load(&reentrant_result) == IC_ERR_IN_USE);

    /* Watch isolates: up events for the live ones, then a down event. */
    EXPECT(ic_watch_isolates(mb), IC_OK);
    EXPECT(ic_recv(mb, 5 * 1000 * 1000, &m), IC_OK);
    CHECK(m.kind == IC_EVENT_ISOLATE_UP && strcmp(m.path, "/echo") == 0 && m.isolate_id == id1);
    EXPECT(ic_message_release(mb, &m), IC_OK);

    /* Stop the echo isolate's loop from inside it; it sees IC_ERR_STOPPED. */
    EXPECT(ic_send(mb, echo, TAG_STOP, NULL, 0), IC_OK);
    EXPECT(ic_recv(mb, 5 * 1000 * 1000, &m), IC_OK);
    CHECK(m.kind == IC_EVENT_ISOLATE_DOWN && strcmp(m.path, "/echo") == 0);
    CHECK(strstr(m.reason, "normal") != NULL);
    EXPECT(ic_message_release(mb, &m), IC_OK);
    CHECK(atomic_load(&echo_stopped) == IC_ERR_STOPPED);
    EXPECT(ic_isolate_alive(echo, &alive), IC_OK);
    CHECK(alive == 0);
    EXPECT(ic_send(mb, echo, TAG_TEXT, text, 1), IC_ERR_DISCONNECTED);
    EXPECT(ic_call(mb, echo, TAG_PING, &x, sizeof x, 1000, &r), IC_ERR_TARGET_DOWN);

    /* A target that stops while a call waits. */
    static atomic_int second_stopped = 0;
    ic_isolate echo2;
    EXPECT(ic_spawn(cluster, "/echo2", NULL, 0, echo_entry, &second_stopped, &echo2), IC_OK);
    EXPECT(ic_recv(mb, 5 * 1000 * 1000, &m), IC_OK); /* its up event */
    CHECK(m.kind == IC_EVENT_ISOLATE_UP);
    EXPECT(ic_message_release(mb, &m), IC_OK);
    EXPECT(ic_call(mb, echo2, TAG_DIE, NULL, 0, 10000, &r), IC_ERR_TARGET_DOWN);
    EXPECT(ic_recv(mb, 5 * 1000 * 1000, &m), IC_OK);
    CHECK(m.kind == IC_EVENT_ISOLATE_DOWN);
    EXPECT(ic_message_release(mb, &m), IC_OK);

    /* Full rings, oversize messages and timeouts, against an isolate that reads slowly. */
    ic_isolate sleeper;
    EXPECT(ic_spawn(cluster, "/sleeper", NULL, 0, sleeper_entry, NULL, &sleeper), IC_OK);
    EXPECT(ic_recv(mb, 5 * 1000 * 1000, &m), IC_OK); /* its up event */
    EXPECT(ic_message_release(mb, &m), IC_OK);
    char big[8192];
    memset(big, 7, sizeof big);
    EXPECT(ic_send(mb, sleeper, TAG_TEXT, big, sizeof big), IC_ERR_TOO_LARGE);
    ic_error last = IC_OK;
    for (int i = 0; i < 1000 && last == IC_OK; i++) {
        last = ic_try_send(mb, sleeper, TAG_TEXT, big, 1000);
    }
    CHECK(last == IC_ERR_FULL);
    EXPECT(ic_call(mb, sleeper, TAG_PING, &x, sizeof x, 50, &r), IC_ERR_TIMEOUT);

    /* Handles: release twice, use after release. */
    EXPECT(ic_isolate_release(found), IC_OK);
    EXPECT(ic_isolate_release(found), IC_ERR_STALE_HANDLE);
    EXPECT(ic_isolate_id(found, &id2), IC_ERR_STALE_HANDLE);

    /* Shutdown: spawns are refused, the mailbox hears about it, join finishes. */
    EXPECT(ic_cluster_shutdown(cluster), IC_OK);
    EXPECT(ic_spawn(cluster, "/late", NULL, 0, echo_entry, NULL, NULL), IC_ERR_SHUTTING_DOWN);
    int saw_shutdown = 0;
    while (ic_recv(mb, 1000 * 1000, &m) == IC_OK) {
        if (m.kind == IC_EVENT_SHUTDOWN_REQUESTED)
            saw_shutdown = 1;
        EXPECT(ic_message_release(mb, &m), IC_OK);
        if (saw_shutdown)
            break;
    }
    CHECK(saw_shutdown);
    EXPECT(ic_cluster_join(cluster, 20000), IC_OK);
    EXPECT(ic_mailbox_close(mb), IC_OK);
    EXPECT(ic_mailbox_close(mb), IC_ERR_STALE_HANDLE);
    EXPECT(ic_watch_isolates(mb), IC_ERR_STALE_HANDLE);
    EXPECT(ic_shutdown_isolate(mb), IC_ERR_STALE_HANDLE);
    EXPECT(ic_isolate_release(echo), IC_OK);
    EXPECT(ic_isolate_release(echo2), IC_OK);
    EXPECT(ic_isolate_release(sleeper), IC_OK);
    EXPECT(ic_cluster_free(cluster), IC_OK);
    EXPECT(ic_cluster_free(cluster), IC_ERR_STALE_HANDLE);
    EXPECT(ic_cluster_join(cluster, 10), IC_ERR_STALE_HANDLE);
    EXPECT(ic_cluster_shutdown(cluster), IC_ERR_STALE_HANDLE);

    printf("api_test: all checks passed (%d checks)\n", checks);
    return 0;
}
