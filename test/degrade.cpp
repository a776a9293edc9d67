// submit_or, submit with a deadline, and what a limiter tells an HTTP server (available,
// next_available, per-profile stats).
#include <valve/error.hpp>
#include <valve/limiter.hpp>
#include <valve/manager.hpp>
#include <valve/retry.hpp>

#include "support.hpp"

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/thread_pool.hpp>

#include <gtest/gtest.h>

#include <string>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using valve::rate;
using valve::test::code_of;
using clock_type = std::chrono::steady_clock;

namespace {

struct fixture {
    asio::io_context ioc;
    asio::thread_pool pool{1};
    std::shared_ptr<valve::bucket_resource> res;
    std::shared_ptr<valve::limiter> lim;
    asio::steady_timer gate{ioc, clock_type::time_point::max()};
    int gate_done = 0;

    explicit fixture(rate r = rate::unlimited(), std::size_t burst = 1, std::size_t queue = 1)
        : res(std::make_shared<valve::bucket_resource>(ioc.get_executor(), r, burst)),
          lim(std::make_shared<valve::limiter>(ioc.get_executor(), res,
                                               valve::limiter_options{.concurrency = 1, .queue_capacity = queue},
                                               pool.get_executor()))
    {
    }

    // Takes the one slot until `gate.cancel()`.
    void occupy()
    {
        lim->async_submit([this]() -> asio::awaitable<void> {
            try {
                co_await gate.async_wait(asio::use_awaitable);
            } catch (...) {
            }
        }, [this](std::exception_ptr) { ++gate_done; });
    }

    // Runs `aw`, then opens the gate; returns its outcome.
    template <class T>
    std::pair<std::exception_ptr, T> run(asio::awaitable<T> aw)
    {
        return valve::test::run_to_end(ioc, std::move(aw), [this] { gate.cancel(); });
    }
};

} // namespace

TEST(submit_or, runs_the_task_when_the_limiter_takes_it)
{
    fixture f;
    int fallbacks = 0;
    auto [e, v] = f.run(f.lim->submit_or([] { return std::string{"fresh"}; }, [&] {
        ++fallbacks;
        return std::string{"cached"};
    }));
    ASSERT_FALSE(e);
    EXPECT_EQ(v, "fresh");
    EXPECT_EQ(fallbacks, 0);
}

TEST(submit_or, takes_the_fallback_exactly_when_the_queue_is_full)
{
    fixture f; // one running, one queued
    f.occupy();
    bool queued_ran = false;
    f.lim->async_submit([&] { queued_ran = true; }, [](std::exception_ptr) {});
    bool refused_ran = false;
    auto [e, v] = f.run(f.lim->submit_or(
        [&] {
            refused_ran = true;
            return 1;
        },
        []() -> asio::awaitable<int> { co_return 2; })); // an async fallback
    ASSERT_FALSE(e);
    EXPECT_EQ(v, 2);
    EXPECT_FALSE(refused_ran);
    EXPECT_TRUE(queued_ran) << "the queued task still ran once the slot was free";
    EXPECT_EQ(f.lim->stats().rejected, 1u);
}

TEST(submit_or, takes_the_fallback_when_shutting_down)
{
    fixture f;
    f.lim->cancel();
    auto [e, v] = f.run(f.lim->submit_or([] { return 1; }, [] { return 2; }));
    ASSERT_FALSE(e);
    EXPECT_EQ(v, 2);
}

TEST(submit_or, rethrows_the_tasks_own_errors_even_a_queue_full_from_elsewhere)
{
    fixture f;
    int fallbacks = 0;
    auto [e, v] = f.run(f.lim->submit_or([]() -> int { throw valve::error(valve::errc::queue_full, "another limiter"); },
                                         [&] { return ++fallbacks; }));
    EXPECT_EQ(code_of(e), valve::errc::queue_full);
    EXPECT_EQ(fallbacks, 0) << "the task ran and failed: that is not a refusal";
}

TEST(submit_or, the_callers_own_cancellation_is_not_a_refusal)
{
    fixture f{rate::unlimited(), 1, 4};
    f.occupy();
    asio::cancellation_signal cancel;
    std::exception_ptr error;
    int fallbacks = 0;
    bool ran = false;
    asio::co_spawn(f.ioc,
                   f.lim->submit_or(
                       [&] {
                           ran = true;
                           return 1;
                       },
                       [&] { return ++fallbacks; }),
                   asio::bind_cancellation_slot(cancel.slot(), [&](std::exception_ptr e, int) {
                       error = e;
                       f.gate.cancel();
                   }));
    asio::post(f.ioc, [&] { cancel.emit(asio::cancellation_type::terminal); });
    f.ioc.run();
    EXPECT_EQ(code_of(error), asio::error::operation_aborted);
    EXPECT_EQ(fallbacks, 0);
    EXPECT_FALSE(ran);
}

TEST(submit_or, with_a_deadline_takes_the_fallback_when_the_token_or_the_queue_is_too_slow)
{
    fixture f{rate::per(1, 1h), 1, 4};
    f.occupy(); // takes the only token and the only slot
    int ran = 0;
    auto [e1, v1] = f.run(f.lim->submit_or([&] { return ++ran; }, [] { return -1; }, clock_type::now() + 10s));
    ASSERT_FALSE(e1);
    EXPECT_EQ(v1, -1) << "the next token is an hour away";
    fixture g{rate::unlimited(), 1, 4};
    g.occupy();
    auto [e2, v2] = g.run(g.lim->submit_or([&] { return ++ran; }, [] { return -2; }, clock_type::now() + 20ms));
    ASSERT_FALSE(e2);
    EXPECT_EQ(v2, -2) << "still queued behind the running task at the deadline";
    EXPECT_EQ(ran, 0);
}

TEST(submit_with_deadline, fails_at_once_when_the_token_wait_alone_would_pass_it)
{
    fixture f{rate::per(1, 1h), 1, 4};
    auto [e1, v1] = f.run(f.lim->submit([] { return 1; }, clock_type::now() + 1s));
    ASSERT_FALSE(e1);
    EXPECT_EQ(v1, 1);
    f.ioc.restart();
    bool ran = false;
    const auto start = clock_type::now();
    auto [e2, v2] = f.run(f.lim->submit(
        [&] {
            ran = true;
            return 2;
        },
        clock_type::now() + 10s));
    EXPECT_EQ(code_of(e2), valve::errc::would_exceed_deadline);
    EXPECT_FALSE(ran);
    EXPECT_LT(clock_type::now() - start, 5s) << "it did not fail fast";
}

TEST(submit_with_deadline, a_task_still_queued_at_the_deadline_is_removed_with_timed_out)
{
    fixture f{rate::unlimited(), 1, 4};
    f.occupy();
    bool ran = false;
    auto [e, v] = f.run(f.lim->submit(
        [&] {
            ran = true;
            return 1;
        },
        clock_type::now() + 20ms));
    EXPECT_EQ(code_of(e), valve::errc::timed_out);
    EXPECT_FALSE(ran);
    EXPECT_EQ(f.lim->stats().cancelled, 1u);
}

TEST(limiter, tells_its_available_tokens_and_next_free_time)
{
    fixture f{rate::per_second(1), 3, 4};
    EXPECT_EQ(f.lim->available(), 3.0);
    const auto next = f.lim->next_available();
    EXPECT_LE(next, clock_type::now());
    for (int i = 0; i < 3; ++i) f.lim->async_submit([] {}, [](std::exception_ptr) {});
    f.ioc.run();
    EXPECT_LT(f.lim->available(), 1.0);
    const auto wait = f.lim->next_available() - clock_type::now();
    EXPECT_GT(wait, 500ms);
    EXPECT_LE(wait, 1s);
    fixture unlimited;
    EXPECT_EQ(unlimited.lim->available(), std::numeric_limits<double>::infinity());
}

TEST(manager, stats_per_profile_keep_the_counts_of_evicted_limiters)
{
    asio::io_context ioc;
    valve::manager mgr{ioc.get_executor()};
    mgr.register_profile("pro", valve::dedicated_resource(rate::unlimited()), valve::idle_timeout(20ms),
                         valve::run_on(ioc.get_executor()));
    mgr.register_profile("free", valve::shared_resource("k", rate::unlimited()), valve::run_on(ioc.get_executor()));
    for (int i = 0; i < 5; ++i) mgr.get_limiter("pro", "user-" + std::to_string(i))->async_submit([] {}, [](std::exception_ptr) {});
    mgr.get_limiter("free", "a")->async_submit([] {}, [](std::exception_ptr) {});
    const auto give_up = clock_type::now() + 10s;
    while (mgr.limiter_count("pro") > 0 && clock_type::now() < give_up) ioc.run_for(10ms);
    ASSERT_EQ(mgr.limiter_count("pro"), 0u);
    EXPECT_EQ(mgr.stats("pro").submitted, 5u);
    EXPECT_EQ(mgr.stats("pro").completed, 5u);
    EXPECT_EQ(mgr.stats("free").completed, 1u);
    EXPECT_EQ(mgr.stats().completed, 6u) << "the whole manager's counters keep them too";
    EXPECT_THROW((void)mgr.stats("gold"), valve::error);
}

TEST(retry, a_limiter_shutting_down_during_a_backoff_sleep_ends_the_retries)
{
    fixture f{rate::unlimited(), 1, 4};
    int attempts = 0;
    const valve::backoff_policy p = valve::constant_backoff{.interval = 20ms, .max_attempts = 100};
    auto [e, v] = f.run(valve::retry(p, [&]() -> asio::awaitable<int> {
        co_return co_await f.lim->submit([&]() -> int {
            ++attempts;
            throw std::runtime_error("transient");
        });
    }, valve::on_retry([&](const valve::retry_event&) { f.lim->cancel(); })));
    EXPECT_EQ(attempts, 1) << "nothing ran after the shutdown";
    EXPECT_EQ(code_of(e), valve::errc::shutting_down);
}
