#ifndef VALVE_TIMEOUT_HPP
#define VALVE_TIMEOUT_HPP

#include <valve/detail/saturate.hpp>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/experimental/parallel_group.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <chrono>
#include <exception>
#include <type_traits>
#include <utility>

namespace valve {

namespace detail {

/// Throws `valve::error(errc::timed_out)` naming the time allowed (zero for a deadline).
[[noreturn]] void throw_timed_out(std::chrono::nanoseconds allowed);

template <class T, class Executor>
boost::asio::awaitable<T, Executor> race_timer(std::chrono::steady_clock::time_point deadline,
                                               std::chrono::nanoseconds allowed, boost::asio::awaitable<T, Executor> op)
{
    namespace asio = boost::asio;
    using timer_type =
        asio::basic_waitable_timer<std::chrono::steady_clock, asio::wait_traits<std::chrono::steady_clock>, Executor>;
    static_assert(std::is_void_v<T> || std::is_default_constructible_v<T>,
                  "valve::with_timeout needs a default-constructible result type");
    const auto ex = co_await asio::this_coro::executor;
    timer_type timer{ex, deadline};
    // Whichever finishes first cancels the other, and both are awaited: nothing is left running.
    auto group = asio::experimental::make_parallel_group(asio::co_spawn(ex, std::move(op), asio::deferred),
                                                         timer.async_wait(asio::deferred));
    if constexpr (std::is_void_v<T>) {
        auto [order, e, timer_ec] =
            co_await group.async_wait(asio::experimental::wait_for_one(), asio::use_awaitable_t<Executor>{});
        // The operation's own outcome stands unless it ended because the timer fired.
        if (order[0] == 1 && !timer_ec && e) throw_timed_out(allowed);
        if (e) std::rethrow_exception(e);
    } else {
        auto [order, e, value, timer_ec] =
            co_await group.async_wait(asio::experimental::wait_for_one(), asio::use_awaitable_t<Executor>{});
        if (order[0] == 1 && !timer_ec && e) throw_timed_out(allowed);
        if (e) std::rethrow_exception(e);
        co_return std::move(value);
    }
}

} // namespace detail

/// Awaits `op`, but for no longer than `timeout`: past it, `op` is cancelled (per-operation
/// cancellation, terminal) and awaited, then `valve::error` with `errc::timed_out` is thrown.
///
/// `op` finishing first cancels the timer, so nothing outlives the call and nothing completes
/// late. An operation that ignores cancellation delays the timeout until it ends; one that
/// succeeds in the same instant the timer fires keeps its result. Cancelling the awaiting
/// coroutine cancels both and rethrows `op`'s `operation_aborted`. A timeout too long for the
/// clock (`nanoseconds::max()`, say) never fires.
template <class T, class Executor, class Rep, class Period>
boost::asio::awaitable<T, Executor> with_timeout(std::chrono::duration<Rep, Period> timeout,
                                                 boost::asio::awaitable<T, Executor> op)
{
    // Saturated: the longest durations never fire rather than wrap into the past.
    const auto allowed = detail::saturating_cast<std::chrono::nanoseconds>(timeout);
    return detail::race_timer(detail::saturating_add(std::chrono::steady_clock::now(), allowed), allowed,
                              std::move(op));
}

/// Awaits `op` until `deadline` at the latest; as `with_timeout`.
template <class T, class Executor>
boost::asio::awaitable<T, Executor> with_deadline(std::chrono::steady_clock::time_point deadline,
                                                  boost::asio::awaitable<T, Executor> op)
{
    return detail::race_timer(deadline, std::chrono::nanoseconds::zero(), std::move(op));
}

} // namespace valve

#endif
