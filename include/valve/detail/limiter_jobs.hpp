#ifndef VALVE_DETAIL_LIMITER_JOBS_HPP
#define VALVE_DETAIL_LIMITER_JOBS_HPP

// Internal: what a limiter queues. A submitted task becomes a job (its callable and its
// submitter's handler, as they are), typed here and erased to `job_base` for `src/limiter.cpp`;
// and the boundary between the two (`limiter_submit`, `limiter_finished`, ...).

#include <valve/detail/awaitable_traits.hpp>
#include <valve/permit.hpp>
#include <valve/resource.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/append.hpp>
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/execution/outstanding_work.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/prefer.hpp>
#include <boost/asio/recycling_allocator.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/system/error_code.hpp>
#include <boost/system/system_error.hpp>

#include <atomic>
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

class limiter;

namespace detail {

/// valve's own way into a limiter and a permit (the manager's, the jobs'), in place of a
/// friend function per use.
struct limiter_access {
    /// Async tasks (and tasks run by their submitting coroutines, and permits of async_enter)
    /// of `l`'s queue running now.
    static std::size_t async_tasks_running(const limiter& l) noexcept;
    /// The manager's: `l` is handed to one user, whose `cancel()` then aborts that user's tasks
    /// only (as through a `for_user` handle); closing it is `close`'s.
    static void hand_to_user(limiter& l) noexcept;
    /// Refuses new tasks, aborts queued ones and asks running ones to stop, through any handle.
    static void close(limiter& l);
    /// The permit of an `async_enter` the limiter let start.
    static permit make_permit(limiter_core& core, std::uint64_t id);
    /// Ends `p` as cancelled before its holder had it: its token goes back, unused.
    static void release_cancelled(permit& p) noexcept;
};


class limiter_core;

/// Where a limiter runs: its executor, the executor of its blocking tasks, and what keeps the
/// latter's threads alive. The limiters a manager makes for one profile share one.
struct limiter_home {
    limiter_home(std::shared_ptr<void> keep, const boost::asio::any_io_executor& ex,
                 const boost::asio::any_io_executor& task_ex)
        : keep_alive(std::move(keep)), executor(ex), task_executor(task_ex)
    {
    }
    /// Lets `keep_alive` go on another thread when it goes on one of the threads it keeps.
    ~limiter_home();
    limiter_home(const limiter_home&) = delete;
    limiter_home& operator=(const limiter_home&) = delete;

    std::shared_ptr<void> keep_alive; // first, so it is destroyed last
    boost::asio::any_io_executor executor;
    boost::asio::any_io_executor task_executor;
};

/// Carries a submitter's cancellation into its running async task: the task's coroutine
/// watches `signal`, which the submitter's cancellation handler emits while `running`.
///
/// The task's coroutine runs on a strand of the submitter's executor, and `signal` is emitted
/// only there: the coroutine changes its cancellation slots as it runs, and the submitter's
/// cancellation may come from any thread (a signal emitted elsewhere than where the handler's
/// executor runs, a multi-threaded `io_context`). Emitting it on the canceller's thread raced
/// with the coroutine, which could free what the emission was still using.
struct task_cancellation : std::enable_shared_from_this<task_cancellation> {
    boost::asio::cancellation_signal signal;
    /// Where the task runs; written before the task is marked running, read after.
    boost::asio::any_io_executor strand;
    /// Not started, running, finished: a task that finished before its starter marked it
    /// running is never marked so, and a finished one hears nothing more.
    enum phase_t : int { not_started, running, finished };
    std::atomic<int> phase{not_started};

    /// Marks the task running, unless it has finished already; whether it did.
    bool mark_running() noexcept
    {
        int expected = not_started;
        return phase.compare_exchange_strong(expected, running);
    }
    bool is_running() const noexcept { return phase.load() == running; }
    /// Cancellation types emitted by the submitter so far: one that arrives after the limiter
    /// started the task but before the task began on its executor stops it from beginning.
    std::atomic<unsigned> requested{0};

    /// Carries `type` to the running task: emitted on its strand, if it still runs then.
    void forward(boost::asio::cancellation_type type)
    {
        boost::asio::post(strand, [self = shared_from_this(), type] {
            if (self->is_running()) self->signal.emit(type);
        });
    }
};

/// How a task that took a slot ended.
enum class task_outcome { ran, threw, cancelled };

/// One submitted task, type-erased for the queue. Exactly one of `run` or `abort` is called.
class job_base {
public:
    virtual ~job_base() = default;

    // A job comes and goes with every task: its memory is recycled by the thread that frees
    // it, as Asio recycles its own operations'. (Not under AddressSanitizer, which must see a
    // job's end to catch its use after it.)
#if !defined(__SANITIZE_ADDRESS__)
    static void* operator new(std::size_t size)
    {
        return boost::asio::recycling_allocator<std::max_align_t>().allocate(blocks(size));
    }
    static void operator delete(void* p, std::size_t size) noexcept
    {
        boost::asio::recycling_allocator<std::max_align_t>().deallocate(static_cast<std::max_align_t*>(p),
                                                                         blocks(size));
    }
#endif

    /// Starts the task; the job must call `limiter_finished(core, id, threw)` once it has
    /// completed its submitter (and hold a share of `core` until then: `limiter_share`).
    virtual void run(std::unique_ptr<job_base> self, limiter_core& core) = 0;
    /// The task will never run: completes its submitter with `ec`.
    virtual void abort(boost::system::error_code ec) = 0;
    /// The submitter's cancellation slot (empty if none).
    virtual boost::asio::cancellation_slot cancellation_slot() noexcept = 0;

    /// Keeps the submitter's executor from running out of work until the job is destroyed.
    virtual void keep_busy() = 0;

    /// A blocking job: runs the task here and now and keeps its outcome for `deliver` or
    /// `complete`; returns whether the task threw.
    virtual bool execute() = 0;
    virtual bool blocking() const noexcept = 0;
    /// After `execute`: posts the outcome to the submitter's handler.
    virtual void deliver_outcome() {}
    /// After `execute`, on the handler's associated executor: completes the handler now.
    virtual void complete_outcome() {}
    /// Whether the handler's associated executor is `ex` (so that a batch of completions
    /// posted to `ex` may complete it).
    virtual bool completes_on(const boost::asio::any_io_executor& ex) const = 0;

    /// Links jobs in the limiter's lock-free lists: submitted while its lock was busy, or
    /// finished and waiting for their batch of completions.
    job_base* next_done = nullptr;

    /// A stop source the task watches (it takes a `std::stop_token`), if any.
    virtual std::optional<std::stop_source> stop_source() { return std::nullopt; }
    /// For an async task whose submitter can cancel: what carries that cancellation into the
    /// task once it runs (made on the first call).
    virtual std::shared_ptr<task_cancellation> forward_cancellation() { return nullptr; }
    /// Whether it has one.
    virtual bool stoppable() const noexcept { return false; }

    /// When the limiter admitted it, its id there, and whose task it is.
    std::chrono::steady_clock::time_point admitted{};
    std::uint64_t id = 0;
    std::uint64_t user = 0;
private:
    static constexpr std::size_t blocks(std::size_t size) noexcept
    {
        return (size + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t);
    }
};

void limiter_submit(const std::shared_ptr<limiter_core>& core, std::uint64_t user, std::unique_ptr<job_base> job);
void limiter_finished(limiter_core& core, std::uint64_t id, bool threw);
/// As `limiter_finished`, for a job that completes its submitter just after: it then calls
/// `limiter_handed_over`, and no shutdown completes in between.
void limiter_finished_before_handover(limiter_core& core, std::uint64_t id, task_outcome outcome);
void limiter_handed_over(limiter_core& core);
std::shared_ptr<limiter_core> limiter_share(limiter_core& core);
/// Runs a blocking job on the current (task executor's) thread, then the limiter's next
/// blocking jobs, a bounded number, before returning the thread to its pool.
void run_blocking(std::unique_ptr<job_base> job, std::shared_ptr<limiter_core> core);
const boost::asio::any_io_executor& limiter_executor(const limiter_core& core) noexcept;
const boost::asio::any_io_executor& limiter_task_executor(const limiter_core& core) noexcept;
std::exception_ptr make_exception(boost::system::error_code ec);

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

/// A task that `limiter::submit` may run in the submitter's own coroutine: it returns an
/// `asio::awaitable<T>` on `any_io_executor`, as `use_awaitable` coroutines do.
template <class F>
inline constexpr bool runs_in_submitter =
    task_traits<F>::is_async
    && std::is_same_v<typename task_traits<F>::returned, boost::asio::awaitable<typename task_traits<F>::result>>;

/// `task`, noting in `*started` that the limiter let it start (`submit_or` tells a refusal
/// from the task's own failure by it). Takes a `std::stop_token` when `Task` does.
template <class Task>
struct flagged_task {
    Task task;
    bool* started;

    decltype(auto) operator()()
        requires std::is_invocable_v<Task&>
    {
        *started = true;
        return std::invoke(task);
    }
    decltype(auto) operator()(std::stop_token stop)
        requires std::is_invocable_v<Task&, std::stop_token>
    {
        *started = true;
        return std::invoke(task, std::move(stop));
    }
};

/// The next free time of a limiter's resource (for `submit` with a deadline).
std::chrono::steady_clock::time_point limiter_next_available(const limiter_core& core);
[[noreturn]] void throw_past_deadline();

/// What every job keeps of its submitter: the completion handler, as it is (no type
/// erasure), and the limiter's executor for a handler without one of its own (it lives in the
/// limiter's home, which outlives every job).
template <class Handler>
class job_for : public job_base {
public:
    job_for(Handler h, const boost::asio::any_io_executor& fallback) : handler_(std::move(h)), fallback_(&fallback) {}

    void keep_busy() override
    {
        namespace asio = boost::asio;
        if (work_ || io_work_) return;
        auto ex = executor();
        if constexpr (std::is_same_v<decltype(ex), asio::any_io_executor>) {
            // The common case, an io_context behind the erased executor: tracked directly, one
            // atomic increment, without going through the erased executor's properties.
            if (const auto* io = ex.template target<asio::io_context::executor_type>()) {
                io_work_.emplace(asio::prefer(*io, asio::execution::outstanding_work.tracked));
                return;
            }
        }
        work_.emplace(asio::prefer(ex, asio::execution::outstanding_work.tracked));
    }

    boost::asio::cancellation_slot cancellation_slot() noexcept override
    {
        return boost::asio::get_associated_cancellation_slot(handler_);
    }

    bool completes_on(const boost::asio::any_io_executor& ex) const override
    {
        if constexpr (std::is_same_v<boost::asio::associated_executor_t<Handler, boost::asio::any_io_executor>,
                                     boost::asio::any_io_executor>)
            return executor() == ex;
        else
            return false;
    }

protected:
    auto executor() const { return boost::asio::get_associated_executor(handler_, *fallback_); }

    // From a foreign thread: posted to the handler's executor.
    template <class... Args>
    void deliver(Args&&... args)
    {
        namespace asio = boost::asio;
        auto ex = executor(); // before the handler moves
        asio::post(ex, asio::append(std::move(handler_), std::forward<Args>(args)...));
    }

    // Already on the handler's executor (the coroutine's completion): dispatched.
    template <class... Args>
    void complete(Args&&... args)
    {
        namespace asio = boost::asio;
        auto ex = executor(); // before the handler moves
        asio::dispatch(ex, asio::append(std::move(handler_), std::forward<Args>(args)...));
    }

    Handler handler_;
    const boost::asio::any_io_executor* fallback_;
    // The submitter's executor has work while the job waits or runs away from it: its
    // io_context keeps running while a task is queued or away on the pool. (An async task
    // running on it keeps it busy by itself.)
    std::optional<std::decay_t<decltype(boost::asio::prefer(
        std::declval<boost::asio::associated_executor_t<Handler, boost::asio::any_io_executor>>(),
        boost::asio::execution::outstanding_work.tracked))>>
        work_;
    std::optional<std::decay_t<decltype(boost::asio::prefer(std::declval<boost::asio::io_context::executor_type>(),
                                                            boost::asio::execution::outstanding_work.tracked))>>
        io_work_;
};

template <class F, class Handler>
class job final : public job_for<Handler> {
    using traits = task_traits<F>;
    using result = typename traits::result;
    using base = job_for<Handler>;

public:
    job(F f, Handler h, const boost::asio::any_io_executor& fallback) : base(std::move(h), fallback), f_(std::move(f))
    {
    }

    void run(std::unique_ptr<job_base> self, limiter_core& core) override
    {
        namespace asio = boost::asio;
        auto* me = static_cast<job*>(self.release());
        std::unique_ptr<job> owned{me};
        if constexpr (traits::is_async) {
            if (me->forward_) {
                // The submitter's cancellation is emitted on its executor: the task begins
                // there too (at once if the limiter decided there), so that the two are
                // ordered and a cancellation that came first keeps it from beginning.
                asio::dispatch(me->executor(), [owned = std::move(owned), core = limiter_share(core)]() mutable {
                    job* j = owned.get();
                    if (j->forward_->requested.load() == 0) return j->begin(std::move(owned), *core);
                    const std::uint64_t job_id = j->id;
                    limiter_finished_before_handover(*core, job_id, task_outcome::cancelled);
                    j->abort(asio::error::operation_aborted);
                    owned.reset();
                    limiter_handed_over(*core);
                });
                return;
            }
            me->begin(std::move(owned), core);
        } else {
            // Blocking work runs on the task executor (the profile's pool): one hop there, and
            // one back to the submitter's executor. The worker then runs the limiter's next
            // blocking tasks itself, a few per wake-up, instead of posting each.
            me->keep_busy();
            const asio::any_io_executor& task_ex = limiter_task_executor(core);
            asio::post(task_ex, [owned = std::move(owned), core = limiter_share(core)]() mutable {
                run_blocking(std::move(owned), std::move(core));
            });
        }
    }

    // An async task begins: on the submitter's executor, no thread hop.
    void begin(std::unique_ptr<job> owned, limiter_core& core)
    {
        namespace asio = boost::asio;
        job* me = owned.get();
        if constexpr (traits::is_async) {
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
            auto done = [owned = std::move(owned), core = limiter_share(core)](std::exception_ptr e, auto... r) mutable {
                if (owned->forward_) owned->forward_->phase.store(task_cancellation::finished);
                // The slot is free before the submitter resumes, so its next submission can
                // start at once.
                limiter_finished_before_handover(*core, owned->id,
                                                 e ? task_outcome::threw : task_outcome::ran);
                owned->complete(std::move(e), std::move(r)...);
                limiter_handed_over(*core);
            };
            if (auto forward = me->forward_) {
                // The submitter's cancellation reaches the running task's coroutine, on the
                // strand the coroutine runs on (see task_cancellation). co_spawn posts to the new
                // strand: the task begins after this returns, its slot handler installed here.
                forward->strand = asio::make_strand(me->executor());
                asio::co_spawn(forward->strand, std::move(*work),
                               asio::bind_cancellation_slot(forward->signal.slot(), std::move(done)));
                // Set, then `requested` read; a canceller adds to `requested`, then reads this:
                // one of the two sees the other, so no cancellation is lost in between.
                // (A task that already finished on another thread stays finished.)
                if (forward->mark_running())
                    if (const unsigned requested = forward->requested.load())
                        forward->forward(static_cast<asio::cancellation_type>(requested));
            } else {
                asio::co_spawn(me->executor(), std::move(*work), std::move(done));
            }
        }
    }

    bool execute() override
    {
        if constexpr (traits::is_async) {
            return false; // never called: async jobs are spawned, not executed
        } else {
            try {
                if constexpr (std::is_void_v<result>)
                    invoke();
                else
                    outcome_.value = invoke();
            } catch (...) {
                outcome_.error = std::current_exception();
            }
            return static_cast<bool>(outcome_.error);
        }
    }

    void deliver_outcome() override
    {
        if constexpr (traits::is_async)
            return; // never called: async jobs complete from their coroutine
        else if constexpr (std::is_void_v<result>)
            this->deliver(std::move(outcome_.error));
        else
            this->deliver(std::move(outcome_.error), std::move(outcome_.value));
    }

    void complete_outcome() override
    {
        if constexpr (traits::is_async)
            return;
        else if constexpr (std::is_void_v<result>)
            std::move(this->handler_)(std::move(outcome_.error));
        else
            std::move(this->handler_)(std::move(outcome_.error), std::move(outcome_.value));
    }

    bool blocking() const noexcept override { return !traits::is_async; }

    void abort(boost::system::error_code ec) override
    {
        if constexpr (std::is_void_v<result>)
            this->deliver(make_exception(ec));
        else
            this->deliver(make_exception(ec), result{});
    }

    std::optional<std::stop_source> stop_source() override
    {
        if constexpr (traits::stoppable)
            return stop_;
        else
            return std::nullopt;
    }

    bool stoppable() const noexcept override { return traits::stoppable; }

    std::shared_ptr<task_cancellation> forward_cancellation() override
    {
        if constexpr (traits::is_async) {
            if (!forward_) forward_ = std::make_shared<task_cancellation>();
            return forward_;
        } else {
            return nullptr;
        }
    }

private:
    decltype(auto) invoke()
    {
        if constexpr (traits::stoppable)
            return std::invoke(f_, stop_.get_token());
        else
            return std::invoke(f_);
    }

    // What a blocking task did, kept from `execute` to its delivery.
    struct outcome_void {
        std::exception_ptr error;
    };
    struct outcome_value {
        std::exception_ptr error;
        std::conditional_t<traits::is_async || std::is_void_v<result>, int, result> value{};
    };

    F f_;
    std::shared_ptr<task_cancellation> forward_; // async tasks whose submitter can cancel
    [[no_unique_address]] std::conditional_t<traits::stoppable, std::stop_source, std::monostate> stop_;
    [[no_unique_address]] std::conditional_t<traits::is_async, std::monostate,
                                             std::conditional_t<std::is_void_v<result>, outcome_void, outcome_value>>
        outcome_;
};

/// What a submitter that runs its task itself learns when the task may start: its id in the
/// limiter (to report it finished) and, for a task that takes a `std::stop_token`, the stop
/// source the limiter may trigger.
struct admission {
    std::uint64_t id = 0;
    std::stop_source stop{std::nostopstate};
};

/// A place in the queue for a task that its submitter runs itself (see `limiter::submit`):
/// started, it completes the submitter's wait with an `admission`; the submitter then runs the
/// task and calls `limiter_finished`.
template <class Handler, bool Stoppable>
class ticket final : public job_for<Handler> {
    using base = job_for<Handler>;

public:
    using base::base;

    void run(std::unique_ptr<job_base> self, limiter_core&) override
    {
        std::unique_ptr<ticket> owned{static_cast<ticket*>(self.release())};
        // Posted, never inline: this may be the submission's own initiating call.
        this->deliver(std::exception_ptr{}, admission{this->id, stop_source_of()});
    }

    bool execute() override { return false; } // never called: the submitter runs the task
    bool blocking() const noexcept override { return false; }

    void abort(boost::system::error_code ec) override { this->deliver(make_exception(ec), admission{}); }

    std::optional<std::stop_source> stop_source() override
    {
        if constexpr (Stoppable)
            return stop_;
        else
            return std::nullopt;
    }

    bool stoppable() const noexcept override { return Stoppable; }

private:
    std::stop_source stop_source_of()
    {
        if constexpr (Stoppable)
            return stop_;
        else
            return std::stop_source{std::nostopstate};
    }

    [[no_unique_address]] std::conditional_t<Stoppable, std::stop_source, std::monostate> stop_;
};

/// A place in the queue for `limiter::async_enter`: started, it completes its caller with a
/// permit, which holds the slot (and counts as an async task) until it is released.
template <class Handler>
class entry_ticket final : public job_for<Handler> {
    using base = job_for<Handler>;

public:
    using base::base;

    void run(std::unique_ptr<job_base> self, limiter_core& core) override
    {
        std::unique_ptr<entry_ticket> owned{static_cast<entry_ticket*>(self.release())};
        // Posted, never inline: this may be the call that initiated the wait. A cancellation
        // that comes after the limiter let the entry start, but before its caller hears of it,
        // ends it as cancelled (its token goes back), as a task that has not begun.
        auto ex = this->executor(); // before the handler moves
        boost::asio::post(ex, [h = std::move(this->handler_), p = limiter_access::make_permit(core, this->id),
                               late = std::move(late_)]() mutable {
            if (late && late->requested.load() != 0) {
                limiter_access::release_cancelled(p);
                std::move(h)(boost::system::error_code{boost::asio::error::operation_aborted}, permit{});
            } else {
                std::move(h)(boost::system::error_code{}, std::move(p));
            }
        });
    }

    bool execute() override { return false; } // never called: the caller does the work
    bool blocking() const noexcept override { return false; }

    void abort(boost::system::error_code ec) override { this->deliver(ec, permit{}); }

    // The limiter's cancellation handler notes here what the caller asked after the start.
    std::shared_ptr<task_cancellation> forward_cancellation() override
    {
        if (!late_) late_ = std::make_shared<task_cancellation>();
        return late_;
    }

private:
    std::shared_ptr<task_cancellation> late_;
};

// The initiations of limiter's asynchronous operations.
struct submit_initiation {
    template <class Handler, class Task>
    void operator()(Handler&& handler, const std::shared_ptr<limiter_core>& core, std::uint64_t user,
                    Task&& task) const
    {
        using job_t = job<std::decay_t<Task>, std::decay_t<Handler>>;
        limiter_submit(core, user,
                       std::make_unique<job_t>(std::forward<Task>(task), std::forward<Handler>(handler),
                                               limiter_executor(*core)));
    }
};

template <bool Stoppable>
struct admit_initiation {
    template <class Handler>
    void operator()(Handler&& handler, const std::shared_ptr<limiter_core>& core, std::uint64_t user) const
    {
        using ticket_t = ticket<std::decay_t<Handler>, Stoppable>;
        limiter_submit(core, user, std::make_unique<ticket_t>(std::forward<Handler>(handler), limiter_executor(*core)));
    }
};

struct enter_initiation {
    template <class Handler>
    void operator()(Handler&& handler, const std::shared_ptr<limiter_core>& core, std::uint64_t user) const
    {
        using ticket_t = entry_ticket<std::decay_t<Handler>>;
        limiter_submit(core, user, std::make_unique<ticket_t>(std::forward<Handler>(handler), limiter_executor(*core)));
    }
};

struct shutdown_initiation {
    void operator()(acquire_handler handler, const std::shared_ptr<limiter_core>& core,
                    std::chrono::nanoseconds grace) const;
};

} // namespace detail

} // namespace valve

#endif
