// Real-time accuracy of token_bucket: the one test here that must use the real clock.
#include <valve/token_bucket.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <vector>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using clk = std::chrono::steady_clock;

TEST(accuracy, fifty_coroutines_at_1000_per_second_for_two_seconds)
{
    constexpr double per_second = 1000;
    constexpr std::size_t burst = 1;
    constexpr auto run_for = 2s;
    asio::io_context ioc;
    valve::token_bucket bucket{ioc, valve::rate::per_second(per_second), burst};
    std::vector<clk::time_point> grants;
    grants.reserve(4000);
    const auto start = clk::now();
    const auto stop = start + run_for;
    for (int i = 0; i < 50; ++i)
        asio::co_spawn(
            ioc,
            [&]() -> asio::awaitable<void> {
                for (;;) {
                    co_await bucket.async_acquire(1, asio::use_awaitable);
                    const auto now = clk::now();
                    if (now >= stop) co_return;
                    grants.push_back(now);
                }
            },
            asio::detached);
    ioc.run();

    const double expected = per_second * std::chrono::duration<double>(run_for).count() + burst;
    EXPECT_NEAR(static_cast<double>(grants.size()), expected, expected * 0.02);

    // No 100 ms window holds more than burst + rate x 0.1 s + 1 grants.
    std::sort(grants.begin(), grants.end());
    std::size_t worst = 0;
    for (auto first = grants.begin(); first != grants.end(); ++first) {
        const auto last = std::lower_bound(first, grants.end(), *first + 100ms);
        worst = std::max(worst, static_cast<std::size_t>(last - first));
    }
    EXPECT_LE(worst, burst + static_cast<std::size_t>(per_second * 0.1) + 1);
}
