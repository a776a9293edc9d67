#ifndef VALVE_BACKOFF_HPP
#define VALVE_BACKOFF_HPP

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <optional>

namespace valve {

/// Exponential backoff: the delay after the n-th failed attempt is
/// `min(initial * multiplier^(n-1), max_interval)`, randomized uniformly within
/// `± jitter` of itself (the "randomization factor" of Google's HTTP client and of
/// cenkalti/backoff), so delays lie in `[d * (1 - jitter), d * (1 + jitter)]`.
///
/// Retrying stops after `max_attempts` attempts (the first one included), or when the next
/// attempt would start more than `max_elapsed` after the first one began.
struct exponential_backoff {
    std::chrono::nanoseconds initial = std::chrono::milliseconds(100);
    double multiplier = 2.0;
    std::chrono::nanoseconds max_interval = std::chrono::seconds(10);
    /// 0 for exact delays; at most 1.
    double jitter = 0.5;
    std::chrono::nanoseconds max_elapsed = std::chrono::minutes(1);
    std::size_t max_attempts = 10;
};

/// The same delay after every failed attempt, randomized within `± jitter` of itself.
struct constant_backoff {
    std::chrono::nanoseconds interval = std::chrono::seconds(1);
    double jitter = 0.0;
    std::chrono::nanoseconds max_elapsed = std::chrono::minutes(1);
    std::size_t max_attempts = 10;
};

/// What a policy is asked after a failed attempt.
struct backoff_step {
    /// Attempts made so far (1 after the first failure).
    std::size_t attempts = 0;
    /// Time since the first attempt began.
    std::chrono::nanoseconds elapsed{0};
    /// A number drawn uniformly from [0, 1) by the schedule's random source.
    double random = 0.0;
};

/// A user-defined policy: the delay before the next attempt, or `std::nullopt` to stop.
using backoff_function = std::function<std::optional<std::chrono::nanoseconds>(const backoff_step&)>;

class backoff_schedule;

/// How long to wait between attempts and when to give up: exponential, constant or
/// user-defined. A copyable value; `schedule()` starts one run of it.
///
/// Randomness comes from a small generator (splitmix64) whose output is fully specified: under
/// `seeded(s)`, every run of a policy yields the same delays on every platform, so tests can
/// assert exact sequences. Unseeded, each run draws a fresh seed, so a fleet of callers does not
/// retry in lockstep.
class backoff_policy {
public:
    /// Throws `valve::error` (`errc::invalid_argument`) for a negative interval, a multiplier
    /// below 1, a jitter outside [0, 1], `max_interval < initial`, or zero `max_attempts`.
    backoff_policy(const exponential_backoff& p);
    /// Throws `valve::error` (`errc::invalid_argument`) for a negative interval, a jitter outside
    /// [0, 1], or zero `max_attempts`.
    backoff_policy(const constant_backoff& p);
    /// Throws `valve::error` (`errc::invalid_argument`) for an empty function.
    backoff_policy(backoff_function f);

    /// The same policy, with every run drawing its random numbers from `seed`.
    backoff_policy seeded(std::uint64_t seed) const;

    /// Starts one run: a fresh attempt count and random sequence.
    backoff_schedule schedule() const;

    /// The delay after the attempt described by `step`, or `std::nullopt` to stop.
    std::optional<std::chrono::nanoseconds> next(const backoff_step& step) const;

private:
    backoff_function next_;
    std::optional<std::uint64_t> seed_;
};

/// One run of a policy: call `next` after each failed attempt.
class backoff_schedule {
public:
    /// Counts a failed attempt made `elapsed` after the first began; returns the delay before
    /// the next attempt, or `std::nullopt` when the policy gives up.
    std::optional<std::chrono::nanoseconds> next(std::chrono::nanoseconds elapsed);

    /// Attempts counted so far.
    std::size_t attempts() const noexcept { return attempts_; }

private:
    friend class backoff_policy;
    backoff_schedule(backoff_function next, std::uint64_t seed) : next_(std::move(next)), state_(seed) {}

    double uniform() noexcept;

    backoff_function next_;
    std::uint64_t state_;
    std::size_t attempts_ = 0;
};

} // namespace valve

#endif
