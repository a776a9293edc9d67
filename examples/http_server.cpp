// valve inside a real Asio server: an HTTP/1.1 server (Boost.Beast, coroutines) on the
// application's own io_context.
//
//   GET /hello    cheap; limited per client (the X-Api-Key header, else the remote address):
//                 over the limit, 429 with Retry-After and RateLimit-* headers
//   GET /work     as /hello, then expensive work through one shared limiter with a bounded
//                 queue: when the queue is full, 503 with Retry-After
//   GET /top10    as /work, but when the queue is full, a cached answer: 200 with
//                 "X-Degraded: cached" (graceful degradation)
//   GET /metrics  valve's statistics in the Prometheus text format (not limited)
//
// SIGINT or SIGTERM: stop accepting, finish the requests in flight (up to --grace), exit 0.
//
// Usage: example_http_server [--listen 127.0.0.1:8080] [--client-rate 5] [--client-burst 10]
//            [--work-concurrency 4] [--work-queue 16] [--work-ms 50] [--grace 10]
//            [--no-limit | --unlimited]
// Port 0 picks a free port; the first line printed is "listening on <address>:<port>".
#include <valve/valve.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <list>
#include <map>
#include <string>
#include <thread>

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using namespace std::chrono_literals;

namespace {

struct config {
    std::string address = "127.0.0.1";
    unsigned short port = 8080;
    double client_rate = 5;
    std::size_t client_burst = 10;
    std::size_t work_concurrency = 4;
    std::size_t work_queue = 16;
    std::chrono::milliseconds work_time{50};
    std::chrono::seconds grace{10};
    enum { limited, unlimited, none } mode = limited; // `none`: no valve at all (load baseline)
};

using request = http::request<http::string_body>;
using response = http::response<http::string_body>;

response make(const request& req, http::status status, std::string body)
{
    response res{status, req.version()};
    res.set(http::field::server, "valve-example");
    res.set(http::field::content_type, "text/plain");
    res.body() = std::move(body);
    res.prepare_payload();
    return res;
}

std::string seconds_until(std::chrono::steady_clock::time_point t)
{
    const double s = std::chrono::duration<double>(t - std::chrono::steady_clock::now()).count();
    return std::to_string(static_cast<long long>(std::max(1.0, std::ceil(s))));
}

// Stands in for expensive blocking work: runs on the shared profile's thread pool.
std::string expensive(std::chrono::milliseconds t)
{
    std::this_thread::sleep_for(t);
    return "fresh top 10\n";
}

class app {
public:
    app(asio::io_context& ioc, const config& cfg) : cfg_(cfg), mgr_(ioc.get_executor())
    {
        const auto client_rate =
            cfg.mode == config::unlimited ? valve::rate::unlimited() : valve::rate::per_second(cfg.client_rate);
        // Per client: a private rate; no queue (over the rate is 429 at once); the request
        // handlers take its permits themselves (limiter::try_enter), on this io_context.
        mgr_.register_profile("per-client", valve::dedicated_resource(client_rate, cfg.client_burst),
                              valve::worker_pool(1000, 0), valve::run_on(ioc.get_executor()),
                              valve::idle_timeout(std::chrono::seconds(60)));
        // The expensive work: one shared limit, a few at once, a bounded queue.
        mgr_.register_profile("expensive", valve::shared_resource("backend", valve::rate::unlimited()),
                              valve::worker_pool(cfg.work_concurrency, cfg.work_queue));
        work_ = mgr_.get_limiter("expensive", "all");
    }

    // The limiter of the connection's last client, kept while the connection lives: most
    // connections carry one client, and this spares a lookup per request.
    struct client_cache {
        std::string key;
        std::shared_ptr<valve::limiter> limiter;
    };

    asio::awaitable<response> handle(const request& req, const std::string& remote, client_cache& cache)
    {
        const std::string target{req.target()};
        if (target == "/metrics") co_return count(metrics(req));
        if (target != "/hello" && target != "/work" && target != "/top10")
            co_return count(make(req, http::status::not_found, "not found\n"));
        if (cfg_.mode == config::none) co_return count(co_await route(req, target));

        const auto key = req.count("X-Api-Key") ? std::string{req["X-Api-Key"]} : remote;
        if (!cache.limiter || cache.key != key) cache = {key, mgr_.get_limiter("per-client", key)};
        const std::shared_ptr<valve::limiter>& client = cache.limiter;
        // The handler runs under the client's limit: admitted only if the client has a token
        // now, and then right here, holding its permit (no task to submit, no post).
        if (valve::permit admitted = client->try_enter()) {
            response res = co_await route(req, target);
            admitted.release();
            rate_headers(res, *client);
            co_return count(std::move(res));
        }
        response res = make(req, http::status::too_many_requests, "too many requests: slow down\n");
        res.set(http::field::retry_after, seconds_until(client->next_available()));
        rate_headers(res, *client);
        res.set("RateLimit-Remaining", "0"); // refused: a token arriving since does not change that
        co_return count(std::move(res));
    }

    // Drains the limiters within the grace period; requests in flight finish.
    void stop()
    {
        mgr_.async_shutdown(cfg_.grace, [](boost::system::error_code) {});
    }

private:
    asio::awaitable<response> route(const request& req, const std::string& target)
    {
        if (target == "/hello") co_return make(req, http::status::ok, "hello\n");
        const auto t = cfg_.work_time;
        if (target == "/top10") {
            // When the queue is full, the cached answer instead of a 503.
            bool degraded = false;
            std::string body = co_await work_->submit_or([t] { return expensive(t); }, [&] {
                degraded = true;
                return std::string{"cached top 10\n"};
            });
            response res = make(req, http::status::ok, std::move(body));
            if (degraded) res.set("X-Degraded", "cached");
            co_return res;
        }
        try {
            co_return make(req, http::status::ok, co_await work_->submit([t] { return expensive(t); }));
        } catch (const boost::system::system_error& e) {
            if (e.code() != valve::errc::queue_full && e.code() != valve::errc::shutting_down) throw;
        }
        response res = make(req, http::status::service_unavailable, "busy: try again shortly\n");
        res.set(http::field::retry_after, "1");
        co_return res;
    }

    void rate_headers(response& res, const valve::limiter& client) const
    {
        if (cfg_.mode == config::unlimited) return;
        // draft-ietf-httpapi-ratelimit-headers: the quota is the burst; it is whole again once
        // the missing tokens have refilled.
        const double left = std::floor(client.available());
        const double missing = static_cast<double>(cfg_.client_burst) - client.available();
        const double reset = std::ceil(std::max(0.0, missing) / cfg_.client_rate);
        res.set("RateLimit-Limit", std::to_string(cfg_.client_burst));
        res.set("RateLimit-Remaining", std::to_string(static_cast<long long>(std::max(0.0, left))));
        res.set("RateLimit-Reset", std::to_string(static_cast<long long>(reset)));
    }

    response metrics(const request& req)
    {
        valve::prometheus_writer w;
        w.add(mgr_.stats("per-client"), {{"profile", "per-client"}});
        w.add(mgr_.stats("expensive"), {{"profile", "expensive"}});
        const double client_rate = cfg_.mode == config::limited ? cfg_.client_rate : HUGE_VAL;
        w.gauge("rate_tokens_per_second", "The rate of each limiter of the profile.", client_rate,
                {{"profile", "per-client"}});
        w.gauge("rate_tokens_per_second", "The rate of each limiter of the profile.", HUGE_VAL,
                {{"profile", "expensive"}});
        w.gauge("limiters", "Limiters alive.", static_cast<double>(mgr_.limiter_count("per-client")),
                {{"profile", "per-client"}});
        for (const auto& [code, n] : responses_)
            w.counter("http_responses_total", "HTTP responses sent, by status code.", static_cast<double>(n),
                      {{"code", std::to_string(code)}});
        response res = make(req, http::status::ok, w.str());
        res.set(http::field::content_type, "text/plain; version=0.0.4");
        res.prepare_payload();
        return res;
    }

    response count(response res)
    {
        ++responses_[res.result_int()];
        return res;
    }

    const config& cfg_;
    valve::manager mgr_;
    std::shared_ptr<valve::limiter> work_;
    std::map<unsigned, std::uint64_t> responses_;
};

struct session_state {
    beast::tcp_stream stream;
    bool in_request = false;
};

class server {
public:
    server(asio::io_context& ioc, const config& cfg) : ioc_(ioc), app_(ioc, cfg), acceptor_(ioc)
    {
        const tcp::endpoint ep{asio::ip::make_address(cfg.address), cfg.port};
        acceptor_.open(ep.protocol());
        acceptor_.set_option(asio::socket_base::reuse_address(true));
        acceptor_.bind(ep);
        acceptor_.listen();
        const auto bound = acceptor_.local_endpoint();
        std::printf("listening on %s:%u\n", bound.address().to_string().c_str(), bound.port());
        std::fflush(stdout);
    }

    asio::awaitable<void> accept()
    {
        for (;;) {
            tcp::socket socket = co_await acceptor_.async_accept(asio::use_awaitable);
            asio::co_spawn(ioc_, session(std::move(socket)), asio::detached);
        }
    }

    // Stops accepting, closes idle connections, lets requests in flight finish.
    void stop()
    {
        if (stopping_) return;
        stopping_ = true;
        acceptor_.close();
        for (auto& s : sessions_)
            if (!s.in_request) s.stream.socket().close();
        app_.stop();
    }

private:
    asio::awaitable<void> session(tcp::socket socket)
    {
        std::string remote = "unknown";
        boost::system::error_code ec;
        if (auto ep = socket.remote_endpoint(ec); !ec) remote = ep.address().to_string();
        sessions_.push_back(session_state{beast::tcp_stream{std::move(socket)}});
        auto me = std::prev(sessions_.end());
        beast::flat_buffer buffer;
        app::client_cache cache;
        try {
            while (!stopping_) {
                request req;
                me->stream.expires_after(30s);
                co_await http::async_read(me->stream, buffer, req, asio::use_awaitable);
                me->in_request = true;
                response res = co_await app_.handle(req, remote, cache);
                res.keep_alive(req.keep_alive() && !stopping_);
                me->stream.expires_after(30s);
                co_await http::async_write(me->stream, res, asio::use_awaitable);
                me->in_request = false;
                if (!res.keep_alive()) break;
            }
        } catch (const std::exception&) {
            // The peer went away, timed out, or the server is stopping: nothing to answer.
        }
        me->stream.socket().shutdown(tcp::socket::shutdown_send, ec);
        me->stream.socket().close(ec);
        sessions_.erase(me);
    }

    asio::io_context& ioc_;
    app app_;
    tcp::acceptor acceptor_;
    std::list<session_state> sessions_;
    bool stopping_ = false;
};

config parse(int argc, char** argv)
{
    config c;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) {
                std::fprintf(stderr, "%s needs a value\n", a.c_str());
                std::exit(2);
            }
            return argv[++i];
        };
        if (a == "--listen") {
            const std::string v = value();
            const auto colon = v.rfind(':');
            c.address = v.substr(0, colon);
            c.port = static_cast<unsigned short>(std::stoi(v.substr(colon + 1)));
        } else if (a == "--client-rate") {
            c.client_rate = std::stod(value());
        } else if (a == "--client-burst") {
            c.client_burst = std::stoul(value());
        } else if (a == "--work-concurrency") {
            c.work_concurrency = std::stoul(value());
        } else if (a == "--work-queue") {
            c.work_queue = std::stoul(value());
        } else if (a == "--work-ms") {
            c.work_time = std::chrono::milliseconds(std::stoi(value()));
        } else if (a == "--grace") {
            c.grace = std::chrono::seconds(std::stoi(value()));
        } else if (a == "--unlimited") {
            c.mode = config::unlimited;
        } else if (a == "--no-limit") {
            c.mode = config::none;
        } else {
            std::fprintf(stderr, "unknown option %s (see the comment at the top of http_server.cpp)\n", a.c_str());
            std::exit(2);
        }
    }
    return c;
}

} // namespace

int main(int argc, char** argv)
{
    const config cfg = parse(argc, argv);
    asio::io_context ioc{1};
    server srv{ioc, cfg};
    asio::signal_set signals{ioc, SIGINT, SIGTERM};
    signals.async_wait([&](boost::system::error_code ec, int) {
        if (!ec) srv.stop();
    });
    asio::co_spawn(ioc, srv.accept(), asio::detached);
    ioc.run();
    std::printf("stopped\n");
    return 0;
}
