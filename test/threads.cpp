#include "detail/threads.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <future>
#include <memory>
#include <utility>

using namespace std::chrono_literals;
using valve::detail::release_elsewhere;

namespace {

// Calls `f` when destroyed.
struct on_destroy {
    explicit on_destroy(std::function<void()> fn) : f(std::move(fn)) {}
    ~on_destroy() { f(); }
    on_destroy(const on_destroy&) = delete;
    on_destroy& operator=(const on_destroy&) = delete;
    std::function<void()> f;
};

} // namespace


TEST(release_elsewhere, a_release_that_blocks_does_not_hold_up_later_ones)
{
    struct shared {
        std::atomic<bool> second_released{false};
        std::promise<void> first_released;
    };
    auto s = std::make_shared<shared>();
    auto first_done = s->first_released.get_future();
    // The first blocks until the second has been released.
    release_elsewhere(std::make_shared<on_destroy>([s] {
        s->second_released.wait(false);
        s->first_released.set_value();
    }));
    release_elsewhere(std::make_shared<on_destroy>([s] {
        s->second_released = true;
        s->second_released.notify_all();
    }));
    EXPECT_EQ(first_done.wait_for(10s), std::future_status::ready) << "the second release waited for the first";
    // Whatever happened, let the first end.
    s->second_released = true;
    s->second_released.notify_all();
}
