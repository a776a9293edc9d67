#include <valve/bucket_set.hpp>

#include <valve/error.hpp>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <gtest/gtest.h>

#include "support.hpp"

#include <chrono>
#include <functional>
#include <optional>
#include <utility>
#include <vector>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using boost::system::error_code;
using valve::bucket_set;
using valve::rate;
using valve::token_bucket;

namespace {

using result_probe = valve::test::completion_probe;

} // namespace

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
    EXPECT_NEAR(per_second.available(), 1.0, 0.2);
    EXPECT_NEAR(per_minute.available(), 9.0, 0.2);
    // Each bucket still works on its own.
    EXPECT_TRUE(per_second.try_acquire());
    EXPECT_FALSE(all.try_acquire(3)); // beyond a burst
}

TEST(bucket_set, release_gives_back_to_every_bucket)
{
    asio::io_context ioc;
    token_bucket a{ioc, rate::per(1, 1h), 2};
    token_bucket b{ioc, rate::per(1, 1h), 1};
    bucket_set both{a, b};
    ASSERT_TRUE(both.try_acquire());
    EXPECT_FALSE(both.try_acquire()); // b is empty
    both.release(1);
    EXPECT_NEAR(a.available(), 2.0, 0.01);
    EXPECT_NEAR(b.available(), 1.0, 0.01);
    EXPECT_TRUE(both.try_acquire());
}

TEST(bucket_set, waits_for_the_slowest_without_holding_the_others)
{
    asio::io_context ioc;
    const auto start = std::chrono::steady_clock::now();
    token_bucket fast{ioc, rate::per_second(50), 2};
    token_bucket slow{ioc, rate::per_second(10), 1};
    ASSERT_TRUE(slow.try_acquire());
    bucket_set both{fast, slow};
    int calls = 0;
    error_code result;
    double fast_left = 1;
    both.async_acquire(1, [&](error_code ec) {
        ++calls;
        result = ec;
        fast_left = fast.available();
    });
    ioc.poll();
    EXPECT_EQ(calls, 0);
    // While the set waits ~100 ms for `slow`, `fast` is not held for it beyond its one token:
    // others may use the rest, but not the token the set's place keeps there.
    EXPECT_TRUE(fast.try_acquire());
    EXPECT_FALSE(fast.try_acquire());
    ioc.run();
    EXPECT_EQ(calls, 1);
    EXPECT_FALSE(result);
    EXPECT_GE(std::chrono::steady_clock::now() - start, 100ms);
    EXPECT_LT(fast_left, 1.9); // the set took one of fast's refilled tokens
}

TEST(bucket_set, queues_behind_waiters_already_waiting_on_a_bucket)
{
    asio::io_context ioc;
    token_bucket a{ioc, rate::per_second(100), 5};
    ASSERT_TRUE(a.try_acquire(5));
    bucket_set set{a};
    std::vector<int> order;
    a.async_acquire(5, [&](error_code ec) { order.push_back(ec ? -1 : 0); }); // needs a full refill
    for (int i = 1; i <= 3; ++i) set.async_acquire(1, [&, i](error_code ec) { order.push_back(ec ? -1 : i); });
    ioc.run();
    ASSERT_EQ(order.size(), 4u);
    EXPECT_EQ(order.front(), 0); // single tokens did not keep the big waiter from its turn
}

TEST(bucket_set, rate_changes_and_cancel_reach_waiting_acquisitions)
{
    asio::io_context ioc;
    token_bucket a{ioc, rate::per(1, 1h), 1};
    ASSERT_TRUE(a.try_acquire());
    bucket_set set{a};
    result_probe sped_up, cancelled;
    const auto start = std::chrono::steady_clock::now();
    set.async_acquire(1, sped_up.handler());
    ioc.poll();
    a.set_rate(rate::per_second(100)); // an hour's wait becomes 10 ms
    ioc.run_for(5s);
    EXPECT_EQ(sped_up.calls, 1);
    EXPECT_FALSE(sped_up.ec);
    EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);

    ioc.restart();
    a.set_rate(rate::zero());
    set.async_acquire(1, cancelled.handler());
    ioc.poll();
    a.cancel();
    ioc.run_for(5s);
    EXPECT_EQ(cancelled.calls, 1);
    EXPECT_EQ(cancelled.ec, asio::error::operation_aborted);
}

TEST(bucket_set, a_deferred_acquisition_may_outlive_the_set)
{
    asio::io_context ioc;
    token_bucket a{ioc, rate::per_second(100), 1};
    std::optional<bucket_set> set{std::in_place, std::initializer_list<std::reference_wrapper<token_bucket>>{a}};
    auto op = set->async_acquire(1, asio::deferred);
    set.reset();
    result_probe r;
    std::move(op)(r.handler());
    ioc.run();
    EXPECT_EQ(r.calls, 1);
    EXPECT_FALSE(r.ec);
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
    EXPECT_THROW((bucket_set{a, b, a}), valve::error);
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

TEST(bucket_set, is_not_starved_by_a_stream_of_single_token_waiters)
{
    // Two single-token waiters keep re-queueing on a bucket of 1000/s while a set asks for 5.
    // Served in arrival order, the set waits for at most the two tokens ahead of it and its own
    // five: 7 token intervals. Starved, it waited ~180 times that.
    asio::io_context ioc;
    constexpr std::size_t burst = 5;
    constexpr int stream = 2;
    token_bucket a{ioc, rate::per_second(1000), burst};
    ASSERT_TRUE(a.try_acquire(burst));
    bucket_set set{a};
    bool set_done = false;
    int grants = 0;
    std::function<void()> requeue = [&] {
        a.async_acquire(1, [&](error_code ec) {
            ASSERT_FALSE(ec);
            ++grants;
            if (!set_done) requeue();
        });
    };
    for (int i = 0; i < stream; ++i) requeue();
    ioc.poll();
    const auto ideal = std::chrono::milliseconds(stream + static_cast<int>(burst)); // 1 ms per token
    const auto start = std::chrono::steady_clock::now();
    auto granted_after = std::chrono::steady_clock::duration::max();
    // The stream stops on its own after 3 s, so a starved set still ends the test.
    asio::steady_timer stop{ioc, 3s};
    stop.async_wait([&](error_code) { set_done = true; });
    result_probe r;
    set.async_acquire(burst, [&](error_code ec) {
        r.handler()(ec);
        granted_after = std::chrono::steady_clock::now() - start;
        set_done = true;
        stop.cancel();
    });
    ioc.run_until(std::chrono::steady_clock::now() + 5s);
    ASSERT_EQ(r.calls, 1);
    EXPECT_FALSE(r.ec);
    EXPECT_LT(granted_after, 10 * ideal) << "the set was starved: " << grants << " single tokens went first";
}

namespace {

// A set of 10 on a bucket of 10/s, burst 10, while `take(bucket)` is called every 2 ms and takes
// a token the moment one appears. Returns how long the set waited (max() if it never got its
// tokens while the stream ran: 4 s) and how many single tokens the stream was granted.
template <class Take>
std::pair<std::chrono::steady_clock::duration, int> set_wait_against(Take take)
{
    asio::io_context ioc;
    constexpr std::size_t burst = 10;
    token_bucket a{ioc, rate::per_second(10), burst};
    EXPECT_TRUE(a.try_acquire(burst));
    bucket_set set{a};
    bool stream_stopped = false;
    int grants = 0;
    asio::steady_timer poller{ioc};
    std::function<void()> poll = [&] {
        take(a, grants);
        poller.expires_after(2ms);
        poller.async_wait([&](error_code ec) {
            if (!ec && !stream_stopped) poll();
        });
    };
    poll();
    const auto start = std::chrono::steady_clock::now();
    auto waited = std::chrono::steady_clock::duration::max();
    asio::steady_timer stop{ioc, 4s};
    stop.async_wait([&](error_code) {
        stream_stopped = true;
        poller.cancel();
    });
    result_probe r;
    set.async_acquire(burst, [&](error_code ec) {
        r.handler()(ec);
        waited = std::chrono::steady_clock::now() - start;
        stream_stopped = true;
        poller.cancel();
        stop.cancel();
    });
    ioc.run_until(std::chrono::steady_clock::now() + 6s);
    EXPECT_EQ(r.calls, 1);
    EXPECT_FALSE(r.ec);
    return {waited, grants};
}

} // namespace

TEST(bucket_set, is_not_starved_by_try_acquire_taking_tokens_as_they_appear)
{
    // The set holds a place in the bucket's queue: try_acquire must leave it its 10 tokens, so
    // it gets them once the bucket has refilled, ~1 s (10 token intervals) after it asked.
    // Blind to that place, try_acquire takes every token and the bucket never holds 10 again.
    const auto [waited, grants] = set_wait_against([](token_bucket& a, int& granted) {
        if (a.try_acquire(1)) ++granted;
    });
    EXPECT_LT(waited, std::chrono::steady_clock::duration{3s}) << "the set was starved: " << grants
                                                               << " single tokens went first";
}

TEST(bucket_set, is_not_starved_by_async_acquire_finding_tokens_free)
{
    // As above, with one async_acquire(1) at a time, started whenever a token is free: it must
    // queue behind the set's place rather than take the token on the fast path.
    bool in_flight = false;
    const auto [waited, grants] = set_wait_against([&in_flight](token_bucket& a, int& granted) {
        if (in_flight || a.available() < 1) return;
        in_flight = true;
        a.async_acquire(1, [&in_flight, &granted](error_code ec) {
            in_flight = false;
            if (!ec) ++granted;
        });
    });
    EXPECT_LT(waited, std::chrono::steady_clock::duration{3s}) << "the set was starved: " << grants
                                                               << " single tokens went first";
}

TEST(bucket_set, try_acquire_leaves_the_tokens_of_a_waiting_set)
{
    // A set of 2 waits for `slow`; its place keeps 2 of `shared`'s 3 tokens. try_acquire, of the
    // bucket or of another set on it, may take the third and no more.
    asio::io_context ioc;
    token_bucket shared{ioc, rate::per_second(1), 3};
    token_bucket slow{ioc, rate::per_second(10), 2};
    ASSERT_TRUE(slow.try_acquire(2));
    bucket_set waiting{shared, slow};
    result_probe r;
    waiting.async_acquire(2, r.handler());
    ioc.poll();
    ASSERT_EQ(r.calls, 0);
    bucket_set other{shared};
    EXPECT_FALSE(other.try_acquire(2));
    EXPECT_FALSE(shared.try_acquire(2));
    EXPECT_TRUE(other.try_acquire(1));
    EXPECT_FALSE(shared.try_acquire(1));
    ioc.run();
    EXPECT_EQ(r.calls, 1);
    EXPECT_FALSE(r.ec);
}
