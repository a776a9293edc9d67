// A client finds the rate a flaky upstream can really take.
//
// The simulated upstream allows 50 calls/s (beyond that it answers "429 Too Many Requests") and
// fails 30% of the calls it accepts anyway ("500"). The client sends 150 requests through a
// limiter whose rate starts at 200/s: an AIMD controller lowers the rate on each 429 and raises
// it while calls succeed; every request is retried with exponential backoff. It prints the
// rate as it goes, then the attempts made and the rate it settled on.
#include <valve/valve.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <chrono>
#include <cstdio>
#include <random>
#include <stdexcept>

namespace asio = boost::asio;
using namespace std::chrono_literals;

namespace {

constexpr double upstream_capacity = 50.0;
constexpr int requests = 150;

// Runs on the client's io_context (one thread), like an async HTTP call would.
class upstream {
public:
    explicit upstream(asio::io_context& ioc) : ioc_(ioc), capacity_(ioc.get_executor(), valve::rate::per_second(upstream_capacity), 5) {}

    asio::awaitable<int> call()
    {
        ++calls;
        asio::steady_timer latency{ioc_, 2ms};
        co_await latency.async_wait(asio::use_awaitable);
        if (!capacity_.try_acquire()) {
            ++rejected;
            throw valve::error(valve::errc::overloaded, "upstream answered 429 Too Many Requests");
        }
        if (flaky_(rng_)) throw std::runtime_error("upstream answered 500 Internal Server Error");
        co_return 200;
    }

    int calls = 0;
    int rejected = 0;

private:
    asio::io_context& ioc_;
    valve::token_bucket capacity_;
    std::mt19937 rng_{2026};
    std::bernoulli_distribution flaky_{0.3};
};

struct client {
    upstream& server;
    std::shared_ptr<valve::limiter> limiter;
    valve::aimd_controller& rate;
    valve::backoff_policy policy;
    int succeeded = 0;
    int gave_up = 0;
};

asio::awaitable<void> request(client& c)
{
    try {
        co_await valve::retry(c.policy, [&]() -> asio::awaitable<int> {
            // Every attempt waits for the limiter's (adaptive) rate; its outcome feeds the controller.
            co_return co_await c.limiter->submit(c.rate.wrap([&] { return c.server.call(); }));
        });
        ++c.succeeded;
    } catch (const std::exception& e) {
        ++c.gave_up;
        std::printf("gave up: %s\n", e.what());
    }
}

asio::awaitable<void> report(client& c, std::chrono::steady_clock::time_point start)
{
    asio::steady_timer tick{co_await asio::this_coro::executor};
    while (c.succeeded + c.gave_up < requests) {
        tick.expires_after(500ms);
        co_await tick.async_wait(asio::use_awaitable);
        std::printf("%5.1f s  rate %6.1f/s  done %3d/%d  calls %4d  429s %4d\n",
                    std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(),
                    c.rate.current().tokens_per_second(), c.succeeded + c.gave_up, requests, c.server.calls,
                    c.server.rejected);
    }
}

} // namespace

int main()
{
    asio::io_context ioc;
    asio::thread_pool pool{1}; // unused by these async tasks, but a limiter needs a task executor
    upstream server{ioc};

    auto resource = std::make_shared<valve::bucket_resource>(ioc.get_executor(), valve::rate::per_second(200), 1);
    auto limiter = std::make_shared<valve::limiter>(
        ioc.get_executor(), resource, valve::limiter_options{.concurrency = 16, .queue_capacity = requests},
        pool.get_executor());
    valve::aimd_controller rate{{.initial = 200, .floor = 5, .ceiling = 500, .decrease = 0.8, .step = 2,
                                 .interval = 250ms, .name = "upstream"},
                                resource->primary()};

    client c{server, limiter, rate,
             valve::exponential_backoff{.initial = 20ms, .multiplier = 2.0, .max_interval = 1s, .jitter = 0.5,
                                        .max_elapsed = 30s, .max_attempts = 10}};

    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < requests; ++i) asio::co_spawn(ioc, request(c), asio::detached);
    asio::co_spawn(ioc, report(c, start), asio::detached);
    ioc.run();

    const auto st = rate.stats();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("\n%d requests: %d succeeded, %d gave up, in %.1f s\n", requests, c.succeeded, c.gave_up, seconds);
    std::printf("%d upstream calls (%.2f per request): %d answered 429, the rest 200 or 500\n", server.calls,
                static_cast<double>(server.calls) / requests, server.rejected);
    std::printf("rate settled at %.1f/s (upstream allows %.0f/s) after %llu decreases and %llu increases\n", st.rate,
                upstream_capacity, static_cast<unsigned long long>(st.decreases),
                static_cast<unsigned long long>(st.increases));
    return c.gave_up == 0 ? 0 : 1;
}
