#ifndef VALVE_ADAPTIVE_HPP
#define VALVE_ADAPTIVE_HPP

#include <valve/detail/awaitable_traits.hpp>
#include <valve/rate.hpp>

#include <boost/asio/awaitable.hpp>

#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>

namespace valve {

class token_bucket;

/// How an `aimd_controller` moves its rate. Rates are in tokens per second.
struct aimd_options {
    /// The rate to start at.
    double initial = 10.0;
    /// Never below this (> 0), never above `ceiling`.
    double floor = 1.0;
    double ceiling = 1000.0;
    /// On an overload signal the rate is multiplied by this, in (0, 1).
    double decrease = 0.9;
    /// While tasks succeed the rate grows by `step` every `interval`.
    double step = 1.0;
    /// Also the cool-down after a decrease: the overload signals of tasks sent at the old rate,
    /// arriving within it, do not lower the rate again.
    std::chrono::nanoseconds interval = std::chrono::seconds(1);
    /// A name for the log.
    std::string name = "adaptive";
};

/// What an `aimd_controller` has seen and done.
struct aimd_stats {
    /// The rate in force now, in tokens per second.
    double rate = 0.0;
    std::uint64_t successes = 0;
    std::uint64_t overloads = 0;
    std::uint64_t increases = 0;
    std::uint64_t decreases = 0;
};

/// Finds the rate an upstream can really take (additive increase, multiplicative decrease, as
/// TCP does): each overload signal — an upstream 429 or 503, a timeout — multiplies the rate by
/// `decrease` (at most once per `interval`); while tasks succeed it adds `step` per `interval`,
/// between `floor` and `ceiling`. Every change is handed to the target (a token bucket's
/// `set_rate`, say) and logged through the "valve" logger: decreases at info, increases at
/// debug.
///
/// Feed it with `on_success`/`on_overload`, with `observe(error)`, or let `wrap(task)` report
/// each task's outcome. By default an exception is an overload signal when it carries
/// `errc::overloaded` or `errc::timed_out`; `classify` replaces that test. Other errors count
/// as neither.
///
/// Thread-safe. Time is an argument, so the controller can be tested on explicit time points.
class aimd_controller {
public:
    using clock = std::chrono::steady_clock;
    using time_point = clock::time_point;
    /// Receives each new rate, under the controller's lock: it must not call back into it.
    using target = std::function<void(rate)>;

    /// Applies `options.initial` to `apply` at once. Throws `valve::error`
    /// (`errc::invalid_argument`) for a floor that is not positive, a ceiling below the floor,
    /// an initial rate outside them, a factor outside (0, 1), a negative step or a non-positive
    /// interval.
    aimd_controller(aimd_options options, target apply);
    /// Drives `bucket`'s rate (which must outlive the controller).
    aimd_controller(aimd_options options, token_bucket& bucket);

    aimd_controller(const aimd_controller&) = delete;
    aimd_controller& operator=(const aimd_controller&) = delete;

    void on_success(time_point now = clock::now());
    void on_overload(time_point now = clock::now());
    /// Success for a null `error`, overload if `classify` (or the default test) says so,
    /// nothing otherwise. Returns whether it was an overload signal.
    bool observe(const std::exception_ptr& error, time_point now = clock::now());

    /// Replaces the test that tells overload signals from other errors.
    void classify(std::function<bool(const std::exception_ptr&)> is_overload);

    /// The rate in force now.
    rate current() const;
    aimd_stats stats() const;

    /// `task` (blocking, or returning `asio::awaitable<T>`) reporting its outcome here. The
    /// controller must outlive the returned callable's runs.
    template <class Task>
    auto wrap(Task task)
    {
        using R = std::invoke_result_t<Task&>;
        if constexpr (detail::awaitable_value<R>::is_awaitable)
            return [this, task = std::move(task)]() mutable -> R { return watch_async(task()); };
        else
            return [this, task = std::move(task)]() mutable -> R {
                try {
                    if constexpr (std::is_void_v<R>) {
                        task();
                        on_success();
                    } else {
                        R r = task();
                        on_success();
                        return r;
                    }
                } catch (...) {
                    observe(std::current_exception());
                    throw;
                }
            };
    }

    /// The default overload test: `errc::overloaded` or `errc::timed_out`.
    static bool default_is_overload(const std::exception_ptr& error);

private:
    template <class T, class Executor>
    boost::asio::awaitable<T, Executor> watch_async(boost::asio::awaitable<T, Executor> op)
    {
        std::exception_ptr error;
        try {
            if constexpr (std::is_void_v<T>) {
                co_await std::move(op);
                on_success();
                co_return;
            } else {
                T r = co_await std::move(op);
                on_success();
                co_return r;
            }
        } catch (...) {
            error = std::current_exception();
        }
        observe(error);
        std::rethrow_exception(error);
    }

    void set(double r, bool up);

    aimd_options options_;
    target apply_;
    std::function<bool(const std::exception_ptr&)> is_overload_;
    mutable std::mutex mutex_;
    aimd_stats stats_;
    time_point last_increase_{};
    time_point last_decrease_{};
    bool started_ = false;   // a first outcome has anchored the increases
    bool decreased_ = false; // last_decrease_ is set
};

} // namespace valve

#endif
