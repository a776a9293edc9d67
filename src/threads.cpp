#include "detail/threads.hpp"

#include "detail/elastic_pool.hpp"

#include <boost/asio/detail/thread_context.hpp>
#include <boost/asio/execution/outstanding_work.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/prefer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/thread_pool.hpp>

#include <limits>
#include <memory>
#include <new>
#include <optional>
#include <thread>
#include <type_traits>
#include <utility>

namespace asio = boost::asio;

namespace valve::detail {

namespace {

// `Plain` (an io_context's, a thread_pool's or an elastic_pool's executor type), tracking work
// or not, or a strand of either: whether this thread runs `ex`, if `ex` is one; empty if not.
template <class Plain>
std::optional<bool> runs(const asio::any_io_executor& ex) noexcept
{
    using tracked = std::decay_t<decltype(asio::prefer(std::declval<Plain>(), asio::execution::outstanding_work.tracked))>;
    if (const auto* e = ex.target<Plain>()) return e->running_in_this_thread();
    if (const auto* e = ex.target<tracked>()) return e->running_in_this_thread();
    if (const auto* s = ex.target<asio::strand<Plain>>()) return s->get_inner_executor().running_in_this_thread();
    if (const auto* s = ex.target<asio::strand<tracked>>()) return s->get_inner_executor().running_in_this_thread();
    return std::nullopt;
}

// Where references are let go: a pool made on first need and never destroyed, so that a release
// from a thread still running at exit, or from a static's destructor, finds it whole, and exit
// never waits for it. It has as many threads as releases under way at once, so one that blocks
// holds up no other; idle ones end. Null if even that could not be made (no memory).
elastic_pool* reaper() noexcept
{
    try {
        static elastic_pool* const leaked = new elastic_pool{std::numeric_limits<std::size_t>::max()};
        return leaked;
    } catch (...) {
        return nullptr; // the next call tries again
    }
}

// Lets go of a reference when called.
struct release_op {
    std::shared_ptr<void> last;
    void operator()() noexcept { last.reset(); }
};

} // namespace

bool running_in_this_thread(const asio::any_io_executor& ex) noexcept
{
    if (const auto here = runs<asio::io_context::executor_type>(ex)) return *here;
    if (const auto here = runs<asio::thread_pool::executor_type>(ex)) return *here;
    return runs<elastic_pool::executor_type>(ex).value_or(false); // a manager's profile pool
}

bool inside_event_loop() noexcept { return asio::detail::thread_context::top_of_thread_call_stack() != nullptr; }

void release_elsewhere(std::shared_ptr<void> last) noexcept
{
    release_op op{std::move(last)};
    if (elastic_pool* pool = reaper()) {
        try {
            // Allocates before it takes `op`: if that fails, `op` still holds the reference.
            pool->get_executor().execute(std::move(op));
            return;
        } catch (...) {
        }
    }
    // No memory: a thread of its own, holding the reference through a pointer so that a failed
    // start leaves it here, not released on this thread.
    if (auto* held = new (std::nothrow) std::shared_ptr<void>(std::move(op.last))) {
        try {
            std::thread([held] { delete held; }).detach();
            return;
        } catch (...) {
            return; // leaked: better than released here, or an exception out of a destructor
        }
    }
    // Nothing at all: leaked (constructed where its destructor never runs).
    alignas(std::shared_ptr<void>) unsigned char never_destroyed[sizeof(std::shared_ptr<void>)];
    ::new (static_cast<void*>(never_destroyed)) std::shared_ptr<void>(std::move(op.last));
}

} // namespace valve::detail
