// End to end: starts examples/http_server.cpp as a process on an ephemeral loopback port and
// drives it with a real HTTP client (Boost.Beast, synchronous).
#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include "promtool.hpp"

#include <gtest/gtest.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <poll.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using namespace std::chrono_literals;
using clock_type = std::chrono::steady_clock;

namespace {

// The server process: started with `args`, on port 0; `port` is what it printed.
class server_process {
public:
    explicit server_process(std::vector<std::string> args)
    {
        args.insert(args.begin(), {VALVE_HTTP_SERVER, "--listen", "127.0.0.1:0"});
        int out[2];
        if (pipe(out) != 0) throw std::runtime_error("pipe failed");
        pid_ = fork();
        if (pid_ == 0) {
            dup2(out[1], STDOUT_FILENO);
            close(out[0]);
            close(out[1]);
            std::vector<char*> argv;
            for (auto& a : args) argv.push_back(const_cast<char*>(a.c_str())); // execv does not write them
            argv.push_back(nullptr);
            execv(argv[0], argv.data());
            _exit(127);
        }
        close(out[1]);
        out_ = fdopen(out[0], "r");
        char line[256] = {};
        if (!out_ || !std::fgets(line, sizeof line, out_)) throw std::runtime_error("the server printed nothing");
        const std::string l = line;
        const auto colon = l.rfind(':');
        if (l.rfind("listening on ", 0) != 0 || colon == std::string::npos)
            throw std::runtime_error("unexpected first line: " + l);
        port = static_cast<unsigned short>(std::stoi(l.substr(colon + 1)));
    }

    ~server_process()
    {
        if (pid_ > 0 && !exited_) {
            kill(pid_, SIGKILL);
            waitpid(pid_, nullptr, 0);
        }
        if (out_) std::fclose(out_);
    }

    void signal(int sig) { kill(pid_, sig); }

    // The exit status, or -1 if it has not exited within `limit`: waits on a pidfd, which
    // becomes readable when the process ends.
    int wait_exit(std::chrono::milliseconds limit)
    {
        const int fd = static_cast<int>(syscall(SYS_pidfd_open, pid_, 0));
        if (fd >= 0) {
            pollfd p{fd, POLLIN, 0};
            poll(&p, 1, static_cast<int>(limit.count()));
            close(fd);
        }
        // Without pidfds (kernels before 5.3) this blocks; ctest's timeout bounds it.
        int status = 0;
        if (waitpid(pid_, &status, fd >= 0 ? WNOHANG : 0) != pid_) return -1;
        exited_ = true;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }

    unsigned short port = 0;

private:
    pid_t pid_ = -1;
    FILE* out_ = nullptr;
    bool exited_ = false;
};

using response = http::response<http::string_body>;

// One keep-alive connection.
class client {
public:
    explicit client(unsigned short port) : stream_(ioc_) { stream_.connect(tcp::endpoint{asio::ip::make_address("127.0.0.1"), port}); }

    response get(const std::string& target, const std::string& key = {})
    {
        http::request<http::empty_body> req{http::verb::get, target, 11};
        req.set(http::field::host, "127.0.0.1");
        if (!key.empty()) req.set("X-Api-Key", key);
        http::write(stream_, req);
        response res;
        http::read(stream_, buffer_, res);
        return res;
    }

private:
    asio::io_context ioc_;
    beast::tcp_stream stream_;
    beast::flat_buffer buffer_;
};

// `GET target` from `n` connections at once, one request each.
std::vector<response> at_once(unsigned short port, const std::string& target, int n)
{
    std::vector<response> out(static_cast<std::size_t>(n));
    std::vector<std::unique_ptr<client>> clients;
    for (int i = 0; i < n; ++i) clients.push_back(std::make_unique<client>(port));
    std::vector<std::thread> threads;
    for (int i = 0; i < n; ++i)
        threads.emplace_back([&, i] { out[static_cast<std::size_t>(i)] = clients[static_cast<std::size_t>(i)]->get(target, "key-" + std::to_string(i)); });
    for (auto& t : threads) t.join();
    return out;
}

// Sample lines of a Prometheus text exposition: "name{labels}" -> value. Every line must be a
// comment or a sample.
std::map<std::string, double> parse_metrics(const std::string& text)
{
    std::map<std::string, double> m;
    std::istringstream in{text};
    std::string line;
    while (std::getline(in, line)) {
        if (line.empty() || line[0] == '#') continue;
        const auto space = line.rfind(' ');
        EXPECT_NE(space, std::string::npos) << line;
        m[line.substr(0, space)] = std::stod(line.substr(space + 1));
    }
    return m;
}

} // namespace

TEST(http_server, serves_rate_times_time_plus_burst_per_key_and_answers_429_beyond)
{
    server_process srv{{"--client-rate", "20", "--client-burst", "5"}};
    client c{srv.port};
    int ok = 0;
    int limited = 0;
    const auto start = clock_type::now();
    while (clock_type::now() - start < 1500ms) {
        const auto res = c.get("/hello", "A");
        if (res.result() == http::status::ok) {
            ++ok;
        } else {
            ASSERT_EQ(res.result(), http::status::too_many_requests);
            ++limited;
            EXPECT_EQ(res["Retry-After"], "1"); // the next token is 50 ms away: rounded up
            EXPECT_EQ(res["RateLimit-Limit"], "5");
            EXPECT_EQ(res["RateLimit-Remaining"], "0");
        }
    }
    const double seconds = std::chrono::duration<double>(clock_type::now() - start).count();
    const double expected = 5 + 20 * seconds; // burst + rate x time
    EXPECT_NEAR(ok, expected, 3.0) << "over " << seconds << " s";
    EXPECT_GT(limited, 100) << "the client should have hit the limit many times";
}

TEST(http_server, retry_after_when_honoured_succeeds_and_keys_are_isolated)
{
    server_process srv{{"--client-rate", "0.5", "--client-burst", "2"}};
    client c{srv.port};
    EXPECT_EQ(c.get("/hello", "C").result(), http::status::ok);
    const auto second = c.get("/hello", "C");
    EXPECT_EQ(second.result(), http::status::ok);
    EXPECT_EQ(second["RateLimit-Remaining"], "0");
    EXPECT_EQ(second["RateLimit-Reset"], "4") << "2 tokens at 0.5/s";
    const auto refused = c.get("/hello", "C");
    ASSERT_EQ(refused.result(), http::status::too_many_requests);
    const int retry_after = std::stoi(std::string{refused["Retry-After"]});
    EXPECT_GE(retry_after, 1);
    EXPECT_LE(retry_after, 2) << "one token every 2 s";
    // Another key is unaffected.
    EXPECT_EQ(c.get("/hello", "D").result(), http::status::ok);
    EXPECT_EQ(c.get("/hello", "D").result(), http::status::ok);
    // Honouring Retry-After (the client waiting as told) succeeds.
    std::this_thread::sleep_for(std::chrono::seconds(retry_after));
    EXPECT_EQ(c.get("/hello", "C").result(), http::status::ok);
}

TEST(http_server, answers_503_or_a_degraded_200_exactly_when_the_shared_queue_is_full_and_metrics_agree)
{
    // One running and two queued fit; each task takes 500 ms, so six at once leave three out.
    server_process srv{{"--client-rate", "1000", "--client-burst", "100", "--work-concurrency", "1",
                        "--work-queue", "2", "--work-ms", "500"}};
    std::map<unsigned, int> seen;
    int busy = 0;
    for (const auto& res : at_once(srv.port, "/work", 6)) {
        ++seen[res.result_int()];
        if (res.result() == http::status::service_unavailable) {
            ++busy;
            EXPECT_EQ(res["Retry-After"], "1");
        } else {
            EXPECT_EQ(res.body(), "fresh top 10\n");
        }
    }
    EXPECT_EQ(busy, 3);
    int degraded = 0;
    for (const auto& res : at_once(srv.port, "/top10", 6)) {
        ++seen[res.result_int()];
        EXPECT_EQ(res.result(), http::status::ok);
        if (res.count("X-Degraded")) {
            ++degraded;
            EXPECT_EQ(res.body(), "cached top 10\n");
        } else {
            EXPECT_EQ(res.body(), "fresh top 10\n");
        }
    }
    EXPECT_EQ(degraded, 3);

    client c{srv.port};
    const auto res = c.get("/metrics");
    ASSERT_EQ(res.result(), http::status::ok);
    EXPECT_EQ(res[http::field::content_type], "text/plain; version=0.0.4");
    EXPECT_TRUE(valve::test::promtool_accepts(res.body()));
    const auto m = parse_metrics(res.body());
    EXPECT_EQ(m.at("valve_tasks_rejected_total{profile=\"expensive\"}"), 6);
    EXPECT_EQ(m.at("valve_tasks_completed_total{profile=\"expensive\"}"), 6);
    EXPECT_EQ(m.at("valve_tasks_submitted_total{profile=\"per-client\"}"), 12);
    EXPECT_EQ(m.at("valve_http_responses_total{code=\"200\"}"), seen[200]);
    EXPECT_EQ(m.at("valve_http_responses_total{code=\"503\"}"), seen[503]);
    EXPECT_EQ(m.at("valve_tasks_queued{profile=\"expensive\"}"), 0);
}

TEST(http_server, sigterm_finishes_requests_in_flight_and_exits_0)
{
    server_process srv{{"--work-ms", "500"}};
    client c{srv.port};
    client watcher{srv.port};
    response res;
    std::thread in_flight{[&] { res = c.get("/work", "E"); }};
    // SIGTERM once the server reports the request's work running (500 ms of it).
    const auto give_up = clock_type::now() + 20s;
    bool running = false;
    while (!running && clock_type::now() < give_up)
        running = parse_metrics(watcher.get("/metrics").body())["valve_tasks_running{profile=\"expensive\"}"] == 1;
    EXPECT_TRUE(running) << "the request never started";
    srv.signal(SIGTERM);
    in_flight.join();
    EXPECT_EQ(res.result(), http::status::ok) << "the request in flight was not finished";
    EXPECT_EQ(res.body(), "fresh top 10\n");
    EXPECT_EQ(srv.wait_exit(20s), 0);
    // Nothing listens any more.
    asio::io_context ioc;
    tcp::socket s{ioc};
    boost::system::error_code ec;
    s.connect(tcp::endpoint{asio::ip::make_address("127.0.0.1"), srv.port}, ec);
    EXPECT_TRUE(ec);
}
