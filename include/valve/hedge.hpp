#ifndef VALVE_HEDGE_HPP
#define VALVE_HEDGE_HPP

#include <valve/detail/awaitable_traits.hpp>
#include <valve/detail/saturate.hpp>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/experimental/parallel_group.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <chrono>
#include <cstddef>
#include <exception>
#include <type_traits>
#include <utility>
#include <vector>

namespace valve {

namespace detail {

/// Throws `valve::error` (`errc::invalid_argument`) for zero copies or a negative delay.
void check_hedge(std::size_t copies, std::chrono::nanoseconds delay);

// One copy: waits its turn, then runs. A copy cancelled while waiting never starts.
template <class Op>
auto hedge_copy(Op& op, std::chrono::nanoseconds wait) -> std::invoke_result_t<Op&>
{
    namespace asio = boost::asio;
    if (wait > std::chrono::nanoseconds::zero()) {
        asio::steady_timer timer{co_await asio::this_coro::executor, wait};
        co_await timer.async_wait(asio::use_awaitable);
    }
    co_return co_await op(); // (a void co_await is a valid co_return operand)
}

template <class Op>
auto hedge_impl(std::size_t copies, std::chrono::nanoseconds delay, Op op) -> std::invoke_result_t<Op&>
{
    namespace asio = boost::asio;
    using R = eventual_result_t<Op>;
    const auto ex = co_await asio::this_coro::executor;
    using copy_op = decltype(asio::co_spawn(ex, hedge_copy(op, delay), asio::deferred));
    std::vector<copy_op> ops;
    ops.reserve(copies);
    for (std::size_t i = 0; i < copies; ++i) {
        // Saturated: with the longest delays the later copies never start, rather than at once.
        const auto wait = saturating_mul(delay, i);
        ops.push_back(asio::co_spawn(ex, hedge_copy(op, wait), asio::deferred));
    }
    // The first success cancels the others (those still waiting never start), and every copy
    // is awaited before this returns.
    auto group = asio::experimental::make_parallel_group(std::move(ops));
    if constexpr (std::is_void_v<R>) {
        auto [order, errors] =
            co_await group.async_wait(asio::experimental::wait_for_one_success(), asio::use_awaitable);
        for (std::size_t i : order)
            if (!errors[i]) co_return;
        std::rethrow_exception(errors[order.back()]);
    } else {
        auto [order, errors, values] =
            co_await group.async_wait(asio::experimental::wait_for_one_success(), asio::use_awaitable);
        for (std::size_t i : order)
            if (!errors[i]) co_return std::move(values[i]);
        std::rethrow_exception(errors[order.back()]);
    }
}

} // namespace detail

/// A hedged (replicated) request: starts `op()`, then another copy every `delay` while none
/// has succeeded, up to `copies` in all. The first copy to succeed wins; the others are
/// cancelled (per-operation cancellation; copies still waiting never start) and awaited, so no
/// work is left dangling. If every copy fails, the exception of the last to fail is rethrown.
///
/// `op` returns `asio::awaitable<T>`, `T` default-constructible; it is called once per copy
/// started, on the awaiting coroutine's executor. Each copy that goes through a limiter takes
/// its own token there. A copy that fails does not start the next one early: copies start on
/// their schedule until one succeeds. Throws `valve::error` (`errc::invalid_argument`) for
/// zero copies or a negative delay. A delay too long for the clock (`nanoseconds::max()`)
/// starts only the first copy.
template <class Op, class Rep, class Period>
auto hedge(std::size_t copies, std::chrono::duration<Rep, Period> delay, Op&& op)
    -> std::invoke_result_t<std::decay_t<Op>&>
{
    static_assert(detail::awaitable_value<std::invoke_result_t<std::decay_t<Op>&>>::is_awaitable,
                  "valve::hedge: op must return an asio::awaitable");
    const auto d = detail::saturating_cast<std::chrono::nanoseconds>(delay);
    detail::check_hedge(copies, d);
    return detail::hedge_impl(copies, d, std::decay_t<Op>(std::forward<Op>(op)));
}

} // namespace valve

#endif
