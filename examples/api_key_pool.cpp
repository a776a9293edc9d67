// A pool of API keys: the upstream allows 5 calls per second per key, and the service has three
// keys. Each key is a shared resource of its own profile; users are spread over the keys, so
// the service gets 15 calls per second in all while no key ever exceeds its 5.
#include <valve/valve.hpp>

#include <boost/asio/io_context.hpp>

#include <chrono>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

namespace asio = boost::asio;

int main()
{
    constexpr int keys = 3;
    asio::io_context ioc;
    valve::manager mgr{ioc.get_executor()};
    for (int k = 0; k < keys; ++k)
        mgr.register_profile("key-" + std::to_string(k),
                             valve::shared_resource("api-key-" + std::to_string(k), valve::rate::per_second(5)),
                             valve::worker_pool(2, 100));

    const auto start = std::chrono::steady_clock::now();
    std::map<int, std::vector<double>> calls; // key -> seconds at which its calls ran
    for (int u = 0; u < 12; ++u) {
        const std::string user = "user-" + std::to_string(u);
        const int key = u % keys; // spread users evenly over the keys
        auto limiter = mgr.get_limiter("key-" + std::to_string(key), user);
        for (int i = 0; i < 2; ++i)
            limiter->async_submit([] { return std::chrono::steady_clock::now(); },
                                  [&, key](std::exception_ptr e, std::chrono::steady_clock::time_point at) {
                                      if (!e) calls[key].push_back(std::chrono::duration<double>(at - start).count());
                                  });
    }
    ioc.run();

    int total = 0;
    bool within = true;
    for (const auto& [key, at] : calls) {
        std::printf("api-key-%d: %2zu calls at", key, at.size());
        for (double t : at) std::printf(" %.2f", t);
        std::printf(" s\n");
        total += static_cast<int>(at.size());
        // 5 per second with a burst of 1: call n runs no earlier than n/5 s.
        for (std::size_t n = 0; n < at.size(); ++n) within = within && at[n] + 0.01 >= static_cast<double>(n) / 5;
    }
    std::printf("%d calls over %d keys, none faster than its key allows: %s\n", total, keys, within ? "yes" : "NO");
    return total == 24 && within ? 0 : 1;
}
