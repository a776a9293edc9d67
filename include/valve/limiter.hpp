#ifndef VALVE_LIMITER_HPP
#define VALVE_LIMITER_HPP

// The limiter's API and its documentation. What it queues (job types, task traits, the
// boundary to src/limiter.cpp) is in detail/limiter_jobs.hpp; the bodies of its templates and
// coroutines in impl/limiter.hpp, included at the end.

#include <valve/detail/limiter_jobs.hpp>
#include <valve/limiter_stats.hpp>
#include <valve/permit.hpp>
#include <valve/resource.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/system/error_code.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>

namespace valve {

/// Runs tasks under a resource's limits, at most `concurrency` at once, with a bounded queue.
///
/// A submitted task is admitted into the queue (or refused at once with `errc::queue_full`, or
/// its submitter waits for room under `queue_full_policy::wait`), waits its turn (users take
/// turns, see `for_user`; FIFO within a user) for a token of the resource and a free
/// slot, then runs: a plain callable on the task executor (a
/// thread pool for blocking work), a callable returning `asio::awaitable<T>` on the submitter's
/// executor. Its result or exception comes back to the submitter, on the submitter's executor.
///
/// Thread safety: every member function may be called from any thread, concurrently.
class limiter : public std::enable_shared_from_this<limiter> {
public:
    using executor_type = boost::asio::any_io_executor;

    /// A limiter whose bookkeeping runs on `ex` and whose blocking tasks run on `task_ex`;
    /// `keep_alive` (say, the thread pool behind `task_ex`) lives as long as the limiter; if
    /// the limiter's last reference goes on one of the threads of `ex` or `task_ex` (a task's
    /// completion drops it), `keep_alive` is released on a thread of valve's own instead, since
    /// a thread pool cannot end from inside.
    /// Throws `valve::error` (`errc::invalid_argument`) for a null resource, zero concurrency,
    /// or a zero queue capacity with `queue_full_policy::wait`.
    limiter(const executor_type& ex, std::shared_ptr<resource> limits, limiter_options options,
            const executor_type& task_ex, std::shared_ptr<void> keep_alive = {});

    /// As above, in a home (executors and what they need kept alive) shared with other
    /// limiters: how a manager makes its per-user limiters without a copy of each per user.
    limiter(std::shared_ptr<const detail::limiter_home> home, std::shared_ptr<resource> limits,
            limiter_options options);

    /// Refuses new tasks and aborts queued ones (`operation_aborted`); running tasks finish.
    ~limiter();

    limiter(const limiter&) = delete;
    limiter& operator=(const limiter&) = delete;

    executor_type get_executor() const noexcept;

    /// Submits `task` and completes with its outcome.
    ///
    /// Completion signature: `void(std::exception_ptr, T)` where `T` is what `task` returns
    /// (or `void(std::exception_ptr)` for `void`); for a task returning `asio::awaitable<T>`,
    /// `T`. The exception is the task's own, or a `valve::error` with `errc::queue_full`,
    /// `errc::shutting_down` or `operation_aborted` when the task never ran. The handler is
    /// invoked through its associated executor (the limiter's by default), never from inside
    /// this call.
    ///
    /// Per-operation cancellation: while the task waits in the queue (or for room), terminal,
    /// partial and total cancellation remove it: it never runs and takes no token. Once it runs,
    /// a task that takes a `std::stop_token` is asked to stop (cooperative preemption), and a
    /// task returning an awaitable receives the cancellation (the operations it awaits see it);
    /// blocking tasks run to the end.
    template <class Task, class CompletionToken>
    auto async_submit(Task&& task, CompletionToken&& token);

    /// `co_await limiter->submit(task)`: the task's result, or its exception rethrown.
    ///
    /// A task returning `asio::awaitable<T>`, submitted from a coroutine that nothing can
    /// cancel (its cancellation slot is not connected, as under `co_spawn(ex, f, detached)`),
    /// runs once the limiter lets it start as a plain `co_await` in the submitter's coroutine:
    /// the wait for admission is the one post, and there is no `co_spawn`. From a cancellable
    /// coroutine the same holds: a queued task is removed by the cancellation (it never runs),
    /// one the limiter has let start but that has not begun does not begin, and a running one
    /// receives the cancellation in the operations it awaits. (A task that takes a
    /// `std::stop_token`, submitted from a cancellable coroutine, runs as
    /// `async_submit(task, use_awaitable)`, so that the cancellation also requests its stop.)
    template <class Task>
    auto submit(Task&& task);

    /// `submit` with a deadline. Fails at once with `errc::would_exceed_deadline` when the wait
    /// for the resource's token alone would pass `deadline` (tasks already queued aside).
    /// Otherwise, as `with_deadline(deadline, submit(task))`: a task still queued at the
    /// deadline is removed (it never runs) and `errc::timed_out` is thrown; a running task that
    /// takes a `std::stop_token` is asked to stop; other running tasks finish first.
    template <class Task>
    auto submit(Task&& task, std::chrono::steady_clock::time_point deadline)
        -> boost::asio::awaitable<typename detail::task_traits<std::decay_t<Task>>::result>;

    /// Graceful degradation: submits `task`, and when the limiter refuses it — queue full,
    /// shutting down, or aborted by a shutdown before it started (or, given a deadline, the
    /// token too late or the deadline reached in the queue) — returns `fallback()`
    /// instead (the cached top 10 rather than a 503). `fallback` returns what `task` yields, or
    /// an `asio::awaitable` of it, and runs in the awaiting coroutine. The task's own
    /// exceptions, and `operation_aborted` after the caller's own cancellation, are rethrown.
    template <class Task, class Fallback>
    auto submit_or(Task&& task, Fallback&& fallback)
        -> boost::asio::awaitable<typename detail::task_traits<std::decay_t<Task>>::result>;

    /// `submit_or` with a deadline, as `submit(task, deadline)`: the fallback runs too when the
    /// token would come after `deadline`, or the task is still queued at it.
    template <class Task, class Fallback>
    auto submit_or(Task&& task, Fallback&& fallback, std::chrono::steady_clock::time_point deadline)
        -> boost::asio::awaitable<typename detail::task_traits<std::decay_t<Task>>::result>;

    /// Stops taking tasks (`errc::shutting_down`), lets queued and running tasks finish for
    /// up to `grace`, then aborts those still queued (`operation_aborted`), asks running tasks
    /// that take a `std::stop_token` to stop, and completes once no task is running.
    /// Completion signature: `void(boost::system::error_code)`.
    template <class Rep, class Period, class CompletionToken>
    auto async_shutdown(std::chrono::duration<Rep, Period> grace, CompletionToken&& token);

    /// Refuses new tasks from now on (`errc::shutting_down`), aborts every queued task
    /// (`operation_aborted`) and asks running tasks that take a `std::stop_token` to stop, all
    /// before returning. Running tasks finish; a shutdown in progress completes when they have.
    ///
    /// Through a handle from `for_user`, or any limiter a manager's `get_limiter` gives (a
    /// shared profile's handle, a dedicated user's own limiter): aborts that user's queued
    /// tasks (and those waiting for room) only, before returning; its running tasks finish,
    /// the limiter goes on, with the limit it keeps, and that user's later tasks are taken as
    /// before. Closing a manager's limiter is the manager's business.
    void cancel();

    /// The same limiter (one queue, one resource, one concurrency cap) seen by another user:
    /// queued tasks of different users are served in turns, the user served least recently
    /// first (a user who arrives goes ahead of the user just served), so one user flooding the
    /// queue cannot starve the others; each user's own tasks stay first come, first served. Tasks
    /// submitted through `*this` count as user 0's. Only the original limiter closes the queue
    /// (its destruction, its `cancel()`); `cancel()` through the handle aborts that user's
    /// queued tasks only.
    std::shared_ptr<limiter> for_user(std::uint64_t user) const;

    /// Admission as a wait, for work the caller does itself: queued as a task would be (its
    /// user's turn, FIFO within the user, the queue's bound and `queue_full_policy`), it
    /// completes with a permit once a slot and a token are the caller's. The caller does the
    /// work while it holds the permit, and releases it (or lets it go) when done.
    ///
    /// Errors (with an empty permit): `errc::queue_full` at once when the queue is full and its
    /// policy is `reject`; `errc::shutting_down` when the limiter is shutting down;
    /// `operation_aborted` when the wait is cancelled (per-operation cancellation, any type) or
    /// aborted by `cancel()` or a shutdown. Completes through the handler's associated executor
    /// (the limiter's executor for a handler with none), never inside this call.
    /// Completion signature: `void(boost::system::error_code, valve::permit)`.
    template <class CompletionToken>
    auto async_enter(CompletionToken&& token);

    /// Admission without waiting and without a task: a permit if a slot and a token are free
    /// now and nothing is queued ahead (the work is then done by the caller, on its own
    /// thread, while it holds the permit); otherwise an empty permit, with `ec` set to
    /// `errc::queue_full` (no slot or no token now, or tasks queued ahead) or
    /// `errc::shutting_down`, and the refusal counted as rejected. For callers that refuse
    /// rather than queue, such as an HTTP handler answering 429: no allocation, no post.
    permit try_enter(boost::system::error_code& ec);
    /// The same, for callers that need no reason.
    permit try_enter();

    /// Whether anything besides this handle shares its queue: a `for_user` handle, or work
    /// still on its way (a manager evicts an idle dedicated limiter only when nothing does).
    bool shared() const noexcept;

    /// Counters and timings so far (shared by every user's handle on this limiter).
    limiter_stats stats() const noexcept;

    /// Tasks waiting in the queue (and for room) now.
    std::size_t queued() const noexcept;
    /// Tasks running now.
    std::size_t running() const noexcept;

    /// Tokens of the limiter's resource a task could take now (infinity when unlimited): the
    /// `RateLimit-Remaining` of an HTTP answer.
    double available() const;
    /// When a task arriving now could have its token, tasks already queued aside: the basis of
    /// a `Retry-After`.
    std::chrono::steady_clock::time_point next_available() const;
    /// The resource the limiter takes its tokens from (a `bucket_resource` for a manager's
    /// limiters).
    resource& limits() const noexcept;

private:
    template <class Task>
    static decltype(auto) invoke_task(Task& task, const detail::admission& admitted);
    template <class Task>
    static auto submit_to(const std::shared_ptr<detail::limiter_core>& core, std::uint64_t user, Task task);
    template <class Task>
    static boost::asio::awaitable<typename detail::task_traits<Task>::result>
    submit_by(std::shared_ptr<detail::limiter_core> core, std::uint64_t user,
              std::chrono::steady_clock::time_point deadline, Task task);
    template <class Task, class Fallback>
    static boost::asio::awaitable<typename detail::task_traits<Task>::result>
    submit_or_impl(std::shared_ptr<detail::limiter_core> core, std::uint64_t user, Task task, Fallback fallback,
                   std::optional<std::chrono::steady_clock::time_point> deadline);
    // See submit(). Waits in the queue as a ticket, then runs the task in this coroutine.
    template <class Task>
    static boost::asio::awaitable<typename detail::task_traits<Task>::result>
    submit_here(std::shared_ptr<detail::limiter_core> core, std::uint64_t user, Task task);

    limiter(std::shared_ptr<detail::limiter_core> core, std::uint64_t user);

    friend struct detail::limiter_access;

    std::shared_ptr<detail::limiter_core> core_;
    std::uint64_t user_ = 0;
    bool owner_ = true;
};

} // namespace valve

#include <valve/impl/limiter.hpp>

#endif
