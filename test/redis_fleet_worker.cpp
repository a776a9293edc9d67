// One process of a fleet, for test/redis.cpp's multi-process tests: from a common start time, runs
// `seconds` of work limited by a limit held in Redis, and prints how much it got in that time.
//
//   redis_fleet_worker bucket  URL KEY RATE BURST SECONDS START_MS WAITERS
//   redis_fleet_worker profile URL USER RATE BURST SECONDS START_MS WAITERS
//
// START_MS is a system_clock time in milliseconds since the epoch (shared by the processes).
// Prints "granted N" (acquisitions or tasks completed within [start, start + seconds]), "all N"
// (every one, including those still out at the end), and "first_ns T" and "end_ns T", the
// steady_clock times of the first grant and of the end (CLOCK_MONOTONIC, common to every process).

#include <valve/manager.hpp>
#include <valve/redis.hpp>

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <thread>

namespace asio = boost::asio;
using boost::system::error_code;

int main(int argc, char** argv)
{
    if (argc != 9) {
        std::fprintf(stderr, "usage: %s bucket|profile URL KEY|USER RATE BURST SECONDS START_MS WAITERS\n", argv[0]);
        return 2;
    }
    const std::string mode = argv[1];
    const std::string url = argv[2];
    const std::string name = argv[3];
    const double per_second = std::atof(argv[4]);
    const auto burst = static_cast<std::size_t>(std::atoll(argv[5]));
    const double seconds = std::atof(argv[6]);
    const long long start_ms = std::atoll(argv[7]);
    const int waiters = std::atoi(argv[8]);

    asio::io_context ioc;
    valve::redis_connection redis{ioc.get_executor(), url};
    const auto sys_now = std::chrono::system_clock::now().time_since_epoch();
    const auto start = std::chrono::steady_clock::now() +
                       (std::chrono::milliseconds(start_ms) - std::chrono::duration_cast<std::chrono::milliseconds>(sys_now));
    const auto end = start + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                 std::chrono::duration<double>(seconds));
    long granted = 0; // everything below runs on the one thread that runs ioc
    long failed = 0;
    std::chrono::steady_clock::time_point first{};

    std::unique_ptr<valve::redis_bucket> bucket;
    std::unique_ptr<valve::manager> mgr;
    std::shared_ptr<valve::limiter> lim;
    if (mode == "bucket") {
        bucket = std::make_unique<valve::redis_bucket>(redis, name, valve::rate::per_second(per_second), burst);
    } else {
        mgr = std::make_unique<valve::manager>(ioc.get_executor());
        mgr->register_profile("fleet", valve::dedicated_resource(valve::rate::per_second(per_second), burst),
                              valve::worker_pool(static_cast<std::size_t>(waiters), 10'000), valve::stored_in(redis));
        lim = mgr->get_limiter("fleet", name);
    }

    // Each waiter acquires (or submits) again as soon as it is served, until the end; then the
    // process waits for the requests still out, so that a grant whose slot fell before the end but
    // whose wake-up came after it (a slow machine) is still seen: "all N" counts every grant.
    std::function<void()> next;
    long all = 0;
    int outstanding = 0;
    auto served = [&](bool ok) {
        const auto now = std::chrono::steady_clock::now();
        --outstanding;
        if (!ok) ++failed;
        else {
            ++all;
            if (now >= start && now <= end && granted++ == 0) first = now;
        }
        if (now < end) next();
        else if (outstanding == 0) ioc.stop();
    };
    next = [&] {
        ++outstanding;
        if (bucket)
            bucket->async_acquire(1, [&](error_code ec) { served(!ec); });
        else
            lim->async_submit([] { return 0; }, [&](std::exception_ptr e, int) { served(!e); });
    };
    asio::steady_timer at_start{ioc, start};
    at_start.async_wait([&](error_code) {
        for (int i = 0; i < waiters; ++i) next();
    });
    asio::steady_timer stop{ioc, end + std::chrono::seconds(5)}; // only if requests never settle
    stop.async_wait([&](error_code) { ioc.stop(); });
    ioc.run();
    auto ns = [](std::chrono::steady_clock::time_point t) {
        return static_cast<long long>(std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count());
    };
    std::printf("granted %ld\nfirst_ns %lld\nend_ns %lld\nall %ld\nunsettled %d\nfailed %ld\n", granted, ns(first),
                ns(end), all, outstanding, failed);
    return failed == 0 && outstanding == 0 ? 0 : 1;
}
