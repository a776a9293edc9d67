#ifndef VALVE_LIMITER_STATS_HPP
#define VALVE_LIMITER_STATS_HPP

// A limiter's options and statistics: plain values, with no Asio, for code that only configures
// or reports (metrics.hpp, a dashboard).

#include <chrono>
#include <cstddef>
#include <cstdint>

namespace valve {

/// What a limiter does with a task that arrives when its queue is full.
enum class queue_full_policy {
    /// Refuse it at once with `errc::queue_full` (the default: backpressure that says no early).
    reject,
    /// Let the submitter wait until there is room.
    wait,
};

/// How many tasks may run at once and how many may wait.
struct limiter_options {
    /// Tasks running at once; at least 1.
    std::size_t concurrency = 1;
    /// Tasks admitted and waiting to run; at least 1 under `queue_full_policy::wait`.
    std::size_t queue_capacity = 100;
    queue_full_policy on_queue_full = queue_full_policy::reject;
};

/// What a limiter (or a whole manager) has done so far. A snapshot; counters only grow.
struct limiter_stats {
    /// Tasks submitted (every submission, accepted or not).
    std::uint64_t submitted = 0;
    /// Refused at once: queue full or shutting down.
    std::uint64_t rejected = 0;
    /// Ran and returned normally.
    std::uint64_t completed = 0;
    /// Ran and threw.
    std::uint64_t failed = 0;
    /// Removed before running: cancelled, or aborted by shutdown.
    std::uint64_t cancelled = 0;
    /// Waiting now (in the queue or for room).
    std::size_t queued = 0;
    /// Running now.
    std::size_t running = 0;
    /// Time tasks spent between admission and start: in all, and the longest.
    std::chrono::nanoseconds queue_time_total{0};
    std::chrono::nanoseconds queue_time_max{0};
    /// Time the next task spent waiting for its token: in all, and the longest.
    std::chrono::nanoseconds token_wait_total{0};
    std::chrono::nanoseconds token_wait_max{0};
    /// When a task last started or finished (the epoch if none has).
    std::chrono::steady_clock::time_point last_progress{};
};

} // namespace valve

#endif
