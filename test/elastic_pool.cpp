#include "detail/elastic_pool.hpp"

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/execution/outstanding_work.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/prefer.hpp>
#include <boost/asio/query.hpp>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <future>
#include <latch>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using valve::detail::elastic_pool;

namespace {

// Waits (polling) until `pred` holds or `limit` has passed; returns whether it held.
template <class Pred>
bool eventually(Pred pred, std::chrono::steady_clock::duration limit = 10s)
{
    const auto give_up = std::chrono::steady_clock::now() + limit;
    while (!pred()) {
        if (std::chrono::steady_clock::now() > give_up) return false;
        std::this_thread::sleep_for(1ms);
    }
    return true;
}

} // namespace

TEST(elastic_pool, starts_no_thread_until_work_is_posted)
{
    elastic_pool pool{100000};
    EXPECT_EQ(pool.threads(), 0u);
    EXPECT_EQ(pool.max_threads(), 100000u);
    std::promise<std::thread::id> ran;
    asio::post(pool.get_executor(), [&] { ran.set_value(std::this_thread::get_id()); });
    EXPECT_NE(ran.get_future().get(), std::this_thread::get_id());
    EXPECT_EQ(pool.threads(), 1u);
    pool.join();
    EXPECT_EQ(pool.threads(), 0u);
}

TEST(elastic_pool, grows_to_the_work_at_hand_up_to_its_maximum)
{
    for (const std::size_t n : {3u, 8u}) {
        const std::size_t max = 5;
        elastic_pool pool{max};
        const std::size_t expected = std::min(n, max);
        std::latch started{static_cast<std::ptrdiff_t>(expected)};
        std::promise<void> open;
        std::shared_future<void> gate = open.get_future().share();
        std::atomic<std::size_t> ran{0};
        for (std::size_t i = 0; i < n; ++i)
            asio::post(pool.get_executor(), [&, gate] {
                if (ran++ < expected) started.count_down();
                gate.wait();
            });
        started.wait(); // `expected` tasks run at once: as many threads
        EXPECT_EQ(pool.threads(), expected) << n << " blocked tasks";
        EXPECT_EQ(ran.load(), expected) << "the rest wait for a thread";
        open.set_value();
        pool.join();
        EXPECT_EQ(ran.load(), n);
    }
}

TEST(elastic_pool, idle_threads_end_after_the_idle_time)
{
    const auto idle = 300ms;
    elastic_pool pool{4, idle};
    std::latch started{4};
    std::latch finish{1};
    for (int i = 0; i < 4; ++i)
        asio::post(pool.get_executor(), [&] {
            started.count_down();
            finish.wait();
        });
    started.wait();
    const auto done = std::chrono::steady_clock::now();
    finish.count_down();
    EXPECT_EQ(pool.threads(), 4u);
    ASSERT_TRUE(eventually([&] { return pool.threads() == 0; })) << "idle threads never ended";
    EXPECT_GE(std::chrono::steady_clock::now() - done, idle) << "they ended before resting for the idle time";
    // Work after that starts a thread again.
    std::promise<void> ran;
    asio::post(pool.get_executor(), [&] { ran.set_value(); });
    ran.get_future().get();
    EXPECT_EQ(pool.threads(), 1u);
}

TEST(elastic_pool, join_runs_the_pending_work_first)
{
    elastic_pool pool{2};
    std::atomic<int> ran{0};
    for (int i = 0; i < 100; ++i)
        asio::post(pool.get_executor(), [&] {
            std::this_thread::yield();
            ++ran;
        });
    pool.join();
    EXPECT_EQ(ran.load(), 100);
    EXPECT_EQ(pool.threads(), 0u);
    // Usable again after a join; the destructor joins too.
    asio::post(pool.get_executor(), [&] { ++ran; });
    pool.join();
    EXPECT_EQ(ran.load(), 101);
}

TEST(elastic_pool, work_posted_by_its_own_tasks_runs_before_join_returns)
{
    elastic_pool pool{2};
    std::atomic<int> ran{0};
    auto ex = pool.get_executor();
    asio::post(ex, [&, ex] {
        for (int i = 0; i < 10; ++i) asio::post(ex, [&] { ++ran; });
    });
    pool.join();
    EXPECT_EQ(ran.load(), 10);
}

TEST(elastic_pool, an_executor_tracking_work_keeps_join_waiting)
{
    elastic_pool pool{1};
    std::optional<asio::any_io_executor> work{asio::prefer(pool.get_executor(), asio::execution::outstanding_work.tracked)};
    auto joined = std::async(std::launch::async, [&] { pool.join(); });
    EXPECT_EQ(joined.wait_for(100ms), std::future_status::timeout) << "join did not wait for the tracked work";
    work.reset();
    EXPECT_EQ(joined.wait_for(10s), std::future_status::ready);
}

TEST(elastic_pool, join_from_its_own_thread_does_not_wait_for_itself)
{
    elastic_pool pool{2};
    std::promise<void> returned;
    asio::post(pool.get_executor(), [&] {
        EXPECT_TRUE(pool.running_in_this_thread());
        pool.join();
        returned.set_value();
    });
    EXPECT_EQ(returned.get_future().wait_for(10s), std::future_status::ready);
    EXPECT_FALSE(pool.running_in_this_thread());
    pool.join();
}

TEST(elastic_pool, destroyed_on_its_own_thread_it_lets_that_thread_finish)
{
    auto pool = std::make_shared<elastic_pool>(2);
    std::promise<void> destroyed;
    auto ex = pool->get_executor();
    asio::post(ex, [p = std::move(pool), &destroyed]() mutable {
        p.reset(); // the last owner: the pool is destroyed here, on its own thread
        destroyed.set_value();
    });
    EXPECT_EQ(destroyed.get_future().wait_for(10s), std::future_status::ready);
}

TEST(elastic_pool, its_executor_is_a_standard_asio_executor)
{
    elastic_pool pool{1};
    const asio::any_io_executor ex = pool.get_executor();
    EXPECT_EQ(&asio::query(ex, asio::execution::context), &pool.context());
    EXPECT_TRUE(pool.get_executor() == pool.get_executor());
    EXPECT_FALSE(pool.get_executor() == asio::prefer(pool.get_executor(), asio::execution::outstanding_work.tracked));
    elastic_pool other{1};
    EXPECT_FALSE(pool.get_executor() == other.get_executor());
    std::promise<bool> on_pool;
    asio::post(ex, [&] { on_pool.set_value(pool.get_executor().running_in_this_thread()); });
    EXPECT_TRUE(on_pool.get_future().get());
}

TEST(elastic_pool, many_threads_post_at_once)
{
    const std::size_t max = 3;
    elastic_pool pool{max};
    std::atomic<int> ran{0};
    std::atomic<std::size_t> at_once{0};
    std::atomic<std::size_t> most{0};
    std::vector<std::thread> posters;
    for (int t = 0; t < 4; ++t)
        posters.emplace_back([&] {
            for (int i = 0; i < 1000; ++i)
                asio::post(pool.get_executor(), [&] {
                    const std::size_t now = ++at_once;
                    std::size_t seen = most.load();
                    while (now > seen && !most.compare_exchange_weak(seen, now)) {
                    }
                    ++ran;
                    --at_once;
                });
        });
    for (auto& p : posters) p.join();
    pool.join();
    EXPECT_EQ(ran.load(), 4000);
    EXPECT_LE(most.load(), max);
    EXPECT_EQ(pool.threads(), 0u);
}

namespace {

// Makes the next `n` thread starts fail, and no more once it goes out of scope.
struct failing_thread_starts {
    explicit failing_thread_starts(std::size_t n) { elastic_pool::fail_thread_starts_for_testing = n; }
    ~failing_thread_starts() { elastic_pool::fail_thread_starts_for_testing = 0; }
    failing_thread_starts(const failing_thread_starts&) = delete;
    failing_thread_starts& operator=(const failing_thread_starts&) = delete;
};

} // namespace

TEST(elastic_pool, work_posted_when_no_thread_can_start_runs_once_a_later_post_starts_one)
{
    elastic_pool pool{2};
    std::latch ran{2};
    {
        failing_thread_starts fail{1};
        EXPECT_NO_THROW(asio::post(pool.get_executor(), [&] { ran.count_down(); })) << "post threw";
    }
    EXPECT_EQ(pool.threads(), 0u) << "no thread could start";
    EXPECT_NO_THROW(asio::post(pool.get_executor(), [&] { ran.count_down(); }));
    ran.wait(); // both: the first was kept, not dropped
    auto joined = std::async(std::launch::async, [&] { pool.join(); });
    EXPECT_EQ(joined.wait_for(10s), std::future_status::ready) << "join hung";
}

TEST(elastic_pool, join_starts_the_thread_that_work_waiting_for_one_needs)
{
    elastic_pool pool{1};
    std::atomic<bool> ran{false};
    {
        failing_thread_starts fail{1};
        EXPECT_NO_THROW(asio::post(pool.get_executor(), [&] { ran = true; }));
    }
    auto joined = std::async(std::launch::async, [&] { pool.join(); });
    ASSERT_EQ(joined.wait_for(10s), std::future_status::ready) << "join hung";
    EXPECT_TRUE(ran.load()) << "join returned before the work ran";
}

namespace {

// Set on a thread, it tells when that thread has ended (its thread_locals are destroyed last).
struct exit_signal {
    explicit exit_signal(std::promise<void>* e) : ended(e) {}
    ~exit_signal() { ended->set_value(); }
    std::promise<void>* ended;
};
thread_local std::optional<exit_signal> at_thread_exit;

} // namespace

TEST(elastic_pool, its_executor_still_names_a_context_after_the_pool_is_destroyed_on_its_own_thread)
{
    auto pool = std::make_shared<elastic_pool>(2);
    auto ex = pool->get_executor();
    const void* context = &pool->context();
    std::promise<bool> has_context;
    asio::post(ex, [p = std::move(pool), ex, context, &has_context]() mutable {
        p.reset(); // the last owner: the pool is destroyed here, on its own thread
        has_context.set_value(static_cast<const void*>(&asio::query(ex, asio::execution::context)) == context);
    });
    EXPECT_TRUE(has_context.get_future().get());
}

TEST(elastic_pool, an_executor_outliving_a_pool_destroyed_on_its_own_thread_still_runs_work)
{
    auto pool = std::make_shared<elastic_pool>(2);
    auto ex = pool->get_executor();
    std::promise<void> ended;
    asio::post(ex, [p = std::move(pool), &ended]() mutable {
        at_thread_exit.emplace(&ended);
        p.reset(); // the last owner: the pool is destroyed here, on its own thread
    });
    ASSERT_EQ(ended.get_future().wait_for(10s), std::future_status::ready);
    // The pool's last thread has ended; `ex` is all that is left of it.
    std::promise<void> ran;
    EXPECT_NO_THROW(asio::post(ex, [&] { ran.set_value(); }));
    EXPECT_EQ(ran.get_future().wait_for(10s), std::future_status::ready);
}
