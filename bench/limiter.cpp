// Benchmarks of valve's limiter and manager, each against a baseline measured in the same run:
//   co_await submit(blocking no-op)  vs  co_await post(pool) and back (the same two hops)
//   co_await submit(async no-op)     vs  co_await post(own executor) (a coroutine self-post),
//                                        from an uncancellable and from a cancellable coroutine
//   many submitters through one shared limiter with 2 workers  vs  asio::post to thread_pool(2)
//   heap per idle dedicated limiter, and after eviction
#include <valve/valve.hpp>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <benchmark/benchmark.h>

#include <atomic>
#include <chrono>
#include <future>
#include <malloc.h>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace asio = boost::asio;

namespace {

long long heap_in_use()
{
    const struct mallinfo2 mi = mallinfo2();
    return static_cast<long long>(mi.uordblks + mi.hblkhd);
}

std::shared_ptr<valve::limiter> make_limiter(asio::io_context& ioc, asio::thread_pool& pool, std::size_t concurrency,
                                             std::size_t capacity = 100)
{
    auto limits = std::make_shared<valve::bucket_resource>(ioc.get_executor(), valve::rate::unlimited());
    return std::make_shared<valve::limiter>(
        ioc.get_executor(), limits,
        valve::limiter_options{concurrency, capacity, valve::queue_full_policy::wait}, pool.get_executor());
}

void BM_hop_to_pool_and_back(benchmark::State& state)
{
    asio::io_context ioc;
    asio::thread_pool pool{1};
    asio::co_spawn(
        ioc,
        [&]() -> asio::awaitable<void> {
            for (auto _ : state) co_await asio::post(pool.get_executor(), asio::use_awaitable);
        },
        asio::detached);
    ioc.run();
    pool.join();
}
BENCHMARK(BM_hop_to_pool_and_back)->UseRealTime();

void BM_submit_blocking_noop(benchmark::State& state)
{
    asio::io_context ioc;
    asio::thread_pool pool{1};
    auto lim = make_limiter(ioc, pool, 1);
    asio::co_spawn(
        ioc,
        [&]() -> asio::awaitable<void> {
            for (auto _ : state) co_await lim->submit([] {});
        },
        asio::detached);
    ioc.run();
    pool.join();
}
BENCHMARK(BM_submit_blocking_noop)->UseRealTime();

void BM_coroutine_self_post(benchmark::State& state)
{
    asio::io_context ioc;
    asio::co_spawn(
        ioc,
        [&]() -> asio::awaitable<void> {
            auto ex = co_await asio::this_coro::executor;
            for (auto _ : state) co_await asio::post(ex, asio::use_awaitable);
        },
        asio::detached);
    ioc.run();
}
BENCHMARK(BM_coroutine_self_post)->UseRealTime();

void BM_submit_async_noop(benchmark::State& state)
{
    asio::io_context ioc;
    asio::thread_pool pool{1};
    auto lim = make_limiter(ioc, pool, 1);
    asio::co_spawn(
        ioc,
        [&]() -> asio::awaitable<void> {
            for (auto _ : state) co_await lim->submit([]() -> asio::awaitable<void> { co_return; });
        },
        asio::detached);
    ioc.run();
    pool.join();
}
BENCHMARK(BM_submit_async_noop)->UseRealTime();

// The same from a coroutine that can be cancelled (its cancellation slot is connected): the
// task then runs as an operation of its own (co_spawn), not in the submitter's frame.
void BM_submit_async_noop_cancellable(benchmark::State& state)
{
    asio::io_context ioc;
    asio::thread_pool pool{1};
    auto lim = make_limiter(ioc, pool, 1);
    asio::cancellation_signal never;
    asio::co_spawn(
        ioc,
        [&]() -> asio::awaitable<void> {
            for (auto _ : state) co_await lim->submit([]() -> asio::awaitable<void> { co_return; });
        },
        asio::bind_cancellation_slot(never.slot(), asio::detached));
    ioc.run();
    pool.join();
}
BENCHMARK(BM_submit_async_noop_cancellable)->UseRealTime();

constexpr int throughput_tasks = 1'000'000; // as the figure the issue names
constexpr int submitters = 4;

void BM_throughput_asio_post_to_pool(benchmark::State& state)
{
    for (auto _ : state) {
        asio::thread_pool pool{2};
        std::atomic<int> done{0};
        std::vector<std::thread> threads;
        for (int s = 0; s < submitters; ++s)
            threads.emplace_back([&] {
                for (int i = 0; i < throughput_tasks / submitters; ++i)
                    asio::post(pool, [&] { done.fetch_add(1, std::memory_order_relaxed); });
            });
        for (auto& t : threads) t.join();
        pool.join();
        if (done != throughput_tasks) state.SkipWithError("lost tasks");
    }
    state.counters["tasks_per_second"] =
        benchmark::Counter(throughput_tasks, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_throughput_asio_post_to_pool)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_throughput_shared_limiter_2_workers(benchmark::State& state)
{
    for (auto _ : state) {
        int completions = 0;
        asio::io_context ioc;
        auto guard = asio::make_work_guard(ioc);
        std::thread io([&] { ioc.run(); });
        asio::thread_pool pool{2};
        auto lim = make_limiter(ioc, pool, 2, 10'000);
        std::atomic<int> done{0};
        std::promise<void> all_done;
        std::vector<std::thread> threads;
        for (int s = 0; s < submitters; ++s)
            threads.emplace_back([&, s] {
                auto mine = lim->for_user(static_cast<std::uint64_t>(s));
                for (int i = 0; i < throughput_tasks / submitters; ++i)
                    mine->async_submit([&] { done.fetch_add(1, std::memory_order_relaxed); },
                                       [&](std::exception_ptr) {
                                           // Completions run on the io thread, one at a time.
                                           if (++completions == throughput_tasks) all_done.set_value();
                                       });
            });
        for (auto& t : threads) t.join();
        all_done.get_future().wait(); // block, as the baseline's join does: no spinning core
        guard.reset();
        io.join();
        pool.join();
    }
    state.counters["tasks_per_second"] =
        benchmark::Counter(throughput_tasks, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_throughput_shared_limiter_2_workers)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_idle_dedicated_limiters(benchmark::State& state)
{
    constexpr int users = 1'000'000;
    double per_limiter = 0;
    double after_eviction = 0;
    for (auto _ : state) {
        asio::io_context ioc;
        const long long before = heap_in_use();
        {
            valve::manager mgr{ioc.get_executor()};
            mgr.register_profile("pro", valve::dedicated_resource(valve::rate::per_second(10)),
                                 valve::worker_pool(1, 100), valve::idle_timeout(std::chrono::milliseconds(1)));
            const long long base = heap_in_use();
            for (int u = 0; u < users; ++u) mgr.get_limiter("pro", "user-" + std::to_string(u));
            per_limiter = static_cast<double>(heap_in_use() - base) / users;
            while (mgr.limiter_count("pro") > 0) ioc.run_for(std::chrono::milliseconds(5));
            ioc.poll();
            after_eviction = static_cast<double>(heap_in_use() - base) / users;
        }
        benchmark::DoNotOptimize(before);
    }
    state.counters["bytes_per_idle_limiter"] = per_limiter;
    state.counters["bytes_per_user_after_eviction"] = after_eviction;
}
BENCHMARK(BM_idle_dedicated_limiters)->Unit(benchmark::kMillisecond)->Iterations(1);

} // namespace

BENCHMARK_MAIN();
