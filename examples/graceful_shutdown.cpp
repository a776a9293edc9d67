// Graceful shutdown: nothing submitted is lost. Tasks submitted before the shutdown run (or their
// submitters hear why not); tasks submitted after it are refused; a long task that takes a
// std::stop_token is asked to stop when the grace period runs out.
// Runs for about a second on its own; Ctrl-C (SIGINT) or SIGTERM starts the shutdown earlier.
#include <valve/valve.hpp>

#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <map>
#include <stop_token>
#include <string>
#include <thread>

namespace asio = boost::asio;
using namespace std::chrono_literals;

int main()
{
    asio::io_context ioc;
    valve::manager mgr{ioc.get_executor()};
    // 20 tasks per second, 2 at once, up to 50 waiting.
    mgr.register_profile("jobs", valve::shared_resource("upstream", valve::rate::per_second(20), 2),
                         valve::worker_pool(2, 50));
    auto jobs = mgr.get_limiter("jobs", "batch");

    std::map<std::string, int> outcomes;
    auto tally = [&](std::exception_ptr e) {
        std::string what = "ran";
        try {
            if (e) std::rethrow_exception(e);
        } catch (const boost::system::system_error& se) {
            what = se.code().message().substr(0, se.code().message().find(':'));
        }
        ++outcomes[what];
    };

    // A long task that stops when asked.
    jobs->async_submit(
        [](std::stop_token st) {
            while (!st.stop_requested()) std::this_thread::sleep_for(1ms);
            std::puts("long task: asked to stop, stopping");
        },
        tally);
    // 40 short tasks: at 20/s with one slot taken, some will still be queued at shutdown.
    for (int i = 0; i < 40; ++i) jobs->async_submit([] { std::this_thread::sleep_for(5ms); }, tally);

    auto shut_down = [&] {
        std::puts("shutting down: 300 ms grace");
        mgr.async_shutdown(300ms, [&](boost::system::error_code) {
            std::puts("shut down: every limiter is idle");
            ioc.stop();
        });
        // Submitted after the shutdown began: refused.
        jobs->async_submit([] {}, tally);
    };
    asio::signal_set signals{ioc, SIGINT, SIGTERM};
    asio::steady_timer later{ioc, 500ms};
    signals.async_wait([&](boost::system::error_code ec, int) {
        if (!ec) {
            later.cancel();
            shut_down();
        }
    });
    later.async_wait([&](boost::system::error_code ec) {
        if (!ec) {
            signals.cancel();
            shut_down();
        }
    });
    ioc.run();

    int total = 0;
    for (const auto& [what, n] : outcomes) {
        std::printf("%3d  %s\n", n, what.c_str());
        total += n;
    }
    std::printf("%3d  submitted: every one accounted for\n", total);
    return total == 42 ? 0 : 1;
}
