#ifndef VALVE_SRC_DETAIL_THREADS_HPP
#define VALVE_SRC_DETAIL_THREADS_HPP

// Internal: what valve needs to know about the threads behind an executor, and a place to
// end a thread pool that may not end where its last reference goes.

#include <boost/asio/any_io_executor.hpp>

#include <memory>

namespace valve::detail {

struct limiter_home;

/// The home of the limiter whose blocking task the calling thread is running, if any (set by
/// the limiter while the task runs).
const limiter_home* running_task_home() noexcept;

/// Whether the calling thread is running `ex`'s handlers now: `ex` is (or is a strand of) an
/// `io_context`'s, a `thread_pool`'s or an `elastic_pool`'s executor, tracking work or not, and
/// this thread is one of its threads. False for other executors (not known).
bool running_in_this_thread(const boost::asio::any_io_executor& ex) noexcept;

/// Whether the calling thread is inside some Asio event loop (an `io_context`'s or a
/// `thread_pool`'s), running one of its handlers.
bool inside_event_loop() noexcept;

/// Releases `last` on a thread of valve's own, soon: for the last reference to something that
/// must not be destroyed on the calling thread (a thread pool, from one of its own threads,
/// cannot join itself). Each release under way has its own thread, so one that blocks holds up
/// no other; the program's exit does not wait for them. Never throws (its callers are
/// destructors): with no thread to be had, the release waits for a later call to start one;
/// with no memory either, `last` is leaked, never released on the calling thread.
void release_elsewhere(std::shared_ptr<void> last) noexcept;

} // namespace valve::detail

#endif
