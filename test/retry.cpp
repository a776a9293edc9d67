#include <valve/error.hpp>
#include <valve/retry.hpp>

#include "support.hpp"

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>

#include <gtest/gtest.h>

#include <stdexcept>
#include <string>
#include <vector>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using std::chrono::nanoseconds;

namespace {

using valve::test::run_to_end;

struct transient : std::runtime_error {
    using std::runtime_error::runtime_error;
};

std::string message_of(const std::exception_ptr& e)
{
    try {
        if (e) std::rethrow_exception(e);
    } catch (const std::exception& x) {
        return x.what();
    }
    return {};
}

const valve::backoff_policy fast = valve::backoff_policy{valve::exponential_backoff{
                                       .initial = 1ms, .multiplier = 2.0, .max_interval = 4ms, .jitter = 0.5,
                                       .max_elapsed = 10s, .max_attempts = 5}}
                                       .seeded(7);

} // namespace

TEST(retry, retries_transient_failures_with_the_policys_delays_then_returns_the_result)
{
    asio::io_context ioc;
    int calls = 0;
    std::vector<valve::retry_event> seen;
    auto op = [&]() -> asio::awaitable<int> {
        if (++calls < 3) throw transient("flaky " + std::to_string(calls));
        co_return 42;
    };
    auto [e, v] = run_to_end(ioc, valve::retry(fast, op, valve::on_retry([&](const valve::retry_event& r) { seen.push_back(r); })));
    ASSERT_FALSE(e) << message_of(e);
    EXPECT_EQ(v, 42);
    EXPECT_EQ(calls, 3);
    // The sleeps are the seeded policy's own sequence.
    auto s = fast.schedule();
    ASSERT_EQ(seen.size(), 2u);
    for (std::size_t i = 0; i < seen.size(); ++i) {
        EXPECT_EQ(seen[i].attempt, i + 1);
        EXPECT_EQ(seen[i].delay, s.next(0ns).value()) << i;
        EXPECT_EQ(message_of(seen[i].error), "flaky " + std::to_string(i + 1));
    }
}

TEST(retry, a_plain_callable_is_retried_too)
{
    asio::io_context ioc;
    int calls = 0;
    auto [e, v] = run_to_end(ioc, valve::retry(fast, [&] {
                          if (++calls < 2) throw transient("once");
                          return std::string{"ok"};
                      }));
    ASSERT_FALSE(e) << message_of(e);
    EXPECT_EQ(v, "ok");
    EXPECT_EQ(calls, 2);
}

TEST(retry, when_attempts_run_out_the_last_error_is_rethrown)
{
    asio::io_context ioc;
    int calls = 0;
    auto [e, v] = run_to_end(ioc, valve::retry(fast, [&]() -> asio::awaitable<int> {
                          throw transient("failure " + std::to_string(++calls));
                          co_return 0;
                      }));
    EXPECT_EQ(calls, 5);
    EXPECT_EQ(message_of(e), "failure 5");
    EXPECT_THROW(std::rethrow_exception(e), transient);
}

TEST(retry, max_elapsed_bounds_the_total_sleep)
{
    asio::io_context ioc;
    const valve::backoff_policy p =
        valve::constant_backoff{.interval = 5ms, .max_elapsed = 30ms, .max_attempts = 1000};
    int calls = 0;
    nanoseconds slept{0};
    auto [e, v] = run_to_end(ioc, valve::retry(
                              p,
                              [&]() -> int { throw transient("attempt " + std::to_string(++calls)); },
                              valve::on_retry([&](const valve::retry_event& r) { slept += r.delay; })));
    EXPECT_TRUE(e);
    EXPECT_GE(calls, 2);
    EXPECT_LE(calls, 7) << "each sleep is 5 ms, so at most 30/5 + 1 attempts fit in 30 ms";
    EXPECT_LE(slept, nanoseconds{30ms});
    EXPECT_EQ(message_of(e), "attempt " + std::to_string(calls));
}

TEST(retry, a_permanent_error_stops_at_once_and_its_inner_error_is_rethrown)
{
    asio::io_context ioc;
    int calls = 0;
    auto [e, v] = run_to_end(ioc, valve::retry(fast, [&]() -> asio::awaitable<int> {
                          if (++calls == 2) throw valve::permanent(std::invalid_argument("404 not found"));
                          throw transient("503");
                          co_return 0;
                      }));
    EXPECT_EQ(calls, 2);
    EXPECT_THROW(std::rethrow_exception(e), std::invalid_argument);
    EXPECT_EQ(message_of(e), "404 not found");
}

TEST(retry, retry_if_decides_what_is_transient)
{
    asio::io_context ioc;
    int calls = 0;
    auto is_transient = [](const std::exception_ptr& e) {
        try {
            std::rethrow_exception(e);
        } catch (const transient&) {
            return true;
        } catch (...) {
            return false;
        }
    };
    auto [e, v] = run_to_end(ioc, valve::retry(
                              fast,
                              [&]() -> int {
                                  if (++calls == 1) throw transient("again");
                                  throw std::logic_error("bug");
                              },
                              valve::retry_if(is_transient)));
    EXPECT_EQ(calls, 2);
    EXPECT_THROW(std::rethrow_exception(e), std::logic_error);
}

TEST(retry, shutting_down_is_never_retried)
{
    asio::io_context ioc;
    int calls = 0;
    auto [e, v] = run_to_end(ioc, valve::retry(
                              fast,
                              [&]() -> int {
                                  ++calls;
                                  throw valve::error(valve::errc::shutting_down);
                              },
                              valve::retry_if([](const std::exception_ptr&) { return true; })));
    EXPECT_EQ(calls, 1);
    EXPECT_EQ(valve::test::code_of(e), valve::errc::shutting_down);
}

TEST(retry, cancelling_during_a_backoff_sleep_ends_it_at_once)
{
    asio::io_context ioc;
    const valve::backoff_policy slow = valve::constant_backoff{.interval = 1h, .max_elapsed = 2h, .max_attempts = 3};
    asio::cancellation_signal cancel;
    int calls = 0;
    std::exception_ptr error;
    int completions = 0;
    asio::co_spawn(ioc,
                   valve::retry(
                       slow,
                       [&]() -> int {
                           ++calls;
                           throw transient("down");
                       },
                       // The sleep starts right after this callback: cancel it from the next turn.
                       valve::on_retry([&](const valve::retry_event&) {
                           asio::post(ioc, [&] { cancel.emit(asio::cancellation_type::terminal); });
                       })),
                   asio::bind_cancellation_slot(cancel.slot(), [&](std::exception_ptr e, int) {
                       error = e;
                       ++completions;
                   }));
    const auto start = std::chrono::steady_clock::now();
    ioc.run();
    EXPECT_LT(std::chrono::steady_clock::now() - start, 30s) << "the hour-long sleep was not cut short";
    EXPECT_EQ(completions, 1);
    EXPECT_EQ(calls, 1);
    EXPECT_EQ(valve::test::code_of(error), asio::error::operation_aborted) << message_of(error);
}

TEST(retry, the_longest_backoff_sleeps_rather_than_retrying_at_once)
{
    // A sleep of nanoseconds::max() must not wrap into an immediate retry.
    asio::io_context ioc;
    const valve::backoff_policy longest =
        valve::constant_backoff{.interval = nanoseconds::max(), .max_elapsed = nanoseconds::max(), .max_attempts = 3};
    asio::cancellation_signal cancel;
    int calls = 0;
    nanoseconds announced{0};
    int completions = 0;
    asio::co_spawn(ioc,
                   valve::retry(
                       longest,
                       [&]() -> int {
                           ++calls;
                           throw transient("down");
                       },
                       valve::on_retry([&](const valve::retry_event& ev) { announced = ev.delay; })),
                   asio::bind_cancellation_slot(cancel.slot(), [&](std::exception_ptr, int) { ++completions; }));
    ioc.run_for(50ms);
    EXPECT_EQ(calls, 1) << "retried at once instead of sleeping";
    EXPECT_EQ(announced, nanoseconds::max());
    cancel.emit(asio::cancellation_type::terminal);
    ioc.run_for(5s);
    EXPECT_EQ(completions, 1);
    EXPECT_EQ(calls, 1);
}

TEST(retry_budget, allows_retries_up_to_the_ratio_of_recent_calls)
{
    valve::retry_budget b{{.ratio = 0.2, .min_retries_per_second = 0.0, .window = 10s}};
    const valve::retry_budget::time_point t0{std::chrono::hours(1)};
    for (int i = 0; i < 10; ++i) b.record_call(t0);
    EXPECT_TRUE(b.try_retry(t0 + 1s));
    EXPECT_TRUE(b.try_retry(t0 + 2s));
    EXPECT_FALSE(b.try_retry(t0 + 3s)) << "20% of 10 calls is 2 retries";
    EXPECT_EQ(b.refused(), 1u);
    EXPECT_EQ(b.calls(t0 + 3s), 10u);
    EXPECT_EQ(b.retries(t0 + 3s), 2u);
    // Once the calls leave the window, so does the room they made.
    EXPECT_EQ(b.calls(t0 + 11s), 0u);
    EXPECT_FALSE(b.try_retry(t0 + 11s));
    for (int i = 0; i < 5; ++i) b.record_call(t0 + 12s);
    EXPECT_TRUE(b.try_retry(t0 + 12s)) << "5 new calls make room for 1 retry";
    EXPECT_FALSE(b.try_retry(t0 + 12s));
}

TEST(retry_budget, the_floor_allows_a_few_retries_without_calls)
{
    valve::retry_budget b{{.ratio = 0.1, .min_retries_per_second = 0.5, .window = 10s}};
    const valve::retry_budget::time_point t0{std::chrono::hours(1)};
    for (int i = 0; i < 5; ++i) EXPECT_TRUE(b.try_retry(t0)) << i;
    EXPECT_FALSE(b.try_retry(t0)) << "0.5/s over 10 s is 5 retries";
    EXPECT_TRUE(b.try_retry(t0 + 10s)) << "the first retries have left the window";
}

TEST(retry_budget, bad_options_are_refused)
{
    EXPECT_THROW(valve::retry_budget({.ratio = -1.0}), valve::error);
    EXPECT_THROW(valve::retry_budget({.ratio = std::nan("")}), valve::error);
    EXPECT_THROW(valve::retry_budget({.window = 0s}), valve::error);
}

TEST(retry, a_spent_budget_stops_retrying_and_reports_the_error)
{
    asio::io_context ioc;
    auto budget = std::make_shared<valve::retry_budget>(
        valve::retry_budget_options{.ratio = 0.5, .min_retries_per_second = 0.0, .window = 10s});
    int calls = 0;
    auto op = [&]() -> int { throw transient("down " + std::to_string(++calls)); };
    // The first call makes room for half a retry: none yet.
    auto [e1, v1] = run_to_end(ioc, valve::retry(fast, op, valve::with_budget(budget)));
    EXPECT_EQ(calls, 1);
    EXPECT_EQ(message_of(e1), "down 1");
    // The second call makes a whole one: one retry, then the budget is spent again.
    ioc.restart();
    auto [e2, v2] = run_to_end(ioc, valve::retry(fast, op, valve::with_budget(budget)));
    EXPECT_EQ(calls, 3);
    EXPECT_EQ(message_of(e2), "down 3");
    EXPECT_EQ(budget->calls(), 2u);
    EXPECT_EQ(budget->retries(), 1u);
    EXPECT_EQ(budget->refused(), 2u);
}
