#ifndef VALVE_LIMITER_HPP
#define VALVE_LIMITER_HPP

#include <valve/resource.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/append.hpp>
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/execution/outstanding_work.hpp>
#include <boost/asio/prefer.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/system/error_code.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <stop_token>
#include <variant>
#include <type_traits>
#include <utility>

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

namespace detail {

class limiter_core;

/// One submitted task, type-erased for the queue. Exactly one of `run` or `abort` is called.
class job_base {
public:
    virtual ~job_base() = default;
    /// Starts the task; the job must call `limiter_finished(core, threw)` once it has completed
    /// its submitter.
    virtual void run(std::unique_ptr<job_base> self, std::shared_ptr<limiter_core> core) = 0;
    /// The task will never run: completes its submitter with `ec`.
    virtual void abort(boost::system::error_code ec) = 0;
    /// The submitter's cancellation slot (empty if none).
    virtual boost::asio::cancellation_slot cancellation_slot() noexcept = 0;

    /// Keeps the submitter's executor from running out of work until the job is destroyed.
    virtual void keep_busy() = 0;

    /// A blocking job: runs the task here and now and completes its submitter (posted);
    /// returns whether the task threw.
    virtual bool execute() = 0;
    virtual bool blocking() const noexcept = 0;

    /// A stop source the task watches (it takes a `std::stop_token`), if any.
    virtual std::optional<std::stop_source> stop_source() { return std::nullopt; }

    /// When the limiter admitted it, and its id there.
    std::chrono::steady_clock::time_point admitted{};
    std::uint64_t id = 0;
};

void limiter_submit(const std::shared_ptr<limiter_core>& core, std::uint64_t user, std::unique_ptr<job_base> job);
void limiter_finished(const std::shared_ptr<limiter_core>& core, std::uint64_t id, bool threw);
/// Runs a blocking job on the current (task executor's) thread, then the limiter's next
/// blocking jobs, a bounded number, before returning the thread to its pool.
void run_blocking(std::unique_ptr<job_base> job, std::shared_ptr<limiter_core> core);
const boost::asio::any_io_executor& limiter_executor(const limiter_core& core) noexcept;
const boost::asio::any_io_executor& limiter_task_executor(const limiter_core& core) noexcept;
std::exception_ptr make_exception(boost::system::error_code ec);

template <class T>
struct awaitable_value {
    static constexpr bool is_awaitable = false;
};
template <class T, class Executor>
struct awaitable_value<boost::asio::awaitable<T, Executor>> {
    static constexpr bool is_awaitable = true;
    using type = T;
};

template <class R>
struct completion_of {
    using type = void(std::exception_ptr, R);
};
template <>
struct completion_of<void> {
    using type = void(std::exception_ptr);
};

template <class F, bool Stoppable = std::is_invocable_v<F&, std::stop_token>>
struct task_return {
    using type = std::invoke_result_t<F&>;
};
template <class F>
struct task_return<F, true> {
    using type = std::invoke_result_t<F&, std::stop_token>;
};

/// What a task returns and how its submitter is completed. A task that takes a
/// `std::stop_token` is asked to stop when its submitter cancels or shutdown's grace runs out.
template <class F>
struct task_traits {
    static constexpr bool stoppable = std::is_invocable_v<F&, std::stop_token>;
    using returned = typename task_return<F>::type;
    static constexpr bool is_async = awaitable_value<returned>::is_awaitable;
    using result = typename std::conditional_t<is_async, awaitable_value<returned>,
                                               std::type_identity<returned>>::type;
    using signature = typename completion_of<result>::type;
};

template <class F, class Handler>
class job final : public job_base {
    using traits = task_traits<F>;
    using result = typename traits::result;

public:
    job(F f, Handler h, const boost::asio::any_io_executor& fallback)
        : f_(std::move(f)), handler_(std::move(h)), fallback_(fallback)
    {
    }

    void keep_busy() override
    {
        if (!work_)
            work_.emplace(boost::asio::prefer(boost::asio::get_associated_executor(handler_, fallback_),
                                              boost::asio::execution::outstanding_work.tracked));
    }

    void run(std::unique_ptr<job_base> self, std::shared_ptr<limiter_core> core) override
    {
        namespace asio = boost::asio;
        auto* me = static_cast<job*>(self.release());
        std::unique_ptr<job> owned{me};
        if constexpr (traits::is_async) {
            // Async work does not block: it runs on the submitter's executor, no thread hop.
            auto ex = asio::get_associated_executor(me->handler_, me->fallback_);
            std::optional<decltype(me->invoke())> work;
            try {
                work.emplace(me->invoke()); // a callable that throws before its coroutine starts
            } catch (...) {
                const std::uint64_t job_id = me->id;
                if constexpr (std::is_void_v<result>)
                    me->deliver(std::current_exception());
                else
                    me->deliver(std::current_exception(), result{});
                limiter_finished(core, job_id, true);
                return;
            }
            asio::co_spawn(ex, std::move(*work),
                           [owned = std::move(owned), core = std::move(core)](std::exception_ptr e, auto... r) mutable {
                               // The slot is free before the submitter resumes, so its next
                               // submission can start at once.
                               limiter_finished(core, owned->id, static_cast<bool>(e));
                               owned->complete(std::move(e), std::move(r)...);
                           });
        } else {
            // Blocking work runs on the task executor (the profile's pool): one hop there, and
            // one back to the submitter's executor. The worker then runs the limiter's next
            // blocking tasks itself, a few per wake-up, instead of posting each.
            me->keep_busy();
            const asio::any_io_executor task_ex = limiter_task_executor(*core);
            asio::post(task_ex, [owned = std::move(owned), core = std::move(core)]() mutable {
                run_blocking(std::move(owned), std::move(core));
            });
        }
    }

    bool execute() override
    {
        if constexpr (traits::is_async) {
            return false; // never called: async jobs are spawned, not executed
        } else if constexpr (std::is_void_v<result>) {
            std::exception_ptr e;
            try {
                invoke();
            } catch (...) {
                e = std::current_exception();
            }
            const bool threw = static_cast<bool>(e);
            deliver(std::move(e));
            return threw;
        } else {
            std::exception_ptr e;
            result r{};
            try {
                r = invoke();
            } catch (...) {
                e = std::current_exception();
            }
            const bool threw = static_cast<bool>(e);
            deliver(std::move(e), std::move(r));
            return threw;
        }
    }

    bool blocking() const noexcept override { return !traits::is_async; }

    void abort(boost::system::error_code ec) override
    {
        if constexpr (std::is_void_v<result>)
            deliver(make_exception(ec));
        else
            deliver(make_exception(ec), result{});
    }

    boost::asio::cancellation_slot cancellation_slot() noexcept override
    {
        return boost::asio::get_associated_cancellation_slot(handler_);
    }

    std::optional<std::stop_source> stop_source() override
    {
        if constexpr (traits::stoppable)
            return stop_;
        else
            return std::nullopt;
    }

private:
    decltype(auto) invoke()
    {
        if constexpr (traits::stoppable)
            return std::invoke(f_, stop_.get_token());
        else
            return std::invoke(f_);
    }

    // From a foreign thread: posted to the handler's executor.
    template <class... Args>
    void deliver(Args&&... args)
    {
        namespace asio = boost::asio;
        auto ex = asio::get_associated_executor(handler_, fallback_);
        asio::post(ex, asio::append(std::move(handler_), std::forward<Args>(args)...));
    }

    // Already on the handler's executor (the coroutine's completion): dispatched.
    template <class... Args>
    void complete(Args&&... args)
    {
        namespace asio = boost::asio;
        auto ex = asio::get_associated_executor(handler_, fallback_);
        asio::dispatch(ex, asio::append(std::move(handler_), std::forward<Args>(args)...));
    }

    F f_;
    Handler handler_;
    [[no_unique_address]] std::conditional_t<traits::stoppable, std::stop_source, std::monostate> stop_;
    boost::asio::any_io_executor fallback_;
    // The submitter's executor has work while the job waits or runs away from it: its
    // io_context keeps running while a task is queued or away on the pool. (An async task
    // running on it keeps it busy by itself.)
    std::optional<std::decay_t<decltype(boost::asio::prefer(
        std::declval<boost::asio::associated_executor_t<Handler, boost::asio::any_io_executor>>(),
        boost::asio::execution::outstanding_work.tracked))>>
        work_;
};

} // namespace detail

/// Runs tasks under a resource's limits, at most `concurrency` at once, with a bounded queue.
///
/// A submitted task is admitted into the queue (or refused at once with `errc::queue_full`, or
/// its submitter waits for room under `queue_full_policy::wait`), waits its turn (round-robin
/// between users, see `for_user`; FIFO within a user) for a token of the resource and a free
/// slot, then runs: a plain callable on the task executor (a
/// thread pool for blocking work), a callable returning `asio::awaitable<T>` on the submitter's
/// executor. Its result or exception comes back to the submitter, on the submitter's executor.
///
/// Thread safety: every member function may be called from any thread, concurrently.
class limiter : public std::enable_shared_from_this<limiter> {
public:
    using executor_type = boost::asio::any_io_executor;

    /// A limiter whose bookkeeping runs on `ex` and whose blocking tasks run on `task_ex`;
    /// `keep_alive` (say, the thread pool behind `task_ex`) lives as long as the limiter.
    /// Throws `valve::error` (`errc::invalid_argument`) for a null resource, zero concurrency,
    /// or a zero queue capacity with `queue_full_policy::wait`.
    limiter(const executor_type& ex, std::shared_ptr<resource> limits, limiter_options options,
            const executor_type& task_ex, std::shared_ptr<void> keep_alive = {});

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
    /// a task that takes a `std::stop_token` is asked to stop (cooperative preemption); other
    /// tasks run to the end.
    template <class Task, class CompletionToken>
    auto async_submit(Task&& task, CompletionToken&& token)
    {
        using signature = typename detail::task_traits<std::decay_t<Task>>::signature;
        return boost::asio::async_initiate<CompletionToken, signature>(initiation{}, token, core_, user_,
                                                                      std::forward<Task>(task));
    }

    /// `co_await limiter->submit(task)`: the task's result, or its exception rethrown.
    template <class Task>
    auto submit(Task&& task)
    {
        return async_submit(std::forward<Task>(task), boost::asio::use_awaitable);
    }

    /// Stops taking tasks (`errc::shutting_down`), lets queued and running tasks finish for
    /// up to `grace`, then aborts those still queued (`operation_aborted`), asks running tasks
    /// that take a `std::stop_token` to stop, and completes once no task is running.
    /// Completion signature: `void(boost::system::error_code)`.
    template <class Rep, class Period, class CompletionToken>
    auto async_shutdown(std::chrono::duration<Rep, Period> grace, CompletionToken&& token)
    {
        return boost::asio::async_initiate<CompletionToken, void(boost::system::error_code)>(
            shutdown_initiation{}, token, core_, std::chrono::duration_cast<std::chrono::nanoseconds>(grace));
    }

    /// Refuses new tasks from now on (`errc::shutting_down`), aborts every queued task
    /// (`operation_aborted`) and asks running tasks that take a `std::stop_token` to stop, all
    /// before returning. Running tasks finish; a shutdown in progress completes when they have.
    void cancel();

    /// The same limiter (one queue, one resource, one concurrency cap) seen by another user:
    /// queued tasks of different users are served round-robin, so one user flooding the queue
    /// cannot starve the others; each user's own tasks stay first come, first served. Tasks
    /// submitted through `*this` count as user 0's. Only the original limiter's destruction
    /// closes the queue.
    std::shared_ptr<limiter> for_user(std::uint64_t user) const;

    /// Counters and timings so far (shared by every user's handle on this limiter).
    limiter_stats stats() const noexcept;

    /// Tasks waiting in the queue (and for room) now.
    std::size_t queued() const noexcept;
    /// Tasks running now.
    std::size_t running() const noexcept;

private:
    struct initiation {
        template <class Handler, class Task>
        void operator()(Handler&& handler, const std::shared_ptr<detail::limiter_core>& core, std::uint64_t user,
                        Task&& task) const
        {
            using job_t = detail::job<std::decay_t<Task>, std::decay_t<Handler>>;
            detail::limiter_submit(core, user,
                                   std::make_unique<job_t>(std::forward<Task>(task), std::forward<Handler>(handler),
                                                           detail::limiter_executor(*core)));
        }
    };
    struct shutdown_initiation {
        void operator()(detail::acquire_handler handler, const std::shared_ptr<detail::limiter_core>& core,
                        std::chrono::nanoseconds grace) const;
    };

    limiter(std::shared_ptr<detail::limiter_core> core, std::uint64_t user);

    std::shared_ptr<detail::limiter_core> core_;
    std::uint64_t user_ = 0;
    bool owner_ = true;
};

} // namespace valve

#endif
