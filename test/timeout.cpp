#include <valve/error.hpp>
#include <valve/hedge.hpp>
#include <valve/limiter.hpp>
#include <valve/timeout.hpp>

#include "support.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/thread_pool.hpp>

#include <gtest/gtest.h>

#include <stdexcept>
#include <string>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using valve::test::code_of;

namespace {

using valve::test::run_to_end;

using clock_type = std::chrono::steady_clock;

// Sleeps `d` on the coroutine's executor, records whether the sleep was cancelled, then
// returns `value`.
asio::awaitable<int> sleepy(std::chrono::nanoseconds d, int value, bool* cancelled)
{
    asio::steady_timer t{co_await asio::this_coro::executor, d};
    try {
        co_await t.async_wait(asio::use_awaitable);
    } catch (const boost::system::system_error&) {
        if (cancelled) *cancelled = true;
        throw;
    }
    co_return value;
}

asio::awaitable<int> failing(std::string what)
{
    co_await asio::post(co_await asio::this_coro::executor, asio::use_awaitable);
    throw std::runtime_error(what);
}

} // namespace

TEST(with_timeout, a_slow_operation_is_cancelled_and_reports_timed_out)
{
    asio::io_context ioc;
    bool cancelled = false;
    const auto start = clock_type::now();
    auto [e, v] = run_to_end(ioc, valve::with_timeout(20ms, sleepy(1h, 1, &cancelled)));
    const auto took = clock_type::now() - start;
    EXPECT_EQ(code_of(e), valve::errc::timed_out);
    EXPECT_TRUE(cancelled) << "the slow operation was not cancelled";
    EXPECT_GE(took, 20ms);
    EXPECT_LT(took, 30s) << "ioc.run() returned only when nothing was left: the hour-long sleep is gone";
}

TEST(with_timeout, a_fast_operation_returns_its_value_and_leaves_no_timer_behind)
{
    asio::io_context ioc;
    const auto start = clock_type::now();
    auto [e, v] = run_to_end(ioc, valve::with_timeout(1h, sleepy(1ms, 7, nullptr)));
    EXPECT_FALSE(e);
    EXPECT_EQ(v, 7);
    EXPECT_LT(clock_type::now() - start, 30s) << "the hour-long timeout timer kept the io_context busy";
}

TEST(with_timeout, the_longest_timeouts_never_fire_rather_than_overflow)
{
    // `now + nanoseconds::max()` overflowed into the past: the timer fired at once and the
    // operation was cancelled as timed out.
    asio::io_context ioc;
    auto [e1, v1] = run_to_end(ioc, valve::with_timeout(std::chrono::nanoseconds::max(), sleepy(1ms, 7, nullptr)));
    EXPECT_FALSE(e1) << valve::test::code_of(e1).message();
    EXPECT_EQ(v1, 7);
    // A duration beyond nanoseconds' range is the longest timeout, not a wrapped one.
    ioc.restart();
    auto [e2, v2] = run_to_end(ioc, valve::with_timeout(std::chrono::hours::max(), sleepy(1ms, 8, nullptr)));
    EXPECT_FALSE(e2) << valve::test::code_of(e2).message();
    EXPECT_EQ(v2, 8);
}

TEST(with_timeout, an_operation_that_fails_fast_reports_its_own_error_at_once)
{
    asio::io_context ioc;
    const auto start = clock_type::now();
    auto [e, v] = run_to_end(ioc, valve::with_timeout(1h, failing("upstream said no")));
    EXPECT_THROW(std::rethrow_exception(e), std::runtime_error);
    EXPECT_LT(clock_type::now() - start, 30s);
}

TEST(with_timeout, void_operations_and_deadlines)
{
    asio::io_context ioc;
    auto ok = [](asio::io_context& io) -> asio::awaitable<int> {
        co_await valve::with_timeout(1h, [](asio::io_context& i) -> asio::awaitable<void> {
            co_await asio::post(i, asio::use_awaitable);
        }(io));
        co_return 1;
    };
    auto [e1, v1] = run_to_end(ioc, ok(ioc));
    EXPECT_FALSE(e1);
    EXPECT_EQ(v1, 1);

    ioc.restart();
    bool cancelled = false;
    auto [e2, v2] = run_to_end(ioc, valve::with_deadline(clock_type::now() + 10ms, sleepy(1h, 1, &cancelled)));
    EXPECT_EQ(code_of(e2), valve::errc::timed_out);
    EXPECT_TRUE(cancelled);
}

TEST(with_timeout, removes_a_queued_limiter_task_which_then_never_runs)
{
    asio::io_context ioc;
    asio::thread_pool pool{1};
    auto lim = std::make_shared<valve::limiter>(
        ioc.get_executor(), std::make_shared<valve::bucket_resource>(ioc.get_executor(), valve::rate::unlimited()),
        valve::limiter_options{.concurrency = 1, .queue_capacity = 10}, pool.get_executor());
    // The one slot is taken by a task that waits until the test releases it.
    asio::steady_timer gate{ioc, clock_type::time_point::max()};
    bool second_ran = false;
    int first_done = 0;
    lim->async_submit([&]() -> asio::awaitable<void> {
        try {
            co_await gate.async_wait(asio::use_awaitable);
        } catch (...) {
        }
    }, [&](std::exception_ptr) { ++first_done; });
    std::exception_ptr e;
    int done = 0;
    asio::co_spawn(ioc, valve::with_timeout(20ms, lim->submit([&] {
                       second_ran = true;
                       return 2;
                   })),
                   [&](std::exception_ptr x, int) {
                       e = x;
                       ++done;
                       EXPECT_EQ(lim->queued(), 0u) << "the timed-out task is still queued";
                       gate.cancel(); // let the first task finish
                   });
    ioc.run();
    EXPECT_EQ(done, 1);
    EXPECT_EQ(code_of(e), valve::errc::timed_out);
    EXPECT_FALSE(second_ran);
    EXPECT_EQ(first_done, 1);
    EXPECT_EQ(lim->stats().cancelled, 1u);
}

TEST(hedge, a_second_copy_wins_when_the_first_is_slow_and_the_first_is_cancelled)
{
    asio::io_context ioc;
    int calls = 0;
    bool first_cancelled = false;
    const auto start = clock_type::now();
    auto [e, v] = run_to_end(ioc, valve::hedge(3, 20ms, [&]() -> asio::awaitable<int> {
        const int copy = ++calls;
        if (copy == 1) co_return co_await sleepy(1h, 1, &first_cancelled);
        co_return co_await sleepy(1ms, copy, nullptr);
    }));
    ASSERT_FALSE(e);
    EXPECT_EQ(v, 2);
    EXPECT_EQ(calls, 2) << "the third copy was due at 40 ms; the second answered near 21 ms";
    EXPECT_TRUE(first_cancelled);
    EXPECT_GE(clock_type::now() - start, 20ms);
    EXPECT_LT(clock_type::now() - start, 30s);
}

TEST(hedge, a_fast_first_answer_starts_no_other_copy)
{
    asio::io_context ioc;
    int calls = 0;
    auto [e, v] = run_to_end(ioc, valve::hedge(3, 1h, [&]() -> asio::awaitable<int> {
        ++calls;
        co_return co_await sleepy(1ms, 5, nullptr);
    }));
    ASSERT_FALSE(e);
    EXPECT_EQ(v, 5);
    EXPECT_EQ(calls, 1);
}

TEST(hedge, the_longest_delay_starts_exactly_one_copy)
{
    // `delay * 2` overflowed to a negative wait: the third copy started at once.
    asio::io_context ioc;
    int calls = 0;
    auto [e, v] = run_to_end(ioc, valve::hedge(3, std::chrono::nanoseconds::max(), [&]() -> asio::awaitable<int> {
        ++calls;
        co_return co_await sleepy(1ms, 5, nullptr);
    }));
    ASSERT_FALSE(e);
    EXPECT_EQ(v, 5);
    EXPECT_EQ(calls, 1);

    ioc.restart();
    calls = 0;
    auto [e2, v2] = run_to_end(ioc, valve::hedge(4, std::chrono::hours::max(), [&]() -> asio::awaitable<int> {
        ++calls;
        co_return co_await sleepy(1ms, 6, nullptr);
    }));
    ASSERT_FALSE(e2);
    EXPECT_EQ(v2, 6);
    EXPECT_EQ(calls, 1);
}

TEST(hedge, when_every_copy_fails_the_last_error_is_rethrown)
{
    asio::io_context ioc;
    int calls = 0;
    auto [e, v] = run_to_end(ioc, valve::hedge(3, 1ms, [&]() -> asio::awaitable<int> {
        co_return co_await failing("copy " + std::to_string(++calls));
    }));
    EXPECT_EQ(calls, 3);
    try {
        std::rethrow_exception(e);
    } catch (const std::runtime_error& x) {
        EXPECT_EQ(std::string{x.what()}, "copy 3");
    }
}

TEST(hedge, each_copy_through_a_limiter_takes_its_own_token)
{
    asio::io_context ioc;
    asio::thread_pool pool{1};
    auto res = std::make_shared<valve::bucket_resource>(ioc.get_executor(), valve::rate::per_second(1), 2);
    auto lim = std::make_shared<valve::limiter>(ioc.get_executor(), res,
                                                valve::limiter_options{.concurrency = 2, .queue_capacity = 10},
                                                pool.get_executor());
    bool first_cancelled = false;
    int calls = 0;
    auto [e, v] = run_to_end(ioc, valve::hedge(2, 5ms, [&]() -> asio::awaitable<int> {
        const int copy = ++calls;
        co_return co_await lim->submit([&, copy]() -> asio::awaitable<int> {
            if (copy == 1) co_return co_await sleepy(1h, 1, &first_cancelled);
            co_return copy;
        });
    }));
    ASSERT_FALSE(e);
    EXPECT_EQ(v, 2);
    EXPECT_TRUE(first_cancelled) << "the losing copy's running task was cancelled";
    EXPECT_FALSE(res->try_acquire(1)) << "the burst of 2 was spent: one token per copy";
}

TEST(hedge, zero_copies_is_refused)
{
    EXPECT_THROW((void)valve::hedge(0, 1ms, []() -> asio::awaitable<int> { co_return 1; }), valve::error);
}
