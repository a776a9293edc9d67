// Limits held in Redis, each figure beside its floor measured in the same run, against a
// redis-server this program starts on a free loopback port:
//
//   script calls/s on one connection, 64 in flight  vs  redis-benchmark -c 1 -P 64 of the same
//                                                         EVALSHA (valve's script); with how busy
//                                                         redis-server was in each, and at 256 in flight
//   one key at 100k/s, 64 local waiters: share of the rate granted, Redis calls per grant
//   one waiter per process at saturation: calls per grant  vs  deny-and-retry (sleep
//                                                         retry_after, ask again)
//   uncontended async_acquire p50  vs  PING p50 on the same connection
//   time to settle queued waiters after Redis stops answering
//
// Prints one figure per line, `name value`.
#include <valve/redis.hpp>

#include "../src/redis/gcra.hpp"
#include "../test/redis_server.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <future>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <unistd.h>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using boost::system::error_code;
using clk = std::chrono::steady_clock;

namespace {

void figure(const char* name, double value) { std::printf("%-40s %.3f\n", name, value); }

// CPU seconds a process has used (user + system), from /proc.
double cpu_seconds(pid_t pid)
{
    std::FILE* f = std::fopen(("/proc/" + std::to_string(pid) + "/stat").c_str(), "r");
    if (!f) return 0;
    char buf[1024] = {};
    const std::size_t n = std::fread(buf, 1, sizeof buf - 1, f);
    std::fclose(f);
    const std::string stat(buf, n);
    const auto close = stat.rfind(')'); // fields after the command name: state is field 3
    unsigned long utime = 0, stime = 0;
    if (close == std::string::npos ||
        std::sscanf(stat.c_str() + close + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &utime, &stime) != 2)
        return 0;
    return static_cast<double>(utime + stime) / static_cast<double>(::sysconf(_SC_CLK_TCK));
}

using valve::test::running_context;

void wait_connected(valve::redis_connection& c)
{
    std::promise<error_code> p;
    c.async_connect([&](error_code ec) { p.set_value(ec); });
    if (auto ec = p.get_future().get()) {
        std::fprintf(stderr, "cannot connect: %s\n", c.last_error().c_str());
        std::exit(1);
    }
}

// Script calls per second through one connection with `in_flight` calls outstanding: one
// redis_bucket per call in flight (each keeps one call outstanding), at a rate that never refuses.
double script_calls_per_second(const std::string& url, int in_flight, std::chrono::milliseconds for_how_long)
{
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), url};
    wait_connected(redis);
    std::vector<std::unique_ptr<valve::redis_bucket>> buckets;
    for (int i = 0; i < in_flight; ++i)
        buckets.push_back(std::make_unique<valve::redis_bucket>(redis, "calls-" + std::to_string(i),
                                                                valve::rate::per_second(1e8), 1000000));
    std::atomic<long> done{0};
    std::atomic<bool> stop{false};
    std::promise<void> all_stopped;
    std::atomic<int> running{in_flight};
    for (auto& b : buckets) {
        auto* bucket = b.get();
        asio::co_spawn(
            ctx.ioc,
            [&, bucket]() -> asio::awaitable<void> {
                while (!stop) {
                    co_await bucket->async_acquire(1, asio::use_awaitable);
                    ++done;
                }
                if (--running == 0) all_stopped.set_value();
            },
            asio::detached);
    }
    std::this_thread::sleep_for(200ms); // warm up
    const long from = done;
    const auto t0 = clk::now();
    std::this_thread::sleep_for(for_how_long);
    const long to = done;
    const double secs = std::chrono::duration<double>(clk::now() - t0).count();
    stop = true;
    all_stopped.get_future().wait();
    return static_cast<double>(to - from) / secs;
}

// redis-benchmark of the same EVALSHA, pipelined 64 deep on one connection.
double redis_benchmark_evalsha(const valve::test::redis_server& server, int pipeline, int requests)
{
    const auto interval = valve::detail::gcra_interval_of(valve::rate::per_second(1e8), 1000000, "bench");
    std::string cmd = "redis-benchmark -h 127.0.0.1 -p " + std::to_string(server.port()) + " -c 1 -P " +
                      std::to_string(pipeline) + " -n " + std::to_string(requests) + " -q --csv EVALSHA " +
                      valve::detail::gcra_script().sha1 + " 1 'valve:{rb}:0' '' 0 " + std::to_string(interval.q) +
                      " " + std::to_string(interval.r) + " " + std::to_string(interval.d) + " 1000000 1 " +
                      std::to_string(valve::detail::gcra_no_deadline) + " 2>&1";
    std::FILE* p = ::popen(cmd.c_str(), "r");
    if (!p) return 0;
    char line[1024];
    double rps = 0;
    while (std::fgets(line, sizeof line, p)) {
        // "EVALSHA ...","144927.54",...
        const std::string s = line;
        const auto q = s.find("\",\"");
        if (q != std::string::npos) rps = std::atof(s.c_str() + q + 3);
    }
    ::pclose(p);
    return rps;
}

struct rate_result {
    double granted_share; // of the rate
    double calls_per_grant;
};

// One key at `per_second`, `waiters` local waiters acquiring in a loop.
rate_result one_key(const std::string& url, double per_second, std::size_t burst, int waiters,
                    std::chrono::milliseconds for_how_long)
{
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), url};
    wait_connected(redis);
    valve::redis_bucket bucket{redis, "hot-" + std::to_string(waiters) + "-" + std::to_string(burst),
                               valve::rate::per_second(per_second), burst};
    std::atomic<long> granted{0};
    std::atomic<bool> stop{false};
    std::atomic<int> running{waiters};
    std::promise<void> all_stopped;
    for (int i = 0; i < waiters; ++i)
        asio::co_spawn(
            ctx.ioc,
            [&]() -> asio::awaitable<void> {
                while (!stop) {
                    co_await bucket.async_acquire(1, asio::use_awaitable);
                    ++granted;
                }
                if (--running == 0) all_stopped.set_value();
            },
            asio::detached);
    std::this_thread::sleep_for(200ms);
    const long g0 = granted;
    const auto c0 = bucket.stats().calls;
    const auto t0 = clk::now();
    std::this_thread::sleep_for(for_how_long);
    const long g1 = granted;
    const auto c1 = bucket.stats().calls;
    const double secs = std::chrono::duration<double>(clk::now() - t0).count();
    stop = true;
    all_stopped.get_future().wait();
    return {static_cast<double>(g1 - g0) / secs / per_second,
            static_cast<double>(c1 - c0) / static_cast<double>(std::max<long>(1, g1 - g0))};
}

// The baseline way: ask to take now; if refused, sleep the retry-after the script gave, ask again.
rate_result deny_and_retry(const std::string& url, double per_second, int clients, std::chrono::milliseconds for_how_long)
{
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), url};
    wait_connected(redis);
    const std::vector<valve::detail::gcra_limit> limits{
        {"valve:{retry}:0", valve::detail::gcra_interval_of(valve::rate::per_second(per_second), 1, "bench"), 1}};
    std::atomic<long> granted{0}, calls{0};
    std::atomic<bool> stop{false};
    std::atomic<int> running{clients};
    std::promise<void> all_stopped;
    for (int i = 0; i < clients; ++i)
        asio::co_spawn(
            ctx.ioc,
            [&]() -> asio::awaitable<void> {
                asio::steady_timer timer{ctx.ioc};
                std::vector<std::string> cmd{"EVALSHA", valve::detail::gcra_script().sha1};
                const auto args = valve::detail::gcra_args(limits, 0, {{1, 0}});
                cmd.insert(cmd.end(), args.begin(), args.end());
                while (!stop) {
                    auto reply = co_await redis.async_exec(cmd, asio::use_awaitable);
                    ++calls;
                    const auto r = valve::detail::gcra_parse(reply, 1);
                    if (r && r->waits[0] >= 0) {
                        ++granted;
                        continue;
                    }
                    timer.expires_after(std::chrono::microseconds(r ? -r->waits[0] - 1 : 1000));
                    co_await timer.async_wait(asio::use_awaitable);
                }
                if (--running == 0) all_stopped.set_value();
            },
            asio::detached);
    std::this_thread::sleep_for(200ms);
    const long g0 = granted, c0 = calls;
    const auto t0 = clk::now();
    std::this_thread::sleep_for(for_how_long);
    const long g1 = granted, c1 = calls;
    const double secs = std::chrono::duration<double>(clk::now() - t0).count();
    stop = true;
    all_stopped.get_future().wait();
    return {static_cast<double>(g1 - g0) / secs / per_second,
            static_cast<double>(c1 - c0) / static_cast<double>(std::max<long>(1, g1 - g0))};
}

double p50_us(std::vector<double> v)
{
    std::sort(v.begin(), v.end());
    return v.empty() ? 0 : v[v.size() / 2];
}

// p50 of an uncontended async_acquire (a rate that never makes it wait) and of PING.
std::pair<double, double> latency(const std::string& url, int samples)
{
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), url};
    wait_connected(redis);
    valve::redis_bucket bucket{redis, "latency", valve::rate::per_second(1e8), 1000000};
    std::vector<double> acquire, ping;
    std::promise<void> done;
    asio::co_spawn(
        ctx.ioc,
        [&]() -> asio::awaitable<void> {
            const std::vector<std::string> ping_cmd{"PING"};
            for (int i = 0; i < samples; ++i) {
                auto t = clk::now();
                co_await bucket.async_acquire(1, asio::use_awaitable);
                acquire.push_back(std::chrono::duration<double, std::micro>(clk::now() - t).count());
                t = clk::now();
                co_await redis.async_exec(ping_cmd, asio::use_awaitable);
                ping.push_back(std::chrono::duration<double, std::micro>(clk::now() - t).count());
            }
            done.set_value();
        },
        asio::detached);
    done.get_future().wait();
    return {p50_us(acquire), p50_us(ping)};
}

// Waiters queued behind a call Redis will never answer (it is stopped): ms until all settled.
double settle_ms(valve::test::redis_server& server)
{
    running_context ctx;
    valve::redis_connection redis{ctx.ioc.get_executor(), server.url()};
    wait_connected(redis);
    valve::redis_bucket bucket{redis, "settle", valve::rate::per_second(1000), 1};
    constexpr int waiters = 1000;
    std::atomic<int> settled{0};
    std::promise<void> all;
    std::this_thread::sleep_for(10ms);
    ::kill(server.pid(), SIGSTOP); // alive but silent, like a stalled server
    const auto t0 = clk::now();
    for (int i = 0; i < waiters; ++i)
        bucket.async_acquire(1, [&](error_code) {
            if (++settled == waiters) all.set_value();
        });
    all.get_future().wait();
    const double ms = std::chrono::duration<double, std::milli>(clk::now() - t0).count();
    ::kill(server.pid(), SIGCONT);
    return ms;
}

} // namespace

int main()
{
    valve::test::redis_server server{{"--io-threads", "1"}};
    const std::string url = server.url();
    std::printf("# redis-server %s on 127.0.0.1:%u; every figure below is from this run\n", "7", server.port());

    // Runs `measure` and returns its figure with the share of that time redis-server was on a
    // CPU (below 1, it waited for commands).
    auto with_busy_share = [&](auto measure) {
        const double cpu0 = cpu_seconds(server.pid());
        const auto t0 = clk::now();
        const double value = measure();
        const double secs = std::chrono::duration<double>(clk::now() - t0).count();
        return std::pair{value, (cpu_seconds(server.pid()) - cpu0) / secs};
    };
    const auto [ours, ours_busy] = with_busy_share([&] { return script_calls_per_second(url, 64, 2000ms); });
    const auto [bench_rps, bench_busy] = with_busy_share([&] { return redis_benchmark_evalsha(server, 64, 200000); });
    figure("redis_benchmark_evalsha_p64_per_s", bench_rps);
    figure("redis_script_calls_per_s_64_in_flight", ours);
    figure("redis_script_calls_ratio", bench_rps > 0 ? ours / bench_rps : 0);
    figure("redis_server_busy_share_redis_benchmark", bench_busy);
    figure("redis_server_busy_share_64_in_flight", ours_busy);
    const auto [ours256, busy256] = with_busy_share([&] { return script_calls_per_second(url, 256, 2000ms); });
    figure("redis_script_calls_per_s_256_in_flight", ours256);
    figure("redis_server_busy_share_256_in_flight", busy256);

    // Burst 100 (1 ms of the rate) absorbs a late timer; burst 1 loses whatever a gap costs.
    const auto hot = one_key(url, 100'000, 100, 64, 2000ms);
    figure("redis_100k_per_s_burst_100_64_waiters_granted_share", hot.granted_share);
    figure("redis_100k_per_s_burst_100_64_waiters_calls_per_grant", hot.calls_per_grant);
    const auto hot1 = one_key(url, 100'000, 1, 64, 2000ms);
    figure("redis_100k_per_s_burst_1_64_waiters_granted_share", hot1.granted_share);
    figure("redis_100k_per_s_burst_1_64_waiters_calls_per_grant", hot1.calls_per_grant);

    const auto single = one_key(url, 2000, 1, 1, 2000ms);
    const auto retry = deny_and_retry(url, 2000, 2, 2000ms);
    figure("redis_2000_per_s_1_waiter_granted_share", single.granted_share);
    figure("redis_2000_per_s_1_waiter_calls_per_grant", single.calls_per_grant);
    figure("deny_and_retry_2000_per_s_2_clients_calls_per_grant", retry.calls_per_grant);
    figure("deny_and_retry_2000_per_s_2_clients_granted_share", retry.granted_share);

    const auto [acquire_p50, ping_p50] = latency(url, 20000);
    figure("redis_async_acquire_p50_us", acquire_p50);
    figure("redis_ping_p50_us", ping_p50);
    figure("redis_async_acquire_p50_minus_ping_us", acquire_p50 - ping_p50);

    figure("redis_settle_1000_waiters_after_stall_ms", settle_ms(server));
    return 0;
}
