#include <valve/limiter.hpp>

#include <valve/error.hpp>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <gtest/gtest.h>

#include "support.hpp"

#include <atomic>
#include <chrono>
#include <future>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using boost::system::error_code;
using valve::limiter;
using valve::limiter_options;
using valve::rate;

namespace {

std::shared_ptr<valve::bucket_resource> unlimited(asio::io_context& ioc)
{
    return std::make_shared<valve::bucket_resource>(ioc.get_executor(), rate::unlimited());
}

using valve::test::code_of;

// A gate that blocking tasks wait on, so a test decides when they finish (no sleeping).
struct gate {
    std::promise<void> p;
    std::shared_future<void> f = p.get_future().share();
    void open() { p.set_value(); }
    void wait() const { f.wait(); }
};

} // namespace

TEST(limiter, blocking_task_result_comes_back_on_the_submitters_executor)
{
    asio::io_context ioc;
    asio::thread_pool pool{2};
    auto lim = std::make_shared<limiter>(ioc.get_executor(), unlimited(ioc), limiter_options{}, pool.get_executor());
    int result = 0;
    bool on_io_thread = false;
    std::thread::id task_thread;
    const auto io_thread = std::this_thread::get_id();
    asio::co_spawn(
        ioc,
        [&]() -> asio::awaitable<void> {
            result = co_await lim->submit([&] {
                task_thread = std::this_thread::get_id();
                return 42;
            });
            on_io_thread = std::this_thread::get_id() == io_thread;
        },
        asio::detached);
    ioc.run();
    EXPECT_EQ(result, 42);
    EXPECT_TRUE(on_io_thread);
    EXPECT_NE(task_thread, io_thread); // the blocking task ran on the pool
    pool.join();
}

TEST(limiter, exceptions_are_rethrown_and_the_pool_keeps_going)
{
    asio::io_context ioc;
    asio::thread_pool pool{1};
    auto lim = std::make_shared<limiter>(ioc.get_executor(), unlimited(ioc), limiter_options{}, pool.get_executor());
    std::string caught;
    int after = 0;
    asio::co_spawn(
        ioc,
        [&]() -> asio::awaitable<void> {
            try {
                co_await lim->submit([]() -> int { throw std::runtime_error("upstream said no"); });
            } catch (const std::runtime_error& e) {
                caught = e.what();
            }
            after = co_await lim->submit([] { return 7; });
            co_await lim->submit([] {}); // void tasks too
        },
        asio::detached);
    ioc.run();
    EXPECT_EQ(caught, "upstream said no");
    EXPECT_EQ(after, 7);
    pool.join();
}

TEST(limiter, async_tasks_run_on_the_submitters_executor)
{
    asio::io_context ioc;
    asio::thread_pool pool{1};
    auto lim = std::make_shared<limiter>(ioc.get_executor(), unlimited(ioc), limiter_options{}, pool.get_executor());
    std::string body;
    std::thread::id task_thread;
    asio::co_spawn(
        ioc,
        [&]() -> asio::awaitable<void> {
            body = co_await lim->submit([&]() -> asio::awaitable<std::string> {
                task_thread = std::this_thread::get_id();
                co_return "fetched";
            });
        },
        asio::detached);
    ioc.run();
    EXPECT_EQ(body, "fetched");
    EXPECT_EQ(task_thread, std::this_thread::get_id()); // no hop to the pool
    pool.join();
}

TEST(limiter, any_completion_token_works)
{
    asio::io_context ioc;
    asio::thread_pool pool{1};
    auto lim = std::make_shared<limiter>(ioc.get_executor(), unlimited(ioc), limiter_options{}, pool.get_executor());
    int calls = 0, value = 0;
    lim->async_submit([] { return 5; }, [&](std::exception_ptr e, int v) {
        calls += !e;
        value = v;
    });
    EXPECT_EQ(calls, 0); // never inside the initiating call
    ioc.run();
    EXPECT_EQ(calls, 1);
    EXPECT_EQ(value, 5);
    pool.join();
}

TEST(limiter, never_runs_more_than_its_concurrency)
{
    asio::io_context ioc;
    asio::thread_pool pool{4};
    auto lim = std::make_shared<limiter>(ioc.get_executor(), unlimited(ioc), limiter_options{.concurrency = 2},
                                         pool.get_executor());
    std::atomic<int> now_running{0}, most{0}, done{0};
    gate release;
    for (int i = 0; i < 6; ++i)
        lim->async_submit(
            [&] {
                const int r = ++now_running;
                for (int m = most; m < r && !most.compare_exchange_weak(m, r);) {
                }
                release.wait();
                --now_running;
            },
            [&](std::exception_ptr) { ++done; });
    std::thread io([&] { ioc.run(); });
    // Four pool threads are free, but only two tasks may start.
    const auto give_up = std::chrono::steady_clock::now() + 30s;
    while (now_running < 2 && std::chrono::steady_clock::now() < give_up) std::this_thread::yield();
    EXPECT_EQ(lim->running(), 2u);
    EXPECT_EQ(lim->queued(), 4u);
    release.open();
    io.join();
    EXPECT_EQ(done.load(), 6);
    EXPECT_EQ(most.load(), 2);
    pool.join();
}

TEST(limiter, a_full_queue_says_no_at_once)
{
    asio::io_context ioc;
    asio::thread_pool pool{1};
    auto lim = std::make_shared<limiter>(ioc.get_executor(), unlimited(ioc),
                                         limiter_options{.concurrency = 1, .queue_capacity = 2}, pool.get_executor());
    gate release;
    std::vector<error_code> outcomes(4);
    std::exception_ptr refusal;
    std::atomic<int> completed{0};
    for (int i = 0; i < 4; ++i)
        lim->async_submit([&] { release.wait(); }, [&, i](std::exception_ptr e) {
            outcomes[i] = code_of(e);
            if (i == 3) refusal = e;
            ++completed;
        });
    // One runs, two wait, the fourth is refused without waiting for anything to finish.
    while (completed < 1) ioc.run_one();
    EXPECT_EQ(outcomes[3], valve::errc::queue_full);
    EXPECT_THROW(std::rethrow_exception(refusal), valve::error); // valve's own error type
    release.open();
    ioc.run();
    EXPECT_FALSE(outcomes[0]);
    EXPECT_FALSE(outcomes[1]);
    EXPECT_FALSE(outcomes[2]);
    pool.join();
}

TEST(limiter, wait_policy_lets_the_submitter_wait_for_room)
{
    asio::io_context ioc;
    asio::thread_pool pool{1};
    auto lim = std::make_shared<limiter>(
        ioc.get_executor(), unlimited(ioc),
        limiter_options{.concurrency = 1, .queue_capacity = 1, .on_queue_full = valve::queue_full_policy::wait},
        pool.get_executor());
    std::vector<int> order;
    for (int i = 0; i < 4; ++i) lim->async_submit([i] { return i; }, [&](std::exception_ptr e, int v) {
        if (!e) order.push_back(v);
    });
    ioc.run();
    EXPECT_EQ(order, (std::vector<int>{0, 1, 2, 3}));
    pool.join();
}

// Tasks waiting for room sit in a plain list until a cancellation has to find one of them;
// the list is then indexed. Cancellations find their tasks in both parts, and the rest still
// run in the order they were submitted.
TEST(limiter, tasks_waiting_for_room_can_be_cancelled_and_keep_their_order)
{
    asio::io_context ioc;
    asio::thread_pool pool{1};
    auto lim = std::make_shared<limiter>(
        ioc.get_executor(), unlimited(ioc),
        limiter_options{.concurrency = 1, .queue_capacity = 1, .on_queue_full = valve::queue_full_policy::wait},
        pool.get_executor());
    gate first;
    constexpr int n = 13;
    std::vector<int> order;
    std::vector<error_code> outcome(n);
    std::vector<asio::cancellation_signal> signals(n);
    auto submit = [&](int i) {
        lim->async_submit(
            [&, i] {
                if (i == 0) first.wait(); // holds the only slot until the test opens the gate
                return i;
            },
            asio::bind_cancellation_slot(signals[i].slot(), [&, i](std::exception_ptr e, int v) {
                outcome[i] = code_of(e);
                if (!e) order.push_back(v);
            }));
    };
    // 0 runs, 1 is queued, 2..9 wait for room.
    for (int i = 0; i < 10; ++i) submit(i);
    signals[5].emit(asio::cancellation_type::terminal); // found after indexing 2..9
    submit(10);
    submit(11);                                         // 10 and 11 join the list behind them
    signals[10].emit(asio::cancellation_type::terminal); // the list is indexed again
    signals[3].emit(asio::cancellation_type::terminal);  // found in the index made first
    submit(12);                                           // the list again, behind the index
    EXPECT_EQ(lim->queued(), 9u);                         // 1, 2, 4, 6, 7, 8, 9, 11, 12
    first.open();
    ioc.run();
    EXPECT_EQ(order, (std::vector<int>{0, 1, 2, 4, 6, 7, 8, 9, 11, 12}));
    EXPECT_EQ(outcome[3], asio::error::operation_aborted);
    EXPECT_EQ(outcome[5], asio::error::operation_aborted);
    EXPECT_EQ(outcome[10], asio::error::operation_aborted);
    EXPECT_EQ(lim->stats().cancelled, 3u);
    EXPECT_EQ(lim->stats().completed, 10u);
    pool.join();
}

TEST(limiter, tasks_pass_the_resources_rate)
{
    asio::io_context ioc;
    asio::thread_pool pool{1}; // one worker: the recorded times are in the order the tasks ran
    auto limits = std::make_shared<valve::bucket_resource>(ioc.get_executor(), rate::per_second(50), 1);
    auto lim = std::make_shared<limiter>(ioc.get_executor(), limits, limiter_options{.concurrency = 4},
                                         pool.get_executor());
    const auto start = std::chrono::steady_clock::now();
    std::vector<std::chrono::steady_clock::time_point> ran(5);
    for (int i = 0; i < 5; ++i)
        lim->async_submit([&, i] { ran[i] = std::chrono::steady_clock::now(); }, [](std::exception_ptr) {});
    ioc.run();
    // Burst 1, then one every 20 ms: the fifth runs no earlier than 80 ms after the start.
    EXPECT_GE(ran[4] - start, 80ms);
    for (int i = 1; i < 5; ++i) EXPECT_GE(ran[i], ran[i - 1]); // FIFO
    pool.join();
}

TEST(limiter, cancelling_a_queued_task_means_it_never_runs_and_takes_no_token)
{
    using namespace asio::experimental::awaitable_operators;
    asio::io_context ioc;
    asio::thread_pool pool{1};
    auto limits = std::make_shared<valve::bucket_resource>(ioc.get_executor(), rate::zero(), 2);
    ASSERT_TRUE(limits->try_acquire(2)); // no tokens, and none will come
    auto lim = std::make_shared<limiter>(ioc.get_executor(), limits, limiter_options{}, pool.get_executor());
    bool ran = false;
    std::optional<std::size_t> winner;
    asio::co_spawn(
        ioc,
        [&]() -> asio::awaitable<void> {
            asio::steady_timer timeout{ioc, 20ms};
            auto v = co_await (lim->submit([&] { ran = true; }) || timeout.async_wait(asio::use_awaitable));
            winner = v.index();
        },
        asio::detached);
    ioc.run();
    ASSERT_TRUE(winner);
    EXPECT_EQ(*winner, 1u);
    EXPECT_FALSE(ran);
    EXPECT_EQ(lim->queued(), 0u);
    pool.join();
}

TEST(limiter, a_task_cancelled_as_its_token_is_granted_gives_the_token_back)
{
    // The limiter's decisions run on `ioc`, the bucket's queue on `bucket_ioc`: the token is
    // granted there, the cancellation lands before the grant reaches the limiter.
    asio::io_context ioc, bucket_ioc;
    asio::thread_pool pool{1};
    auto limits = std::make_shared<valve::bucket_resource>(bucket_ioc.get_executor(), rate::per(1, 1h), 1);
    ASSERT_TRUE(limits->try_acquire(1)); // empty for the next hour
    auto lim = std::make_shared<limiter>(ioc.get_executor(), limits, limiter_options{}, pool.get_executor());
    asio::cancellation_signal signal;
    bool ran = false;
    error_code heard = asio::error::would_block;
    lim->async_submit([&] { ran = true; },
                      asio::bind_cancellation_slot(signal.slot(), [&](std::exception_ptr e) { heard = code_of(e); }));
    bucket_ioc.poll(); // the task's wait joins the bucket's queue
    ASSERT_EQ(limits->primary().waiters(), 1u);
    // A token given back to the bucket (by someone else) grants the wait; its completion goes
    // to `ioc`, not run yet.
    limits->primary().release(1);
    bucket_ioc.run();
    ASSERT_EQ(limits->primary().waiters(), 0u);
    ASSERT_LT(limits->available(), 0.01); // the grant took the token
    signal.emit(asio::cancellation_type::terminal);
    ioc.run();
    EXPECT_FALSE(ran);
    EXPECT_EQ(heard, asio::error::operation_aborted);
    EXPECT_GT(limits->available(), 0.99) << "the unused token was not given back";
    EXPECT_TRUE(limits->try_acquire(1));
    pool.join();
}

TEST(limiter, cancellation_with_a_signal_reports_operation_aborted)
{
    asio::io_context ioc;
    asio::thread_pool pool{1};
    auto limits = std::make_shared<valve::bucket_resource>(ioc.get_executor(), rate::zero(), 1);
    ASSERT_TRUE(limits->try_acquire(1));
    auto lim = std::make_shared<limiter>(ioc.get_executor(), limits, limiter_options{}, pool.get_executor());
    asio::cancellation_signal head, second;
    error_code head_ec, second_ec;
    lim->async_submit([] {}, asio::bind_cancellation_slot(head.slot(), [&](std::exception_ptr e) { head_ec = code_of(e); }));
    lim->async_submit([] {},
                      asio::bind_cancellation_slot(second.slot(), [&](std::exception_ptr e) { second_ec = code_of(e); }));
    ioc.poll();
    EXPECT_EQ(lim->queued(), 2u);
    second.emit(asio::cancellation_type::terminal); // behind the head
    head.emit(asio::cancellation_type::terminal);   // the head, waiting for its token
    ioc.run();
    EXPECT_EQ(head_ec, asio::error::operation_aborted);
    EXPECT_EQ(second_ec, asio::error::operation_aborted);
    EXPECT_EQ(lim->queued(), 0u);
    EXPECT_DOUBLE_EQ(limits->primary().available(), 0.0);
    pool.join();
}

TEST(limiter, shutdown_drains_then_refuses)
{
    asio::io_context ioc;
    asio::thread_pool pool{2};
    auto limits = std::make_shared<valve::bucket_resource>(ioc.get_executor(), rate::per_second(200), 1);
    auto lim = std::make_shared<limiter>(ioc.get_executor(), limits, limiter_options{.concurrency = 2},
                                         pool.get_executor());
    std::atomic<int> ran{0};
    int ok = 0;
    for (int i = 0; i < 5; ++i) lim->async_submit([&] { ++ran; }, [&](std::exception_ptr e) { ok += !e; });
    error_code shut = valve::errc::timed_out;
    lim->async_shutdown(5s, [&](error_code ec) { shut = ec; });
    error_code late;
    lim->async_submit([&] { ++ran; }, [&](std::exception_ptr e) { late = code_of(e); });
    ioc.run();
    EXPECT_FALSE(shut);
    EXPECT_EQ(ok, 5); // every task submitted before the shutdown ran
    EXPECT_EQ(ran.load(), 5);
    EXPECT_EQ(late, valve::errc::shutting_down);
    pool.join();
}

TEST(limiter, shutdown_grace_aborts_what_cannot_finish)
{
    asio::io_context ioc;
    asio::thread_pool pool{1};
    auto limits = std::make_shared<valve::bucket_resource>(ioc.get_executor(), rate::zero(), 1);
    auto lim = std::make_shared<limiter>(ioc.get_executor(), limits, limiter_options{}, pool.get_executor());
    std::vector<error_code> outcomes(3, valve::errc::timed_out);
    for (int i = 0; i < 3; ++i) lim->async_submit([] {}, [&, i](std::exception_ptr e) { outcomes[i] = code_of(e); });
    error_code shut = valve::errc::timed_out;
    lim->async_shutdown(30ms, [&](error_code ec) { shut = ec; });
    ioc.run();
    EXPECT_FALSE(shut);
    // The first had the burst's token; the others could never get one and were aborted.
    ASSERT_EQ(outcomes.size(), 3u);
    EXPECT_FALSE(outcomes[0]);
    EXPECT_EQ(outcomes[1], asio::error::operation_aborted);
    EXPECT_EQ(outcomes[2], asio::error::operation_aborted);
    pool.join();
}

TEST(limiter, bad_options_throw)
{
    asio::io_context ioc;
    EXPECT_THROW(limiter(ioc.get_executor(), unlimited(ioc), limiter_options{.concurrency = 0}, ioc.get_executor()),
                 valve::error);
    EXPECT_THROW(limiter(ioc.get_executor(), unlimited(ioc),
                         limiter_options{.queue_capacity = 0, .on_queue_full = valve::queue_full_policy::wait},
                         ioc.get_executor()),
                 valve::error);
    EXPECT_THROW(limiter(ioc.get_executor(), nullptr, limiter_options{}, ioc.get_executor()), valve::error);
}

TEST(limiter, every_task_runs_exactly_once_or_its_submitter_hears_why)
{
    // Thousands of tasks from two threads, a fifth of them cancelled at random moments, and a
    // shutdown midway: each submission completes exactly once, a task runs at most once, and it
    // ran exactly when its submitter was told it succeeded.
    constexpr int per_thread = 2500;
    constexpr int total = 2 * per_thread;
    asio::io_context ioc;
    auto guard = asio::make_work_guard(ioc);
    std::vector<std::thread> io;
    for (int i = 0; i < 2; ++i) io.emplace_back([&] { ioc.run(); });
    asio::thread_pool pool{2};
    auto limits = std::make_shared<valve::bucket_resource>(ioc.get_executor(), rate::per_second(50'000), 20);
    auto lim = std::make_shared<limiter>(ioc.get_executor(), limits,
                                         limiter_options{.concurrency = 4, .queue_capacity = 300}, pool.get_executor());
    std::vector<std::atomic<int>> runs(total), completions(total);
    std::vector<error_code> outcome(total);
    std::vector<asio::cancellation_signal> signals(total);
    std::atomic<int> ok{0}, full{0}, shutting{0}, aborted{0}, other{0};
    std::atomic<bool> shut_done{false};
    auto submitter = [&](int first) {
        std::uint32_t seed = static_cast<std::uint32_t>(first) * 2654435761u + 1;
        for (int i = first; i < first + per_thread; ++i) {
            lim->async_submit([&, i] { ++runs[i]; },
                              asio::bind_cancellation_slot(signals[i].slot(), [&, i](std::exception_ptr e) {
                                  const auto ec = code_of(e);
                                  outcome[i] = ec;
                                  ++completions[i];
                                  if (!ec)
                                      ++ok;
                                  else if (ec == valve::errc::queue_full)
                                      ++full;
                                  else if (ec == valve::errc::shutting_down)
                                      ++shutting;
                                  else if (ec == asio::error::operation_aborted)
                                      ++aborted;
                                  else
                                      ++other;
                              }));
            seed = seed * 1664525u + 1013904223u;
            if (seed % 5 == 0) signals[i].emit(asio::cancellation_type::terminal);
            if (first == 0 && i == per_thread / 2)
                lim->async_shutdown(5ms, [&](error_code) { shut_done = true; });
        }
    };
    std::thread a(submitter, 0), b(submitter, per_thread);
    a.join();
    b.join();
    const auto give_up = std::chrono::steady_clock::now() + 60s;
    while ((ok + full + shutting + aborted + other < total || !shut_done) && std::chrono::steady_clock::now() < give_up)
        std::this_thread::yield();
    guard.reset();
    for (auto& t : io) t.join();
    pool.join();

    EXPECT_TRUE(shut_done.load());
    EXPECT_EQ(ok + full + shutting + aborted, total);
    EXPECT_EQ(other.load(), 0);
    for (int i = 0; i < total; ++i) {
        ASSERT_EQ(completions[i].load(), 1) << "task " << i;
        ASSERT_LE(runs[i].load(), 1) << "task " << i;
        ASSERT_EQ(runs[i].load() == 1, !outcome[i]) << "task " << i;
    }
    EXPECT_GT(ok.load(), 0);
    EXPECT_GT(shutting.load(), 0);
    EXPECT_GT(aborted.load(), 0);
}

TEST(limiter, stats_count_what_happened)
{
    asio::io_context ioc;
    asio::thread_pool pool{1};
    // Two tokens at once, then one every 100 ms: the third task surely waits for its token.
    auto limits = std::make_shared<valve::bucket_resource>(ioc.get_executor(), rate::per_second(10), 2);
    auto lim = std::make_shared<limiter>(ioc.get_executor(), limits,
                                         limiter_options{.concurrency = 1, .queue_capacity = 3}, pool.get_executor());
    asio::cancellation_signal sig;
    gate everything_submitted; // nothing finishes before all five are in
    lim->async_submit([&] {
        everything_submitted.wait();
        return 1;
    }, [](std::exception_ptr, int) {});
    lim->async_submit([]() -> int { throw std::runtime_error("no"); }, [](std::exception_ptr, int) {});
    lim->async_submit([] { return 3; }, [](std::exception_ptr, int) {}); // waits ~100 ms for its token
    lim->async_submit([] { return 4; }, asio::bind_cancellation_slot(sig.slot(), [](std::exception_ptr, int) {}));
    lim->async_submit([] { return 5; }, [](std::exception_ptr, int) {}); // refused: queue full
    sig.emit(asio::cancellation_type::terminal);                          // the fourth, still queued
    const auto before = std::chrono::steady_clock::now();
    everything_submitted.open();
    ioc.run();
    pool.join();
    const valve::limiter_stats st = lim->stats();
    EXPECT_EQ(st.submitted, 5u);
    EXPECT_EQ(st.completed, 2u);
    EXPECT_EQ(st.failed, 1u);
    EXPECT_EQ(st.cancelled, 1u);
    EXPECT_EQ(st.rejected, 1u);
    EXPECT_EQ(st.queued, 0u);
    EXPECT_EQ(st.running, 0u);
    EXPECT_GT(st.token_wait_total.count(), 0);       // the third task waited for a token
    EXPECT_GE(st.token_wait_total, st.token_wait_max);
    EXPECT_GE(st.queue_time_total, st.queue_time_max);
    EXPECT_GE(st.queue_time_max, st.token_wait_max); // waiting for a token is part of queueing
    EXPECT_GE(st.last_progress, before);
}

TEST(limiter, a_running_task_with_a_stop_token_is_asked_to_stop_when_its_submitter_cancels)
{
    asio::io_context ioc;
    asio::thread_pool pool{1};
    auto lim = std::make_shared<limiter>(ioc.get_executor(), unlimited(ioc), limiter_options{}, pool.get_executor());
    std::atomic<bool> started{false};
    asio::cancellation_signal sig;
    std::string result;
    lim->async_submit(
        [&](std::stop_token st) {
            started = true;
            while (!st.stop_requested()) std::this_thread::yield();
            return std::string("stopped");
        },
        asio::bind_cancellation_slot(sig.slot(), [&](std::exception_ptr e, std::string r) {
            if (!e) result = r;
        }));
    const auto give_up = std::chrono::steady_clock::now() + 30s;
    while (!started && std::chrono::steady_clock::now() < give_up) ioc.poll();
    ASSERT_TRUE(started);
    sig.emit(asio::cancellation_type::terminal);
    ioc.run();
    EXPECT_EQ(result, "stopped");
    pool.join();
}

TEST(limiter, shutdown_asks_running_tasks_to_stop_when_the_grace_runs_out)
{
    asio::io_context ioc;
    asio::thread_pool pool{1};
    auto lim = std::make_shared<limiter>(ioc.get_executor(), unlimited(ioc), limiter_options{}, pool.get_executor());
    std::atomic<bool> started{false};
    bool stopped = false;
    lim->async_submit(
        [&](std::stop_token st) {
            started = true;
            while (!st.stop_requested()) std::this_thread::yield();
            return true;
        },
        [&](std::exception_ptr e, bool s) { stopped = !e && s; });
    const auto give_up = std::chrono::steady_clock::now() + 30s;
    while (!started && std::chrono::steady_clock::now() < give_up) ioc.poll();
    error_code shut = valve::errc::timed_out;
    lim->async_shutdown(20ms, [&](error_code ec) { shut = ec; });
    ioc.run();
    EXPECT_TRUE(stopped);
    EXPECT_FALSE(shut);
    pool.join();
}

TEST(limiter, an_async_task_may_submit_to_its_own_limiter)
{
    asio::io_context ioc;
    asio::thread_pool pool{1};
    auto lim = std::make_shared<limiter>(ioc.get_executor(), unlimited(ioc), limiter_options{.concurrency = 2},
                                         pool.get_executor());
    int result = 0;
    asio::co_spawn(
        ioc,
        [&]() -> asio::awaitable<void> {
            result = co_await lim->submit([&]() -> asio::awaitable<int> {
                const int inner = co_await lim->submit([] { return 41; });
                co_return inner + 1;
            });
        },
        asio::detached);
    ioc.run();
    EXPECT_EQ(result, 42);
    pool.join();
}

TEST(limiter, a_task_that_throws_before_its_coroutine_starts_frees_its_slot)
{
    asio::io_context ioc;
    asio::thread_pool pool{1};
    auto lim = std::make_shared<limiter>(ioc.get_executor(), unlimited(ioc), limiter_options{.concurrency = 1},
                                         pool.get_executor());
    std::string caught;
    int after = 0;
    asio::co_spawn(
        ioc,
        [&]() -> asio::awaitable<void> {
            try {
                // Not a coroutine: it throws instead of returning the awaitable.
                co_await lim->submit([]() -> asio::awaitable<int> { throw std::runtime_error("no connection"); });
            } catch (const std::runtime_error& e) {
                caught = e.what();
            }
            after = co_await lim->submit([]() -> asio::awaitable<int> { co_return 7; });
        },
        asio::detached);
    ioc.run();
    EXPECT_EQ(caught, "no connection");
    EXPECT_EQ(after, 7);
    EXPECT_EQ(lim->stats().failed, 1u);
    pool.join();
}

TEST(limiter, a_pending_shutdown_keeps_its_executor_running_until_it_completes)
{
    // The running task's submitter lives on another io_context, so only the shutdown itself
    // can keep `ioc` running after the grace period ends while the task still runs.
    asio::io_context ioc, other;
    asio::thread_pool pool{1};
    auto lim = std::make_shared<limiter>(ioc.get_executor(), unlimited(ioc), limiter_options{}, pool.get_executor());
    gate release;
    auto elsewhere = other.get_executor();
    lim->async_submit([&] { release.wait(); }, asio::bind_executor(elsewhere, [](std::exception_ptr) {}));
    lim->async_submit([] {}, asio::bind_executor(elsewhere, [](std::exception_ptr) {})); // aborted at the grace
    bool shut = false;
    lim->async_shutdown(10ms, [&](error_code ec) { shut = !ec; });
    std::thread opener([&] {
        const auto give_up = std::chrono::steady_clock::now() + 30s;
        while (lim->stats().cancelled == 0 && std::chrono::steady_clock::now() < give_up) std::this_thread::yield();
        release.open(); // only after the grace period has run out
    });
    ioc.run();
    opener.join();
    EXPECT_TRUE(shut);
    pool.join();
    other.run();
}

// `submit` runs an async task in the submitter's own coroutine when nothing can cancel that
// coroutine, and as an operation of its own otherwise. Both must keep every promise.

namespace {

// Spawns `f` on `ioc` either detached (nothing can cancel it) or with a cancellation slot
// connected (a signal that the caller may emit, or not).
template <class F>
void spawn(asio::io_context& ioc, bool cancellable, asio::cancellation_signal& sig, F f)
{
    if (cancellable)
        asio::co_spawn(ioc, std::move(f), asio::bind_cancellation_slot(sig.slot(), asio::detached));
    else
        asio::co_spawn(ioc, std::move(f), asio::detached);
}

} // namespace

TEST(limiter, async_tasks_keep_to_the_concurrency_whoever_submits_them)
{
    asio::io_context ioc;
    asio::thread_pool pool{1};
    auto lim = std::make_shared<limiter>(ioc.get_executor(), unlimited(ioc), limiter_options{.concurrency = 2},
                                         pool.get_executor());
    int running = 0, most = 0, done = 0;
    std::vector<asio::cancellation_signal> sigs(8);
    for (int i = 0; i < 8; ++i)
        spawn(ioc, i % 2 == 0, sigs[i], [&, i]() -> asio::awaitable<void> {
            const int r = co_await lim->submit([&, i]() -> asio::awaitable<int> {
                most = std::max(most, ++running);
                asio::steady_timer t{ioc, 2ms};
                co_await t.async_wait(asio::use_awaitable);
                --running;
                co_return i;
            });
            done += r == i;
        });
    ioc.run();
    EXPECT_EQ(done, 8);
    EXPECT_EQ(most, 2);
    EXPECT_EQ(lim->stats().completed, 8u);
    EXPECT_EQ(lim->running(), 0u);
    pool.join();
}

TEST(limiter, an_async_task_that_throws_frees_its_slot_whoever_submits_it)
{
    for (const bool cancellable : {false, true}) {
        asio::io_context ioc;
        asio::thread_pool pool{1};
        auto lim = std::make_shared<limiter>(ioc.get_executor(), unlimited(ioc), limiter_options{.concurrency = 1},
                                             pool.get_executor());
        asio::cancellation_signal sig;
        std::string caught;
        int after = 0;
        spawn(ioc, cancellable, sig, [&]() -> asio::awaitable<void> {
            try {
                co_await lim->submit([&]() -> asio::awaitable<void> {
                    co_await asio::post(ioc, asio::use_awaitable); // it has started, then fails
                    throw std::runtime_error("upstream 503");
                });
            } catch (const std::runtime_error& e) {
                caught = e.what();
            }
            after = co_await lim->submit([]() -> asio::awaitable<int> { co_return 7; });
        });
        ioc.run();
        EXPECT_EQ(caught, "upstream 503");
        EXPECT_EQ(after, 7);
        EXPECT_EQ(lim->stats().failed, 1u);
        EXPECT_EQ(lim->stats().completed, 1u);
        pool.join();
    }
}

TEST(limiter, a_cancelled_submitter_cancels_its_running_async_task)
{
    using namespace asio::experimental::awaitable_operators;
    asio::io_context ioc;
    asio::thread_pool pool{1};
    auto lim = std::make_shared<limiter>(ioc.get_executor(), unlimited(ioc), limiter_options{}, pool.get_executor());
    error_code inner = asio::error::would_block;
    std::optional<std::size_t> winner;
    asio::co_spawn(
        ioc,
        [&]() -> asio::awaitable<void> {
            asio::steady_timer timeout{ioc, 5ms};
            auto v = co_await (lim->submit([&]() -> asio::awaitable<void> {
                asio::steady_timer t{ioc, 1h};
                co_await t.async_wait(asio::redirect_error(asio::use_awaitable, inner));
            }) || timeout.async_wait(asio::use_awaitable));
            winner = v.index();
        },
        asio::detached);
    const auto start = std::chrono::steady_clock::now();
    ioc.run();
    ASSERT_TRUE(winner);
    EXPECT_EQ(*winner, 1u); // the timeout won
    EXPECT_EQ(inner, asio::error::operation_aborted) << "the running task's wait did not hear the cancellation";
    EXPECT_LT(std::chrono::steady_clock::now() - start, 30s);
    EXPECT_EQ(lim->stats().completed, 1u);
    pool.join();
}

TEST(limiter, a_queued_async_task_is_aborted_by_cancel_whoever_submits_it)
{
    for (const bool cancellable : {false, true}) {
        asio::io_context ioc;
        asio::thread_pool pool{1};
        auto lim = std::make_shared<limiter>(ioc.get_executor(), unlimited(ioc), limiter_options{.concurrency = 1},
                                             pool.get_executor());
        asio::cancellation_signal s1, s2;
        bool first_done = false, second_ran = false;
        error_code second = valve::errc::timed_out;
        spawn(ioc, cancellable, s1, [&]() -> asio::awaitable<void> {
            co_await lim->submit([&]() -> asio::awaitable<void> {
                asio::steady_timer t{ioc, 20ms};
                co_await t.async_wait(asio::use_awaitable);
            });
            first_done = true;
        });
        spawn(ioc, cancellable, s2, [&]() -> asio::awaitable<void> {
            try {
                co_await lim->submit([&]() -> asio::awaitable<void> {
                    second_ran = true;
                    co_return;
                });
                second = {};
            } catch (const boost::system::system_error& e) {
                second = e.code();
            }
        });
        ioc.poll(); // the first runs, the second waits in the queue
        EXPECT_EQ(lim->queued(), 1u);
        lim->cancel();
        ioc.run();
        EXPECT_TRUE(first_done);
        EXPECT_FALSE(second_ran);
        EXPECT_EQ(second, asio::error::operation_aborted);
        pool.join();
    }
}

TEST(limiter, shutdown_asks_a_running_async_task_with_a_stop_token_to_stop)
{
    asio::io_context ioc;
    asio::thread_pool pool{1};
    auto lim = std::make_shared<limiter>(ioc.get_executor(), unlimited(ioc), limiter_options{}, pool.get_executor());
    bool stopped = false;
    error_code shut = valve::errc::timed_out;
    asio::co_spawn(
        ioc,
        [&]() -> asio::awaitable<void> {
            stopped = co_await lim->submit([&](std::stop_token st) -> asio::awaitable<bool> {
                asio::steady_timer t{ioc};
                while (!st.stop_requested()) {
                    t.expires_after(1ms);
                    co_await t.async_wait(asio::use_awaitable);
                }
                co_return true;
            });
        },
        asio::detached);
    ioc.poll();
    lim->async_shutdown(10ms, [&](error_code ec) { shut = ec; });
    ioc.run();
    EXPECT_TRUE(stopped);
    EXPECT_FALSE(shut);
    EXPECT_EQ(lim->running(), 0u);
    pool.join();
}

TEST(limiter, many_submitters_racing_for_the_lock_lose_no_task)
{
    // Four threads submit at once to a limiter whose queue is mostly full (they wait for room),
    // cancelling some: submissions that find the lock busy go through the inbox and may reach
    // the waiting room out of order. Each completes exactly once, runs at most once (exactly
    // when told it succeeded), and never more than `concurrency` run at a time.
    constexpr int per_thread = 2000;
    constexpr int threads = 4;
    constexpr int total = threads * per_thread;
    asio::io_context ioc;
    auto guard = asio::make_work_guard(ioc);
    std::thread io([&] { ioc.run(); });
    asio::thread_pool pool{3};
    auto lim = std::make_shared<limiter>(
        ioc.get_executor(), unlimited(ioc),
        limiter_options{.concurrency = 2, .queue_capacity = 16, .on_queue_full = valve::queue_full_policy::wait},
        pool.get_executor());
    std::vector<std::atomic<int>> runs(total), completions(total);
    std::vector<error_code> outcome(total);
    std::vector<asio::cancellation_signal> signals(total);
    std::atomic<int> running{0}, most{0}, done{0};
    auto submitter = [&](int t) {
        auto mine = lim->for_user(static_cast<std::uint64_t>(t));
        for (int i = t * per_thread; i < (t + 1) * per_thread; ++i) {
            mine->async_submit(
                [&, i] {
                    const int now = ++running;
                    int seen = most.load();
                    while (now > seen && !most.compare_exchange_weak(seen, now)) {
                    }
                    ++runs[i];
                    --running;
                },
                asio::bind_cancellation_slot(signals[i].slot(), [&, i](std::exception_ptr e) {
                    outcome[i] = code_of(e); // on the io thread, one at a time
                    ++completions[i];
                    ++done;
                }));
            if (i % 7 == 0) signals[i].emit(asio::cancellation_type::terminal);
        }
    };
    std::vector<std::thread> subs;
    for (int t = 0; t < threads; ++t) subs.emplace_back(submitter, t);
    for (auto& s : subs) s.join();
    const auto give_up = std::chrono::steady_clock::now() + 60s;
    while (done < total && std::chrono::steady_clock::now() < give_up) std::this_thread::yield();
    guard.reset();
    io.join();
    pool.join();
    EXPECT_EQ(done.load(), total);
    EXPECT_LE(most.load(), 2);
    int ran = 0;
    for (int i = 0; i < total; ++i) {
        ASSERT_EQ(completions[i].load(), 1) << "task " << i;
        ASSERT_LE(runs[i].load(), 1) << "task " << i;
        ASSERT_EQ(runs[i].load() == 1, !outcome[i]) << "task " << i;
        if (outcome[i]) {
            ASSERT_EQ(outcome[i], asio::error::operation_aborted) << "task " << i;
        }
        ran += runs[i].load();
    }
    EXPECT_GT(ran, total / 2);
    const auto st = lim->stats();
    EXPECT_EQ(st.submitted, static_cast<std::uint64_t>(total));
    EXPECT_EQ(st.completed + st.cancelled, static_cast<std::uint64_t>(total));
    EXPECT_EQ(st.queued, 0u);
    EXPECT_EQ(st.running, 0u);
}

TEST(limiter, every_submitter_hears_before_the_shutdown_completes)
{
    // Workers finish tasks, and the grace timer aborts the backlog, while the shutdown waits:
    // on a one-thread io_context every submitter's handler has run when the shutdown's does.
    // (A handler that stops the io_context must not strand anyone.) Repeated, as the
    // interleavings differ from run to run.
    for (int round = 0; round < 200; ++round) {
        asio::io_context ioc;
        asio::thread_pool pool{2};
        auto limits = std::make_shared<valve::bucket_resource>(ioc.get_executor(), rate::per_second(20000), 4);
        auto lim = std::make_shared<limiter>(ioc.get_executor(), limits,
                                             limiter_options{.concurrency = 2, .queue_capacity = 64},
                                             pool.get_executor());
        constexpr int tasks = 24;
        int heard = 0;
        for (int i = 0; i < tasks; ++i) lim->async_submit([] {}, [&](std::exception_ptr) { ++heard; });
        int heard_at_shutdown = -1;
        lim->async_shutdown(std::chrono::microseconds(round % 5 * 100), [&](error_code) {
            heard_at_shutdown = heard;
            ioc.stop();
        });
        ioc.run();
        ASSERT_EQ(heard_at_shutdown, tasks) << "round " << round;
        pool.join();
    }
}

// A limiter with one slot, held by a blocking task on a gate, and two tokens (none more for
// an hour): the held task takes one, the async task under test the other. The test lets the
// limiter start the async task and cancels it before it begins on its executor.
struct started_then_cancelled {
    asio::io_context ioc;
    asio::thread_pool pool{1};
    std::shared_ptr<valve::bucket_resource> limits =
        std::make_shared<valve::bucket_resource>(ioc.get_executor(), rate::per(1, 1h), 2);
    std::shared_ptr<limiter> lim = std::make_shared<limiter>(ioc.get_executor(), limits,
                                                             limiter_options{.concurrency = 1}, pool.get_executor());
    gate g;
    asio::cancellation_signal signal;
    bool began = false;
    error_code heard = asio::error::would_block;

    started_then_cancelled() { lim->async_submit([this] { g.wait(); }, [](std::exception_ptr) {}); }

    // The held task ends; a pool worker frees its slot and starts the queued one.
    void let_the_task_start()
    {
        g.open();
        const auto give_up = std::chrono::steady_clock::now() + 10s;
        while (lim->queued() != 0 && std::chrono::steady_clock::now() < give_up) std::this_thread::sleep_for(1ms);
        ASSERT_EQ(lim->queued(), 0u) << "the worker did not start the queued task";
    }

    void expect_it_never_began()
    {
        ioc.run_for(10s);
        EXPECT_FALSE(began);
        EXPECT_EQ(heard, asio::error::operation_aborted);
        EXPECT_EQ(lim->running(), 0u);
        EXPECT_EQ(lim->stats().cancelled, 1u);
        EXPECT_NEAR(limits->available(), 1.0, 0.01) << "the token of the task that never began was not given back";
        pool.join();
    }
};

TEST(limiter, a_cancellation_that_beats_its_async_tasks_start_keeps_it_from_running)
{
    // The submitter cancels before the start reaches its executor (the io_context is not
    // running yet). The task must not begin, and the submitter hears operation_aborted.
    started_then_cancelled t;
    t.lim->async_submit(
        [&]() -> asio::awaitable<void> {
            t.began = true;
            asio::steady_timer timer{t.ioc, 1h};
            co_await timer.async_wait(asio::use_awaitable);
        },
        asio::bind_cancellation_slot(t.signal.slot(), [&](std::exception_ptr e) { t.heard = code_of(e); }));
    ASSERT_EQ(t.lim->queued(), 1u);
    t.let_the_task_start();
    t.signal.emit(asio::cancellation_type::terminal); // on this thread, the io_context's
    t.expect_it_never_began();
}

TEST(limiter, a_cancellation_that_beats_the_start_of_a_task_submitted_from_a_coroutine_keeps_it_from_running)
{
    // As above, for `co_await submit(task)` from a cancellable coroutine: the limiter lets the
    // task start (its turn is posted to the coroutine), and the cancellation reaches the
    // coroutine before it resumes.
    started_then_cancelled t;
    spawn(t.ioc, true, t.signal, [&]() -> asio::awaitable<void> {
        try {
            co_await t.lim->submit([&]() -> asio::awaitable<void> {
                t.began = true;
                co_return;
            });
            t.heard = {};
        } catch (const boost::system::system_error& e) {
            t.heard = e.code();
        }
    });
    t.ioc.poll(); // the coroutine submits; its task waits in the queue
    ASSERT_EQ(t.lim->queued(), 1u);
    // Emitted on the io_context, ahead of the task's turn, which the worker posts after it.
    asio::post(t.ioc, [&] { t.signal.emit(asio::cancellation_type::terminal); });
    t.let_the_task_start();
    t.expect_it_never_began();
}

TEST(limiter, try_enter_takes_a_slot_and_a_token_now_or_says_why_not)
{
    asio::io_context ioc;
    asio::thread_pool pool{1};
    // Burst 2, a rate too slow to refill during the test; two slots.
    auto limits = std::make_shared<valve::bucket_resource>(ioc.get_executor(), rate::per(1, 1h), 2);
    auto lim = std::make_shared<limiter>(ioc.get_executor(), limits, limiter_options{.concurrency = 2},
                                         pool.get_executor());
    error_code ec;
    valve::permit first = lim->try_enter(ec);
    ASSERT_TRUE(first);
    EXPECT_FALSE(ec);
    EXPECT_EQ(lim->running(), 1u);
    valve::permit second = lim->try_enter(ec);
    ASSERT_TRUE(second);
    // Both slots taken: refused, and no token spent on the refusal.
    EXPECT_FALSE(lim->try_enter(ec));
    EXPECT_EQ(ec, valve::errc::queue_full);
    second.release();
    EXPECT_EQ(lim->running(), 1u);
    // A slot is free but the burst is spent: refused.
    EXPECT_FALSE(lim->try_enter(ec));
    EXPECT_EQ(ec, valve::errc::queue_full);
    first = valve::permit{}; // moving an empty permit in releases the held one
    EXPECT_EQ(lim->running(), 0u);
    const auto st = lim->stats();
    EXPECT_EQ(st.submitted, 4u);
    EXPECT_EQ(st.completed, 2u);
    EXPECT_EQ(st.rejected, 2u);
    EXPECT_EQ(st.queued, 0u);
    pool.join();
}

TEST(limiter, try_enter_does_not_jump_the_queue_and_a_shutdown_waits_for_permits)
{
    asio::io_context ioc;
    asio::thread_pool pool{1};
    auto lim = std::make_shared<limiter>(ioc.get_executor(), unlimited(ioc), limiter_options{.concurrency = 1},
                                         pool.get_executor());
    valve::permit held = lim->try_enter();
    ASSERT_TRUE(held);
    std::atomic<bool> ran = false;
    gate g; // holds the slot once the task has it, so that the check below cannot race its end
    lim->async_submit(
        [&] {
            g.wait();
            ran = true;
        },
        [](std::exception_ptr) {}); // queued behind the permit
    ASSERT_EQ(lim->queued(), 1u);
    error_code ec;
    held.release(); // the queued task takes the slot
    EXPECT_FALSE(lim->try_enter(ec)) << "a queued task is ahead, or holds the only slot";
    EXPECT_EQ(ec, valve::errc::queue_full);
    g.open();
    ioc.run();
    EXPECT_TRUE(ran);
    ioc.restart();

    held = lim->try_enter();
    ASSERT_TRUE(held);
    bool shut = false;
    lim->async_shutdown(1h, [&](error_code) { shut = true; });
    EXPECT_FALSE(lim->try_enter(ec));
    EXPECT_EQ(ec, valve::errc::shutting_down);
    ioc.poll();
    EXPECT_FALSE(shut) << "the shutdown completed while a permit was held";
    held.release();
    ioc.run();
    EXPECT_TRUE(shut);
    pool.join();
}

// What one async_enter completed with.
struct entered {
    bool done = false;
    error_code ec;
    valve::permit p;
    auto handler()
    {
        return [this](error_code e, valve::permit got) {
            done = true;
            ec = e;
            p = std::move(got);
        };
    }
};

TEST(limiter, async_enter_waits_its_turn_and_completes_with_a_permit_that_holds_the_slot)
{
    asio::io_context ioc;
    auto work = asio::make_work_guard(ioc); // polled in steps: it must not run out of work
    asio::thread_pool pool{1};
    auto lim = std::make_shared<limiter>(ioc.get_executor(), unlimited(ioc), limiter_options{.concurrency = 1},
                                         pool.get_executor());
    entered first, second;
    lim->async_enter(first.handler());
    EXPECT_FALSE(first.done) << "completed inside the initiating call";
    ioc.poll();
    ASSERT_TRUE(first.done);
    EXPECT_FALSE(first.ec);
    ASSERT_TRUE(first.p);
    EXPECT_EQ(lim->running(), 1u);
    // The only slot is first's: second queues, behind it, and try_enter may not jump it.
    lim->async_enter(second.handler());
    ioc.poll();
    EXPECT_FALSE(second.done);
    EXPECT_EQ(lim->queued(), 1u);
    error_code ec;
    EXPECT_FALSE(lim->try_enter(ec));
    EXPECT_EQ(ec, valve::errc::queue_full);
    first.p.release();
    ioc.poll();
    ASSERT_TRUE(second.done);
    EXPECT_FALSE(second.ec);
    EXPECT_TRUE(second.p);
    EXPECT_EQ(lim->running(), 1u);
    second.p.release(true); // the work under it failed
    EXPECT_EQ(lim->running(), 0u);
    const auto st = lim->stats();
    EXPECT_EQ(st.submitted, 3u);
    EXPECT_EQ(st.completed, 1u);
    EXPECT_EQ(st.failed, 1u);
    EXPECT_EQ(st.rejected, 1u);
    pool.join();
}

TEST(limiter, async_enter_cancelled_after_the_limiter_let_it_start_gives_its_slot_and_token_back)
{
    asio::io_context ioc;
    auto work = asio::make_work_guard(ioc);
    asio::thread_pool pool{1};
    // One token, and a rate too slow to refill during the test.
    auto limits = std::make_shared<valve::bucket_resource>(ioc.get_executor(), rate::per(1, 1h), 1);
    auto lim = std::make_shared<limiter>(ioc.get_executor(), limits, limiter_options{.concurrency = 1},
                                         pool.get_executor());
    asio::cancellation_signal signal;
    entered e;
    lim->async_enter(asio::bind_cancellation_slot(signal.slot(), e.handler()));
    // A slot and the token were free: the limiter let it start, and its completion is on its way.
    EXPECT_EQ(lim->running(), 1u);
    EXPECT_FALSE(e.done);
    signal.emit(asio::cancellation_type::terminal);
    ioc.poll();
    ASSERT_TRUE(e.done);
    EXPECT_EQ(e.ec, asio::error::operation_aborted);
    EXPECT_FALSE(e.p);
    EXPECT_EQ(lim->running(), 0u);
    EXPECT_EQ(lim->stats().cancelled, 1u);
    EXPECT_TRUE(lim->try_enter()) << "the token was not given back";
    pool.join();
}

TEST(limiter, async_enter_is_refused_when_the_queue_is_full_cancelled_per_operation_and_aborted_by_shutdown)
{
    asio::io_context ioc;
    auto work = asio::make_work_guard(ioc); // polled in steps: it must not run out of work
    asio::thread_pool pool{1};
    auto lim = std::make_shared<limiter>(ioc.get_executor(), unlimited(ioc),
                                         limiter_options{.concurrency = 1, .queue_capacity = 1}, pool.get_executor());
    valve::permit held = lim->try_enter();
    ASSERT_TRUE(held);
    entered cancelled, refused, aborted, late;
    asio::cancellation_signal signal;
    lim->async_enter(asio::bind_cancellation_slot(signal.slot(), cancelled.handler()));
    lim->async_enter(refused.handler());
    ioc.poll();
    EXPECT_FALSE(cancelled.done);
    ASSERT_TRUE(refused.done);
    EXPECT_EQ(refused.ec, valve::errc::queue_full);
    EXPECT_FALSE(refused.p);

    // Cancelled while queued ("total": nothing happened yet): removed, its place freed.
    signal.emit(asio::cancellation_type::total);
    ioc.poll();
    ASSERT_TRUE(cancelled.done);
    EXPECT_EQ(cancelled.ec, asio::error::operation_aborted);
    EXPECT_FALSE(cancelled.p);
    EXPECT_EQ(lim->queued(), 0u);

    // A shutdown aborts what is queued at the end of its grace, refuses what comes after, and
    // completes once the permit held is released.
    lim->async_enter(aborted.handler());
    ioc.poll();
    EXPECT_FALSE(aborted.done);
    bool shut = false;
    lim->async_shutdown(0ms, [&](error_code) { shut = true; });
    lim->async_enter(late.handler());
    for (int i = 0; i < 1000 && !(aborted.done && late.done); ++i) ioc.run_one_for(10ms); // the grace's timer
    ASSERT_TRUE(aborted.done);
    EXPECT_EQ(aborted.ec, asio::error::operation_aborted);
    ASSERT_TRUE(late.done);
    EXPECT_EQ(late.ec, valve::errc::shutting_down);
    EXPECT_FALSE(shut);
    held.release();
    work.reset();
    ioc.run();
    EXPECT_TRUE(shut);
    pool.join();
}

TEST(limiter, async_enter_takes_any_completion_token_and_waits_for_a_token_of_the_resource)
{
    asio::io_context ioc;
    asio::thread_pool pool{1};
    // Burst 1 and a rate too slow to refill during the test: the second entry waits for a token.
    auto limits = std::make_shared<valve::bucket_resource>(ioc.get_executor(), rate::per(1, 1h), 1);
    auto lim = std::make_shared<limiter>(ioc.get_executor(), limits, limiter_options{.concurrency = 4},
                                         pool.get_executor());
    asio::cancellation_signal signal;
    std::optional<error_code> second_ec;
    asio::co_spawn(
        ioc,
        [&]() -> asio::awaitable<void> {
            valve::permit p = co_await lim->async_enter(asio::use_awaitable);
            EXPECT_TRUE(p);
            p.release();
            // No token left: this waits, until it is cancelled below.
            auto [ec, none] =
                co_await lim->async_enter(asio::bind_cancellation_slot(signal.slot(), asio::as_tuple(asio::use_awaitable)));
            second_ec = ec;
            EXPECT_FALSE(none);
        },
        asio::detached);
    // Run until the second entry waits for its token (nothing else can make it go on).
    for (int i = 0; i < 1000 && lim->stats().completed == 0; ++i) ioc.run_one_for(10ms);
    for (int i = 0; i < 100 && !second_ec; ++i) ioc.poll();
    EXPECT_FALSE(second_ec.has_value()) << "an entry with no token left was let in";
    EXPECT_EQ(lim->stats().completed, 1u);
    signal.emit(asio::cancellation_type::terminal);
    ioc.run();
    ASSERT_TRUE(second_ec.has_value());
    EXPECT_EQ(*second_ec, asio::error::operation_aborted);
    pool.join();
}

TEST(limiter, a_submitter_that_hears_of_its_task_finds_it_counted_and_its_slot_free)
{
    // The worker counts a finished task and frees its slot before its submitter hears of it:
    // read from the completion handler, `completed` never lags, and the one slot is free. Repeated, as the worker and the io thread race: this thread polls the
    // io_context without sleeping, so that a completion runs the moment it is posted.
    asio::io_context ioc;
    asio::thread_pool pool{1};
    auto lim = std::make_shared<limiter>(ioc.get_executor(), unlimited(ioc), limiter_options{.concurrency = 1},
                                         pool.get_executor());
    int lagged = 0, slot_taken = 0;
    for (std::uint64_t round = 1; round <= 2000; ++round) {
        bool heard = false;
        lim->async_submit([] {}, [&, round](std::exception_ptr) {
            lagged += lim->stats().completed < round;
            slot_taken += lim->running() != 0; // a try_enter would be refused
            heard = true;
        });
        while (!heard) ioc.poll();
        ioc.restart();
    }
    EXPECT_EQ(lagged, 0);
    EXPECT_EQ(slot_taken, 0);
    pool.join();
}

TEST(limiter, a_limiter_that_keeps_its_pool_may_be_released_last_on_that_pool)
{
    for (int round = 0; round < 20; ++round) {
        auto pool = std::make_shared<asio::thread_pool>(2);
        auto res = std::make_shared<valve::bucket_resource>(pool->get_executor(), rate::unlimited());
        auto l = std::make_shared<limiter>(pool->get_executor(), res, limiter_options{1, 10}, pool->get_executor(), pool);
        res.reset();
        pool.reset();
        std::promise<int> heard;
        limiter* raw = l.get();
        gate submitted; // the task ends after the submission has returned (and stopped using the pool)
        // The completion runs on the pool and drops the last reference to the limiter there.
        raw->async_submit(
            [&submitted] {
                submitted.wait();
                return 7;
            },
            [&heard, l = std::move(l)](std::exception_ptr, int v) mutable {
                l.reset();
                heard.set_value(v);
            });
        submitted.open();
        auto said = heard.get_future();
        ASSERT_EQ(said.wait_for(10s), std::future_status::ready);
        EXPECT_EQ(said.get(), 7);
    }
}
