#include <valve/token_bucket.hpp>

#include <valve/error.hpp>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/use_future.hpp>

#include <gtest/gtest.h>

#include "support.hpp"

#include <atomic>
#include <chrono>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using boost::system::error_code;
using valve::rate;
using valve::token_bucket;

namespace {

using result = valve::test::completion_probe;

// A bucket whose tokens never come back: waits stay pending until something else happens.
token_bucket drained_frozen(asio::io_context& ioc, std::size_t burst = 1)
{
    token_bucket b{ioc, rate::zero(), burst};
    EXPECT_TRUE(b.try_acquire(burst));
    return b;
}

} // namespace

TEST(token_bucket, try_acquire_grants_the_burst_then_refuses)
{
    asio::io_context ioc;
    token_bucket b{ioc, rate::per_second(1), 3};
    EXPECT_TRUE(b.try_acquire());
    EXPECT_TRUE(b.try_acquire(2));
    EXPECT_FALSE(b.try_acquire());
    EXPECT_FALSE(b.try_acquire(4)); // more than the burst: never
    EXPECT_TRUE(b.try_acquire(0));
    EXPECT_EQ(b.burst(), 3u);
    EXPECT_EQ(b.current_rate(), rate::per_second(1));
    EXPECT_LT(b.available(), 1.0);
}

TEST(token_bucket, release_gives_back_unused_tokens_up_to_the_burst_and_serves_waiters)
{
    asio::io_context ioc;
    token_bucket b{ioc, rate::per(1, 1h), 3};
    ASSERT_TRUE(b.try_acquire(3));
    b.release(2);
    EXPECT_NEAR(b.available(), 2.0, 0.01);
    b.release(5); // never beyond the burst
    EXPECT_NEAR(b.available(), 3.0, 0.01);
    ASSERT_TRUE(b.try_acquire(3));
    // A queued waiter is served by a release, not an hour later.
    result r;
    b.async_acquire(1, r.handler());
    ioc.poll();
    ASSERT_EQ(r.calls, 0);
    b.release(1);
    ioc.poll();
    EXPECT_EQ(r.calls, 1);
    EXPECT_FALSE(r.ec);
    EXPECT_LT(b.available(), 0.01);
}

TEST(token_bucket, async_acquire_never_completes_inside_the_initiating_call)
{
    asio::io_context ioc;
    token_bucket b{ioc, rate::per_second(100), 5};
    result r;
    b.async_acquire(1, r.handler());
    EXPECT_EQ(r.calls, 0);
    ioc.run();
    EXPECT_EQ(r.calls, 1);
    EXPECT_FALSE(r.ec);
}

TEST(token_bucket, waits_for_tokens_on_a_timer)
{
    asio::io_context ioc;
    const auto start = std::chrono::steady_clock::now();
    token_bucket b{ioc, rate::per_second(50), 1};
    ASSERT_TRUE(b.try_acquire());
    result r;
    b.async_acquire(1, r.handler());
    EXPECT_EQ(b.waiters(), 1u);
    ioc.run();
    const auto waited = std::chrono::steady_clock::now() - start;
    EXPECT_EQ(r.calls, 1);
    EXPECT_FALSE(r.ec);
    EXPECT_GE(waited, 20ms); // one token at 50/s is 20 ms away (timers never fire early)
    EXPECT_EQ(b.waiters(), 0u);
}

TEST(token_bucket, works_with_use_awaitable)
{
    asio::io_context ioc;
    token_bucket b{ioc, rate::per_second(1000), 3};
    bool done = false;
    asio::co_spawn(
        ioc,
        [&]() -> asio::awaitable<void> {
            co_await b.async_acquire(3, asio::use_awaitable);
            co_await b.async_acquire(1, asio::use_awaitable);
            done = true;
        },
        asio::detached);
    ioc.run();
    EXPECT_TRUE(done);
}

TEST(token_bucket, coroutine_sees_errors_as_exceptions)
{
    asio::io_context ioc;
    token_bucket b{ioc, rate::per_second(1000), 3};
    error_code caught;
    asio::co_spawn(
        ioc,
        [&]() -> asio::awaitable<void> {
            try {
                co_await b.async_acquire(4, asio::use_awaitable);
            } catch (const boost::system::system_error& e) {
                caught = e.code();
            }
        },
        asio::detached);
    ioc.run();
    EXPECT_EQ(caught, valve::errc::exceeds_burst);
}

TEST(token_bucket, works_with_use_future_from_another_thread)
{
    asio::io_context ioc;
    auto guard = asio::make_work_guard(ioc);
    std::thread runner([&] { ioc.run(); });
    token_bucket b{ioc, rate::per_second(200), 1};
    for (int i = 0; i < 3; ++i) {
        auto f = b.async_acquire(1, asio::use_future);
        EXPECT_NO_THROW(f.get());
    }
    auto f = b.async_acquire(2, asio::use_future);
    // Join the io thread before reading the error: libstdc++'s exception_ptr reference count is
    // not instrumented, so ThreadSanitizer would take the io thread's release of the promise
    // for a race with the read.
    guard.reset();
    runner.join();
    try {
        f.get();
        ADD_FAILURE() << "no exception";
    } catch (const boost::system::system_error& e) {
        EXPECT_EQ(e.code(), valve::errc::exceeds_burst);
    }
}

TEST(token_bucket, deferred_takes_nothing_until_launched)
{
    asio::io_context ioc;
    token_bucket b{ioc, rate::zero(), 2};
    auto op = b.async_acquire(2, asio::deferred);
    EXPECT_DOUBLE_EQ(b.available(), 2.0);
    result r;
    std::move(op)(r.handler());
    EXPECT_DOUBLE_EQ(b.available(), 0.0);
    ioc.run();
    EXPECT_EQ(r.calls, 1);
    EXPECT_FALSE(r.ec);
}

TEST(token_bucket, exceeding_the_burst_fails_at_once_and_not_inline)
{
    asio::io_context ioc;
    token_bucket b{ioc, rate::per_second(10), 2};
    result r;
    b.async_acquire(3, r.handler());
    EXPECT_EQ(r.calls, 0);
    ioc.run();
    EXPECT_EQ(r.calls, 1);
    EXPECT_EQ(r.ec, valve::errc::exceeds_burst);
    EXPECT_DOUBLE_EQ(b.available(), 2.0);
}

TEST(token_bucket, completes_through_the_handlers_associated_executor)
{
    asio::io_context ioc;
    asio::thread_pool other{1};
    auto strand = asio::make_strand(other);
    token_bucket b{ioc, rate::per_second(100), 1};
    std::atomic<int> on_strand{0};
    std::atomic<int> calls{0};
    auto h = [&](error_code) {
        on_strand += strand.running_in_this_thread();
        ++calls;
    };
    b.async_acquire(1, asio::bind_executor(strand, h)); // granted at once
    b.async_acquire(1, asio::bind_executor(strand, h)); // waits 10 ms
    ioc.run();
    other.join();
    EXPECT_EQ(calls.load(), 2);
    EXPECT_EQ(on_strand.load(), 2); // both the immediate and the waited completion
}

TEST(token_bucket, waiters_are_served_first_come_first_served)
{
    asio::io_context ioc;
    token_bucket b{ioc, rate::per_second(500), 2};
    ASSERT_TRUE(b.try_acquire(2));
    std::vector<int> order;
    // A big request at the head is not overtaken by the small ones behind it.
    b.async_acquire(2, [&](error_code ec) { order.push_back(ec ? -1 : 0); });
    for (int i = 1; i <= 5; ++i) b.async_acquire(1, [&, i](error_code ec) { order.push_back(ec ? -1 : i); });
    EXPECT_EQ(b.waiters(), 6u);
    // A try_acquire never overtakes a queued waiter either.
    EXPECT_FALSE(b.try_acquire());
    ioc.run();
    EXPECT_EQ(order, (std::vector<int>{0, 1, 2, 3, 4, 5}));
}

TEST(token_bucket, per_operation_cancellation_takes_no_tokens)
{
    asio::io_context ioc;
    token_bucket b{ioc, rate::zero(), 2};
    ASSERT_TRUE(b.try_acquire(1));
    asio::cancellation_signal sig;
    result r;
    b.async_acquire(2, asio::bind_cancellation_slot(sig.slot(), r.handler()));
    ioc.poll();
    EXPECT_EQ(r.calls, 0);
    EXPECT_EQ(b.waiters(), 1u);
    sig.emit(asio::cancellation_type::terminal);
    ioc.run();
    EXPECT_EQ(r.calls, 1);
    EXPECT_EQ(r.ec, asio::error::operation_aborted);
    EXPECT_EQ(b.waiters(), 0u);
    EXPECT_DOUBLE_EQ(b.available(), 1.0);
    EXPECT_TRUE(b.try_acquire(1));
}

TEST(token_bucket, cancellation_right_after_initiation_is_honoured)
{
    asio::io_context ioc;
    auto b = drained_frozen(ioc);
    asio::cancellation_signal sig;
    result r;
    b.async_acquire(1, asio::bind_cancellation_slot(sig.slot(), r.handler()));
    sig.emit(asio::cancellation_type::total); // before the waiter has reached the queue
    ioc.run();
    EXPECT_EQ(r.calls, 1);
    EXPECT_EQ(r.ec, asio::error::operation_aborted);
}

TEST(token_bucket, awaitable_operators_cancel_the_loser)
{
    using namespace asio::experimental::awaitable_operators;
    asio::io_context ioc;
    auto b = drained_frozen(ioc);
    std::optional<std::size_t> winner;
    asio::co_spawn(
        ioc,
        [&]() -> asio::awaitable<void> {
            asio::steady_timer timer{ioc, 20ms};
            auto v = co_await (b.async_acquire(1, asio::use_awaitable) || timer.async_wait(asio::use_awaitable));
            winner = v.index();
        },
        asio::detached);
    ioc.run();
    ASSERT_TRUE(winner);
    EXPECT_EQ(*winner, 1u);
    EXPECT_EQ(b.waiters(), 0u);
    EXPECT_DOUBLE_EQ(b.available(), 0.0);
}

TEST(token_bucket, cancel_completes_every_waiter_and_the_bucket_goes_on)
{
    asio::io_context ioc;
    auto b = drained_frozen(ioc);
    std::vector<result> rs(3);
    for (auto& r : rs) b.async_acquire(1, r.handler());
    ioc.poll();
    b.cancel();
    ioc.run();
    for (auto& r : rs) {
        EXPECT_EQ(r.calls, 1);
        EXPECT_EQ(r.ec, asio::error::operation_aborted);
    }
    ioc.restart();
    b.set_rate(rate::per_second(1000));
    result later;
    b.async_acquire(1, later.handler());
    ioc.run();
    EXPECT_EQ(later.calls, 1);
    EXPECT_FALSE(later.ec);
}

TEST(token_bucket, destructor_completes_every_waiter)
{
    asio::io_context ioc;
    std::vector<result> rs(3);
    {
        auto b = drained_frozen(ioc);
        for (auto& r : rs) b.async_acquire(1, r.handler());
        ioc.poll();
    }
    ioc.run();
    for (auto& r : rs) {
        EXPECT_EQ(r.calls, 1);
        EXPECT_EQ(r.ec, asio::error::operation_aborted);
    }
}

TEST(token_bucket, rate_change_replans_the_waiters)
{
    asio::io_context ioc;
    auto b = drained_frozen(ioc);
    result r;
    b.async_acquire(1, r.handler());
    ioc.poll();
    EXPECT_EQ(r.calls, 0); // zero rate: waits for ever
    const auto start = std::chrono::steady_clock::now();
    b.set_rate(rate::per_second(100));
    ioc.run();
    EXPECT_EQ(r.calls, 1);
    EXPECT_FALSE(r.ec);
    EXPECT_LT(std::chrono::steady_clock::now() - start, 2s); // not left waiting for ever
}

TEST(token_bucket, slower_rate_fails_a_waiter_that_would_miss_its_deadline)
{
    asio::io_context ioc;
    token_bucket b{ioc, rate::per(1, 10s), 1};
    ASSERT_TRUE(b.try_acquire());
    result r;
    b.async_acquire(1, std::chrono::steady_clock::now() + 30s, r.handler());
    ioc.poll();
    EXPECT_EQ(r.calls, 0);
    b.set_rate(rate::per(1, 1h));
    ioc.run();
    EXPECT_EQ(r.calls, 1);
    EXPECT_EQ(r.ec, valve::errc::would_exceed_deadline);
}

TEST(token_bucket, slower_rate_fails_waiters_behind_the_head_that_would_miss_their_deadline)
{
    asio::io_context ioc;
    token_bucket b{ioc, rate::per(1, 10s), 1};
    ASSERT_TRUE(b.try_acquire());
    const auto now = std::chrono::steady_clock::now();
    result head, patient, hurried;
    b.async_acquire(1, head.handler());                  // due in ~10 s
    b.async_acquire(1, now + 1h, patient.handler());     // due in ~20 s
    b.async_acquire(1, now + 40s, hurried.handler());    // due in ~30 s
    ioc.poll();
    EXPECT_EQ(b.waiters(), 3u);
    b.set_rate(rate::per(1, 15s)); // now ~15, ~30 and ~45 s: only the last misses its deadline
    ioc.poll();
    EXPECT_EQ(hurried.calls, 1);
    EXPECT_EQ(hurried.ec, valve::errc::would_exceed_deadline);
    EXPECT_EQ(patient.calls, 0);
    EXPECT_EQ(head.calls, 0);
    b.cancel();
    ioc.run();
    EXPECT_EQ(patient.ec, asio::error::operation_aborted);
}

TEST(token_bucket, lowering_the_burst_fails_waiters_that_ask_for_more)
{
    asio::io_context ioc;
    auto b = drained_frozen(ioc, 5);
    result big, small;
    b.async_acquire(4, big.handler());
    b.async_acquire(1, small.handler());
    ioc.poll();
    b.set_burst(2);
    EXPECT_EQ(b.burst(), 2u);
    ioc.poll();
    EXPECT_EQ(big.calls, 1);
    EXPECT_EQ(big.ec, valve::errc::exceeds_burst);
    EXPECT_EQ(small.calls, 0); // still waiting for a token of the zero rate
    b.cancel();
    ioc.run();
    EXPECT_EQ(small.ec, asio::error::operation_aborted);
}

TEST(token_bucket, deadline_that_cannot_be_met_fails_at_once_taking_nothing)
{
    asio::io_context ioc;
    token_bucket b{ioc, rate::per_second(1), 2};
    ASSERT_TRUE(b.try_acquire(1));
    result r;
    b.async_acquire(2, std::chrono::steady_clock::now() + 100ms, r.handler());
    EXPECT_EQ(b.waiters(), 0u);
    ioc.run();
    EXPECT_EQ(r.ec, valve::errc::would_exceed_deadline);
    EXPECT_GT(b.available(), 0.99);
    // A deadline that can be met is met.
    result ok;
    ioc.restart();
    b.async_acquire(1, std::chrono::steady_clock::now() + 1s, ok.handler());
    ioc.run();
    EXPECT_FALSE(ok.ec);
}

TEST(token_bucket, next_available_counts_the_queue)
{
    asio::io_context ioc;
    token_bucket b{ioc, rate::per_second(10), 1};
    const auto now = std::chrono::steady_clock::now();
    const auto full = b.next_available();
    EXPECT_LE(full, std::chrono::steady_clock::now());
    ASSERT_TRUE(b.try_acquire());
    EXPECT_GE(b.next_available(), now + 100ms - 1ms);
    const auto one = b.next_available();
    EXPECT_LE(one, std::chrono::steady_clock::now() + 100ms);
    b.async_acquire(1, [](error_code) {});
    EXPECT_GE(b.next_available(), now + 200ms - 1ms);
    b.cancel();
    ioc.run();
}

TEST(token_bucket, invalid_configuration_throws)
{
    asio::io_context ioc;
    EXPECT_THROW(token_bucket(ioc, rate::per_second(-1), 1), valve::error);
    EXPECT_THROW(token_bucket(ioc, rate::per_second(1), 0), valve::error);
    token_bucket b{ioc, rate::per_second(5), 1};
    EXPECT_THROW(b.set_rate(rate::per(1, 0s)), valve::error);
    EXPECT_THROW(b.set_burst(0), valve::error);
    EXPECT_EQ(b.current_rate(), rate::per_second(5));
}

TEST(token_bucket, unlimited_rate_grants_everything)
{
    asio::io_context ioc;
    token_bucket b{ioc, rate::unlimited(), 1};
    int granted = 0;
    for (int i = 0; i < 100; ++i) b.async_acquire(10, [&](error_code ec) { granted += !ec; });
    EXPECT_TRUE(b.try_acquire(1000));
    ioc.run();
    EXPECT_EQ(granted, 100);
}

TEST(token_bucket, many_threads_many_waiters_exact_totals)
{
    // 4 threads run the io_context while 4 others acquire and try_acquire at once; a zero rate
    // makes the totals exact: exactly `tokens` grants, the rest wait until cancelled.
    constexpr std::size_t tokens = 1000;
    asio::io_context ioc;
    auto guard = asio::make_work_guard(ioc);
    std::vector<std::thread> runners;
    for (int i = 0; i < 4; ++i) runners.emplace_back([&] { ioc.run(); });
    token_bucket b{ioc, rate::zero(), tokens};
    std::atomic<std::size_t> granted{0}, aborted{0}, tried{0};
    std::vector<std::thread> users;
    for (int i = 0; i < 4; ++i)
        users.emplace_back([&] {
            for (int k = 0; k < 300; ++k) {
                b.async_acquire(1, [&](error_code ec) { ++(ec ? aborted : granted); });
                if (b.try_acquire()) ++tried;
            }
        });
    for (auto& u : users) u.join();
    const auto give_up = std::chrono::steady_clock::now() + 30s;
    while (granted + tried < tokens && std::chrono::steady_clock::now() < give_up) std::this_thread::yield();
    b.cancel();
    while (granted + aborted < 1200 && std::chrono::steady_clock::now() < give_up) std::this_thread::yield();
    guard.reset();
    for (auto& r : runners) r.join();
    EXPECT_EQ(granted + tried, tokens);
    EXPECT_EQ(granted + aborted, 1200u);
}

// A bucket makes what serves waiters (strand, timer, waiter map) only when someone first has to
// wait: everything that may come before must leave that first waiter working.

TEST(token_bucket, first_waiter_after_rate_burst_changes_and_cancel_is_served)
{
    asio::io_context ioc;
    token_bucket b{ioc, rate::zero(), 1};
    // Nobody has waited yet: none of these has a queue to act on.
    b.set_rate(rate::per(1, 10s));
    b.set_burst(2);
    b.cancel();
    ASSERT_TRUE(b.try_acquire(1)); // the one token it had (a raised burst keeps what accrued)
    ASSERT_FALSE(b.try_acquire(1));
    b.set_rate(rate::per_second(100));
    result r;
    const auto start = std::chrono::steady_clock::now();
    b.async_acquire(1, r.handler());
    EXPECT_EQ(b.waiters(), 1u);
    ioc.run();
    EXPECT_EQ(r.calls, 1);
    EXPECT_FALSE(r.ec);
    EXPECT_GE(std::chrono::steady_clock::now() - start, 5ms); // it waited for its token
    EXPECT_EQ(b.waiters(), 0u);
}

TEST(token_bucket, first_waiter_can_be_cancelled_and_the_next_replanned)
{
    asio::io_context ioc;
    auto b = drained_frozen(ioc);
    asio::cancellation_signal sig;
    result first, second;
    b.async_acquire(1, asio::bind_cancellation_slot(sig.slot(), first.handler()));
    b.async_acquire(1, second.handler());
    ioc.poll();
    sig.emit(asio::cancellation_type::terminal);
    ioc.poll();
    EXPECT_EQ(first.calls, 1);
    EXPECT_EQ(first.ec, asio::error::operation_aborted);
    EXPECT_EQ(second.calls, 0);
    b.set_rate(rate::per_second(1000));
    ioc.run();
    EXPECT_EQ(second.calls, 1);
    EXPECT_FALSE(second.ec);
}

TEST(token_bucket, waiter_arriving_after_a_bucket_that_never_waited_is_gone_is_aborted)
{
    asio::io_context ioc;
    result r;
    {
        auto b = drained_frozen(ioc);
        auto op = b.async_acquire(1, asio::deferred); // holds the bucket's state, launches later
        std::move(op)(r.handler());
        EXPECT_EQ(r.calls, 0);
    } // closed before the waiter reached a queue that did not exist yet
    ioc.run();
    EXPECT_EQ(r.calls, 1);
    EXPECT_EQ(r.ec, asio::error::operation_aborted);

    result late;
    std::optional<decltype(std::declval<token_bucket&>().async_acquire(1, asio::deferred))> op;
    {
        auto b = drained_frozen(ioc);
        op.emplace(b.async_acquire(1, asio::deferred));
    } // closed while nobody had ever waited
    std::move(*op)(late.handler());
    ioc.restart();
    ioc.run();
    EXPECT_EQ(late.calls, 1);
    EXPECT_EQ(late.ec, asio::error::operation_aborted);
}

TEST(token_bucket, first_waiters_from_many_threads_at_once_are_all_served)
{
    // Threads race to make the serving state of a fresh bucket; one wins, nobody is lost.
    asio::io_context ioc;
    auto guard = asio::make_work_guard(ioc);
    std::vector<std::thread> runners;
    for (int i = 0; i < 2; ++i) runners.emplace_back([&] { ioc.run(); });
    constexpr int per_thread = 50;
    for (int round = 0; round < 20; ++round) {
        token_bucket b{ioc, rate::per_second(100'000), 1};
        ASSERT_TRUE(b.try_acquire());
        std::atomic<int> granted{0};
        std::vector<std::thread> users;
        for (int i = 0; i < 4; ++i)
            users.emplace_back([&] {
                for (int k = 0; k < per_thread; ++k) b.async_acquire(1, [&](error_code ec) { granted += !ec; });
            });
        for (auto& u : users) u.join();
        const auto give_up = std::chrono::steady_clock::now() + 30s;
        while (granted < 4 * per_thread && std::chrono::steady_clock::now() < give_up) std::this_thread::yield();
        EXPECT_EQ(granted.load(), 4 * per_thread);
    }
    guard.reset();
    for (auto& r : runners) r.join();
}
