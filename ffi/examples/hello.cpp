// Hello from C++: a greeter isolate answers calls; RAII wrappers free every handle.
//
// Build and run (from the repository root):
//   cargo build --release -p isolate-cluster-ffi && c++ -O2 -std=c++17 -pthread -Iffi/include ffi/examples/hello.cpp target/release/libisolate_cluster.a -ldl -lm -o hello && ./hello
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>

#include "isolate_cluster.h"

namespace ic {

inline void check(ic_error e, const char* what) {
    if (e != IC_OK) {
        throw std::runtime_error(std::string(what) + ": " + ic_error_str(e) + " (" +
                                 ic_last_error() + ")");
    }
}

class Cluster {
  public:
    Cluster() { check(ic_cluster_new(nullptr, &h_), "ic_cluster_new"); }
    ~Cluster() {
        ic_cluster_shutdown(h_);
        ic_cluster_join(h_, 10000);
        ic_cluster_free(h_);
    }
    Cluster(const Cluster&) = delete;
    Cluster& operator=(const Cluster&) = delete;
    ic_cluster handle() const { return h_; }

  private:
    ic_cluster h_ = 0;
};

class Isolate {
  public:
    Isolate(const Cluster& c, const char* path, ic_entry_fn entry) {
        ic_property props[] = {{"lang", "c++"}};
        check(ic_spawn(c.handle(), path, props, 1, entry, nullptr, &h_), "ic_spawn");
    }
    ~Isolate() { ic_isolate_release(h_); }
    Isolate(const Isolate&) = delete;
    Isolate& operator=(const Isolate&) = delete;
    ic_isolate handle() const { return h_; }

  private:
    ic_isolate h_ = 0;
};

class Mailbox {
  public:
    explicit Mailbox(const Cluster& c) { check(ic_mailbox_open(c.handle(), &h_), "ic_mailbox_open"); }
    ~Mailbox() { ic_mailbox_close(h_); }
    Mailbox(const Mailbox&) = delete;
    Mailbox& operator=(const Mailbox&) = delete;

    std::string call(const Isolate& to, const std::string& request) {
        ic_message reply;
        check(ic_call(h_, to.handle(), 1, request.data(), request.size(), 5000, &reply), "ic_call");
        std::string text(reinterpret_cast<const char*>(reply.data), reply.len);
        ic_message_release(h_, &reply);
        return text;
    }

  private:
    ic_inbox h_ = 0;
};

}  // namespace ic

int main() {
    try {
        ic::Cluster cluster;
        ic::Isolate greeter(cluster, "/greeter", [](ic_inbox inbox, void*) {
            ic_message m;
            while (ic_recv(inbox, -1, &m) == IC_OK) {
                if (m.kind == IC_EVENT_MESSAGE && (m.flags & IC_MSG_REQUEST)) {
                    std::string answer = "hello from /greeter, ";
                    answer.append(reinterpret_cast<const char*>(m.data), m.len);
                    ic_reply(inbox, &m, m.tag, answer.data(), answer.size());
                }
                ic_message_release(inbox, &m);
            }
        });
        ic::Mailbox mailbox(cluster);
        std::printf("%s\n", mailbox.call(greeter, "hello from C++").c_str());
        std::printf("isolate-cluster %s\n", ic_version());
    } catch (const std::exception& e) {
        std::fprintf(stderr, "%s\n", e.what());
        return 1;
    }
    return 0;
}
