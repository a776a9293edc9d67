#ifndef VALVE_RETRY_HPP
#define VALVE_RETRY_HPP

#include <valve/backoff.hpp>
#include <valve/detail/awaitable_traits.hpp>
#include <valve/detail/saturate.hpp>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/cancellation_type.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <utility>

namespace valve {

/// Thrown by an operation (wrapping its real error) to say: do not retry this.
/// `retry` stops at once and rethrows the wrapped exception.
class permanent_error : public std::exception {
public:
    explicit permanent_error(std::exception_ptr inner) noexcept : inner_(std::move(inner)) {}
    /// The real error.
    const std::exception_ptr& inner() const noexcept { return inner_; }
    const char* what() const noexcept override { return "permanent error (not retried)"; }

private:
    std::exception_ptr inner_;
};

/// `throw valve::permanent(bad_request{...});` stops a `retry` at once.
template <class E>
permanent_error permanent(E&& e)
{
    return permanent_error{std::make_exception_ptr(std::forward<E>(e))};
}

/// Limits for a shared `retry_budget`.
struct retry_budget_options {
    /// Retries may add at most this fraction to the calls of the last window (0.2: 20%).
    double ratio = 0.2;
    /// Retries allowed per second of the window whatever the calls, so that a quiet caller
    /// can still retry.
    double min_retries_per_second = 10.0;
    /// The sliding window over which calls and retries are counted.
    std::chrono::nanoseconds window = std::chrono::seconds(10);
};

/// A budget of retries shared by many callers (as in Finagle and gRPC): over the last `window`,
/// retries may number at most `ratio` × first attempts + `min_retries_per_second` × window.
/// A fleet of retrying callers sharing one then cannot turn an upstream's bad minute into a
/// retry storm: past the budget, failures are reported instead of retried.
///
/// Thread-safe. Time is an argument, so the budget can be tested on explicit time points.
class retry_budget {
public:
    using clock = std::chrono::steady_clock;
    using time_point = clock::time_point;

    /// Throws `valve::error` (`errc::invalid_argument`) for a negative or NaN ratio or floor, or
    /// a window that is not positive.
    explicit retry_budget(retry_budget_options options = {});

    /// Counts a first attempt.
    void record_call(time_point now = clock::now());

    /// Takes one retry from the budget if there is room; `false` (and counts a refusal) if not.
    bool try_retry(time_point now = clock::now());

    /// Calls and retries in the window ending at `now`.
    std::uint64_t calls(time_point now = clock::now()) const;
    std::uint64_t retries(time_point now = clock::now()) const;
    /// Retries refused so far.
    std::uint64_t refused() const;

private:
    static constexpr std::size_t slots = 10;
    struct slot {
        std::int64_t tag = -1;
        std::uint64_t calls = 0;
        std::uint64_t retries = 0;
    };
    slot& at(time_point now);
    template <class F>
    std::uint64_t sum(time_point now, F field) const;

    retry_budget_options options_;
    std::chrono::nanoseconds slot_length_;
    mutable std::mutex mutex_;
    std::array<slot, slots> slots_{};
    std::uint64_t refused_ = 0;
};

/// What `on_retry` is told before each backoff sleep.
struct retry_event {
    /// Attempts made so far (1 after the first failure).
    std::size_t attempt = 0;
    /// The sleep before the next attempt.
    std::chrono::nanoseconds delay{0};
    /// The error of the attempt that failed.
    std::exception_ptr error;
};

namespace detail {

struct retry_options {
    std::function<bool(const std::exception_ptr&)> retry_if;
    std::function<void(const retry_event&)> on_retry;
    std::shared_ptr<retry_budget> budget;
};

struct retry_if_option {
    std::function<bool(const std::exception_ptr&)> f;
};
struct on_retry_option {
    std::function<void(const retry_event&)> f;
};
struct budget_option {
    std::shared_ptr<retry_budget> budget;
};

inline void apply(retry_options& o, retry_if_option x) { o.retry_if = std::move(x.f); }
inline void apply(retry_options& o, on_retry_option x) { o.on_retry = std::move(x.f); }
inline void apply(retry_options& o, budget_option x) { o.budget = std::move(x.budget); }

/// The decisions of one `retry` call: plain code, compiled once.
class retry_state {
public:
    retry_state(const backoff_policy& policy, retry_options options);

    /// Before each attempt.
    void starting();

    /// After a failed attempt: the sleep before the next one, or `std::nullopt` to stop, with
    /// `error` replaced by what to rethrow (a permanent error's inner one).
    std::optional<std::chrono::nanoseconds> failed(std::exception_ptr& error, bool cancelled);

private:
    backoff_schedule schedule_;
    retry_options options_;
    std::chrono::steady_clock::time_point start_;
    std::size_t attempts_ = 0;
};

template <class Op>
boost::asio::awaitable<eventual_result_t<Op>> retry_loop(retry_state state, Op op)
{
    namespace asio = boost::asio;
    using R = eventual_result_t<Op>;
    constexpr bool is_async = awaitable_value<std::invoke_result_t<Op&>>::is_awaitable;
    std::optional<asio::steady_timer> timer;
    for (;;) {
        std::exception_ptr error;
        state.starting();
        try {
            if constexpr (is_async && std::is_void_v<R>) {
                co_await op();
                co_return;
            } else if constexpr (is_async) {
                co_return co_await op();
            } else if constexpr (std::is_void_v<R>) {
                op();
                co_return;
            } else {
                co_return op();
            }
        } catch (...) {
            error = std::current_exception();
        }
        const auto cs = co_await asio::this_coro::cancellation_state;
        const auto delay = state.failed(error, cs.cancelled() != asio::cancellation_type::none);
        if (!delay) std::rethrow_exception(error);
        if (!timer) timer.emplace(co_await asio::this_coro::executor);
        timer->expires_at(saturating_add(std::chrono::steady_clock::now(), *delay));
        co_await timer->async_wait(asio::use_awaitable); // cancellable: throws operation_aborted
    }
}

} // namespace detail

/// Retries only the errors for which `pred(const std::exception_ptr&)` returns true. Whatever
/// it says, `valve::permanent` errors, `operation_aborted`, `errc::shutting_down` and errors
/// after the caller was cancelled are never retried.
template <class Pred>
detail::retry_if_option retry_if(Pred pred)
{
    return {std::move(pred)};
}

/// Calls `f(const retry_event&)` before each backoff sleep, in place of the default debug log.
template <class F>
detail::on_retry_option on_retry(F f)
{
    return {std::move(f)};
}

/// Draws every retry from `budget`, which many callers may share.
inline detail::budget_option with_budget(std::shared_ptr<retry_budget> budget) { return {std::move(budget)}; }

/// Runs `op` until it succeeds, sleeping between attempts as `policy` says.
///
/// `op` is a callable returning `asio::awaitable<T>`, or a plain callable returning `T` (run
/// inline on the coroutine's executor). The result is `op`'s. Options: `retry_if(pred)`,
/// `on_retry(f)`, `with_budget(b)`. Each failed attempt is logged through the "valve" logger at
/// debug level unless `on_retry` is given.
///
/// When retrying stops — a permanent or non-transient error, attempts or time used up, the
/// budget refusing — the last attempt's own exception is rethrown (a `permanent_error`'s
/// inner one), so callers handle the upstream's errors, not valve's.
///
/// The sleeps wait on an `asio::steady_timer` of the coroutine's executor and honour
/// per-operation cancellation: cancelling the awaiting coroutine (say, with `||` a timer)
/// ends the sleep with `operation_aborted` and nothing more is attempted. A shutdown reaches a
/// retry the same way (an application's shutdown cancels its coroutines), or through the
/// limiter: `errc::shutting_down` from an attempt is never retried.
template <class Op, class... Options>
boost::asio::awaitable<detail::eventual_result_t<std::decay_t<Op>>> retry(const backoff_policy& policy, Op&& op,
                                                                          Options&&... options)
{
    detail::retry_options o;
    (detail::apply(o, std::forward<Options>(options)), ...);
    return detail::retry_loop(detail::retry_state{policy, std::move(o)}, std::decay_t<Op>(std::forward<Op>(op)));
}

} // namespace valve

#endif
