// valve's limits held in Redis, against a real redis-server that each test starts and stops.
#include <valve/redis.hpp>

#include "redis/gcra.hpp"
#include "promtool.hpp"
#include "redis_server.hpp"
#include "support.hpp"

#include <valve/bucket_core.hpp>
#include <valve/error.hpp>
#include <valve/manager.hpp>
#include <valve/metrics.hpp>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/use_future.hpp>

#include <gtest/gtest.h>

#include <fcntl.h>
#include <spawn.h>

extern char** environ;

#include <array>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <future>
#include <mutex>
#include <random>
#include <thread>
#include <type_traits>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using boost::system::error_code;
using valve::redis_reply;
using valve::test::redis_server;

namespace {

using valve::test::running_context;

redis_reply exec(valve::redis_connection& c, std::vector<std::string> cmd, error_code* ec_out = nullptr)
{
    std::promise<std::pair<error_code, redis_reply>> p;
    auto f = p.get_future();
    c.async_exec(std::move(cmd), [&p](error_code ec, redis_reply r) { p.set_value({ec, std::move(r)}); });
    if (f.wait_for(10s) != std::future_status::ready) {
        ADD_FAILURE() << "no reply within 10 s";
        return {};
    }
    auto [ec, r] = f.get();
    if (ec_out) *ec_out = ec;
    else EXPECT_FALSE(ec) << ec.message();
    return r;
}

error_code connect(valve::redis_connection& c)
{
    auto f = c.async_connect(asio::use_future(
        [](error_code ec) { return ec; }));
    if (f.wait_for(10s) != std::future_status::ready) {
        ADD_FAILURE() << "async_connect did not complete within 10 s";
        return asio::error::timed_out;
    }
    return f.get();
}

error_code acquire(valve::redis_bucket& b, std::size_t n = 1,
                   valve::resource::time_point deadline = valve::resource::time_point::max())
{
    std::promise<error_code> p;
    auto f = p.get_future();
    b.async_acquire(n, deadline, [&p](error_code ec) { p.set_value(ec); });
    if (f.wait_for(10s) != std::future_status::ready) {
        ADD_FAILURE() << "async_acquire did not complete within 10 s";
        return asio::error::timed_out;
    }
    return f.get();
}

// Waits (up to 10 s) until `done()` holds; false if it never did.
template <class Done>
bool eventually(Done done)
{
    const auto until = std::chrono::steady_clock::now() + 10s;
    while (!done()) {
        if (std::chrono::steady_clock::now() > until) return false;
        std::this_thread::sleep_for(1ms);
    }
    return true;
}

// How many single tokens `b` gets now (a deadline of now), until Redis says none is left.
int take_all_now(valve::redis_bucket& b)
{
    int n = 0;
    while (!acquire(b, 1, std::chrono::steady_clock::now())) ++n;
    return n;
}

// Runs valve's script with an explicit time (us) and returns its reply.
valve::detail::gcra_result run_script(valve::redis_connection& c, const std::vector<valve::detail::gcra_limit>& limits,
                                      std::uint64_t give, const std::vector<valve::detail::gcra_ask>& asks,
                                      std::optional<std::int64_t> now_us)
{
    std::vector<std::string> cmd{"EVALSHA", valve::detail::gcra_script().sha1};
    auto args = valve::detail::gcra_args(limits, give, asks, now_us);
    cmd.insert(cmd.end(), args.begin(), args.end());
    const auto reply = exec(c, cmd);
    auto r = valve::detail::gcra_parse(reply, asks.size());
    EXPECT_TRUE(r.has_value()) << reply.str;
    return r.value_or(valve::detail::gcra_result{});
}

std::uint64_t model_seed()
{
    if (const char* s = std::getenv("VALVE_MODEL_SEED")) return std::strtoull(s, nullptr, 10);
    return std::random_device{}();
}

} // namespace

// ---- the script, on explicit times -------------------------------------------------------

TEST(redis_script, decides_as_bucket_core_does_on_the_same_explicit_times)
{
    redis_server server;
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), server.url()};
    ASSERT_FALSE(connect(redis)) << redis.last_error();

    using valve::rate;
    const std::uint64_t seed = model_seed();
    SCOPED_TRACE("VALVE_MODEL_SEED=" + std::to_string(seed));
    std::mt19937_64 rng(seed);
    const rate rates[] = {rate::per_second(2000), rate::per_second(3), rate::per(7, 10ms), rate::per_second(100),
                          rate::per(5000, std::chrono::hours(1)), rate::per(10, std::chrono::minutes(1))};
    using tp = valve::bucket_core::time_point;
    const tp t0 = tp{} + 1000h;
    const std::int64_t base_us = 1'700'000'000'000'000; // a Redis TIME of 2023, in us
    int key = 0;
    for (const rate& r : rates) {
        for (std::size_t burst : {std::size_t{1}, std::size_t{5}, std::size_t{40}}) {
            const std::string name = "model-" + std::to_string(key++);
            valve::bucket_core core{r, burst, t0};
            const auto interval = valve::detail::gcra_interval_of(r, burst, "test");
            const std::vector<valve::detail::gcra_limit> limits{{"valve:{" + name + "}:0", interval, burst}};
            const double interval_us = 1e6 / r.tokens_per_second();
            std::int64_t at_us = 0;
            for (int step = 0; step < 150; ++step) {
                // Steps of 0 to 3 intervals, in whole microseconds.
                at_us += static_cast<std::int64_t>(std::uniform_real_distribution<double>(0, 3 * interval_us)(rng));
                const tp now = t0 + std::chrono::microseconds(at_us);
                const std::size_t n = std::uniform_int_distribution<std::size_t>(1, burst)(rng);
                const bool reserve = rng() % 3 == 0;
                SCOPED_TRACE("rate " + valve::to_string(r) + " burst " + std::to_string(burst) + " step " +
                             std::to_string(step) + " n " + std::to_string(n));
                if (!reserve) {
                    const bool core_took = core.try_take(n, now);
                    const auto got = run_script(redis, limits, 0, {{n, 0}}, base_us + at_us);
                    ASSERT_EQ(got.waits.size(), 1u);
                    ASSERT_EQ(got.waits[0] >= 0, core_took);
                    if (core_took) {
                        EXPECT_EQ(got.waits[0], 0);
                    }
                } else {
                    const std::int64_t max_wait =
                        static_cast<std::int64_t>(std::uniform_real_distribution<double>(0, 4 * interval_us)(rng));
                    error_code ec;
                    auto res = core.reserve(n, now, ec, now + std::chrono::microseconds(max_wait));
                    const auto got = run_script(redis, limits, 0, {{n, max_wait}}, base_us + at_us);
                    ASSERT_EQ(got.waits.size(), 1u);
                    ASSERT_EQ(got.waits[0] >= 0, !ec) << ec.message();
                    const std::int64_t core_wait_ns = ec ? 0 : (res.ready - now).count();
                    if (!ec) {
                        EXPECT_EQ(got.waits[0], (core_wait_ns + 999) / 1000);
                    }
                }
            }
        }
    }
}

TEST(redis_script, several_limits_are_taken_all_or_nothing)
{
    redis_server server;
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), server.url()};
    ASSERT_FALSE(connect(redis)) << redis.last_error();
    using valve::rate;
    const std::vector<valve::detail::gcra_limit> limits{
        {"valve:{both}:0", valve::detail::gcra_interval_of(rate::per_second(10), 10, "t"), 10},
        {"valve:{both}:1", valve::detail::gcra_interval_of(rate::per_second(1), 3, "t"), 3}};
    const std::int64_t now = 1'700'000'000'000'000;
    auto got = run_script(redis, limits, 0, {{2, 0}, {1, 0}, {1, 0}}, now);
    EXPECT_EQ(got.waits, (std::vector<std::int64_t>{0, 0, -1 - 1'000'000}));
    // The refused call changed neither key: the first limit still holds 7 of 10 tokens.
    const auto before0 = exec(redis, {"GET", "valve:{both}:0"}).str;
    const auto before1 = exec(redis, {"GET", "valve:{both}:1"}).str;
    got = run_script(redis, limits, 0, {{1, 0}}, now);
    EXPECT_LT(got.waits[0], 0);
    EXPECT_EQ(exec(redis, {"GET", "valve:{both}:0"}).str, before0);
    EXPECT_EQ(exec(redis, {"GET", "valve:{both}:1"}).str, before1);
    EXPECT_EQ(got.free_us, 700'000); // 7 tokens of 100 ms
    // A second later the strict limit has one token again.
    got = run_script(redis, limits, 0, {{1, 0}}, now + 1'000'000);
    EXPECT_EQ(got.waits[0], 0);
}

TEST(redis_script, reservations_queue_into_the_future_and_give_backs_move_time_back_but_not_before_now)
{
    redis_server server;
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), server.url()};
    ASSERT_FALSE(connect(redis)) << redis.last_error();
    const std::vector<valve::detail::gcra_limit> limits{
        {"valve:{r}:0", valve::detail::gcra_interval_of(valve::rate::per_second(1000), 2, "t"), 2}};
    const std::int64_t now = 1'700'000'000'000'000;
    const auto inf = valve::detail::gcra_no_deadline;
    auto got = run_script(redis, limits, 0, {{1, inf}, {1, inf}, {1, inf}, {1, inf}, {1, 1500}}, now);
    EXPECT_EQ(got.waits, (std::vector<std::int64_t>{0, 0, 1000, 2000, -1 - 3000}));
    EXPECT_EQ(got.free_us, -2000);
    // Two slots given back: the next comes 2 ms sooner.
    got = run_script(redis, limits, 2, {{1, inf}}, now);
    EXPECT_EQ(got.waits, (std::vector<std::int64_t>{1000}));
    // Giving back more than was taken leaves a full bucket, not more.
    got = run_script(redis, limits, 100, {}, now);
    EXPECT_EQ(got.free_us, 2000);
}

// The script runs one limit on a path of its own and several on another. With a second limit
// that never binds, the two must answer alike, through rate changes and give-backs.
TEST(redis_script, one_limit_alone_and_beside_a_limit_that_never_binds_decide_alike)
{
    redis_server server;
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), server.url()};
    ASSERT_FALSE(connect(redis)) << redis.last_error();
    using valve::rate;
    using valve::detail::gcra_interval_of;
    using valve::detail::gcra_limit;
    const std::uint64_t seed = model_seed();
    SCOPED_TRACE("VALVE_MODEL_SEED=" + std::to_string(seed));
    std::mt19937_64 rng(seed);
    // Intervals with fractions of different denominators (1/3, 1/7 us, ...) and whole ones.
    const rate rates[] = {rate::per_second(3), rate::per_second(7), rate::per_second(2000), rate::per(7, 10ms),
                          rate::per_second(3'000'000)};
    const auto wide = gcra_interval_of(rate::per_second(1e9), std::size_t{1} << 30, "test");
    const std::int64_t t0 = 1'700'000'000'000'000;
    std::int64_t at = 0;
    for (int step = 0; step < 400; ++step) {
        const rate& r = rates[(step / 40) % std::size(rates)]; // a rate change every 40 steps
        const std::size_t burst = (step / 40) % 2 == 0 ? 5 : 2;
        const auto interval = gcra_interval_of(r, burst, "test");
        const double interval_us = 1e6 / r.tokens_per_second();
        at += static_cast<std::int64_t>(std::uniform_real_distribution<double>(0, 2 * interval_us)(rng));
        const std::uint64_t give = rng() % 5 == 0 ? rng() % 3 : 0;
        std::vector<valve::detail::gcra_ask> asks;
        for (auto k = rng() % 4; k > 0; --k) {
            const std::size_t n = std::uniform_int_distribution<std::size_t>(1, burst)(rng);
            const auto max_wait = rng() % 3 == 0 ? valve::detail::gcra_no_deadline
                                                 : static_cast<std::int64_t>(std::uniform_real_distribution<double>(
                                                       0, 3 * interval_us)(rng));
            asks.push_back({n, max_wait});
        }
        SCOPED_TRACE("step " + std::to_string(step) + " rate " + valve::to_string(r));
        const auto alone = run_script(redis, {gcra_limit{"valve:{a}:0", interval, burst}}, give, asks, t0 + at);
        const auto beside = run_script(
            redis, {gcra_limit{"valve:{b}:0", interval, burst}, gcra_limit{"valve:{b}:1", wide, std::size_t{1} << 30}},
            give, asks, t0 + at);
        ASSERT_EQ(alone.waits, beside.waits);
        ASSERT_EQ(alone.free_us, beside.free_us);
        ASSERT_EQ(exec(redis, {"GET", "valve:{a}:0"}).str, exec(redis, {"GET", "valve:{b}:0"}).str);
    }
}

TEST(redis_script, a_rate_change_reads_the_old_fraction_rounded_up_in_the_new_one)
{
    redis_server server;
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), server.url()};
    ASSERT_FALSE(connect(redis)) << redis.last_error();
    using valve::rate;
    using valve::detail::gcra_interval_of;
    using valve::detail::gcra_limit;
    const std::int64_t now = 1'700'000'000'000'000;
    const auto thirds = gcra_interval_of(rate::per_second(3), 1, "t");  // 333333 + 1/3 us
    const auto sevenths = gcra_interval_of(rate::per_second(7), 1, "t"); // 142857 + 1/7 us
    ASSERT_EQ(thirds.d, 3);
    ASSERT_EQ(sevenths.d, 7);
    for (const bool beside : {false, true}) {
        SCOPED_TRACE(beside ? "beside a second limit" : "alone");
        const std::string key = beside ? "valve:{rc2}:0" : "valve:{rc1}:0";
        auto limits = [&](valve::detail::gcra_interval i) {
            std::vector<gcra_limit> l{{key, i, 1}};
            if (beside) l.push_back({"valve:{rc2}:1", gcra_interval_of(rate::per_second(1e9), 1000, "t"), 1000});
            return l;
        };
        EXPECT_EQ(run_script(redis, limits(thirds), 0, {{1, 0}}, now).waits, (std::vector<std::int64_t>{0}));
        EXPECT_EQ(exec(redis, {"GET", key}).str, std::to_string(now + 333'333) + ":1:3");
        // Read in sevenths, 1/3 us becomes 3/7 (rounded up): the slot is 333333 + 3/7 us away.
        auto got = run_script(redis, limits(sevenths), 0, {{1, 0}}, now);
        EXPECT_EQ(got.waits, (std::vector<std::int64_t>{-1 - 333'334}));
        EXPECT_EQ(got.free_us, -190'477); // in debt by 333333 + 3/7 - (142857 + 1/7) us, rounded down
        got = run_script(redis, limits(sevenths), 0, {{1, valve::detail::gcra_no_deadline}}, now);
        EXPECT_EQ(got.waits, (std::vector<std::int64_t>{333'334}));
        EXPECT_EQ(exec(redis, {"GET", key}).str, std::to_string(now + 333'333 + 142'857) + ":4:7");
        // A whole number of microseconds is kept as a plain number.
        const auto whole = gcra_interval_of(rate::per_second(2000), 1, "t");
        got = run_script(redis, limits(whole), 1000, {{1, 0}}, now); // all given back first
        EXPECT_EQ(got.waits, (std::vector<std::int64_t>{0}));
        EXPECT_EQ(exec(redis, {"GET", key}).str, std::to_string(now + 500));
        // The state as the first script wrote it, "us:0:d", reads the same.
        exec(redis, {"SET", key, std::to_string(now + 500) + ":0:1"});
        got = run_script(redis, limits(whole), 0, {{1, 0}}, now);
        EXPECT_EQ(got.waits, (std::vector<std::int64_t>{-1 - 500}));
        EXPECT_EQ(got.free_us, 0); // its one token is the one taken
    }
}

TEST(redis_script, a_key_expires_once_its_bucket_is_full_again)
{
    redis_server server;
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), server.url()};
    ASSERT_FALSE(connect(redis)) << redis.last_error();
    valve::redis_bucket bucket{redis, "expiring", valve::rate::per_second(20), 2};
    ASSERT_FALSE(acquire(bucket, 2));
    const auto ttl = exec(redis, {"PTTL", "valve:{expiring}:0"}).integer;
    EXPECT_GT(ttl, 0);
    EXPECT_LE(ttl, 100); // two tokens of 50 ms
    // Redis expires it on its own clock: wait for that event (bounded), not a guessed time.
    const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(ttl) + 1s;
    while (exec(redis, {"EXISTS", "valve:{expiring}:0"}).integer != 0 && std::chrono::steady_clock::now() < until)
        std::this_thread::sleep_for(1ms);
    EXPECT_EQ(exec(redis, {"EXISTS", "valve:{expiring}:0"}).integer, 0);
}

// ---- the connection ------------------------------------------------------------------------

TEST(redis_connection, answers_over_tcp_and_a_unix_socket)
{
    redis_server server;
    running_context ctx;
    valve::redis_connection tcp{ctx.ioc.get_executor(), server.url()};
    valve::redis_connection local{ctx.ioc.get_executor(), server.unix_url()};
    EXPECT_EQ(exec(tcp, {"PING"}).str, "PONG");
    EXPECT_EQ(exec(local, {"PING"}).str, "PONG");
    EXPECT_TRUE(tcp.is_up());
    EXPECT_EQ(exec(tcp, {"SET", "k", "from tcp"}).str, "OK");
    EXPECT_EQ(exec(local, {"GET", "k"}).str, "from tcp");
}

TEST(redis_connection, pipelines_commands_and_matches_every_reply_to_its_command)
{
    redis_server server;
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), server.url()};
    ASSERT_FALSE(connect(redis)) << redis.last_error();
    constexpr int count = 2000;
    std::vector<long long> got(count, -1);
    std::atomic<int> done{0};
    std::promise<void> all;
    for (int i = 0; i < count; ++i)
        redis.async_exec({"INCR", "counter"}, [&, i](error_code ec, redis_reply r) {
            EXPECT_FALSE(ec);
            got[i] = r.integer;
            if (++done == count) all.set_value();
        });
    ASSERT_EQ(all.get_future().wait_for(10s), std::future_status::ready);
    for (int i = 0; i < count; ++i) ASSERT_EQ(got[i], i + 1); // issued from one thread: answered in order
    EXPECT_GE(redis.stats().commands, static_cast<std::uint64_t>(count));
}

TEST(redis_connection, selects_the_database_of_the_url)
{
    redis_server server;
    running_context ctx;
    valve::redis_connection db3{ctx.ioc.get_executor(), server.url() + "/3"};
    valve::redis_connection db0{ctx.ioc.get_executor(), server.url() + "/0"};
    exec(db3, {"SET", "where", "three"});
    EXPECT_EQ(exec(db0, {"EXISTS", "where"}).integer, 0);
    EXPECT_EQ(exec(db3, {"GET", "where"}).str, "three");
}

TEST(redis_connection, authenticates_with_the_password_and_user_of_the_url)
{
    redis_server server{{"--requirepass", "s3cret"}};
    running_context ctx;
    valve::redis_connection good{ctx.ioc.get_executor(), server.url(":s3cret")};
    EXPECT_FALSE(connect(good)) << good.last_error();
    EXPECT_EQ(exec(good, {"PING"}).str, "PONG");
    valve::redis_connection acl{ctx.ioc.get_executor(), server.url("default:s3cret")};
    EXPECT_FALSE(connect(acl)) << acl.last_error();

    valve::redis_connection wrong{ctx.ioc.get_executor(), server.url(":nope")};
    EXPECT_EQ(connect(wrong), valve::errc::store_error);
    EXPECT_NE(wrong.last_error().find("password"), std::string::npos) << wrong.last_error();
    EXPECT_EQ(wrong.last_error().find("nope"), std::string::npos) << "the password is not shown";
    valve::redis_connection none{ctx.ioc.get_executor(), server.url()};
    EXPECT_EQ(connect(none), valve::errc::store_error);
    EXPECT_NE(none.last_error().find("password"), std::string::npos) << none.last_error();
    error_code ec;
    exec(none, {"PING"}, &ec);
    EXPECT_EQ(ec, valve::errc::store_unavailable);
}

TEST(redis_connection, a_refused_connection_is_reported_and_commands_fail_at_once)
{
    running_context ctx;
    const auto port = valve::test::free_port();
    valve::redis_connection redis{ctx.ioc.get_executor(), "redis://127.0.0.1:" + std::to_string(port)};
    EXPECT_EQ(connect(redis), asio::error::connection_refused);
    EXPECT_NE(redis.last_error().find("cannot connect"), std::string::npos) << redis.last_error();
    const auto start = std::chrono::steady_clock::now();
    error_code ec;
    exec(redis, {"PING"}, &ec);
    EXPECT_EQ(ec, valve::errc::store_unavailable);
    EXPECT_LT(std::chrono::steady_clock::now() - start, 100ms);
}

TEST(redis_connection, a_bad_url_is_refused_at_construction)
{
    asio::io_context ioc;
    try {
        valve::redis_connection redis{ioc.get_executor(), "redis//localhost"};
        FAIL() << "no error";
    } catch (const valve::error& e) {
        EXPECT_EQ(e.code(), valve::errc::invalid_argument);
        EXPECT_NE(std::string(e.what()).find("redis://"), std::string::npos) << e.what();
    }
}

TEST(redis_connection, comes_back_by_itself_when_redis_restarts)
{
    redis_server server;
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), server.url()};
    ASSERT_FALSE(connect(redis)) << redis.last_error();
    server.stop();
    error_code ec;
    exec(redis, {"PING"}, &ec);
    EXPECT_EQ(ec, valve::errc::store_unavailable);
    EXPECT_FALSE(redis.is_up());
    server.start();
    const auto until = std::chrono::steady_clock::now() + 5s;
    while (!redis.is_up() && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(5ms);
    ASSERT_TRUE(redis.is_up()) << redis.last_error();
    EXPECT_EQ(exec(redis, {"PING"}).str, "PONG");
    EXPECT_EQ(redis.stats().recoveries, 1u);
    EXPECT_GE(redis.stats().failures, 1u);
    // The switch and the recovery are in /metrics.
    valve::prometheus_writer w;
    valve::add_metrics(w, redis.stats(), {{"redis", "main"}});
    const std::string text = w.str();
    EXPECT_NE(text.find("valve_redis_up{redis=\"main\"} 1"), std::string::npos) << text;
    EXPECT_NE(text.find("valve_redis_recoveries_total{redis=\"main\"} 1"), std::string::npos) << text;
    EXPECT_NE(text.find("# TYPE valve_redis_failures_total counter"), std::string::npos) << text;
}

TEST(redis_connection, a_redis_that_stops_answering_fails_waiting_commands_within_the_reply_timeout)
{
    redis_server server;
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), server.url(), {.reply_timeout = 50ms}};
    valve::redis_connection other{ctx.ioc.get_executor(), server.url(), {.reply_timeout = 2s}};
    ASSERT_FALSE(connect(redis)) << redis.last_error();
    ASSERT_FALSE(connect(other)) << other.last_error();
    other.async_exec({"DEBUG", "SLEEP", "0.5"}, [](error_code, redis_reply) {});
    std::this_thread::sleep_for(10ms);
    const auto start = std::chrono::steady_clock::now();
    error_code ec;
    exec(redis, {"PING"}, &ec);
    const auto took = std::chrono::steady_clock::now() - start;
    EXPECT_EQ(ec, valve::errc::store_unavailable);
    EXPECT_LT(took, 100ms);
    EXPECT_GE(took, 40ms);
    EXPECT_NE(redis.last_error().find("did not answer"), std::string::npos) << redis.last_error();
}

TEST(redis_connection, a_reply_timeout_as_long_as_the_clock_allows_means_wait_as_long_as_it_takes)
{
    // now + milliseconds::max() overflows the clock: it used to wrap into the past and fail every
    // command at once as overdue.
    redis_server server;
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), server.url(),
                                  {.reply_timeout = std::chrono::milliseconds::max()}};
    valve::redis_connection other{ctx.ioc.get_executor(), server.url(), {.reply_timeout = 2s}};
    ASSERT_FALSE(connect(redis)) << redis.last_error();
    ASSERT_FALSE(connect(other)) << other.last_error();
    other.async_exec({"DEBUG", "SLEEP", "0.2"}, [](error_code, redis_reply) {});
    std::this_thread::sleep_for(10ms);
    error_code ec;
    EXPECT_EQ(exec(redis, {"PING"}, &ec).str, "PONG");
    EXPECT_FALSE(ec) << ec.message();
    EXPECT_TRUE(redis.is_up());
}

// ---- redis_bucket ----------------------------------------------------------------------------

TEST(redis_bucket, grants_the_burst_then_the_rate)
{
    redis_server server;
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), server.url()};
    valve::redis_bucket bucket{redis, "api", valve::rate::per_second(200), 10};
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < 10; ++i) ASSERT_FALSE(acquire(bucket));
    const auto burst_took = std::chrono::steady_clock::now() - start;
    for (int i = 0; i < 40; ++i) ASSERT_FALSE(acquire(bucket));
    const auto took = std::chrono::steady_clock::now() - start;
    // 40 tokens beyond the burst at 200/s take 200 ms; the burst takes no wait.
    EXPECT_GE(took, 195ms);
    EXPECT_LT(took, 400ms);
    EXPECT_LT(burst_took, 50ms);
    EXPECT_EQ(bucket.stats().granted, 50u);
}

TEST(redis_bucket, two_connections_on_one_key_share_one_limit)
{
    redis_server server;
    running_context ctx;
    valve::redis_connection r1{ctx.ioc.get_executor(), server.url()};
    valve::redis_connection r2{ctx.ioc.get_executor(), server.unix_url()};
    valve::redis_bucket b1{r1, "shared", valve::rate::per_second(500), 20};
    valve::redis_bucket b2{r2, "shared", valve::rate::per_second(500), 20};
    std::atomic<int> granted{0};
    std::atomic<bool> stop{false};
    const auto start = std::chrono::steady_clock::now();
    auto loop = [&](valve::redis_bucket& b) {
        while (!stop) {
            if (acquire(b)) break;
            if (!stop) ++granted;
        }
    };
    std::thread t1([&] { loop(b1); });
    std::thread t2([&] { loop(b2); });
    std::this_thread::sleep_for(1s);
    const int at_stop = granted.load();
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    stop = true;
    t1.join();
    t2.join();
    const double allowed = 20 + 500 * elapsed;
    EXPECT_LE(at_stop, allowed + 1);
    EXPECT_GE(at_stop, 0.9 * (20 + 500 * 1.0));
}

TEST(redis_bucket, script_flush_mid_run_fails_no_acquire)
{
    redis_server server;
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), server.url()};
    valve::redis_connection admin{ctx.ioc.get_executor(), server.url()};
    valve::redis_bucket bucket{redis, "flushed", valve::rate::per_second(5000), 50};
    std::atomic<int> failed{0}, ok{0};
    std::atomic<bool> stop{false};
    std::vector<std::thread> users;
    for (int i = 0; i < 4; ++i)
        users.emplace_back([&] {
            while (!stop) (acquire(bucket) ? failed : ok)++;
        });
    for (int i = 0; i < 5; ++i) {
        std::this_thread::sleep_for(40ms);
        EXPECT_EQ(exec(admin, {"SCRIPT", "FLUSH"}).str, "OK");
    }
    std::this_thread::sleep_for(40ms);
    stop = true;
    for (auto& t : users) t.join();
    EXPECT_EQ(failed.load(), 0);
    EXPECT_GT(ok.load(), 100);
    EXPECT_GE(redis.stats().script_loads, 1u);
}

TEST(redis_bucket, a_cancelled_waiter_gives_its_slot_back)
{
    redis_server server;
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), server.url()};
    valve::redis_bucket bucket{redis, "cancel", valve::rate::per_second(2), 1};
    ASSERT_FALSE(acquire(bucket)); // the burst: the next slot is 500 ms away
    asio::cancellation_signal signal;
    std::promise<error_code> p;
    bucket.async_acquire(1, asio::bind_cancellation_slot(signal.slot(), [&](error_code ec) { p.set_value(ec); }));
    std::this_thread::sleep_for(50ms); // reserved by now
    asio::post(ctx.ioc, [&] { signal.emit(asio::cancellation_type::terminal); });
    auto f = p.get_future();
    ASSERT_EQ(f.wait_for(1s), std::future_status::ready);
    EXPECT_EQ(f.get(), asio::error::operation_aborted);
    // The slot went back to Redis: a second process's next token is ~450 ms away, not ~950 ms.
    valve::redis_connection other{ctx.ioc.get_executor(), server.url()};
    valve::redis_bucket again{other, "cancel", valve::rate::per_second(2), 1};
    const auto start = std::chrono::steady_clock::now();
    ASSERT_FALSE(acquire(again));
    EXPECT_LT(std::chrono::steady_clock::now() - start, 700ms);
    EXPECT_EQ(bucket.stats().given_back, 1u);
}

TEST(redis_bucket, a_slot_beyond_the_deadline_is_refused_and_takes_nothing)
{
    redis_server server;
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), server.url()};
    valve::redis_bucket bucket{redis, "deadline", valve::rate::per_second(10), 1};
    ASSERT_FALSE(acquire(bucket));
    const auto soon = std::chrono::steady_clock::now() + 20ms;
    EXPECT_EQ(acquire(bucket, 1, soon), valve::errc::would_exceed_deadline);
    // Nothing was taken: the next slot is still within one interval.
    const auto start = std::chrono::steady_clock::now();
    ASSERT_FALSE(acquire(bucket));
    EXPECT_LT(std::chrono::steady_clock::now() - start, 150ms);
}

TEST(redis_bucket, a_deadline_of_now_takes_what_redis_has_now_and_says_no_otherwise)
{
    // The fleet-wide "now or 429": the deadline has passed by the time Redis answers, but a
    // slot that is now (wait 0) is granted, as token_bucket grants tokens it has.
    redis_server server;
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), server.url()};
    valve::redis_bucket bucket{redis, "now-or-never", valve::rate::per_second(1), 2};
    EXPECT_FALSE(acquire(bucket, 1, std::chrono::steady_clock::now()));
    EXPECT_FALSE(acquire(bucket, 1, std::chrono::steady_clock::now() - 1h));
    EXPECT_EQ(acquire(bucket, 1, std::chrono::steady_clock::now()), valve::errc::would_exceed_deadline);
    EXPECT_EQ(acquire(bucket, 1, std::chrono::steady_clock::time_point::min()), valve::errc::would_exceed_deadline);
    EXPECT_EQ(bucket.stats().granted, 2u);
}

namespace {

// One key as two processes hold it: `a` (on `redis`) with a stock, `b` (on `other`) without; the
// rate is so slow that no token comes back during a test.
struct stocked_pair {
    stocked_pair(const std::string& key, std::size_t burst, std::size_t stock, std::chrono::milliseconds hold)
        : a{redis, key, valve::rate::per(1, 1h), burst, {.stock = stock, .stock_hold = hold}},
          b{other, key, valve::rate::per(1, 1h), burst}
    {
    }
    redis_server server;
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), server.url()};
    valve::redis_connection other{ctx.ioc.get_executor(), server.url()};
    valve::redis_bucket a;
    valve::redis_bucket b;
};

} // namespace

TEST(redis_bucket, try_acquire_says_yes_only_from_tokens_taken_ahead_from_redis)
{
    stocked_pair s{"stocked", 10, 4, 10min};
    auto& a = s.a;
    auto& b = s.b;
    valve::redis_bucket plain{s.redis, "plain", valve::rate::per(1, 1h), 10};
    EXPECT_FALSE(plain.try_acquire()); // no stock: no I/O, no yes
    EXPECT_FALSE(a.try_acquire());     // none taken yet; this asks for 4
    ASSERT_TRUE(eventually([&] { return a.stats().stocked == 4; }));
    EXPECT_EQ(take_all_now(b), 6) << "the stock is taken from the key every process shares";
    for (int i = 0; i < 4; ++i) EXPECT_TRUE(a.try_acquire()) << i;
    EXPECT_FALSE(a.try_acquire()); // the key is empty: nothing more
    EXPECT_EQ(a.stats().try_granted, 4u);
    EXPECT_EQ(a.stats().stocked, 4u);
    EXPECT_TRUE(a.try_acquire(0)); // zero is always granted
}

TEST(redis_bucket, the_stock_serves_an_acquisition_with_nobody_ahead_and_never_overtakes_a_waiter)
{
    stocked_pair s{"fair-stock", 10, 4, 10min};
    auto& a = s.a;
    auto& b = s.b;
    EXPECT_FALSE(a.try_acquire());
    ASSERT_TRUE(eventually([&] { return a.stats().stocked == 4; }));
    EXPECT_EQ(take_all_now(b), 6);
    const auto calls = a.stats().calls;
    EXPECT_FALSE(acquire(a)) << "nobody ahead: served from the stock";
    EXPECT_EQ(a.stats().calls, calls) << "with no round trip";
    // A waiter for more than the stock holds asks Redis, which has nothing until hours later.
    asio::cancellation_signal cancel;
    std::promise<error_code> p;
    a.async_acquire(5, asio::bind_cancellation_slot(cancel.slot(), [&p](error_code ec) { p.set_value(ec); }));
    ASSERT_TRUE(eventually([&] { return a.stats().granted == 2; })); // its slot is reserved
    EXPECT_FALSE(a.try_acquire()) << "the stock overtook a waiter";
    EXPECT_FALSE(a.try_acquire(3));
    cancel.emit(asio::cancellation_type::terminal);
    EXPECT_EQ(p.get_future().get(), asio::error::operation_aborted);
    EXPECT_TRUE(a.try_acquire(3)) << "with the waiter gone, the 3 stocked are there";
}

TEST(redis_bucket, an_empty_key_is_asked_for_stock_once_until_it_has_tokens_again)
{
    stocked_pair s{"empty-stock", 10, 4, 10min};
    auto& a = s.a;
    auto& b = s.b;
    EXPECT_EQ(take_all_now(b), 10);
    // Refused try_acquires while the one call is out, and after its answer: no call more.
    for (int i = 0; i < 1000; ++i) EXPECT_FALSE(a.try_acquire());
    ASSERT_TRUE(eventually([&] { return a.stats().calls == 1; }));
    for (int i = 0; i < 1000; ++i) EXPECT_FALSE(a.try_acquire());
    std::this_thread::sleep_for(50ms); // time for a call that should not be made to show
    EXPECT_EQ(a.stats().calls, 1u);
    EXPECT_EQ(a.stats().stocked, 0u);
}

TEST(redis_bucket, threads_racing_on_try_acquire_never_get_more_than_the_key_holds)
{
    stocked_pair s{"raced", 50, 8, 10min};
    auto& a = s.a;
    auto& b = s.b;
    std::atomic<int> yes{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t)
        threads.emplace_back([&] {
            for (int i = 0; i < 20'000 && yes.load() + static_cast<int>(b.stats().granted) < 60; ++i)
                if (a.try_acquire()) ++yes;
        });
    const int by_b = take_all_now(b);
    for (auto& t : threads) t.join();
    // Whatever the interleaving: every yes was a token Redis debited, and no more than 50 were.
    EXPECT_LE(yes.load() + by_b, 50);
    EXPECT_EQ(static_cast<std::uint64_t>(yes.load()), a.stats().try_granted);
    EXPECT_LE(a.stats().try_granted, a.stats().stocked);
    EXPECT_GT(yes.load(), 0);
}

TEST(redis_bucket, a_stocked_token_held_too_long_is_given_back_not_used)
{
    stocked_pair s{"stale", 6, 4, 50ms};
    auto& a = s.a;
    auto& b = s.b;
    EXPECT_FALSE(a.try_acquire());
    ASSERT_TRUE(eventually([&] { return a.stats().stocked == 4; }));
    EXPECT_TRUE(a.try_acquire());
    std::this_thread::sleep_for(60ms); // past the hold: the 3 left are stale
    EXPECT_FALSE(a.try_acquire()) << "a token taken more than stock_hold ago was used";
    // They went back to Redis (by the stock's timer, or with the call this try_acquire makes),
    // and 4 were stocked again for this demand.
    ASSERT_TRUE(eventually([&] { return a.stats().stocked == 8; }));
    EXPECT_EQ(a.stats().given_back, 3u);
    EXPECT_EQ(take_all_now(b), 1) << "6 - 1 used - 4 stocked";
}

TEST(redis_bucket, a_stock_hold_as_long_as_the_clock_allows_keeps_the_stock)
{
    // milliseconds::max() in nanoseconds overflowed into a negative hold, refused as not positive.
    stocked_pair s{"held-stock", 6, 4, std::chrono::milliseconds::max()};
    EXPECT_FALSE(s.a.try_acquire());
    ASSERT_TRUE(eventually([&] { return s.a.stats().stocked == 4; }));
    EXPECT_TRUE(s.a.try_acquire());
    EXPECT_EQ(s.a.stats().given_back, 0u);
}

TEST(redis_bucket, a_stock_nobody_uses_goes_back_to_redis_when_it_expires)
{
    // Traffic stops: nothing calls the bucket again, and its stock must not stay debited.
    stocked_pair s{"idle-stock", 6, 4, 50ms};
    EXPECT_FALSE(s.a.try_acquire());
    ASSERT_TRUE(eventually([&] { return s.a.stats().stocked == 4; }));
    ASSERT_TRUE(eventually([&] { return s.a.stats().given_back == 4; })) << "the stock stayed taken";
    std::this_thread::sleep_for(100ms); // two holds: time for a refill nobody asked for to show
    EXPECT_EQ(s.a.stats().stocked, 4u) << "taken again with nobody asking";
    EXPECT_EQ(s.a.stats().calls, 2u); // the stock, then the give-back
    exec(s.redis, {"PING"});          // after the give-back, on the same connection
    EXPECT_EQ(take_all_now(s.b), 6);
}

// A failed stock ask is not repeated at once, but a long hold does not turn the stock off:
// it is asked again within a second.
TEST(redis_bucket, a_failed_stock_ask_is_asked_again_within_a_second_whatever_the_hold)
{
    redis_server server;
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), server.url()};
    ASSERT_FALSE(connect(redis)) << redis.last_error();
    valve::redis_bucket b{redis, "wrong", valve::rate::per(10, 1h), 10, {.stock = 4, .stock_hold = 1h}};
    // A key of another type makes the script fail (WRONGTYPE): the stock ask fails.
    exec(redis, {"HSET", "valve:{wrong}:0", "f", "v"});
    EXPECT_FALSE(b.try_acquire());
    ASSERT_TRUE(eventually([&] { return b.stats().calls >= 1; }));
    exec(redis, {"DEL", "valve:{wrong}:0"});
    const auto t0 = std::chrono::steady_clock::now();
    EXPECT_TRUE(eventually([&] { return b.try_acquire(); })) << "the stock stays off after a failure";
    EXPECT_LT(std::chrono::steady_clock::now() - t0, 3s); // 1 s at most, and slack for a slow machine
}

TEST(redis_bucket, a_stock_is_given_back_when_the_bucket_goes)
{
    redis_server server;
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), server.url()};
    valve::redis_connection other{ctx.ioc.get_executor(), server.url()};
    const auto per_hour = valve::rate::per(1, 1h);
    valve::redis_bucket b{other, "closing", per_hour, 6};
    {
        valve::redis_bucket a{redis, "closing", per_hour, 6, {.stock = 4, .stock_hold = 10min}};
        EXPECT_FALSE(a.try_acquire());
        ASSERT_TRUE(eventually([&] { return a.stats().stocked == 4; }));
    }
    exec(redis, {"PING"}); // after the give-back, on the same connection
    EXPECT_EQ(take_all_now(b), 6);
}

// The same when the bucket goes while its stock call is in flight: the reply finds the bucket
// gone, and what Redis granted in it goes back.
TEST(redis_bucket, a_stock_call_in_flight_when_the_bucket_goes_is_given_back)
{
    redis_server server;
    running_context ctx;
    // Replies held up for 300 ms below: a reply timeout well beyond it.
    valve::redis_connection redis{ctx.ioc.get_executor(), server.url(), {.reply_timeout = 5000ms}};
    valve::redis_connection other{ctx.ioc.get_executor(), server.url(), {.reply_timeout = 5000ms}};
    ASSERT_FALSE(connect(redis)) << redis.last_error();
    ASSERT_FALSE(connect(other)) << other.last_error();
    const auto per_hour = valve::rate::per(1, 1h);
    const auto answered = redis.stats().commands;
    {
        valve::redis_bucket a{redis, "in-flight", per_hour, 6, {.stock = 4, .stock_hold = 10min}};
        exec(other, {"CLIENT", "PAUSE", "300", "ALL"}); // Redis runs no command for 300 ms
        EXPECT_FALSE(a.try_acquire());                   // asks for the stock: a call now in flight
        ASSERT_TRUE(eventually([&] { return a.stats().calls == 1; }));
    } // the bucket goes; its call is answered after the pause
    // The stock call, then the give-back of its four tokens.
    EXPECT_TRUE(eventually([&] { return redis.stats().commands >= answered + 2; }))
        << "the stock taken by the call in flight was not given back";
    valve::redis_bucket b{other, "in-flight", per_hour, 6};
    EXPECT_EQ(take_all_now(b), 6);
}

TEST(redis_bucket, available_and_next_available_are_estimates_from_the_last_reply)
{
    redis_server server;
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), server.url()};
    valve::redis_bucket bucket{redis, "estimates", valve::rate::per_second(10), 5};
    EXPECT_EQ(bucket.available(), 5.0); // nothing known yet: the burst
    ASSERT_FALSE(acquire(bucket, 3));
    EXPECT_NEAR(bucket.available(), 2.0, 0.2); // 2 left, refilling at 10/s
    const auto first = bucket.next_available(1);
    EXPECT_LE(first, std::chrono::steady_clock::now());
    ASSERT_FALSE(acquire(bucket, 2));
    const auto now = std::chrono::steady_clock::now();
    const auto next = bucket.next_available(1);
    EXPECT_GT(next, now + 50ms); // the next token is about 100 ms away
    EXPECT_LT(next, now + 120ms);
    EXPECT_LT(bucket.available(), 0.5);
}

TEST(redis_bucket, connection_and_bucket_counters_reach_metrics_that_promtool_accepts)
{
    redis_server server;
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), server.url()};
    valve::redis_bucket bucket{redis, "metered", valve::rate::per(1, 1h), 3, {.stock = 2, .stock_hold = 10min}};
    ASSERT_FALSE(acquire(bucket)); // the same call takes the stock of 2
    ASSERT_TRUE(eventually([&] { return bucket.stats().stocked == 2; }));
    EXPECT_TRUE(bucket.try_acquire()); // half the stock used: one more call finds the key empty
    ASSERT_TRUE(eventually([&] { return bucket.stats().calls == 2; }));
    valve::prometheus_writer w;
    add_metrics(w, redis.stats(), {{"redis", "main"}});
    add_metrics(w, bucket.stats(), {{"key", "metered"}});
    const std::string text = w.str();
    EXPECT_TRUE(valve::test::promtool_accepts(text));
    EXPECT_NE(text.find("valve_redis_up{redis=\"main\"} 1\n"), std::string::npos) << text;
    EXPECT_NE(text.find("valve_redis_granted_total{key=\"metered\"} 1\n"), std::string::npos) << text;
    EXPECT_NE(text.find("valve_redis_stocked_total{key=\"metered\"} 2\n"), std::string::npos) << text;
    EXPECT_NE(text.find("valve_redis_try_granted_total{key=\"metered\"} 1\n"), std::string::npos) << text;
    EXPECT_NE(text.find("valve_redis_calls_total{key=\"metered\"} 2\n"), std::string::npos) << text;
}

static_assert(!std::is_copy_constructible_v<valve::redis_bucket>, "a copy would share (and close) one limit");

TEST(redis_bucket, a_slot_that_comes_after_the_deadline_once_the_reply_is_in_is_refused_and_given_back)
{
    redis_server server;
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), server.url()};
    valve::redis_bucket bucket{redis, "late", valve::rate::per_second(10), 1};
    ASSERT_FALSE(acquire(bucket)); // the next slot is 100 ms away
    // Redis finds the slot within the deadline, but the reply is read 150 ms later (the only
    // thread of the io_context is busy): waking at the slot would be after the deadline.
    std::promise<error_code> p;
    bucket.async_acquire(1, std::chrono::steady_clock::now() + 105ms, [&p](error_code ec) { p.set_value(ec); });
    asio::post(ctx.ioc, [] { std::this_thread::sleep_for(150ms); });
    auto f = p.get_future();
    ASSERT_EQ(f.wait_for(2s), std::future_status::ready);
    EXPECT_EQ(f.get(), valve::errc::would_exceed_deadline);
    EXPECT_EQ(bucket.stats().given_back, 1u);
}

TEST(redis_bucket, a_closed_connection_aborts_acquisitions_whatever_the_policy)
{
    redis_server server;
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), server.url()};
    valve::redis_bucket bucket{redis, "closed", valve::rate::per_second(10), 1,
                               {.on_failure = valve::store_failure::fail_open}};
    ASSERT_FALSE(acquire(bucket));
    redis.close();
    EXPECT_EQ(acquire(bucket), asio::error::operation_aborted);
    EXPECT_FALSE(bucket.try_acquire());
}

TEST(redis_bucket, under_fail_local_an_acquisition_larger_than_the_local_burst_takes_it_all)
{
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), "redis://127.0.0.1:" + std::to_string(valve::test::free_port())};
    EXPECT_EQ(connect(redis), asio::error::connection_refused);
    valve::redis_bucket bucket{redis, "local", valve::rate::per_second(4), 10,
                               {.on_failure = valve::store_failure::fail_local, .instances = 4}};
    EXPECT_FALSE(acquire(bucket, 8)); // the local burst is 2: it takes both, not exceeds_burst
    EXPECT_FALSE(bucket.try_acquire());
    EXPECT_EQ(acquire(bucket, 11), valve::errc::exceeds_burst);
}

TEST(redis_bucket, bad_arguments_are_errors_at_the_call)
{
    asio::io_context ioc;
    valve::redis_connection redis{ioc.get_executor(), "redis://127.0.0.1:1"};
    auto message = [&](auto f) -> std::string {
        try {
            f();
        } catch (const valve::error& e) {
            EXPECT_EQ(e.code(), valve::errc::invalid_argument);
            return e.what();
        }
        ADD_FAILURE() << "no error";
        return {};
    };
    EXPECT_NE(message([&] { valve::redis_bucket b(redis, "", valve::rate::per_second(1)); }).find("empty"),
              std::string::npos);
    EXPECT_NE(message([&] { valve::redis_bucket b(redis, "k", valve::rate::zero()); }).find("zero"),
              std::string::npos);
    EXPECT_NE(message([&] { valve::redis_bucket b(redis, "k", valve::rate::per_second(1), 0); }).find("burst"),
              std::string::npos);
    EXPECT_NE(message([&] {
                  valve::redis_bucket b(redis, "k", valve::rate::per_second(1), 1, {.instances = 0});
              }).find("instances"),
              std::string::npos);
    EXPECT_NE(message([&] {
                  valve::redis_bucket b(redis, "k", valve::rate::per_second(1), 1, {.batch = 8, .stock = 9});
              }).find("stock is 9, more than batch (8)"),
              std::string::npos);
    EXPECT_NE(message([&] {
                  valve::redis_bucket b(redis, "k", valve::rate::per_second(1), 1, {.stock = 2, .stock_hold = 0ms});
              }).find("stock_hold is 0"),
              std::string::npos);
    valve::redis_bucket b(redis, "k", valve::rate::per_second(1), 2);
    std::optional<error_code> got;
    b.async_acquire(3, [&](error_code ec) { got = ec; });
    EXPECT_FALSE(got) << "completed inside the call";
    ioc.run_for(100ms);
    EXPECT_EQ(got, valve::errc::exceeds_burst);
}

namespace {

class redis_failure : public ::testing::TestWithParam<valve::store_failure> {};

} // namespace

namespace {

/// Outcomes of many acquisitions, and when each came.
struct outcomes {
    std::mutex m;
    std::vector<std::pair<std::chrono::steady_clock::time_point, error_code>> got;

    auto handler()
    {
        return [this](error_code ec) {
            std::lock_guard lock{m};
            got.emplace_back(std::chrono::steady_clock::now(), ec);
        };
    }
    std::size_t size()
    {
        std::lock_guard lock{m};
        return got.size();
    }
    std::size_t count(error_code ec)
    {
        std::lock_guard lock{m};
        return static_cast<std::size_t>(std::count_if(got.begin(), got.end(), [&](auto& g) { return g.second == ec; }));
    }
    // Completions later than `t + d`.
    std::size_t later_than(std::chrono::steady_clock::time_point t, std::chrono::nanoseconds d)
    {
        std::lock_guard lock{m};
        return static_cast<std::size_t>(std::count_if(got.begin(), got.end(), [&](auto& g) { return g.first > t + d; }));
    }
    bool wait_for(std::size_t n, std::chrono::nanoseconds d)
    {
        const auto until = std::chrono::steady_clock::now() + d;
        while (size() < n && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(1ms);
        return size() >= n;
    }
};

void expect_settled_by(valve::store_failure policy, outcomes& o, std::size_t n)
{
    switch (policy) {
    case valve::store_failure::fail_closed:
        EXPECT_EQ(o.count(valve::errc::store_unavailable), n);
        break;
    case valve::store_failure::fail_open:
        EXPECT_EQ(o.count({}), n);
        break;
    case valve::store_failure::fail_local:
        break; // checked by the caller: at the local rate
    }
}

void wait_up(valve::redis_connection& redis)
{
    const auto until = std::chrono::steady_clock::now() + 5s;
    while (!redis.is_up() && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(1ms);
    ASSERT_TRUE(redis.is_up()) << redis.last_error();
}

} // namespace

TEST_P(redis_failure, with_redis_killed_waiters_are_settled_by_the_policy_at_once_and_work_resumes)
{
    const auto policy = GetParam();
    outcomes slotted, after, back; // outlive the thread that completes them
    redis_server server;
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), server.url()};
    // 20/s over 2 instances: the local fallback allows 10/s, burst 1.
    valve::redis_bucket bucket{redis, "failing", valve::rate::per_second(20), 2, {.on_failure = policy, .instances = 2}};
    ASSERT_FALSE(acquire(bucket, 2)); // the burst is spent
    // Slots reserved before the crash were taken in Redis: they complete on time, granted.
    for (int i = 0; i < 3; ++i) bucket.async_acquire(1, slotted.handler());
    std::this_thread::sleep_for(10ms);
    server.stop();
    const auto killed = std::chrono::steady_clock::now();
    std::this_thread::sleep_for(5ms); // the connection sees the crash
    for (int i = 0; i < 20; ++i) bucket.async_acquire(1, after.handler());
    ASSERT_TRUE(slotted.wait_for(3, 1s));
    EXPECT_EQ(slotted.count({}), 3u);
    if (policy == valve::store_failure::fail_local) {
        // The local bucket: one at once, then one per 100 ms.
        std::this_thread::sleep_for(250ms);
        EXPECT_GE(after.size(), 2u);
        EXPECT_LE(after.size(), 4u);
        EXPECT_EQ(after.count({}), after.size());
    } else {
        ASSERT_TRUE(after.wait_for(20, 1s));
        EXPECT_EQ(after.later_than(killed, 100ms), 0u);
        expect_settled_by(policy, after, 20);
        EXPECT_FALSE(bucket.try_acquire() != (policy == valve::store_failure::fail_open));
    }
    EXPECT_GE(bucket.stats().store_failures, 2u);
    {
        valve::prometheus_writer w;
        valve::add_metrics(w, bucket.stats());
        EXPECT_NE(w.str().find("valve_redis_store_failures_total " + std::to_string(bucket.stats().store_failures)),
                  std::string::npos)
            << w.str();
    }
    // Redis is back: acquisitions go through it again, with no action by the user.
    server.start();
    wait_up(redis);
    const auto calls = bucket.stats().calls;
    bucket.async_acquire(1, back.handler());
    ASSERT_TRUE(back.wait_for(1, 2s));
    EXPECT_EQ(back.count({}), 1u);
    EXPECT_GT(bucket.stats().calls, calls);
}

TEST_P(redis_failure, with_redis_asleep_waiters_are_settled_by_the_policy_within_100_ms)
{
    const auto policy = GetParam();
    outcomes o; // outlives the thread that completes it
    redis_server server;
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), server.url(), {.reply_timeout = 50ms}};
    valve::redis_connection admin{ctx.ioc.get_executor(), server.url(), {.reply_timeout = 5s}};
    ASSERT_FALSE(connect(admin));
    valve::redis_bucket bucket{redis, "asleep", valve::rate::per_second(1000), 100, {.on_failure = policy}};
    ASSERT_FALSE(acquire(bucket));
    admin.async_exec({"DEBUG", "SLEEP", "0.5"}, [](error_code, redis_reply) {});
    std::this_thread::sleep_for(10ms);
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < 20; ++i) bucket.async_acquire(1, o.handler());
    ASSERT_TRUE(o.wait_for(policy == valve::store_failure::fail_local ? 1 : 20, 1s));
    EXPECT_EQ(o.later_than(start, 100ms), 0u);
    expect_settled_by(policy, o, 20);
    if (policy == valve::store_failure::fail_local) {
        EXPECT_GE(o.count({}), 1u); // the local burst
    }
}

TEST(redis_bucket, a_redis_busy_with_a_long_script_is_unavailable_not_an_error_and_work_resumes)
{
    // Redis answers BUSY to every command while another client's script runs past the
    // threshold: an outage (settled by the policy), not a fault of valve's script.
    redis_server server;
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), server.url(), {.reply_timeout = 5s}};
    valve::redis_connection admin{ctx.ioc.get_executor(), server.url(), {.reply_timeout = 5s}};
    valve::redis_connection blocker{ctx.ioc.get_executor(), server.url(), {.reply_timeout = 30s}};
    ASSERT_FALSE(connect(redis)) << redis.last_error();
    ASSERT_FALSE(connect(admin)) << admin.last_error();
    ASSERT_FALSE(connect(blocker)) << blocker.last_error();
    valve::redis_bucket bucket{redis, "busy", valve::rate::per_second(100), 10};
    ASSERT_FALSE(acquire(bucket)); // the script is loaded and works
    EXPECT_EQ(exec(admin, {"CONFIG", "SET", "lua-time-limit", "10"}).str, "OK");
    std::promise<void> blocked_done;
    blocker.async_exec({"EVAL", "while true do end", "0"}, [&](error_code, redis_reply) { blocked_done.set_value(); });
    // Until the script has run past the threshold, Redis still answers.
    ASSERT_TRUE(eventually([&] { return exec(admin, {"PING"}).str.starts_with("BUSY"); })) << "Redis never got busy";
    EXPECT_EQ(acquire(bucket), valve::errc::store_unavailable);
    EXPECT_EQ(bucket.stats().store_failures, 1u);
    EXPECT_EQ(exec(admin, {"SCRIPT", "KILL"}).str, "OK");
    blocked_done.get_future().wait();
    EXPECT_FALSE(acquire(bucket)) << "work resumes once the script is killed";
    EXPECT_TRUE(redis.is_up()) << "BUSY is an answer: the connection stayed up";
}

TEST_P(redis_failure, a_killed_client_connection_settles_its_waiters_and_reconnects)
{
    const auto policy = GetParam();
    redis_server server;
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), server.url()};
    valve::redis_connection admin{ctx.ioc.get_executor(), server.url()};
    ASSERT_FALSE(connect(admin));
    valve::redis_bucket bucket{redis, "killed", valve::rate::per_second(1000), 100, {.on_failure = policy}};
    ASSERT_FALSE(acquire(bucket));
    EXPECT_GE(exec(admin, {"CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"}).integer, 1);
    // The connection sees the kill (it may still look up for a moment), then comes back.
    const auto until = std::chrono::steady_clock::now() + 5s;
    while (redis.stats().failures == 0 && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(1ms);
    ASSERT_EQ(redis.stats().failures, 1u);
    wait_up(redis);
    EXPECT_EQ(redis.stats().recoveries, 1u);
    EXPECT_FALSE(acquire(bucket));
}

INSTANTIATE_TEST_SUITE_P(policies, redis_failure,
                         ::testing::Values(valve::store_failure::fail_closed, valve::store_failure::fail_open,
                                           valve::store_failure::fail_local),
                         [](const auto& param_info) {
                             switch (param_info.param) {
                             case valve::store_failure::fail_closed:
                                 return std::string("fail_closed");
                             case valve::store_failure::fail_open:
                                 return std::string("fail_open");
                             case valve::store_failure::fail_local:
                                 return std::string("fail_local");
                             }
                             return std::string("unknown");
                         });

// ---- profiles stored in Redis ------------------------------------------------------------------

TEST(redis_profile, a_shared_profile_is_one_limit_for_every_manager_using_it)
{
    redis_server server;
    running_context ctx;
    valve::redis_connection r1{ctx.ioc.get_executor(), server.url()};
    valve::redis_connection r2{ctx.ioc.get_executor(), server.url()};
    valve::manager m1{ctx.ioc.get_executor()};
    valve::manager m2{ctx.ioc.get_executor()};
    for (auto [m, r] : {std::pair{&m1, &r1}, std::pair{&m2, &r2}})
        m->register_profile("free", valve::shared_resource("free-key", valve::rate::per_second(100), 5),
                            valve::worker_pool(4, 1000), valve::stored_in(*r));
    std::atomic<int> ran{0};
    std::vector<std::future<int>> results;
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < 30; ++i) {
        auto& m = i % 2 ? m1 : m2;
        results.push_back(m.get_limiter("free", "u")->async_submit([&] { return ++ran; }, asio::use_future));
    }
    for (auto& f : results) ASSERT_EQ(f.wait_for(5s), std::future_status::ready);
    // 30 tasks, 5 of them from the burst, the rest at 100/s between both managers: >= 250 ms.
    EXPECT_GE(std::chrono::steady_clock::now() - start, 240ms);
    EXPECT_EQ(ran.load(), 30);
}

TEST(redis_profile, a_dedicated_profile_keeps_one_key_per_user_across_managers)
{
    redis_server server;
    running_context ctx;
    valve::redis_connection r1{ctx.ioc.get_executor(), server.url()};
    valve::redis_connection r2{ctx.ioc.get_executor(), server.url()};
    valve::manager m1{ctx.ioc.get_executor()};
    valve::manager m2{ctx.ioc.get_executor()};
    for (auto [m, r] : {std::pair{&m1, &r1}, std::pair{&m2, &r2}})
        m->register_profile("pro", valve::dedicated_resource(valve::rate::per_second(1), 2),
                            valve::worker_pool(4, 1000), valve::stored_in(*r),
                            valve::on_store_failure(valve::store_failure::fail_closed));
    auto run = [](valve::manager& m, const std::string& user) {
        return m.get_limiter("pro", user)->async_submit([] { return 1; }, asio::use_future);
    };
    // alice's burst of 2 is spent through m1 ...
    ASSERT_EQ(run(m1, "alice").wait_for(2s), std::future_status::ready);
    ASSERT_EQ(run(m1, "alice").wait_for(2s), std::future_status::ready);
    // ... so m2 has nothing for her for about a second, while bob is served at once.
    auto alice = run(m2, "alice");
    auto bob = run(m2, "bob");
    EXPECT_EQ(bob.wait_for(500ms), std::future_status::ready);
    EXPECT_EQ(alice.wait_for(500ms), std::future_status::timeout);
    EXPECT_EQ(alice.wait_for(2s), std::future_status::ready);
    EXPECT_NE(server.running(), false);
    error_code ec;
    EXPECT_EQ(exec(r1, {"EXISTS", "valve:{pro/alice}:user:0"}, &ec).integer, 1);
}

TEST(redis_profile, names_cannot_make_two_limits_one)
{
    redis_server server;
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), server.url()};
    valve::manager m{ctx.ioc.get_executor()};
    // "api" + user "x/y", "api/x" + user "y" and the shared key "api/x/y" are three limits.
    m.register_profile("api", valve::dedicated_resource(valve::rate::per_second(1), 1), valve::stored_in(redis));
    m.register_profile("api/x", valve::dedicated_resource(valve::rate::per_second(1), 1), valve::stored_in(redis));
    m.register_profile("shared", valve::shared_resource("api/x/y", valve::rate::per_second(1), 1),
                       valve::stored_in(redis));
    auto run = [](const std::shared_ptr<valve::limiter>& l) { return l->async_submit([] { return 1; }, asio::use_future); };
    auto a = run(m.get_limiter("api", "x/y"));
    auto b = run(m.get_limiter("api/x", "y"));
    auto c = run(m.get_limiter("shared", "anyone"));
    // Each has its own burst of one: all three run at once.
    EXPECT_EQ(a.wait_for(500ms), std::future_status::ready);
    EXPECT_EQ(b.wait_for(500ms), std::future_status::ready);
    EXPECT_EQ(c.wait_for(500ms), std::future_status::ready);
    // A brace cannot move the Redis Cluster hash tag.
    valve::redis_bucket braces{redis, "}odd{", valve::rate::per_second(1), 1};
    EXPECT_FALSE(acquire(braces));
    EXPECT_EQ(exec(redis, {"EXISTS", "valve:{%7Dodd%7B}:0"}).integer, 1);
}

TEST(redis_profile, limits_redis_cannot_hold_are_refused_at_registration_and_at_set_rate)
{
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), "redis://127.0.0.1:1"};
    valve::manager m{ctx.ioc.get_executor()};
    auto code_of = [](auto f) -> error_code {
        try {
            f();
        } catch (const valve::error& e) {
            return e.code();
        }
        return {};
    };
    EXPECT_EQ(code_of([&] {
                  m.register_profile("zero", valve::dedicated_resource(valve::rate::zero(), 1), valve::stored_in(redis));
              }),
              valve::errc::invalid_argument);
    EXPECT_EQ(m.limiter_count("zero"), 0u) << "not registered";
    m.register_profile("ok", valve::dedicated_resource(valve::rate::per_second(5), 5), valve::stored_in(redis));
    EXPECT_EQ(code_of([&] { m.set_rate("ok", valve::rate::unlimited()); }), valve::errc::invalid_argument);
    // The profile is as it was: its users still get limiters.
    EXPECT_NO_THROW(m.get_limiter("ok", "u"));
}


TEST(redis_profile, store_options_without_a_store_are_an_error)
{
    valve::manager m{};
    try {
        m.register_profile("p", valve::shared_resource("k", valve::rate::per_second(1)),
                           valve::on_store_failure(valve::store_failure::fail_open));
        FAIL() << "no error";
    } catch (const valve::error& e) {
        EXPECT_EQ(e.code(), valve::errc::invalid_argument);
        EXPECT_NE(std::string(e.what()).find("stored_in"), std::string::npos) << e.what();
    }
}

// Without a stock, a limit held in Redis grants a token only by a round trip: a limiter's
// queued tasks start one call apart and try_enter says no. With one, they take from it.
TEST(redis_profile, a_stock_starts_queued_tasks_and_answers_try_enter_without_a_call_each)
{
    redis_server server;
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), server.url()};
    valve::redis_connection other{ctx.ioc.get_executor(), server.url()};
    ASSERT_FALSE(connect(redis)) << redis.last_error();
    valve::manager m{ctx.ioc.get_executor()};
    const auto slow = valve::rate::per(1000, 24h); // no token comes back during the test
    m.register_profile("plain", valve::shared_resource("plain-key", slow, 1000), valve::worker_pool(2, 1000),
                       valve::stored_in(redis));
    m.register_profile("stocked", valve::shared_resource("stocked-key", slow, 1000), valve::worker_pool(2, 1000),
                       valve::stored_in(redis), valve::store_stock(16, 1h));
    constexpr int tasks = 64;
    auto calls_for = [&](const std::string& profile) {
        auto lim = m.get_limiter(profile, "u");
        const auto before = redis.stats().commands;
        std::vector<std::future<int>> results;
        for (int i = 0; i < tasks; ++i) results.push_back(lim->async_submit([] { return 1; }, asio::use_future));
        for (auto& f : results) EXPECT_EQ(f.wait_for(10s), std::future_status::ready);
        return redis.stats().commands - before;
    };
    EXPECT_GE(calls_for("plain"), static_cast<std::uint64_t>(tasks)); // one per task
    const auto stocked_calls = calls_for("stocked");
    // A call takes a token for the waiting task and up to 16 for the stock: 4 or more tokens a
    // call on average, where a round trip apiece would be 1 (9 calls were seen for 64 tasks).
    EXPECT_LE(stocked_calls, static_cast<std::uint64_t>(tasks / 4));

    // try_enter: never from a plain stored profile; from a stocked one once the stock is in.
    EXPECT_FALSE(m.get_limiter("plain", "u")->try_enter());
    auto stocked = m.get_limiter("stocked", "u");
    EXPECT_TRUE(eventually([&] { return static_cast<bool>(stocked->try_enter()); }));
    // What the stock holds is gone from Redis: the key keeps 1000 - 64 - 1 - what is still stocked.
    valve::redis_bucket same_key{other, "stocked-key", slow, 1000};
    const int left = take_all_now(same_key);
    EXPECT_LE(left, 1000 - tasks - 1);
    EXPECT_GE(left, 1000 - tasks - 1 - 16);
}

TEST(redis_profile, a_stock_redis_cannot_keep_is_refused_at_registration)
{
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), "redis://127.0.0.1:1"};
    valve::manager m{ctx.ioc.get_executor()};
    auto message_of = [&](auto... options) -> std::string {
        try {
            m.register_profile("p", valve::shared_resource("k", valve::rate::per_second(1)), options...);
        } catch (const valve::error& e) {
            EXPECT_EQ(e.code(), valve::errc::invalid_argument);
            return e.what();
        }
        return "no error";
    };
    EXPECT_NE(message_of(valve::stored_in(redis), valve::store_stock(65)).find("65"), std::string::npos);
    EXPECT_NE(message_of(valve::stored_in(redis), valve::store_stock(8, 0ms)).find("hold"), std::string::npos);
    EXPECT_NE(message_of(valve::store_stock(8)).find("stored_in"), std::string::npos);
    EXPECT_NE(message_of(valve::stored_in(redis), valve::store_stock(8), valve::store_stock(8)).find("twice"),
              std::string::npos);
    // A hold as long as the clock allows is a hold that never ends, not an overflow.
    EXPECT_NO_THROW(m.register_profile("long", valve::shared_resource("k", valve::rate::per_second(1)),
                                       valve::stored_in(redis), valve::store_stock(8, std::chrono::hours::max())));
}

// Two profiles share a key only with the same store options: else the second would silently
// keep the first one's (a limit asked to be fleet-wide could stay in this process).
TEST(redis_profile, a_shared_key_is_shared_only_with_the_same_store_options)
{
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), "redis://127.0.0.1:1"};
    valve::manager m{ctx.ioc.get_executor()};
    const auto r = valve::rate::per_second(10);
    m.register_profile("local", valve::shared_resource("key", r, 10));
    auto message_of = [&](const std::string& name, auto... options) -> std::string {
        try {
            m.register_profile(name, valve::shared_resource("key", r, 10), options...);
        } catch (const valve::error& e) {
            EXPECT_EQ(e.code(), valve::errc::invalid_argument);
            return e.what();
        }
        return "no error";
    };
    EXPECT_NE(message_of("fleet", valve::stored_in(redis)).find("store options"), std::string::npos);
    EXPECT_EQ(m.limiter_count("fleet"), 0u) << "not registered";
    m.register_profile("stored", valve::shared_resource("key2", r, 10), valve::stored_in(redis));
    auto again = [&](const std::string& name, auto... options) -> std::string {
        try {
            m.register_profile(name, valve::shared_resource("key2", r, 10), options...);
        } catch (const valve::error& e) {
            return e.what();
        }
        return "no error";
    };
    EXPECT_NE(again("plain"), "no error") << "a local profile on a key held in Redis";
    EXPECT_NE(again("open", valve::stored_in(redis), valve::on_store_failure(valve::store_failure::fail_open)),
              "no error");
    EXPECT_NE(again("stock", valve::stored_in(redis), valve::store_stock(4)), "no error");
    EXPECT_EQ(again("same", valve::stored_in(redis)), "no error") << "the same options share the key";
    EXPECT_EQ(again("same-local", valve::stored_in(redis)), "no error");
}

// ---- a fleet of OS processes -----------------------------------------------------------------

namespace {

struct worker_result {
    long granted = -1;
    long long first_ns = 0; // steady_clock: the worker's first grant
    long long end_ns = 0;   // steady_clock: the end of its run
    long all = -1;          // every grant, including those still out at the end
    int unsettled = -1;     // requests that never completed
    int status = -1;
};

// Runs redis_fleet_worker once per argument list, all at once; returns what each printed.
std::vector<worker_result> run_fleet(const std::vector<std::vector<std::string>>& runs)
{
    char tmpl[] = "/tmp/valve-fleet-XXXXXX";
    const std::string dir = ::mkdtemp(tmpl);
    std::vector<pid_t> pids;
    for (std::size_t i = 0; i < runs.size(); ++i) {
        std::vector<std::string> args{VALVE_FLEET_WORKER};
        args.insert(args.end(), runs[i].begin(), runs[i].end());
        std::vector<char*> argv;
        for (auto& a : args) argv.push_back(a.data());
        argv.push_back(nullptr);
        posix_spawn_file_actions_t fa;
        posix_spawn_file_actions_init(&fa);
        const std::string out = dir + "/" + std::to_string(i);
        posix_spawn_file_actions_addopen(&fa, 1, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
        pid_t pid = -1;
        EXPECT_EQ(::posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), environ), 0) << "cannot start " << args[0];
        posix_spawn_file_actions_destroy(&fa);
        pids.push_back(pid);
    }
    std::vector<worker_result> results(runs.size());
    for (std::size_t i = 0; i < pids.size(); ++i) {
        if (pids[i] <= 0) continue;
        ::waitpid(pids[i], &results[i].status, 0);
        std::FILE* f = std::fopen((dir + "/" + std::to_string(i)).c_str(), "r");
        if (f) {
            auto& r = results[i];
            if (std::fscanf(f, "granted %ld first_ns %lld end_ns %lld all %ld unsettled %d", &r.granted, &r.first_ns,
                            &r.end_ns, &r.all, &r.unsettled) != 5)
                results[i].granted = -1;
            std::fclose(f);
        }
    }
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
    return results;
}

std::string start_in(std::chrono::milliseconds d)
{
    const auto at = std::chrono::system_clock::now() + d;
    return std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(at.time_since_epoch()).count());
}

} // namespace

TEST(redis_fleet, three_processes_on_one_key_get_the_rate_between_them_in_even_shares)
{
    redis_server server;
    const double rate = 1000;
    const long burst = 50;
    const double seconds = 3;
    const std::string start = start_in(700ms); // after every process has connected
    std::vector<std::vector<std::string>> runs;
    for (int i = 0; i < 3; ++i)
        runs.push_back({"bucket", i == 1 ? server.unix_url() : server.url(), "fleet-key", "1000", "50", "3", start, "16"});
    const auto results = run_fleet(runs);
    long total = 0;
    long all = 0;
    for (const auto& r : results) {
        EXPECT_EQ(r.status, 0);
        ASSERT_GE(r.granted, 0) << "a worker printed nothing";
        EXPECT_EQ(r.unsettled, 0);
        total += r.granted;
        all += r.all;
    }
    const double allowed = rate * seconds + burst;
    // Upper bound: what the processes got inside the window, against what the key allows in it.
    // Lower bound: a fresh key is full when it is first asked, so it allows burst + rate * (end -
    // first grant); a grant whose slot came before the end but whose wake-up came after it (a slow,
    // sanitized machine) is counted in `all`, which can exceed the truth only by the requests still
    // out at the end (3 x 16 here, each with a slot at most 48 ms past it).
    const auto first = std::min({results[0].first_ns, results[1].first_ns, results[2].first_ns});
    const double from_first = rate * static_cast<double>(results[0].end_ns - first) / 1e9 + burst;
    std::printf("fleet of 3: %ld granted in the window (%ld, %ld, %ld) of %.0f allowed; %ld in all of %.0f allowed "
                "from the first grant\n",
                total, results[0].granted, results[1].granted, results[2].granted, allowed, all, from_first);
    EXPECT_LE(static_cast<double>(total), allowed + 2) << "the fleet got more than the key allows";
    EXPECT_GE(static_cast<double>(all), 0.99 * from_first) << "the fleet got less than the key allows";
    for (const auto& r : results) {
        EXPECT_GE(static_cast<double>(r.granted), static_cast<double>(total) / 3 * 0.95);
        EXPECT_LE(static_cast<double>(r.granted), static_cast<double>(total) / 3 * 1.05);
    }
}

TEST(redis_fleet, a_dedicated_profile_limits_a_user_across_two_processes)
{
    redis_server server;
    const std::string start = start_in(700ms);
    // alice in both processes: one limit of 100/s, burst 10, between them; bob has his own.
    const auto results = run_fleet({{"profile", server.url(), "alice", "100", "10", "2", start, "8"},
                                    {"profile", server.url(), "alice", "100", "10", "2", start, "8"},
                                    {"profile", server.url(), "bob", "100", "10", "2", start, "8"}});
    for (const auto& r : results) {
        EXPECT_EQ(r.status, 0);
        ASSERT_GE(r.granted, 0) << "a worker printed nothing";
        EXPECT_EQ(r.unsettled, 0);
    }
    // Bounds as in the test above: the window's count from above, every grant from below.
    const long alice = results[0].granted + results[1].granted;
    const long alice_all = results[0].all + results[1].all;
    std::printf("alice in two processes: %ld (%ld + %ld), %ld in all; bob: %ld, %ld in all; of 210 allowed each\n",
                alice, results[0].granted, results[1].granted, alice_all, results[2].granted, results[2].all);
    EXPECT_LE(alice, 100 * 2 + 10 + 2);
    EXPECT_GE(static_cast<double>(alice_all), 0.95 * (100 * 2 + 10));
    EXPECT_GE(static_cast<double>(results[2].all), 0.95 * (100 * 2 + 10)); // bob is not slowed by alice
}

TEST_P(redis_failure, a_stored_profile_runs_each_task_once_or_tells_its_submitter_why_and_resumes)
{
    const auto policy = GetParam();
    std::array<std::atomic<int>, 40> runs{}; // outlives the threads that run the tasks
    redis_server server;
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), server.url()};
    valve::manager m{ctx.ioc.get_executor()};
    m.register_profile("p", valve::shared_resource("tasks", valve::rate::per_second(200), 5), valve::worker_pool(4, 1000),
                       valve::stored_in(redis), valve::on_store_failure(policy));
    auto lim = m.get_limiter("p", "u");
    // The outcome is read in the completion handler, on the thread that completes it (an
    // exception_ptr's count is invisible to ThreadSanitizer across threads).
    auto submit = [&](int i) {
        auto p = std::make_shared<std::promise<std::pair<error_code, int>>>();
        auto f = p->get_future();
        lim->async_submit([&runs, i] { return ++runs[static_cast<std::size_t>(i)]; },
                          [p](std::exception_ptr e, int v) { p->set_value({valve::test::code_of(e), v}); });
        return f;
    };
    ASSERT_EQ(submit(0).wait_for(2s), std::future_status::ready);
    // Tasks queued behind the rate when Redis dies; more come while it is down.
    std::vector<std::future<std::pair<error_code, int>>> queued;
    for (int i = 1; i < 20; ++i) queued.push_back(submit(i));
    server.stop();
    for (int i = 20; i < 30; ++i) queued.push_back(submit(i));
    int ran = 0, refused = 0;
    for (auto& f : queued) {
        ASSERT_EQ(f.wait_for(5s), std::future_status::ready) << "a task was lost";
        const auto [ec, v] = f.get();
        if (!ec) {
            EXPECT_EQ(v, 1);
            ++ran;
        } else {
            EXPECT_EQ(ec, valve::errc::store_unavailable) << ec.message();
            ++refused;
        }
    }
    EXPECT_EQ(ran + refused, 29);
    if (policy == valve::store_failure::fail_closed) {
        EXPECT_GT(refused, 0);
    } else {
        EXPECT_EQ(refused, 0);
    }
    for (int i = 0; i < 30; ++i) EXPECT_LE(runs[static_cast<std::size_t>(i)].load(), 1) << "task " << i << " ran twice";
    // Back: tasks run through Redis again.
    server.start();
    wait_up(redis);
    std::vector<std::future<std::pair<error_code, int>>> after;
    for (int i = 30; i < 40; ++i) after.push_back(submit(i));
    for (auto& f : after) {
        ASSERT_EQ(f.wait_for(5s), std::future_status::ready);
        EXPECT_EQ(f.get(), std::make_pair(error_code{}, 1));
    }
}

// ---- chaos -------------------------------------------------------------------------------------

namespace {

// What an acquisition's completion recorded; one destroyed uncalled counts as dropped.
struct redis_ledger {
    explicit redis_ledger(std::size_t n) : fired(n), outcome(n), tokens(n) {}
    std::vector<std::atomic<int>> fired;
    std::vector<std::atomic<int>> outcome; // 0 granted, 1 past its deadline, 2 aborted, 3 store unavailable
    std::vector<std::atomic<int>> tokens;
    std::atomic<int> dropped{0};
    std::atomic<int> strange{0}; // an error no acquisition should end with
    std::atomic<std::int64_t> last_grant{0}; // steady_clock ticks of the latest grant seen

    void granted_now()
    {
        const auto t = std::chrono::steady_clock::now().time_since_epoch().count();
        auto seen = last_grant.load();
        while (seen < t && !last_grant.compare_exchange_weak(seen, t)) {
        }
    }
};

struct once_acquired {
    std::shared_ptr<redis_ledger> book;
    std::size_t id;
    std::shared_ptr<asio::cancellation_signal> signal; // what the slot points into
    bool owes = true;

    once_acquired(std::shared_ptr<redis_ledger> b, std::size_t i, std::shared_ptr<asio::cancellation_signal> s)
        : book(std::move(b)), id(i), signal(std::move(s))
    {
    }
    once_acquired(once_acquired&& o) noexcept
        : book(std::move(o.book)), id(o.id), signal(std::move(o.signal)), owes(std::exchange(o.owes, false))
    {
    }
    once_acquired& operator=(once_acquired&&) = delete;
    ~once_acquired()
    {
        if (owes && book) book->dropped.fetch_add(1);
    }
    void operator()(error_code ec)
    {
        if (!owes) {
            book->fired[id].fetch_add(100); // called twice
            return;
        }
        owes = false;
        const int what = !ec                                          ? 0
                         : ec == valve::errc::would_exceed_deadline     ? 1
                         : ec == asio::error::operation_aborted         ? 2
                         : ec == valve::errc::store_unavailable         ? 3
                                                                        : 4;
        if (what == 4) book->strange.fetch_add(1);
        if (what == 0) book->granted_now();
        book->outcome[id].store(what);
        book->fired[id].fetch_add(1);
    }
};


// One submitter of the chaos test, on its own strand: its acquisitions, their cancellations and
// their completions all run there.
asio::awaitable<void> chaos_submitter(std::uint64_t seed, int c, int per_coroutine,
                                      std::shared_ptr<valve::redis_bucket> bucket, std::shared_ptr<redis_ledger> book,
                                      std::atomic<int>& issued, std::atomic<int>& try_yes)
{
    std::mt19937_64 r{seed};
    auto strand = co_await asio::this_coro::executor;
    for (int i = 0; i < per_coroutine; ++i) {
        const std::size_t id = static_cast<std::size_t>(c * per_coroutine + i);
        if (r() % 4 == 0 && bucket->try_acquire()) {
            try_yes.fetch_add(1);
            book->granted_now();
        }
        const std::size_t n = 1 + r() % 2;
        const auto now = std::chrono::steady_clock::now();
        const valve::resource::time_point deadlines[] = {valve::resource::time_point::max(), now, now + 2ms, now + 30ms};
        auto signal = std::make_shared<asio::cancellation_signal>();
        book->tokens[id].store(static_cast<int>(n));
        issued.fetch_add(1);
        bucket->async_acquire(
            n, deadlines[r() % 4],
            asio::bind_cancellation_slot(signal->slot(), asio::bind_executor(strand, once_acquired{book, id, signal})));
        if (r() % 3 == 0) { // cancelled a little later, or at once
            auto t = std::make_shared<asio::steady_timer>(strand, std::chrono::microseconds(r() % 3000));
            const auto type = r() % 2 ? asio::cancellation_type::terminal : asio::cancellation_type::total;
            t->async_wait([t, signal, type](error_code) { signal->emit(type); });
        }
        asio::steady_timer pause{strand, std::chrono::microseconds(r() % 8000)};
        co_await pause.async_wait(asio::use_awaitable);
    }
}
} // namespace

TEST_P(redis_failure, chaos_every_acquisition_completes_once_through_cancels_kills_flushes_and_a_close)
{
    const auto policy = GetParam();
    const std::uint64_t seed = model_seed();
    SCOPED_TRACE("replay with VALVE_MODEL_SEED=" + std::to_string(seed));
    std::mt19937_64 rng{seed};
    redis_server server;
    asio::io_context ioc;
    auto work = asio::make_work_guard(ioc);
    std::vector<std::thread> threads;
    for (int i = 0; i < 3; ++i) threads.emplace_back([&] { ioc.run(); });
    struct joiner { // also when an assertion returns early
        asio::io_context& ioc;
        std::vector<std::thread>& threads;
        ~joiner()
        {
            ioc.stop();
            for (auto& t : threads)
                if (t.joinable()) t.join();
        }
    } join_at_exit{ioc, threads};
    valve::redis_connection redis{ioc.get_executor(), server.url(), {.reply_timeout = 50ms}};
    valve::redis_connection admin{ioc.get_executor(), server.url(), {.reply_timeout = 2s}};
    ASSERT_FALSE(connect(redis)) << redis.last_error();
    ASSERT_FALSE(connect(admin)) << admin.last_error();
    const double per_second = 2000; // below what the submitters ask for: the limit binds
    const std::size_t burst = 20;
    const auto hold = 20ms;
    auto bucket = std::make_shared<valve::redis_bucket>(
        redis, "chaos", valve::rate::per_second(per_second), burst,
        valve::redis_bucket_options{.on_failure = policy, .stock = 4, .stock_hold = hold});

    constexpr int coroutines = 12;
    constexpr int per_coroutine = 80;
    auto book = std::make_shared<redis_ledger>(coroutines * per_coroutine);
    std::atomic<int> issued{0}, active{coroutines}, try_yes{0}, thrown{0};
    const auto start = std::chrono::steady_clock::now();
    for (int c = 0; c < coroutines; ++c) {
        // Each on its own strand: its acquisitions, their cancellations and their completions.
        asio::co_spawn(asio::make_strand(ioc), chaos_submitter(rng(), c, per_coroutine, bucket, book, issued, try_yes),
            [&](std::exception_ptr e) {
                if (e) thrown.fetch_add(1);
                active.fetch_sub(1);
            });
    }

    // Meanwhile: the connection killed from Redis's side, the script flushed, then the
    // connection closed with acquisitions still pending.
    const auto close_at = start + std::chrono::milliseconds(150 + rng() % 250); // mid-run
    while (std::chrono::steady_clock::now() < close_at) {
        std::this_thread::sleep_for(std::chrono::milliseconds(20 + rng() % 80)); // the test's pacing
        switch (rng() % 3) {
        case 0:
            exec(admin, {"CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"});
            break;
        case 1:
            exec(admin, {"SCRIPT", "FLUSH"});
            break;
        default:
            break;
        }
    }
    redis.close();
    ASSERT_TRUE(eventually([&] { return active.load() == 0; })) << "a submitter never finished";
    ASSERT_TRUE(eventually([&] {
        for (int i = 0; i < issued.load(); ++i)
            if (book->fired[static_cast<std::size_t>(i)].load() == 0) return false;
        return true;
    })) << "an acquisition never completed";
    bucket.reset();
    admin.close();
    work.reset();
    ioc.stop(); // every acquisition has completed; what is left is the connections' own work
    for (auto& t : threads) t.join();

    long granted = try_yes.load();
    std::array<int, 5> seen{};
    for (int i = 0; i < issued.load(); ++i) {
        const auto id = static_cast<std::size_t>(i);
        EXPECT_EQ(book->fired[id].load(), 1) << "acquisition " << i;
        ++seen[static_cast<std::size_t>(book->outcome[id].load())];
        if (book->outcome[id].load() == 0) granted += book->tokens[id].load();
    }
    EXPECT_EQ(book->dropped.load(), 0) << "a completion handler was destroyed uncalled";
    EXPECT_EQ(book->strange.load(), 0);
    EXPECT_EQ(thrown.load(), 0) << "a submitter threw";
    std::printf("chaos (policy %d): %d acquisitions: %d granted, %d past the deadline, %d aborted, %d store_unavailable; "
                "%d try_acquire yes\n",
                static_cast<int>(policy), issued.load(), seen[0], seen[1], seen[2], seen[3], try_yes.load());
    if (policy == valve::store_failure::fail_closed) {
        // Every token granted was Redis's, by the latest grant (a reserved slot may complete after
        // the close); a stocked one may be up to `hold` older than its use.
        const auto last = std::chrono::steady_clock::time_point{std::chrono::steady_clock::duration{book->last_grant.load()}};
        const double seconds = std::chrono::duration<double>(last - start + hold).count();
        const double allowed = static_cast<double>(burst) + per_second * seconds + 1;
        std::printf("chaos (fail_closed): %ld tokens granted of %.0f allowed\n", granted, allowed);
        EXPECT_LE(static_cast<double>(granted), allowed);
    }
}
