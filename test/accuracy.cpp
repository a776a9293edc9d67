// Real-time accuracy of token_bucket: the one test here that must use the real clock.
#include <valve/token_bucket.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <chrono>
#include <sstream>
#include <string>
#include <vector>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using clk = std::chrono::steady_clock;

namespace {

constexpr double per_second = 1000;
constexpr std::size_t burst = 1;
constexpr auto run_for = 2s;

struct measurement {
    std::size_t granted = 0;
    std::size_t worst_window = 0; // most grants in any 100 ms
    // Time the run could not serve: the part beyond one interval of every gap between grants
    // longer than two intervals. At 1000/s with 50 waiters a working bucket leaves no such
    // gap; a starved thread does (a bucket of burst 1 cannot keep those tokens for later).
    clk::duration stalled{};
};

// 50 coroutines acquire one token at a time for two seconds.
measurement measure()
{
    asio::io_context ioc;
    valve::token_bucket bucket{ioc, valve::rate::per_second(per_second), burst};
    std::vector<clk::time_point> grants;
    grants.reserve(4000);
    const auto stop = clk::now() + run_for;
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
    std::sort(grants.begin(), grants.end());
    measurement m;
    m.granted = grants.size();
    const auto interval = std::chrono::duration_cast<clk::duration>(std::chrono::duration<double>(1.0 / per_second));
    auto previous = stop - run_for;
    for (const auto t : grants) {
        if (t - previous > 2 * interval) m.stalled += t - previous - interval;
        previous = t;
    }
    if (stop - previous > 2 * interval) m.stalled += stop - previous - interval;
    for (auto first = grants.begin(); first != grants.end(); ++first) {
        const auto last = std::lower_bound(first, grants.end(), *first + 100ms);
        m.worst_window = std::max(m.worst_window, static_cast<std::size_t>(last - first));
    }
    return m;
}

} // namespace

TEST(accuracy, fifty_coroutines_at_1000_per_second_for_two_seconds)
{
    const std::size_t window_bound = burst + static_cast<std::size_t>(per_second * 0.1) + 1;
    // On a shared machine a run starved of CPU loses grants that a bucket of burst 1 cannot
    // keep for later (it never releases more than one late token at once, or the window bound
    // would break). So the time the run could not serve (gaps of over two intervals, at most a
    // tenth of the run) is not counted, and the run is measured up to three times; one run must
    // meet every bound. A rate off by more than 2% leaves no such gaps and fails them all.
    std::ostringstream runs;
    bool met = false;
    for (int attempt = 0; attempt < 3 && !met; ++attempt) {
        const measurement m = measure();
        const double served_s = std::chrono::duration<double>(run_for - m.stalled).count();
        const double expected = per_second * served_s + burst;
        const bool mostly_served = m.stalled <= std::chrono::milliseconds{run_for} / 10;
        runs << "run " << attempt + 1 << ": " << m.granted << " grants (expected " << expected << " +/- 2% in the "
             << served_s << " s served; " << std::chrono::duration<double>(m.stalled).count()
             << " s stalled, at most 0.2 s), " << m.worst_window << " in the busiest 100 ms (at most " << window_bound
             << ")\n";
        met = mostly_served && std::abs(static_cast<double>(m.granted) - expected) <= expected * 0.02
              && m.worst_window <= window_bound;
    }
    EXPECT_TRUE(met) << runs.str();
}
