#include <valve/manager.hpp>

#include <valve/error.hpp>
#include <valve/log.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/execution/outstanding_work.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/prefer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <spdlog/logger.h>
#include <spdlog/sinks/ostream_sink.h>

#include <gtest/gtest.h>

#include "support.hpp"

#include <atomic>
#include <chrono>
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <future>
#include <iterator>
#include <latch>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using boost::system::error_code;
using valve::rate;

namespace {

using valve::test::code_of;

template <class F>
error_code thrown_by(F&& f)
{
    try {
        f();
    } catch (const valve::error& e) {
        return e.code();
    }
    return {};
}

// Counts the tasks that ran; tasks that can never get a token stay queued until shutdown.
struct tally {
    std::atomic<int> ran{0};
    int aborted = 0;
    void submit(valve::limiter& l)
    {
        l.async_submit([this] { ++ran; }, [this](std::exception_ptr e) {
            if (code_of(e) == asio::error::operation_aborted) ++aborted;
        });
    }
};

} // namespace

TEST(manager, a_shared_profile_gives_all_users_one_limiter)
{
    asio::io_context ioc;
    valve::manager mgr{ioc.get_executor()};
    mgr.register_profile("free-tier", valve::shared_resource("free-key", rate::per_second(2)),
                         valve::worker_pool(5, 100));
    auto a = mgr.get_limiter("free-tier", "alice");
    auto b = mgr.get_limiter("free-tier", "bob");
    EXPECT_EQ(mgr.limiter_count("free-tier"), 1u);
    // Two handles, one limiter: what bob submits, alice's handle sees.
    std::promise<void> hold;
    auto held = hold.get_future().share();
    b->async_submit([held] { held.wait(); }, [](std::exception_ptr) {}); // runs, and waits
    b->async_submit([] {}, [](std::exception_ptr) {});                   // waits for a token
    EXPECT_EQ(a->stats().submitted, 2u);
    EXPECT_EQ(a->running(), 1u);
    EXPECT_EQ(a->queued(), 1u);
    hold.set_value();
    ioc.run();
    EXPECT_EQ(a->stats().completed, 2u);
}

TEST(manager, users_of_a_shared_profile_take_turns)
{
    // A user with 1,000 queued tasks does not delay another user's single task by more than a
    // few task slots (govalve served them strictly in arrival order).
    asio::io_context ioc;
    valve::manager mgr{ioc.get_executor()};
    mgr.register_profile("free-tier", valve::shared_resource("k", rate::unlimited()), valve::worker_pool(1, 2000));
    std::vector<std::string> order;
    std::mutex m;
    auto record = [&](std::string who) {
        std::lock_guard lock{m};
        order.push_back(std::move(who));
    };
    // The first task holds the only slot until everything is queued.
    std::promise<void> queued;
    auto gate = queued.get_future().share();
    auto flooder = mgr.get_limiter("free-tier", "flooder");
    flooder->async_submit([&, gate] {
        gate.wait();
        record("flood");
    }, [](std::exception_ptr) {});
    for (int i = 1; i < 1000; ++i) flooder->async_submit([&] { record("flood"); }, [](std::exception_ptr) {});
    mgr.get_limiter("free-tier", "newcomer")->async_submit([&] { record("newcomer"); }, [](std::exception_ptr) {});
    queued.set_value();
    ioc.run();
    ASSERT_EQ(order.size(), 1001u);
    const auto position = std::find(order.begin(), order.end(), "newcomer") - order.begin();
    EXPECT_LE(position, 3);
}

TEST(manager, profiles_naming_one_key_share_its_limit)
{
    asio::io_context ioc;
    valve::manager mgr{ioc.get_executor()};
    // Two tokens in all, and no refill: across both profiles only two tasks can ever run.
    mgr.register_profile("web", valve::shared_resource("key-1", rate::zero(), 2), valve::worker_pool(2, 10));
    mgr.register_profile("batch", valve::shared_resource("key-1", rate::zero(), 2), valve::worker_pool(2, 10));
    tally t;
    for (int i = 0; i < 2; ++i) t.submit(*mgr.get_limiter("web", "u"));
    for (int i = 0; i < 2; ++i) t.submit(*mgr.get_limiter("batch", "u"));
    mgr.async_shutdown(50ms, [](error_code) {});
    ioc.run();
    EXPECT_EQ(t.ran.load(), 2);
    EXPECT_EQ(t.aborted, 2);
}

TEST(manager, dedicated_users_each_get_their_own_limit)
{
    // govalve built one bucket at registration and handed it to every "dedicated" user.
    asio::io_context ioc;
    valve::manager mgr{ioc.get_executor()};
    mgr.register_profile("pro-tier", valve::dedicated_resource(rate::zero(), 1), valve::worker_pool(1, 10));
    tally t;
    for (const char* user : {"u1", "u2", "u3"})
        for (int i = 0; i < 2; ++i) t.submit(*mgr.get_limiter("pro-tier", user));
    EXPECT_NE(mgr.get_limiter("pro-tier", "u1"), mgr.get_limiter("pro-tier", "u2"));
    EXPECT_EQ(mgr.limiter_count("pro-tier"), 3u);
    mgr.async_shutdown(50ms, [](error_code) {});
    ioc.run();
    EXPECT_EQ(t.ran.load(), 3); // one token each
    EXPECT_EQ(t.aborted, 3);
}

TEST(manager, also_limit_composes_with_the_resource)
{
    asio::io_context ioc;
    valve::manager mgr{ioc.get_executor()};
    mgr.register_profile("pro-tier", valve::dedicated_resource(rate::per_second(1000), 10),
                         valve::also_limit(rate::zero(), 3), valve::worker_pool(4, 10));
    tally t;
    auto l = mgr.get_limiter("pro-tier", "u");
    for (int i = 0; i < 5; ++i) t.submit(*l);
    mgr.async_shutdown(100ms, [](error_code) {});
    ioc.run();
    EXPECT_EQ(t.ran.load(), 3);
    EXPECT_EQ(t.aborted, 2);
}

TEST(manager, a_rate_the_profiles_burst_cannot_take_is_refused_before_it_applies)
{
    asio::io_context ioc;
    valve::manager mgr{ioc.get_executor()};
    mgr.register_profile("dedicated", valve::dedicated_resource(rate::per_second(10), 100));
    mgr.register_profile("shared", valve::shared_resource("key", rate::per_second(10), 100));
    // A burst of 100 at one a year would take a century to refill: more than a bucket supports.
    for (const char* name : {"dedicated", "shared"}) {
        try {
            mgr.set_rate(name, rate::per(1, 24h * 365));
            ADD_FAILURE() << name << ": no exception";
        } catch (const valve::error& e) {
            EXPECT_EQ(e.code(), valve::errc::invalid_argument) << name;
        }
    }
    // Nothing changed: users old and new get limiters at the old rate.
    auto l = mgr.get_limiter("dedicated", "new-user");
    EXPECT_EQ(static_cast<valve::bucket_resource&>(l->limits()).primary().current_rate(), rate::per_second(10));
    EXPECT_NO_THROW(mgr.get_limiter("shared", "u"));
    mgr.set_rate("dedicated", rate::per_second(20));
    EXPECT_NO_THROW(mgr.get_limiter("dedicated", "another-user"));
}

TEST(manager, results_come_back_through_profiles)
{
    asio::io_context ioc;
    valve::manager mgr{ioc.get_executor()};
    mgr.register_profile("pro-tier", valve::dedicated_resource(rate::per_second(100), 5),
                         valve::also_limit(rate::per(300, std::chrono::minutes(1)), 300), valve::worker_pool(2, 10));
    int n = 0;
    std::string body;
    asio::co_spawn(
        ioc,
        [&]() -> asio::awaitable<void> {
            auto pro = mgr.get_limiter("pro-tier", "pro-user-123");
            n = co_await pro->submit([] { return 41 + 1; });
            body = co_await pro->submit([]() -> asio::awaitable<std::string> { co_return "ok"; });
        },
        asio::detached);
    ioc.run();
    EXPECT_EQ(n, 42);
    EXPECT_EQ(body, "ok");
}

TEST(manager, unknown_and_duplicate_profiles_are_errors)
{
    asio::io_context ioc;
    valve::manager mgr{ioc.get_executor()};
    mgr.register_profile("p", valve::dedicated_resource(rate::per_second(1)));
    EXPECT_EQ(thrown_by([&] { mgr.get_limiter("nope", "u"); }), valve::errc::unknown_profile);
    EXPECT_EQ(thrown_by([&] { mgr.register_profile("p", valve::dedicated_resource(rate::per_second(1))); }),
              valve::errc::duplicate_profile);
}

TEST(manager, options_that_do_not_fit_are_refused)
{
    asio::io_context ioc;
    valve::manager mgr{ioc.get_executor()};
    const auto invalid = valve::errc::invalid_argument;
    EXPECT_EQ(thrown_by([&] { mgr.register_profile("a", valve::worker_pool(1, 1)); }), invalid);
    EXPECT_EQ(thrown_by([&] {
                  mgr.register_profile("b", valve::shared_resource("k", rate::per_second(1)),
                                       valve::dedicated_resource(rate::per_second(1)));
              }),
              invalid);
    EXPECT_EQ(thrown_by([&] {
                  mgr.register_profile("c", valve::shared_resource("k", rate::per_second(1)), valve::idle_timeout(1s));
              }),
              invalid);
    EXPECT_EQ(thrown_by([&] {
                  mgr.register_profile("d", valve::dedicated_resource(rate::per_second(1)), valve::worker_pool(0, 10));
              }),
              invalid);
    EXPECT_EQ(thrown_by([&] {
                  mgr.register_profile("e", valve::dedicated_resource(rate::per_second(1)), valve::worker_pool(1, 0),
                                       valve::on_queue_full(valve::queue_full_policy::wait));
              }),
              invalid);
    EXPECT_EQ(thrown_by([&] { mgr.register_profile("f", valve::dedicated_resource(rate::per_second(std::nan("")))); }),
              invalid);
    EXPECT_EQ(thrown_by([&] {
                  mgr.register_profile("g", valve::dedicated_resource(rate::per_second(1)), valve::worker_pool(1, 1),
                                       valve::worker_pool(2, 2));
              }),
              invalid);
    mgr.register_profile("h", valve::shared_resource("k", rate::per_second(1)));
    EXPECT_EQ(thrown_by([&] { mgr.register_profile("i", valve::shared_resource("k", rate::per_second(5))); }),
              invalid);
    // A refused profile is not half-registered.
    EXPECT_EQ(thrown_by([&] { mgr.get_limiter("d", "u"); }), valve::errc::unknown_profile);
}

namespace {

// The message of the valve::error that `f` throws (empty if none).
template <class F>
std::string message_of(F&& f)
{
    try {
        f();
    } catch (const valve::error& e) {
        return e.what();
    }
    return {};
}

// Whether `text` says `phrase` more than once.
bool repeats(const std::string& text, const std::string& phrase)
{
    const auto first = text.find(phrase);
    return first != std::string::npos && text.find(phrase, first + 1) != std::string::npos;
}

} // namespace

TEST(manager, error_messages_say_what_was_wrong_and_what_to_do_once)
{
    asio::io_context ioc;
    valve::manager mgr{ioc.get_executor()};
    mgr.register_profile("p", valve::dedicated_resource(rate::per_second(1)));

    const auto bad_rate =
        message_of([&] { mgr.register_profile("u", valve::dedicated_resource(rate::per_second(std::nan("")))); });
    EXPECT_TRUE(bad_rate.starts_with("manager::register_profile(\"u\"): dedicated_resource: ")) << bad_rate;
    EXPECT_NE(bad_rate.find("nan"), std::string::npos) << bad_rate;
    EXPECT_FALSE(repeats(bad_rate, "valve")) << bad_rate;
    EXPECT_FALSE(repeats(bad_rate, "invalid")) << bad_rate;
    EXPECT_EQ(bad_rate.find("[valve:"), std::string::npos) << bad_rate;

    EXPECT_EQ(message_of([&] { mgr.get_limiter("nope", "u"); }),
              "manager::get_limiter(\"nope\", \"u\"): no profile \"nope\" is registered; register it first");
    EXPECT_EQ(message_of([&] { (void)mgr.stats("nope"); }),
              "manager::stats(\"nope\"): no profile \"nope\" is registered; register it first");
    EXPECT_EQ(message_of([&] { mgr.set_rate("nope", rate::per_second(5)); }),
              "manager::set_rate(\"nope\", 5/s): no profile \"nope\" is registered; register it first");
    const auto bad_set = message_of([&] { mgr.set_rate("p", rate::per_second(-1)); });
    EXPECT_TRUE(bad_set.starts_with("manager::set_rate(\"p\", -1/s): ")) << bad_set;
    EXPECT_NE(bad_set.find("rate::unlimited()"), std::string::npos) << bad_set;
    EXPECT_EQ(message_of([&] { mgr.register_profile("p", valve::dedicated_resource(rate::per_second(1))); }),
              "manager::register_profile(\"p\"): a profile of that name is already registered; choose another name");
    EXPECT_EQ(message_of([&] {
                  mgr.register_profile("w", valve::dedicated_resource(rate::per_second(1)), valve::worker_pool(0, 10));
              }),
              "manager::register_profile(\"w\"): worker_pool concurrency is 0; give at least 1");
}

TEST(manager, an_empty_profile_name_is_refused)
{
    asio::io_context ioc;
    valve::manager mgr{ioc.get_executor()};
    EXPECT_EQ(thrown_by([&] { mgr.register_profile("", valve::dedicated_resource(rate::per_second(1))); }),
              valve::errc::invalid_argument);
    EXPECT_EQ(message_of([&] { mgr.register_profile("", valve::dedicated_resource(rate::per_second(1))); }),
              "manager::register_profile(\"\"): the profile name is empty; give it a name");
    EXPECT_EQ(thrown_by([&] { mgr.get_limiter("", "u"); }), valve::errc::invalid_argument);
    // An empty user name is an ordinary user.
    mgr.register_profile("p", valve::dedicated_resource(rate::per_second(1)));
    EXPECT_NE(mgr.get_limiter("p", ""), nullptr);
}

TEST(manager, idle_dedicated_limiters_are_evicted)
{
    asio::io_context ioc;
    valve::manager mgr{ioc.get_executor()};
    mgr.register_profile("pro", valve::dedicated_resource(rate::per_second(10)), valve::idle_timeout(20ms));
    for (int i = 0; i < 100; ++i) mgr.get_limiter("pro", "user-" + std::to_string(i));
    auto held = mgr.get_limiter("pro", "holder"); // a user still holding its limiter keeps it
    // So does one holding only a for_user handle on its queue: the limiter must not be closed
    // under it.
    auto other_view = mgr.get_limiter("pro", "viewer")->for_user(7);
    EXPECT_EQ(mgr.limiter_count("pro"), 102u);
    const auto give_up = std::chrono::steady_clock::now() + 10s;
    while (mgr.limiter_count("pro") > 2 && std::chrono::steady_clock::now() < give_up) ioc.run_for(10ms);
    ioc.run_for(50ms); // more sweeps than the idle timeout: the two held ones stay
    EXPECT_EQ(mgr.limiter_count("pro"), 2u);
    EXPECT_EQ(mgr.get_limiter("pro", "holder"), held);
    std::atomic<bool> ran{false};
    other_view->async_submit([&] { ran = true; }, [](std::exception_ptr e) { EXPECT_FALSE(e); });
    const auto done_by = std::chrono::steady_clock::now() + 10s;
    while (!ran && std::chrono::steady_clock::now() < done_by) ioc.run_for(10ms);
    EXPECT_TRUE(ran) << "a for_user handle outlived its limiter's eviction and was refused";
    other_view.reset();
    while (mgr.limiter_count("pro") > 1 && std::chrono::steady_clock::now() < give_up + 10s) ioc.run_for(10ms);
    EXPECT_EQ(mgr.limiter_count("pro"), 1u) << "released, the viewer's limiter is evicted";
}

TEST(manager, an_evicted_user_gets_no_fresh_burst)
{
    // 1 per minute, burst 10: over this test's run a user may have 10 permits, 11 at the
    // very most. Eviction used to drop the drained bucket after 5 ms of rest and make a full
    // one on the next get_limiter (about 50 permits in 150 ms).
    asio::io_context ioc;
    valve::manager mgr{ioc.get_executor()};
    mgr.register_profile("pro", valve::dedicated_resource(rate::per(1, std::chrono::minutes(1)), 10),
                         valve::idle_timeout(5ms), valve::worker_pool(1, 10));
    mgr.get_limiter("pro", "bystander"); // full and idle: its eviction shows that sweeps ran
    int granted = 0;
    const auto start = std::chrono::steady_clock::now();
    while (std::chrono::steady_clock::now() - start < 200ms) {
        auto l = mgr.get_limiter("pro", "u");
        while (l->try_enter()) ++granted; // the permit is released at once
        l.reset();
        ioc.run_for(15ms); // rest for longer than the idle timeout while sweeps run
    }
    const auto elapsed = std::chrono::steady_clock::now() - start;
    EXPECT_LE(granted, 10 + 1) << "in " << std::chrono::duration_cast<std::chrono::milliseconds>(elapsed).count()
                               << " ms";
    EXPECT_LT(elapsed, 60s); // where 11 stops being the bound
    EXPECT_EQ(mgr.limiter_count("pro"), 1u) << "the bystander's full limiter is evicted, u's drained one kept";
}

TEST(manager, a_limiter_is_evicted_once_every_bucket_of_it_is_full_again)
{
    asio::io_context ioc;
    valve::manager mgr{ioc.get_executor()};
    // A fast rate: the drained bucket is full again 10 ms later, and then the limiter goes.
    mgr.register_profile("fast", valve::dedicated_resource(rate::per_second(1000), 10), valve::idle_timeout(5ms));
    // Its primary bucket refills as fast, but its also_limit does not: kept.
    mgr.register_profile("also", valve::dedicated_resource(rate::per_second(1000), 10),
                         valve::also_limit(rate::per(1, std::chrono::minutes(1)), 5), valve::idle_timeout(5ms));
    std::uint64_t rejected = 0;
    for (const char* p : {"fast", "also"}) {
        auto l = mgr.get_limiter(p, "u");
        while (l->try_enter()) {
        }
        rejected = l->stats().rejected;
        EXPECT_GE(rejected, 1u);
    }
    const auto give_up = std::chrono::steady_clock::now() + 10s;
    while (mgr.limiter_count("fast") > 0 && std::chrono::steady_clock::now() < give_up) ioc.run_for(5ms);
    EXPECT_EQ(mgr.limiter_count("fast"), 0u) << "a refilled limiter must still be evicted";
    EXPECT_EQ(mgr.stats("fast").rejected, 1u) << "an evicted limiter's statistics are kept";
    ioc.run_for(30ms); // sweeps, and the primary bucket of "also" is long full again
    EXPECT_EQ(mgr.limiter_count("also"), 1u) << "a limiter with an also_limit bucket still drained is kept";
    EXPECT_LE(mgr.get_limiter("also", "u")->available(), 1.0);
}

TEST(manager, dedicated_profiles_evict_by_default)
{
    asio::io_context ioc;
    valve::manager mgr{ioc.get_executor()};
    mgr.register_profile("default", valve::dedicated_resource(rate::per_second(10)));
    // Long enough that making 100 limiters never outlasts it, even under a sanitizer on a busy
    // machine (at 5 ms, TSan in CI once evicted the first user before the hundredth was made).
    mgr.register_profile("short", valve::dedicated_resource(rate::per_second(10)), valve::idle_timeout(300ms));
    mgr.register_profile("shared", valve::shared_resource("k", rate::per_second(10)));
    EXPECT_EQ(mgr.idle_timeout_of("default"), valve::default_idle_timeout);
    EXPECT_EQ(valve::default_idle_timeout, 60s);
    EXPECT_EQ(mgr.idle_timeout_of("short"), 300ms);
    EXPECT_EQ(mgr.idle_timeout_of("shared"), std::nullopt);
    // Eviction does not wait for the io_context: get_limiter sweeps too, when a sweep is due,
    // so memory stays bounded even where no timer runs (the default's sweeps need none, so that
    // `ioc.run()` still returns when the program's work is done).
    for (int i = 0; i < 100; ++i) mgr.get_limiter("short", "user-" + std::to_string(i));
    EXPECT_EQ(mgr.limiter_count("short"), 100u);
    std::this_thread::sleep_for(400ms); // past the idle timeout and the sweep's due time, for sure
    mgr.get_limiter("short", "newcomer");
    EXPECT_EQ(mgr.limiter_count("short"), 1u);
    // A default profile's users are not swept before their minute has passed.
    for (int i = 0; i < 10; ++i) mgr.get_limiter("default", "user-" + std::to_string(i));
    mgr.get_limiter("default", "newcomer");
    EXPECT_EQ(mgr.limiter_count("default"), 11u);
}

TEST(manager, a_profile_starts_threads_only_when_blocking_tasks_need_them)
{
    // worker_pool(100000, ...) used to start 100,000 threads at registration.
    const auto os_threads = [] {
        return std::distance(std::filesystem::directory_iterator{"/proc/self/task"},
                             std::filesystem::directory_iterator{});
    };
    asio::io_context ioc;
    valve::manager mgr{ioc.get_executor()};
    const auto before = os_threads();
    mgr.register_profile("huge", valve::dedicated_resource(rate::unlimited()), valve::worker_pool(100000, 10));
    mgr.register_profile("two", valve::dedicated_resource(rate::unlimited()), valve::worker_pool(2, 10));
    mgr.register_profile("elsewhere", valve::dedicated_resource(rate::unlimited()), valve::run_on(ioc.get_executor()));
    EXPECT_EQ(mgr.thread_count("huge"), 0u);
    EXPECT_LT(os_threads() - before, 10);
    // Async tasks run on their submitter's executor: no thread.
    int results = 0;
    asio::co_spawn(
        ioc,
        [&]() -> asio::awaitable<void> {
            auto l = mgr.get_limiter("huge", "u");
            for (int i = 0; i < 5; ++i) results += co_await l->submit([]() -> asio::awaitable<int> { co_return 1; });
        },
        asio::detached);
    ioc.run();
    EXPECT_EQ(results, 5);
    EXPECT_EQ(mgr.thread_count("huge"), 0u);
    // Blocking tasks start threads as they need them: three at once, three threads; no more than
    // the concurrency.
    std::promise<void> open;
    std::shared_future<void> gate = open.get_future().share();
    std::latch started{3 + 2}; // three tasks of "huge" and the first two of "two"
    std::atomic<int> arrived{0};
    std::atomic<int> ran{0};
    auto blocked = [&, gate] {
        if (arrived++ < 5) started.count_down();
        gate.wait();
        ++ran;
    };
    auto huge = mgr.get_limiter("huge", "u");
    for (int i = 0; i < 3; ++i) huge->async_submit(blocked, [](std::exception_ptr) {});
    auto two = mgr.get_limiter("two", "u");
    for (int i = 0; i < 5; ++i) two->async_submit(blocked, [](std::exception_ptr) {});
    started.wait();
    EXPECT_EQ(mgr.thread_count("huge"), 3u);
    EXPECT_EQ(mgr.thread_count("two"), 2u);
    EXPECT_EQ(mgr.thread_count("elsewhere"), 0u);
    open.set_value();
    ioc.restart();
    const auto give_up = std::chrono::steady_clock::now() + 10s;
    while (ran.load() < 8 && std::chrono::steady_clock::now() < give_up) ioc.run_for(10ms);
    EXPECT_EQ(ran.load(), 8);
    EXPECT_LE(mgr.thread_count("two"), 2u);
}

TEST(manager, get_limiter_is_safe_from_many_threads)
{
    asio::io_context ioc;
    valve::manager mgr{ioc.get_executor()};
    mgr.register_profile("pro", valve::dedicated_resource(rate::unlimited()), valve::worker_pool(2, 1000));
    std::vector<std::thread> threads;
    std::vector<std::set<valve::limiter*>> seen(4);
    std::atomic<int> ran{0};
    for (int t = 0; t < 4; ++t)
        threads.emplace_back([&, t] {
            for (int i = 0; i < 200; ++i) {
                auto l = mgr.get_limiter("pro", "user-" + std::to_string(i % 50));
                seen[t].insert(l.get());
                l->async_submit([&] { ++ran; }, [](std::exception_ptr) {});
            }
        });
    for (auto& th : threads) th.join();
    ioc.run();
    EXPECT_EQ(mgr.limiter_count("pro"), 50u);
    for (const auto& s : seen) EXPECT_EQ(s, seen[0]); // every thread got the same 50 limiters
    EXPECT_EQ(ran.load(), 800);
}

TEST(manager, a_manager_with_its_own_thread_shuts_down_cleanly)
{
    std::atomic<int> ran{0};
    std::atomic<int> refused{0};
    {
        valve::manager mgr;
        mgr.register_profile("p", valve::shared_resource("k", rate::per_second(1000), 10), valve::worker_pool(2, 100));
        auto l = mgr.get_limiter("p", "u");
        for (int i = 0; i < 20; ++i) l->async_submit([&] { ++ran; }, [](std::exception_ptr) {});
        mgr.shutdown(5s);
        EXPECT_EQ(ran.load(), 20);
        l->async_submit([&] { ++ran; }, [&](std::exception_ptr e) { refused += code_of(e) == valve::errc::shutting_down; });
        EXPECT_EQ(thrown_by([&] { mgr.get_limiter("p", "u"); }), valve::errc::shutting_down);
    }
    EXPECT_EQ(ran.load(), 20);
    EXPECT_EQ(refused.load(), 1);
}

TEST(manager, shutdown_runs_a_stopped_io_context_itself)
{
    asio::io_context ioc;
    valve::manager mgr{ioc.get_executor()};
    mgr.register_profile("p", valve::shared_resource("k", rate::per(1, 1h), 1), valve::worker_pool(1, 10));
    auto l = mgr.get_limiter("p", "u");
    int ran = 0;
    l->async_submit([&] { ++ran; }, [](std::exception_ptr) {});
    ioc.run(); // returns once the task is done: the io_context is stopped from here on
    ASSERT_TRUE(ioc.stopped());
    std::vector<error_code> heard;
    for (int i = 0; i < 2; ++i) // no token for an hour: they wait in the queue
        l->async_submit([&] { ++ran; }, [&](std::exception_ptr e) { heard.push_back(code_of(e)); });
    const auto start = std::chrono::steady_clock::now();
    mgr.shutdown(20ms); // runs `ioc` until the grace is over and the backlog aborted
    EXPECT_LT(std::chrono::steady_clock::now() - start, 10s);
    EXPECT_EQ(ran, 1);
    EXPECT_EQ(heard, (std::vector<error_code>{asio::error::operation_aborted, asio::error::operation_aborted}));
    EXPECT_TRUE(ioc.stopped()) << "left running, as it was not found";
}

TEST(manager, shutdown_from_inside_its_io_context_is_an_error_not_a_hang)
{
    for (const int kind : {0, 1, 2}) { // the io_context's executor, one tracking work, a strand
        asio::io_context ioc;
        const asio::any_io_executor ex =
            kind == 0   ? asio::any_io_executor{ioc.get_executor()}
            : kind == 1 ? asio::any_io_executor{asio::prefer(ioc.get_executor(), asio::execution::outstanding_work.tracked)}
                        : asio::any_io_executor{asio::make_strand(ioc)};
        valve::manager mgr{ex};
        mgr.register_profile("p", valve::shared_resource("k", rate::per_second(10)), valve::worker_pool(1, 10));
        error_code refused;
        asio::post(ioc, [&] {
            refused = thrown_by([&] { mgr.shutdown(); });
            ioc.stop(); // a tracking executor keeps `ioc` from running out of work
        });
        ioc.run();
        EXPECT_EQ(refused, valve::errc::invalid_argument) << "executor kind " << kind;
        // From outside, it works.
        mgr.shutdown();
        EXPECT_EQ(thrown_by([&] { mgr.get_limiter("p", "u"); }), valve::errc::shutting_down);
    }
}

TEST(manager, stats_add_up_and_a_stall_is_logged)
{
    auto lines = std::make_shared<std::ostringstream>();
    auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(*lines);
    auto log = std::make_shared<spdlog::logger>("valve-test", sink);
    valve::set_logger(log);

    asio::io_context ioc;
    valve::manager mgr{ioc.get_executor()};
    mgr.register_profile("stuck", valve::shared_resource("k", rate::zero(), 1), valve::worker_pool(1, 10));
    mgr.register_profile("pro", valve::dedicated_resource(rate::unlimited()), valve::worker_pool(1, 10));
    auto stuck = mgr.get_limiter("stuck", "u");
    for (int i = 0; i < 3; ++i) stuck->async_submit([] {}, [](std::exception_ptr) {});
    mgr.get_limiter("pro", "a")->async_submit([] {}, [](std::exception_ptr) {});
    mgr.get_limiter("pro", "b")->async_submit([] {}, [](std::exception_ptr) {});
    mgr.warn_on_stall(20ms);
    const auto give_up = std::chrono::steady_clock::now() + 10s;
    while (lines->str().find("stuck") == std::string::npos && std::chrono::steady_clock::now() < give_up)
        ioc.run_for(5ms);
    const valve::limiter_stats st = mgr.stats();
    EXPECT_EQ(st.submitted, 5u);
    EXPECT_EQ(st.completed, 3u); // the burst's one token, and the two pro users' tasks
    EXPECT_EQ(st.queued, 2u);
    EXPECT_NE(lines->str().find("2 tasks queued"), std::string::npos) << lines->str();
    EXPECT_EQ(lines->str().find("\"pro\""), std::string::npos) << lines->str(); // no false alarm
    valve::set_logger(nullptr);
    mgr.async_shutdown(0ms, [](error_code) {});
    ioc.run();
}

TEST(manager, destruction_aborts_the_backlog_at_once_and_held_limiters_refuse_afterwards)
{
    asio::io_context ioc;
    std::atomic<int> ran{0};
    int aborted = 0, refused = 0;
    std::shared_ptr<valve::limiter> kept;
    {
        valve::manager mgr{ioc.get_executor()};
        mgr.register_profile("p", valve::dedicated_resource(rate::zero(), 1), valve::worker_pool(1, 10));
        kept = mgr.get_limiter("p", "u");
        for (int i = 0; i < 5; ++i)
            kept->async_submit([&] { ++ran; }, [&](std::exception_ptr e) {
                aborted += code_of(e) == asio::error::operation_aborted;
            });
        // Destroyed while nobody runs the io_context: the backlog must not run meanwhile.
    }
    EXPECT_LE(ran.load(), 1); // only the burst's one token could ever run
    kept->async_submit([&] { ++ran; }, [&](std::exception_ptr e) { refused += code_of(e) == valve::errc::shutting_down; });
    ioc.run();
    EXPECT_EQ(aborted, 4);
    EXPECT_EQ(refused, 1);
    EXPECT_LE(ran.load(), 1);
}

TEST(manager, a_limiter_kept_after_a_manager_with_its_own_thread_refuses_with_shutting_down)
{
    std::shared_ptr<valve::limiter> shared, dedicated;
    {
        valve::manager mgr;
        mgr.register_profile("s", valve::shared_resource("k", rate::unlimited()), valve::worker_pool(1, 10));
        mgr.register_profile("d", valve::dedicated_resource(rate::unlimited()), valve::worker_pool(1, 10));
        shared = mgr.get_limiter("s", "u");
        dedicated = mgr.get_limiter("d", "u");
    }
    for (auto* l : {&shared, &dedicated}) {
        auto heard = std::make_shared<std::promise<error_code>>();
        auto said = heard->get_future();
        (*l)->async_submit([] {}, [heard](std::exception_ptr e) { heard->set_value(code_of(e)); });
        ASSERT_EQ(said.wait_for(10s), std::future_status::ready) << "the refusal never came";
        EXPECT_EQ(said.get(), valve::errc::shutting_down);
    }
}

TEST(manager, shutdown_from_inside_a_blocking_task_is_an_error_not_a_hang)
{
    asio::io_context ioc;
    auto work = asio::make_work_guard(ioc);
    std::thread runner{[&] { ioc.run(); }};
    {
        valve::manager mgr{ioc.get_executor()};
        mgr.register_profile("p", valve::shared_resource("k", rate::unlimited()), valve::worker_pool(2, 10));
        auto l = mgr.get_limiter("p", "u");
        std::promise<error_code> from_blocking;
        l->async_submit([&] { return thrown_by([&] { mgr.shutdown(1s); }); },
                        [&](std::exception_ptr e, error_code ec) {
                            EXPECT_FALSE(e);
                            from_blocking.set_value(ec);
                        });
        auto blocking = from_blocking.get_future();
        ASSERT_EQ(blocking.wait_for(10s), std::future_status::ready) << "shutdown from a blocking task hangs";
        EXPECT_EQ(blocking.get(), valve::errc::invalid_argument);
        mgr.shutdown(1s); // from outside, it works
    }
    work.reset();
    runner.join();
}

TEST(manager, shutdown_from_inside_an_async_task_is_an_error_not_a_hang)
{
    asio::io_context ioc;
    auto work = asio::make_work_guard(ioc);
    std::thread runner{[&] { ioc.run(); }};
    asio::io_context other; // where the coroutine that submits the task runs
    auto other_work = asio::make_work_guard(other);
    std::thread other_runner{[&] { other.run(); }};
    {
        valve::manager mgr{ioc.get_executor()};
        mgr.register_profile("p", valve::shared_resource("k", rate::unlimited()), valve::worker_pool(2, 10));
        auto l = mgr.get_limiter("p", "u");
        std::promise<error_code> from_async;
        asio::co_spawn(
            other,
            [&]() -> asio::awaitable<error_code> {
                co_return co_await l->submit([&]() -> asio::awaitable<error_code> {
                    co_return thrown_by([&] { mgr.shutdown(1s); });
                });
            },
            [&](std::exception_ptr e, error_code ec) {
                EXPECT_FALSE(e);
                from_async.set_value(ec);
            });
        auto async = from_async.get_future();
        ASSERT_EQ(async.wait_for(10s), std::future_status::ready) << "shutdown from an async task hangs";
        EXPECT_EQ(async.get(), valve::errc::invalid_argument);
        mgr.shutdown(1s); // from outside, it works
    }
    work.reset();
    other_work.reset();
    runner.join();
    other_runner.join();
}

// A permit (from async_enter or try_enter) counts as an async task: a blocking shutdown called
// while holding one would wait for it forever.
TEST(manager, shutdown_while_holding_a_permit_is_an_error_not_a_hang)
{
    for (const bool queued : {true, false}) {
        SCOPED_TRACE(queued ? "async_enter" : "try_enter");
        asio::io_context ioc;
        auto work = asio::make_work_guard(ioc);
        std::thread runner{[&] { ioc.run(); }};
        asio::io_context other; // where the coroutine holding the permit runs
        auto other_work = asio::make_work_guard(other);
        std::thread other_runner{[&] { other.run(); }};
        {
            valve::manager mgr{ioc.get_executor()};
            mgr.register_profile("p", valve::shared_resource("k", rate::unlimited()), valve::worker_pool(2, 10));
            auto l = mgr.get_limiter("p", "u");
            std::promise<error_code> from_holder;
            asio::co_spawn(
                other,
                [&]() -> asio::awaitable<error_code> {
                    valve::permit held;
                    if (queued) // (not `?:`: GCC 12 mishandles a co_await in a conditional expression)
                        held = co_await l->async_enter(asio::use_awaitable);
                    else
                        held = l->try_enter();
                    EXPECT_TRUE(held);
                    co_return thrown_by([&] { mgr.shutdown(1s); });
                },
                [&](std::exception_ptr e, error_code ec) {
                    EXPECT_FALSE(e);
                    from_holder.set_value(ec);
                });
            auto holder = from_holder.get_future();
            ASSERT_EQ(holder.wait_for(10s), std::future_status::ready) << "shutdown while holding a permit hangs";
            EXPECT_EQ(holder.get(), valve::errc::invalid_argument);
            mgr.shutdown(1s); // the permit was released with its coroutine: from outside, it works
        }
        work.reset();
        other_work.reset();
        runner.join();
        other_runner.join();
    }
}

TEST(manager, shutdown_from_inside_a_task_of_a_manager_with_its_own_thread_is_an_error)
{
    valve::manager mgr;
    mgr.register_profile("p", valve::shared_resource("k", rate::unlimited()), valve::worker_pool(1, 10));
    auto l = mgr.get_limiter("p", "u");
    std::promise<error_code> from_async;
    asio::co_spawn(
        mgr.get_executor(),
        [&]() -> asio::awaitable<error_code> {
            co_return co_await l->submit(
                [&]() -> asio::awaitable<error_code> { co_return thrown_by([&] { mgr.shutdown(1s); }); });
        },
        [&](std::exception_ptr e, error_code ec) {
            EXPECT_FALSE(e);
            from_async.set_value(ec);
        });
    auto async = from_async.get_future();
    ASSERT_EQ(async.wait_for(10s), std::future_status::ready) << "shutdown from an async task hangs";
    EXPECT_EQ(async.get(), valve::errc::invalid_argument);
    mgr.shutdown(1s);
}

TEST(manager, a_manager_with_its_own_thread_may_be_destroyed_on_that_thread)
{
    for (int round = 0; round < 5; ++round) { // a thread left to end late gets time to, in the next rounds
        auto mgr = std::make_unique<valve::manager>();
        mgr->register_profile("p", valve::shared_resource("k", rate::unlimited()), valve::worker_pool(1, 10));
        mgr->register_profile("d", valve::dedicated_resource(rate::unlimited()), valve::worker_pool(1, 10));
        {
            std::promise<void> ran;
            mgr->get_limiter("p", "u")->async_submit([] {}, [&](std::exception_ptr) { ran.set_value(); });
            ran.get_future().wait();
            std::promise<void> ran_too;
            mgr->get_limiter("d", "u")->async_submit([] {}, [&](std::exception_ptr) { ran_too.set_value(); });
            ran_too.get_future().wait();
        }
        std::promise<void> destroyed;
        std::promise<void> posted; // destroyed after the post has returned (and stopped using the thread)
        asio::post(mgr->get_executor(), [&, after = posted.get_future()] {
            after.wait();
            mgr.reset();
            destroyed.set_value();
        });
        posted.set_value();
        auto done = destroyed.get_future();
        ASSERT_EQ(done.wait_for(10s), std::future_status::ready);
    }
}

TEST(manager, a_manager_with_its_own_thread_may_be_destroyed_inside_one_of_its_tasks)
{
    // The task holds the last owner of the manager and lets it go while it runs: the
    // destructor must not wait for that task, nor for the completion it has yet to deliver.
    auto mgr = std::make_shared<valve::manager>();
    mgr->register_profile("p", valve::shared_resource("k", rate::unlimited()), valve::worker_pool(1, 10));
    std::promise<void> destroyed, heard;
    auto lim = mgr->get_limiter("p", "u");
    lim->async_submit(
        [&destroyed, owner = std::move(mgr)]() mutable {
            owner.reset();
            destroyed.set_value();
        },
        [&heard](std::exception_ptr) { heard.set_value(); });
    lim.reset();
    ASSERT_EQ(destroyed.get_future().wait_for(10s), std::future_status::ready) << "~manager waited for its own task";
    EXPECT_EQ(heard.get_future().wait_for(10s), std::future_status::ready) << "the task's completion never came";
}

TEST(manager, cancel_through_a_dedicated_users_handle_aborts_the_queue_but_keeps_the_limiter)
{
    asio::io_context ioc;
    valve::manager mgr{ioc.get_executor()};
    // One token now, then none for an hour: what comes after the first task stays queued.
    mgr.register_profile("p", valve::dedicated_resource(rate::per(1, 1h), 1), valve::worker_pool(1, 10));
    auto alice = mgr.get_limiter("p", "alice");
    std::vector<error_code> heard;
    int ran = 0;
    for (int i = 0; i < 3; ++i) alice->async_submit([&] { ++ran; }, [&](std::exception_ptr e) { heard.push_back(code_of(e)); });
    ioc.run_for(50ms);
    alice->cancel();
    ioc.restart(); // (run out of work when the old limiter closed)
    ioc.run_for(50ms);
    EXPECT_EQ(heard, (std::vector<error_code>{{}, asio::error::operation_aborted, asio::error::operation_aborted}));
    // The limiter (and the limit it keeps: no token for an hour) stays: new tasks queue, through
    // the old handle and a new one, and are not refused.
    alice->async_submit([&] { ++ran; }, [&](std::exception_ptr e) { heard.push_back(code_of(e)); });
    mgr.get_limiter("p", "alice")->async_submit([&] { ++ran; }, [&](std::exception_ptr e) { heard.push_back(code_of(e)); });
    ioc.restart();
    ioc.run_for(50ms);
    EXPECT_EQ(heard.size(), 3u) << "alice's new tasks are queued, not refused";
    EXPECT_EQ(mgr.stats("p").queued, 2u);
    EXPECT_EQ(mgr.limiter_count("p"), 1u);
    mgr.async_shutdown(0ms, [](error_code) {});
    ioc.restart();
    ioc.run();
    EXPECT_EQ(heard.size(), 5u);
    EXPECT_EQ(ran, 1);
}

TEST(manager, cancel_through_a_users_handle_aborts_that_users_queued_tasks_only)
{
    asio::io_context ioc;
    valve::manager mgr{ioc.get_executor()};
    // One token now, then none for an hour: what comes after the first task stays queued.
    mgr.register_profile("p", valve::shared_resource("k", rate::per(1, 1h), 1), valve::worker_pool(1, 10));
    auto alice = mgr.get_limiter("p", "alice");
    auto bob = mgr.get_limiter("p", "bob");
    std::vector<error_code> heard_alice, heard_bob;
    int ran = 0;
    for (int i = 0; i < 3; ++i) {
        alice->async_submit([&] { ++ran; }, [&](std::exception_ptr e) { heard_alice.push_back(code_of(e)); });
        bob->async_submit([&] { ++ran; }, [&](std::exception_ptr e) { heard_bob.push_back(code_of(e)); });
    }
    ioc.run_for(50ms); // alice's first task takes the one token
    alice->cancel();
    ioc.run_for(50ms);
    EXPECT_EQ(ran, 1);
    EXPECT_EQ(heard_alice, (std::vector<error_code>{{}, asio::error::operation_aborted, asio::error::operation_aborted}));
    EXPECT_TRUE(heard_bob.empty()) << "bob's tasks stay queued";
    // Alice may submit again, through her handle or a new one, and so may bob.
    alice->async_submit([&] { ++ran; }, [&](std::exception_ptr e) { heard_alice.push_back(code_of(e)); });
    mgr.get_limiter("p", "alice")->async_submit([&] { ++ran; },
                                                [&](std::exception_ptr e) { heard_alice.push_back(code_of(e)); });
    ioc.run_for(50ms);
    EXPECT_EQ(heard_alice.size(), 3u) << "alice's new tasks are queued, not refused";
    EXPECT_EQ(mgr.stats("p").queued, 5u);
    mgr.async_shutdown(0ms, [](error_code) {});
    ioc.run();
    EXPECT_EQ(heard_alice.size(), 5u);
    EXPECT_EQ(heard_bob.size(), 3u);
    EXPECT_EQ(ran, 1);
}
