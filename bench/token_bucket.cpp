// Benchmarks of valve's token bucket, each against a baseline measured in the same run:
//   try_acquire            vs a plain std::mutex bucket (1 and 2 threads)
//   async_acquire round trip (unlimited rate) vs a bare asio::post round trip
//   10,000 coroutines waiting on one bucket: bytes per waiter and time to serve them all
#include <valve/valve.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <malloc.h>
#include <memory>
#include <mutex>

namespace asio = boost::asio;
using clk = std::chrono::steady_clock;

namespace {

// Bytes in use on the heap (everything malloc hands out: operator new, aligned allocations and
// Asio's recycled blocks alike), to measure what a waiting operation costs.
long long heap_in_use()
{
    const struct mallinfo2 mi = mallinfo2();
    return static_cast<long long>(mi.uordblks + mi.hblkhd);
}

} // namespace

namespace {

// The baseline: the textbook bucket, a mutex around a floating-point token count.
class mutex_bucket {
public:
    mutex_bucket(double per_second, double burst) : rate_(per_second), burst_(burst), tokens_(burst) {}

    bool try_acquire(double n = 1)
    {
        const auto now = clk::now();
        std::lock_guard lock{mutex_};
        tokens_ = std::min(burst_, tokens_ + std::chrono::duration<double>(now - last_).count() * rate_);
        last_ = now;
        if (tokens_ < n) return false;
        tokens_ -= n;
        return true;
    }

private:
    std::mutex mutex_;
    double rate_;
    double burst_;
    double tokens_;
    clk::time_point last_ = clk::now();
};

// A rate high enough that every call is granted: both buckets do their full bookkeeping.
constexpr double fast_rate = 1e9;
constexpr std::size_t big_burst = 1'000'000;

void BM_try_acquire_mutex_bucket(benchmark::State& state)
{
    static mutex_bucket bucket{fast_rate, big_burst};
    for (auto _ : state) benchmark::DoNotOptimize(bucket.try_acquire());
}
BENCHMARK(BM_try_acquire_mutex_bucket)->Threads(1)->Threads(2)->UseRealTime();

void BM_try_acquire_valve(benchmark::State& state)
{
    static asio::io_context ioc;
    static valve::token_bucket bucket{ioc, valve::rate::per_second(fast_rate), big_burst};
    for (auto _ : state) benchmark::DoNotOptimize(bucket.try_acquire());
}
BENCHMARK(BM_try_acquire_valve)->Threads(1)->Threads(2)->UseRealTime();

// Round trips: post (or initiate) from outside the io_context, then run_one() to complete it.
// An io_context that owns a timer or a socket runs its reactor on every run_one(), so the fair
// baseline for valve (whose bucket owns a timer, as every Asio server owns sockets) has one too;
// the reactor-less figure is reported beside it.
template <class Executor>
void post_round_trip(benchmark::State& state, asio::io_context& ioc, const Executor& ex)
{
    auto guard = asio::make_work_guard(ioc);
    long long n = 0;
    for (auto _ : state) {
        asio::post(ex, [&] { ++n; });
        ioc.run_one();
    }
    benchmark::DoNotOptimize(n);
}

void BM_round_trip_asio_post_no_reactor(benchmark::State& state)
{
    asio::io_context ioc;
    post_round_trip(state, ioc, ioc.get_executor());
}
BENCHMARK(BM_round_trip_asio_post_no_reactor);

void BM_round_trip_asio_post(benchmark::State& state)
{
    asio::io_context ioc;
    asio::steady_timer timer{ioc};
    post_round_trip(state, ioc, ioc.get_executor());
}
BENCHMARK(BM_round_trip_asio_post);

void BM_round_trip_asio_post_any_io_executor(benchmark::State& state)
{
    // The same, through the type-erased executor most Asio programs pass around.
    asio::io_context ioc;
    asio::steady_timer timer{ioc};
    post_round_trip(state, ioc, asio::any_io_executor(ioc.get_executor()));
}
BENCHMARK(BM_round_trip_asio_post_any_io_executor);

void BM_round_trip_async_acquire_unlimited(benchmark::State& state)
{
    asio::io_context ioc;
    auto guard = asio::make_work_guard(ioc);
    valve::token_bucket bucket{ioc, valve::rate::unlimited(), 1};
    long long n = 0;
    for (auto _ : state) {
        bucket.async_acquire(1, [&](boost::system::error_code) { ++n; });
        ioc.run_one();
    }
    benchmark::DoNotOptimize(n);
}
BENCHMARK(BM_round_trip_async_acquire_unlimited);

void BM_round_trip_async_acquire_granted(benchmark::State& state)
{
    // A finite rate with tokens to spare: the lock-free core is on the path too.
    asio::io_context ioc;
    auto guard = asio::make_work_guard(ioc);
    valve::token_bucket bucket{ioc, valve::rate::per_second(fast_rate), big_burst};
    long long n = 0;
    for (auto _ : state) {
        bucket.async_acquire(1, [&](boost::system::error_code) { ++n; });
        ioc.run_one();
    }
    benchmark::DoNotOptimize(n);
}
BENCHMARK(BM_round_trip_async_acquire_granted);

// 10,000 coroutines queue on a bucket with no tokens, then the rate opens and all are served.
void BM_serve_10000_waiting_coroutines(benchmark::State& state)
{
    constexpr int waiters = 10'000;
    double bytes_per_waiter = 0;
    for (auto _ : state) {
        state.PauseTiming();
        asio::io_context ioc;
        valve::token_bucket bucket{ioc, valve::rate::zero(), 1};
        bucket.try_acquire();
        int served = 0;
        const long long before = heap_in_use();
        for (int i = 0; i < waiters; ++i)
            asio::co_spawn(
                ioc,
                [&]() -> asio::awaitable<void> {
                    co_await bucket.async_acquire(1, asio::use_awaitable);
                    ++served;
                },
                asio::detached);
        while (ioc.poll() > 0 || bucket.waiters() < waiters) {
        }
        bytes_per_waiter = static_cast<double>(heap_in_use() - before) / waiters;
        state.ResumeTiming();

        bucket.set_rate(valve::rate::unlimited());
        ioc.run();
        if (served != waiters) state.SkipWithError("not every waiter was served");
    }
    state.counters["bytes_per_waiter"] = bytes_per_waiter;
    state.counters["waiters_per_second"] =
        benchmark::Counter(static_cast<double>(waiters), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_serve_10000_waiting_coroutines)->Unit(benchmark::kMillisecond)->UseRealTime();

// The same 10,000 waiters as plain callbacks: the bucket's own cost without coroutine frames.
void BM_serve_10000_waiting_callbacks(benchmark::State& state)
{
    constexpr int waiters = 10'000;
    double bytes_per_waiter = 0;
    for (auto _ : state) {
        state.PauseTiming();
        asio::io_context ioc;
        valve::token_bucket bucket{ioc, valve::rate::zero(), 1};
        bucket.try_acquire();
        int served = 0;
        const long long before = heap_in_use();
        for (int i = 0; i < waiters; ++i) bucket.async_acquire(1, [&](boost::system::error_code ec) { served += !ec; });
        while (ioc.poll() > 0) {
        }
        bytes_per_waiter = static_cast<double>(heap_in_use() - before) / waiters;
        state.ResumeTiming();

        bucket.set_rate(valve::rate::unlimited());
        ioc.run();
        if (served != waiters) state.SkipWithError("not every waiter was served");
    }
    state.counters["bytes_per_waiter"] = bytes_per_waiter;
    state.counters["waiters_per_second"] =
        benchmark::Counter(static_cast<double>(waiters), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_serve_10000_waiting_callbacks)->Unit(benchmark::kMillisecond)->UseRealTime();

} // namespace

BENCHMARK_MAIN();
