#ifndef VALVE_IMPL_LIMITER_HPP
#define VALVE_IMPL_LIMITER_HPP

// The bodies of limiter's templates and coroutines: included at the end of valve/limiter.hpp.

#include <valve/detail/saturate.hpp>
#include <valve/limiter.hpp>
#include <valve/timeout.hpp>

#include <boost/asio/async_result.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/system/system_error.hpp>

#include <exception>
#include <functional>
#include <optional>
#include <type_traits>
#include <utility>

namespace valve {

template <class Task, class CompletionToken>
auto limiter::async_submit(Task&& task, CompletionToken&& token)
{
    using signature = typename detail::task_traits<std::decay_t<Task>>::signature;
    return boost::asio::async_initiate<CompletionToken, signature>(detail::submit_initiation{}, token, core_,
                                                                  user_, std::forward<Task>(task));
}

template <class Task>
auto limiter::submit(Task&& task)
{
    return submit_to(core_, user_, std::decay_t<Task>(std::forward<Task>(task)));
}

template <class Task>
auto limiter::submit(Task&& task, std::chrono::steady_clock::time_point deadline)
    -> boost::asio::awaitable<typename detail::task_traits<std::decay_t<Task>>::result>
{
    return submit_by(core_, user_, deadline, std::decay_t<Task>(std::forward<Task>(task)));
}

template <class Task, class Fallback>
auto limiter::submit_or(Task&& task, Fallback&& fallback)
    -> boost::asio::awaitable<typename detail::task_traits<std::decay_t<Task>>::result>
{
    return submit_or_impl(core_, user_, std::decay_t<Task>(std::forward<Task>(task)),
                          std::decay_t<Fallback>(std::forward<Fallback>(fallback)), std::nullopt);
}

template <class Task, class Fallback>
auto limiter::submit_or(Task&& task, Fallback&& fallback, std::chrono::steady_clock::time_point deadline)
    -> boost::asio::awaitable<typename detail::task_traits<std::decay_t<Task>>::result>
{
    return submit_or_impl(core_, user_, std::decay_t<Task>(std::forward<Task>(task)),
                          std::decay_t<Fallback>(std::forward<Fallback>(fallback)), deadline);
}

template <class Rep, class Period, class CompletionToken>
auto limiter::async_shutdown(std::chrono::duration<Rep, Period> grace, CompletionToken&& token)
{
    return boost::asio::async_initiate<CompletionToken, void(boost::system::error_code)>(
        detail::shutdown_initiation{}, token, core_, detail::saturating_cast<std::chrono::nanoseconds>(grace));
}

template <class CompletionToken>
auto limiter::async_enter(CompletionToken&& token)
{
    return boost::asio::async_initiate<CompletionToken, void(boost::system::error_code, permit)>(
        detail::enter_initiation{}, token, core_, user_);
}

template <class Task>
decltype(auto) limiter::invoke_task(Task& task, const detail::admission& admitted)
{
    if constexpr (detail::task_traits<Task>::stoppable)
        return std::invoke(task, admitted.stop.get_token());
    else
        return std::invoke(task);
}

template <class Task>
auto limiter::submit_to(const std::shared_ptr<detail::limiter_core>& core, std::uint64_t user, Task task)
{
    if constexpr (detail::runs_in_submitter<Task>)
        return submit_here(core, user, std::move(task));
    else
        return boost::asio::async_initiate<const boost::asio::use_awaitable_t<>&,
                                           typename detail::task_traits<Task>::signature>(
            detail::submit_initiation{}, boost::asio::use_awaitable, core, user, std::move(task));
}

template <class Task>
boost::asio::awaitable<typename detail::task_traits<Task>::result>
limiter::submit_by(std::shared_ptr<detail::limiter_core> core, std::uint64_t user,
          std::chrono::steady_clock::time_point deadline, Task task)
{
    if (detail::limiter_next_available(*core) > deadline) detail::throw_past_deadline();
    co_return co_await with_deadline(deadline, submit_to(core, user, std::move(task)));
}

template <class Task, class Fallback>
boost::asio::awaitable<typename detail::task_traits<Task>::result>
limiter::submit_or_impl(std::shared_ptr<detail::limiter_core> core, std::uint64_t user, Task task, Fallback fallback,
               std::optional<std::chrono::steady_clock::time_point> deadline)
{
    namespace asio = boost::asio;
    using result = typename detail::task_traits<Task>::result;
    bool started = false;
    std::exception_ptr failure;
    try {
        detail::flagged_task<Task> flagged{std::move(task), &started};
        auto submitted = deadline ? submit_by(core, user, *deadline, std::move(flagged))
                                  : submit_to(core, user, std::move(flagged));
        if constexpr (std::is_void_v<result>) {
            co_await std::move(submitted);
            co_return;
        } else {
            co_return co_await std::move(submitted);
        }
    } catch (...) {
        failure = std::current_exception();
    }
    const asio::cancellation_state cancellation = co_await asio::this_coro::cancellation_state;
    if (started || cancellation.cancelled() != asio::cancellation_type::none) std::rethrow_exception(failure);
    if constexpr (detail::awaitable_value<std::invoke_result_t<Fallback&>>::is_awaitable)
        co_return co_await fallback();
    else if constexpr (std::is_void_v<result>)
        fallback();
    else
        co_return fallback();
}

template <class Task>
boost::asio::awaitable<typename detail::task_traits<Task>::result>
limiter::submit_here(std::shared_ptr<detail::limiter_core> core, std::uint64_t user, Task task)
{
    namespace asio = boost::asio;
    using traits = detail::task_traits<Task>;
    using result = typename traits::result;
    const asio::cancellation_state cancellation = co_await asio::this_coro::cancellation_state;
    const bool cancellable = cancellation.slot().is_connected();
    // What the coroutine was told before this submission (if it does not throw on it) is
    // not this task's cancellation.
    const asio::cancellation_type_t told_before = cancellation.cancelled();
    if constexpr (traits::stoppable) {
        if (cancellable) {
            // The submitter's cancellation must reach the task's stop token once it runs:
            // the task runs as an operation of its own, whose slot the limiter keeps.
            co_return co_await asio::async_initiate<const asio::use_awaitable_t<>&, typename traits::signature>(
                detail::submit_initiation{}, asio::use_awaitable, core, user, std::move(task));
        }
    }
    // While the ticket is queued, a cancellation removes it (the limiter's handler is in
    // this coroutine's slot); once the task runs here, the operations it awaits see the
    // cancellation themselves.
    const detail::admission admitted =
        co_await asio::async_initiate<const asio::use_awaitable_t<>&, void(std::exception_ptr, detail::admission)>(
            detail::admit_initiation<traits::stoppable>{}, asio::use_awaitable, core, user);
    if (cancellable && cancellation.cancelled() != told_before) {
        // Cancelled after the limiter let it start and before this coroutine resumed: the
        // task does not begin (and its token goes back).
        detail::limiter_finished_before_handover(*core, admitted.id, detail::task_outcome::cancelled);
        detail::limiter_handed_over(*core);
        throw boost::system::system_error(asio::error::operation_aborted);
    }
    std::exception_ptr failure;
    if constexpr (std::is_void_v<result>) {
        try {
            co_await invoke_task(task, admitted);
        } catch (...) {
            failure = std::current_exception();
        }
        detail::limiter_finished(*core, admitted.id, static_cast<bool>(failure));
        if (failure) std::rethrow_exception(failure);
    } else {
        std::optional<result> value;
        try {
            value.emplace(co_await invoke_task(task, admitted));
        } catch (...) {
            failure = std::current_exception();
        }
        detail::limiter_finished(*core, admitted.id, static_cast<bool>(failure));
        if (failure) std::rethrow_exception(failure);
        co_return std::move(*value);
    }
}

} // namespace valve

#endif
