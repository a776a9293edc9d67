// One limit for many processes: run several copies of this program at once (fleet_demo.sh does)
// and together they get the key's rate, not one rate each.
//
//   example_fleet URL [SECONDS] [RATE]
//
// Each process acquires from the bucket "fleet-demo" (RATE per second, burst RATE, held in Redis
// at URL) with four coroutines for SECONDS, and prints what it was granted each second.
#include <valve/redis.hpp>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>

namespace asio = boost::asio;
using namespace std::chrono_literals;

int main(int argc, char** argv)
{
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s redis://host:port [seconds] [rate]\n", argv[0]);
        return 2;
    }
    const int seconds = argc > 2 ? std::atoi(argv[2]) : 5;
    const double per_second = argc > 3 ? std::atof(argv[3]) : 10;
    asio::io_context ioc;
    valve::redis_connection redis{ioc.get_executor(), argv[1]};
    valve::redis_bucket bucket{redis, "fleet-demo", valve::rate::per_second(per_second),
                               static_cast<std::size_t>(per_second)};
    const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
    long this_second = 0, total = 0, failed = 0;

    for (int i = 0; i < 4; ++i)
        asio::co_spawn(
            ioc,
            [&]() -> asio::awaitable<void> {
                while (std::chrono::steady_clock::now() < end) {
                    auto [ec] = co_await bucket.async_acquire(1, asio::as_tuple(asio::use_awaitable));
                    if (!ec && std::chrono::steady_clock::now() >= end) break; // a slot reserved for after the end
                    if (!ec) {
                        ++this_second; // the work the limit protects goes here
                        ++total;
                        continue;
                    }
                    // Redis unreachable: fail_closed (the default) refuses rather than overrun the key.
                    if (failed++ == 0)
                        std::printf("pid %d: %s (%s)\n", ::getpid(), ec.message().c_str(), redis.last_error().c_str());
                    co_await asio::steady_timer(ioc, 100ms).async_wait(asio::use_awaitable);
                }
            },
            asio::detached);

    asio::co_spawn(
        ioc,
        [&]() -> asio::awaitable<void> {
            asio::steady_timer tick{ioc};
            for (int s = 1; s <= seconds; ++s) {
                tick.expires_after(1s);
                co_await tick.async_wait(asio::use_awaitable);
                std::printf("pid %d: second %d: %ld granted\n", ::getpid(), s, this_second);
                std::fflush(stdout);
                this_second = 0;
            }
            redis.close(); // the connection is kept open until closed: now io_context::run can return
        },
        asio::detached);

    ioc.run();
    std::printf("pid %d: %ld granted in %d s; the fleet shares %.0f/s plus a burst of %.0f\n", ::getpid(), total,
                seconds, per_second, per_second);
    return failed == 0 ? 0 : 1;
}
