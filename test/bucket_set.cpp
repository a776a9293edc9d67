#include <valve/bucket_set.hpp>

#include <valve/error.hpp>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <gtest/gtest.h>

#include <chrono>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using boost::system::error_code;
using valve::bucket_set;
using valve::rate;
using valve::token_bucket;

TEST(bucket_set, takes_from_all_or_from_none)
{
    asio::io_context ioc;
    token_bucket per_second{ioc, rate::per_second(2), 2};
    token_bucket per_minute{ioc, rate::per(10, 1min), 10};
    token_bucket disk{ioc, rate::per_second(1), 1};
    bucket_set all{per_second, per_minute, disk};
    EXPECT_EQ(all.size(), 3u);

    EXPECT_TRUE(all.try_acquire());
    // The disk bucket is empty now: nothing is taken from the other two.
    EXPECT_FALSE(all.try_acquire());
    EXPECT_NEAR(per_second.available(), 1.0, 0.05);
    EXPECT_NEAR(per_minute.available(), 9.0, 0.05);
    // Each bucket still works on its own.
    EXPECT_TRUE(per_second.try_acquire());
    EXPECT_FALSE(all.try_acquire(3)); // beyond a burst
}

TEST(bucket_set, waits_for_the_slowest_without_holding_the_others)
{
    asio::io_context ioc;
    token_bucket fast{ioc, rate::per_second(1000), 1};
    token_bucket slow{ioc, rate::per_second(20), 1};
    ASSERT_TRUE(slow.try_acquire());
    bucket_set both{fast, slow};
    int calls = 0;
    error_code result;
    const auto start = std::chrono::steady_clock::now();
    both.async_acquire(1, [&](error_code ec) {
        ++calls;
        result = ec;
    });
    ioc.poll();
    EXPECT_EQ(calls, 0);
    // While the set waits ~50 ms for `slow`, the token of `fast` is not held: others may use it.
    EXPECT_TRUE(fast.try_acquire());
    ioc.run();
    EXPECT_EQ(calls, 1);
    EXPECT_FALSE(result);
    EXPECT_GE(std::chrono::steady_clock::now() - start, 49ms);
    EXPECT_LT(fast.available(), 1.0);
    EXPECT_LT(slow.available(), 1.0);
}

TEST(bucket_set, cancelled_acquisition_has_taken_nothing)
{
    asio::io_context ioc;
    token_bucket a{ioc, rate::zero(), 3};
    token_bucket b{ioc, rate::zero(), 2};
    ASSERT_TRUE(b.try_acquire(2));
    bucket_set both{a, b};
    asio::cancellation_signal sig;
    int calls = 0;
    error_code result;
    both.async_acquire(2, asio::bind_cancellation_slot(sig.slot(), [&](error_code ec) {
                           ++calls;
                           result = ec;
                       }));
    ioc.poll();
    EXPECT_EQ(calls, 0);
    sig.emit(asio::cancellation_type::terminal);
    ioc.run();
    EXPECT_EQ(calls, 1);
    EXPECT_EQ(result, asio::error::operation_aborted);
    EXPECT_DOUBLE_EQ(a.available(), 3.0);
    EXPECT_DOUBLE_EQ(b.available(), 0.0);
}

TEST(bucket_set, errors_burst_and_deadline)
{
    asio::io_context ioc;
    token_bucket a{ioc, rate::per_second(10), 5};
    token_bucket b{ioc, rate::per_second(1), 2};
    bucket_set both{a, b};
    error_code burst, deadline;
    both.async_acquire(3, [&](error_code ec) { burst = ec; });
    ASSERT_TRUE(b.try_acquire(2));
    both.async_acquire(1, std::chrono::steady_clock::now() + 200ms, [&](error_code ec) { deadline = ec; });
    ioc.run();
    EXPECT_EQ(burst, valve::errc::exceeds_burst);
    EXPECT_EQ(deadline, valve::errc::would_exceed_deadline);
    EXPECT_DOUBLE_EQ(a.available(), 5.0);
    EXPECT_THROW(bucket_set(std::vector<std::reference_wrapper<token_bucket>>{}), valve::error);
}

TEST(bucket_set, coroutines_compose_limits)
{
    asio::io_context ioc;
    token_bucket per_second{ioc, rate::per_second(200), 2};
    token_bucket per_minute{ioc, rate::per(6, 1min), 6};
    bucket_set both{per_second, per_minute};
    int granted = 0;
    error_code last;
    asio::co_spawn(
        ioc,
        [&]() -> asio::awaitable<void> {
            for (int i = 0; i < 6; ++i) {
                co_await both.async_acquire(1, asio::use_awaitable);
                ++granted;
            }
            // The minute limit is spent: the next one would wait ~10 s.
            try {
                co_await both.async_acquire(1, std::chrono::steady_clock::now() + 1s, asio::use_awaitable);
            } catch (const boost::system::system_error& e) {
                last = e.code();
            }
        },
        asio::detached);
    ioc.run();
    EXPECT_EQ(granted, 6);
    EXPECT_EQ(last, valve::errc::would_exceed_deadline);
    EXPECT_GT(both.next_available(), std::chrono::steady_clock::now() + 5s);
}
