// valve's token bucket in a few lines each: the 429 path, waiting, rate changes, deadlines,
// cancellation and composed limits. Prints what happens with timestamps.
#include <valve/valve.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <chrono>
#include <cstdio>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using namespace asio::experimental::awaitable_operators;

namespace {

const auto start = std::chrono::steady_clock::now();

void say(const char* what)
{
    const auto ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start);
    std::printf("%8.1f ms  %s\n", ms.count(), what);
}

asio::awaitable<void> demo()
{
    auto ex = co_await asio::this_coro::executor;

    // 5 tokens per second, up to 2 at once.
    valve::token_bucket bucket{ex, valve::rate::per_second(5), 2};

    // The HTTP 429 path: never waits.
    for (int i = 0; i < 3; ++i) say(bucket.try_acquire() ? "try_acquire: granted" : "try_acquire: refused (429)");

    // Waiting for tokens: one every 200 ms.
    for (int i = 0; i < 3; ++i) {
        co_await bucket.async_acquire(1, asio::use_awaitable);
        say("async_acquire(1): granted");
    }

    // Rates change at run time; waiters are re-planned.
    bucket.set_rate(valve::rate::per_second(20));
    for (int i = 0; i < 3; ++i) {
        co_await bucket.async_acquire(1, asio::use_awaitable);
        say("async_acquire(1) at 20/s: granted");
    }

    // A deadline the bucket cannot meet fails at once instead of waiting.
    try {
        co_await bucket.async_acquire(2, std::chrono::steady_clock::now() + 10ms, asio::use_awaitable);
    } catch (const boost::system::system_error& e) {
        std::printf("%8s     async_acquire(2) with a 10 ms deadline: %s\n", "", e.code().message().c_str());
    }

    // Per-operation cancellation: whichever finishes first wins, the other is cancelled.
    bucket.set_rate(valve::rate::per(1, 1min));
    asio::steady_timer timeout{ex, 50ms};
    auto winner = co_await (bucket.async_acquire(2, asio::use_awaitable) || timeout.async_wait(asio::use_awaitable));
    say(winner.index() == 1 ? "gave up after 50 ms; the cancelled waiter took no tokens" : "granted");

    // Several limits at once, all or nothing: 2/s and 10/min and a disk bucket.
    valve::token_bucket per_second{ex, valve::rate::per_second(2), 2};
    valve::token_bucket per_minute{ex, valve::rate::per(10, 1min), 10};
    valve::token_bucket disk{ex, valve::rate::per_second(4), 1};
    valve::bucket_set limits{per_second, per_minute, disk};
    for (int i = 0; i < 4; ++i) {
        co_await limits.async_acquire(1, asio::use_awaitable);
        say("2/s and 10/min and disk: granted");
    }
}

} // namespace

int main()
{
    asio::io_context ioc;
    asio::co_spawn(ioc, demo(), [](std::exception_ptr e) {
        if (e) std::rethrow_exception(e);
    });
    ioc.run();
}
