// valve's quick start: two tiers of users calling a rate-limited upstream.
//   free-tier: all free users share one key: 2 tasks/s in total, 5 running at once, 100 queued.
//   pro-tier:  each pro user has a private 10/s (and at most 300 per minute), 10 running, 200 queued.
// 20 pro tasks and 5 free tasks are submitted at once; the timestamps show 10/s and 2/s.
#include <valve/valve.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>

namespace asio = boost::asio;

namespace {

const auto start = std::chrono::steady_clock::now();

double ms_since_start()
{
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
}

// Stands in for a call to the upstream API: blocking work, run on the profile's thread pool.
std::string call_upstream(const std::string& who, int n)
{
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    return who + " #" + std::to_string(n);
}

asio::awaitable<void> task(std::shared_ptr<valve::limiter> limiter, std::string profile, std::string name, int n)
{
    const std::string done = co_await limiter->submit([&] { return call_upstream(name, n); });
    std::printf("%8.1f ms  [%s] %s\n", ms_since_start(), profile.c_str(), done.c_str());
}

void user(asio::io_context& ioc, valve::manager& mgr, const std::string& profile, const std::string& name, int tasks)
{
    auto limiter = mgr.get_limiter(profile, name);
    for (int i = 0; i < tasks; ++i) asio::co_spawn(ioc, task(limiter, profile, name, i), asio::detached);
}

} // namespace

int main()
{
    asio::io_context ioc;
    valve::manager mgr{ioc.get_executor()};

    mgr.register_profile("free-tier", valve::shared_resource("shared-free-key", valve::rate::per_second(2)),
                         valve::worker_pool(5, 100));
    mgr.register_profile("pro-tier", valve::dedicated_resource(valve::rate::per_second(10)),
                         valve::also_limit(valve::rate::per(300, std::chrono::minutes(1)), 300),
                         valve::worker_pool(10, 200));

    user(ioc, mgr, "pro-tier", "pro-user-123", 20);
    user(ioc, mgr, "free-tier", "free-user-abc", 3);
    user(ioc, mgr, "free-tier", "free-user-xyz", 2);
    ioc.run();
}
