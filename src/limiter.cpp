#include <valve/limiter.hpp>

#include "detail/cancellation.hpp"
#include "detail/adaptive_mutex.hpp"
#include "detail/fair_queue.hpp"
#include "detail/threads.hpp"

#include <valve/error.hpp>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/any_completion_executor.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/execution/outstanding_work.hpp>
#include <boost/asio/prefer.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/container/small_vector.hpp>

#include <atomic>
#include <map>
#include <ctime>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

namespace asio = boost::asio;

namespace valve {

namespace detail {

namespace {

// steady_clock's own timebase (CLOCK_MONOTONIC) read at tick resolution, for a fraction of
// the cost of a precise read.
std::chrono::steady_clock::time_point coarse_now() noexcept
{
#if defined(__linux__) && defined(CLOCK_MONOTONIC_COARSE)
    timespec ts{};
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return std::chrono::steady_clock::time_point{std::chrono::duration_cast<std::chrono::steady_clock::duration>(
        std::chrono::seconds(ts.tv_sec) + std::chrono::nanoseconds(ts.tv_nsec))};
#else
    return std::chrono::steady_clock::now();
#endif
}

// The home of the limiter whose blocking task this thread is running (see running_task_home).
thread_local const limiter_home* task_home = nullptr;

} // namespace

const limiter_home* running_task_home() noexcept { return task_home; }

limiter_home::~limiter_home()
{
    // The last reference to what keeps the threads alive may go on one of those threads (a
    // task's completion dropped the last handle on a limiter built on its own thread pool): a
    // pool cannot join its own thread, so it is let go on another. The executors go first: they
    // point into it.
    if (!keep_alive || !(running_in_this_thread(executor) || running_in_this_thread(task_executor))) return;
    executor = asio::any_io_executor{};
    task_executor = asio::any_io_executor{};
    release_elsewhere(std::move(keep_alive));
}

std::exception_ptr make_exception(boost::system::error_code ec)
{
    // valve's own refusals (queue full, shutting down, ...) are `valve::error`s, as the
    // README promises; others (operation_aborted) plain system errors.
    if (ec.category() == error_category()) return std::make_exception_ptr(error(static_cast<errc>(ec.value())));
    return std::make_exception_ptr(boost::system::system_error(ec));
}

/// The limiter's state, guarded by `mutex_`: every decision is a few steps of plain code, and
/// nothing under the lock waits or runs a handler inline (completions are posted), so a
/// submitter, a finishing worker or a cancellation decides on its own thread and starts the next
/// task from there, with no hop to a strand. Counters for `stats()` are atomics.
class limiter_core : public std::enable_shared_from_this<limiter_core> {
public:
    using clock = std::chrono::steady_clock;

    limiter_core(std::shared_ptr<const limiter_home> home, std::shared_ptr<resource> limits, limiter_options options)
        : home_(std::move(home)), limits_(std::move(limits)), options_(options)
    {
    }

    void submit(std::uint64_t user, std::unique_ptr<job_base> job)
    {
        // Counted (and so queued) before it looks at the running count under the lock: see
        // finished(). One atomic step per submission: the id is the count so far.
        const std::uint64_t id = submitted_.fetch_add(1);
        // Installed before the job is admitted; a cancellation emitted after this call returns
        // finds the job (or its outcome) under the lock.
        auto slot = job->cancellation_slot();
        if (slot.is_connected())
            slot.template emplace<cancel_handler>(weak_from_this(), user, id, job->forward_cancellation());
        // Done before the lock, to keep it short: a blocking job runs away from its submitter
        // in any case, so its executor is kept busy from now.
        if (job->blocking()) job->keep_busy();
        job->id = id;
        job->user = user;
        const auto now = clock::now();
        // Every slot is taken: the task cannot start now, and a finishing task will decide
        // (it takes the lock when anything is queued, and admits the inbox first). So the job
        // joins the inbox without the lock: under a backlog, submitters and workers do not
        // contend for it task by task.
        // (Only when the queue surely has room for it, and with no shutdown or cancel under
        // way: a refusal is decided at once.)
        const bool busy = running_.load() >= options_.concurrency && attention_.load() == 0
                          && (options_.on_queue_full == queue_full_policy::wait || queued() <= options_.queue_capacity);
        if (!busy) {
            if (std::unique_lock lock{mutex_, std::try_to_lock}; lock) {
                decide(lock, [&] { admit(std::move(job)); }, now);
                return;
            }
        }
        // The lock is busy (or not needed): rather than queue up for it, the job joins the
        // inbox, which the next decision under the lock admits first (in arrival order). A job
        // may wait there on another thread's decision: its submitter's executor is kept busy
        // meanwhile.
        job->keep_busy();
        job->admitted = now;
        job_base* j = job.release();
        job_base* head = inbox_.load(std::memory_order_relaxed);
        do
            j->next_done = head;
        while (!inbox_.compare_exchange_weak(head, j)); // sequentially consistent: see below
        // Pushed, then the running count looked at again; a finishing task frees its slot, then
        // decides (admitting the inbox): one of the two sees the other, so a job left here
        // with every slot taken is admitted by the next task to finish.
        if (busy && running_.load() >= options_.concurrency) return;
        // Whoever sets the flag decides until the inbox stays empty. It clears the flag, then
        // looks at the inbox again; a submitter pushes, then tries to set the flag: one of the
        // two sees the other, so no job is left in the inbox with nobody to admit it.
        while (!admitting_.exchange(true)) {
            locked([] {});
            admitting_.store(false);
            if (inbox_.load() == nullptr) return;
        }
    }

    /// Counts task `id` (before its submitter hears of it, so that what the submitter then
    /// reads counts it), frees its slot and starts what that allows. With `hand_back`, a
    /// blocking job the slot lets start is handed back to run on the calling worker instead of
    /// posted. A caller that hands the outcome over after this calls `unsettle` first.
    void finished(std::uint64_t id, task_outcome outcome, std::unique_ptr<job_base>* hand_back = nullptr)
    {
        // Started and then cancelled before it began: its token goes back, unused.
        if (outcome == task_outcome::cancelled) limits_->release(1);
        (outcome == task_outcome::ran    ? completed_
         : outcome == task_outcome::threw ? failed_
                                          : cancelled_)
            .fetch_add(1, std::memory_order_relaxed);
        // A progress stamp needs no precision: a coarse read of the same clock, kept only if it
        // moves the stamp forward (the start's precise stamp may be later).
        const std::int64_t stamp = coarse_now().time_since_epoch().count();
        if (stamp > last_progress_.load(std::memory_order_relaxed))
            last_progress_.store(stamp, std::memory_order_relaxed);
        // The slot is freed before anything is looked at, and a submitter counts itself queued
        // before it looks at the running count: one of the two sees the other, so with nothing
        // queued (and no shutdown waiting for the count to reach zero, no stop source to drop)
        // the lock is not needed.
        running_.fetch_sub(1);
        if (queued() == 0 && attention_.load() == 0) return;
        locked(
            [&] {
                if (seldom_ && seldom_->stoppable.erase(id) != 0) attention_.fetch_sub(1);
                pending_->hand_back = hand_back;
                pump();
            },
            clock::now());
    }

    /// An outcome will be handed to its submitter after its slot is freed: a shutdown waits
    /// until `handed_over` (see maybe_finish_shutdown()).
    void unsettle() noexcept { unsettled_.fetch_add(1); }

    /// The outcome announced by `unsettle` has been handed over.
    void handed_over()
    {
        if (unsettled_.fetch_sub(1) == 1) after_handover();
    }

    void shutdown(acquire_handler handler, std::chrono::nanoseconds grace)
    {
        locked([&] { begin_shutdown(std::move(handler), grace); });
    }

    /// Takes a slot and a token for work its caller does itself, if both are free now and
    /// nothing is queued ahead (see limiter::try_enter); its id, to report it finished.
    std::optional<std::uint64_t> try_enter(boost::system::error_code& ec)
    {
        const std::uint64_t id = submitted_.fetch_add(1);
        bool entered = false;
        locked([&] {
            // The inbox was admitted first: what it held is ahead.
            if (closing_ || shutdown_) {
                ec = errc::shutting_down;
            } else if (may_start_now()) {
                running_.fetch_add(1);
                running_async_.fetch_add(1, std::memory_order_relaxed); // until its permit is released
                last_progress_.store(pending_->now.time_since_epoch().count(), std::memory_order_relaxed);
                entered = true;
            } else {
                ec = errc::queue_full;
            }
            if (!entered) rejected_.fetch_add(1, std::memory_order_relaxed);
            left_.store(left_.load(std::memory_order_relaxed) + 1, std::memory_order_release); // under the lock
        });
        if (!entered) return std::nullopt;
        ec = {};
        return id;
    }

    /// Refuses new tasks, aborts queued ones and asks running ones (with a stop token) to stop,
    /// all before returning.
    void close()
    {
        locked([&] {
            if (!closing_) attention_.fetch_add(1); // submitters decide under the lock from now
            closing_ = true;
            abort_all(asio::error::operation_aborted);
            ask_running_to_stop();
        });
    }

    /// Aborts `user`'s queued tasks (and those waiting for room), all before returning; the
    /// limiter goes on, for that user too.
    void cancel_user(std::uint64_t user)
    {
        locked([&] {
            queue_.drain_user(user, [&](std::uint64_t, entry e) { drop(std::move(e.job), asio::error::operation_aborted); });
            if (waiting_.job && waiting_.job->user == user) {
                // Waiting for its token: its completion (operation_aborted) drops it.
                cancel_waiting_ = true;
                acquire_cancel_.emit(asio::cancellation_type::terminal);
            }
            if (seldom_ && !seldom_->room_empty()) {
                std::vector<job_ptr> others; // parked again in the order they came
                seldom_->drain_room([&](job_ptr job) {
                    if (job->user == user)
                        drop(std::move(job), asio::error::operation_aborted);
                    else
                        others.push_back(std::move(job));
                });
                for (auto& job : others) seldom_->park(std::move(job));
            }
            refill();
            pump();
        });
    }

    /// Async tasks (and tickets) started and not finished.
    std::size_t async_running() const noexcept { return running_async_.load(std::memory_order_relaxed); }

    /// An async task (or ticket) has finished: see limiter_finished.
    void async_finished() noexcept { running_async_.fetch_sub(1, std::memory_order_relaxed); }

    limiter_stats stats() const noexcept
    {
        limiter_stats st;
        st.submitted = submitted_.load(std::memory_order_relaxed);
        st.rejected = rejected_.load(std::memory_order_relaxed);
        st.completed = completed_.load(std::memory_order_relaxed);
        st.failed = failed_.load(std::memory_order_relaxed);
        st.cancelled = cancelled_.load(std::memory_order_relaxed);
        st.queued = queued();
        st.running = running();
        st.queue_time_total = std::chrono::nanoseconds{queue_ns_total_.load(std::memory_order_relaxed)};
        st.queue_time_max = std::chrono::nanoseconds{queue_ns_max_.load(std::memory_order_relaxed)};
        st.token_wait_total = std::chrono::nanoseconds{token_ns_total_.load(std::memory_order_relaxed)};
        st.token_wait_max = std::chrono::nanoseconds{token_ns_max_.load(std::memory_order_relaxed)};
        st.last_progress = std::chrono::steady_clock::time_point{
            std::chrono::steady_clock::duration{last_progress_.load(std::memory_order_relaxed)}};
        return st;
    }

    /// Delivers the outcome of a blocking job that has run. Completions bound for the limiter's
    /// executor go out in batches: the first of a batch posts one operation there, and those
    /// that finish before it runs join it. Under load that is one post (and one wake-up of the
    /// submitters' thread) for many tasks; alone, a completion goes out at once as before.
    void deliver(std::unique_ptr<job_base> job)
    {
        if (!job->completes_on(home_->executor)) return job->deliver_outcome();
        job_base* j = job.release();
        job_base* head = done_.load(std::memory_order_relaxed);
        do
            j->next_done = head;
        while (!done_.compare_exchange_weak(head, j, std::memory_order_release, std::memory_order_relaxed));
        if (head == nullptr)
            asio::post(home_->executor, [self = shared_from_this()] { self->complete_done(); });
    }

    ~limiter_core()
    {
        // Outcomes whose batch was never run (its executor was destroyed first).
        for (job_base* j = done_.exchange(nullptr); j;) delete std::exchange(j, j->next_done);
        for (job_base* j = inbox_.exchange(nullptr); j;) delete std::exchange(j, j->next_done);
    }

    /// Submitted and neither started nor dropped yet. Read without the lock, `left_` may be
    /// behind: the count errs high, never low. (Read first, it counts only submissions that
    /// the later read of `submitted_` counts too.)
    std::size_t queued() const noexcept
    {
        const std::uint64_t left = left_.load(std::memory_order_acquire);
        return static_cast<std::size_t>(submitted_.load() - left);
    }
    std::size_t running() const noexcept { return running_.load(std::memory_order_relaxed); }
    resource& limits() const noexcept { return *limits_; }

public:
    // First, so it is destroyed last: its executors may point into what it keeps alive.
    std::shared_ptr<const limiter_home> home_;

private:
    using job_ptr = std::unique_ptr<job_base>;
    // An admitted job with what the decisions about it need, so that starting it does not
    // touch the job itself under the lock (in a backlog it was written long ago, by another
    // thread: a cache miss the lock would be held across).
    struct entry {
        job_ptr job; // empty: no job
        std::uint64_t id = 0;
        clock::time_point admitted{}; // the epoch if it did not queue
        bool blocking = false;
        bool stoppable = false;
    };
    struct parked {
        std::uint64_t user;
        entry e;
    };

    struct cancel_handler {
        cancel_handler(std::weak_ptr<limiter_core> c, std::uint64_t u, std::uint64_t i,
                       std::shared_ptr<task_cancellation> f)
            : core(std::move(c)), user(u), id(i), forward(std::move(f))
        {
        }

        std::weak_ptr<limiter_core> core;
        std::uint64_t user;
        std::uint64_t id;
        std::shared_ptr<task_cancellation> forward; // an async task's

        void operator()(asio::cancellation_type type) const
        {
            if (!cancels_waiting(type)) return; // a running task is asked to stop, see cancel()
            // Runs on the emitting thread; the lock serialises it with everything else.
            if (auto c = core.lock()) c->locked([&] { c->cancel(user, id); });
            // A running async task hears it too, outside the lock (its handlers are user code),
            // on the strand it runs on (see task_cancellation).
            // Not running yet (started, on its way to the submitter's executor): it will not run.
            if (forward) {
                forward->requested.fetch_or(static_cast<unsigned>(type));
                if (forward->is_running()) forward->forward(type);
            }
        }
    };

    // Tasks admitted and not yet running: the fair queue plus the one waiting for its token.
    std::size_t admitted() const noexcept { return queue_.size() + (waiting_.job ? 1 : 0); }

    // Nobody waiting ahead, a free slot, and a token, taken now: a newcomer may start at once.
    bool may_start_now()
    {
        return queue_.empty() && !waiting_.job && running_.load() < options_.concurrency && limits_->try_acquire(1);
    }

    // What the decisions about a job need, read from it once.
    static entry entry_of(job_ptr job)
    {
        entry e{nullptr, job->id, job->admitted, job->blocking(), job->stoppable()};
        e.job = std::move(job);
        return e;
    }

    void admit(job_ptr job)
    {
        if (closing_ || shutdown_) return drop(std::move(job), errc::shutting_down);
        // Nobody waiting, a free slot and a token at hand: start at once, without queueing.
        if (may_start_now()) return start(entry_of(std::move(job)));
        if (job->admitted == clock::time_point{}) job->admitted = pending_->now;
        job->keep_busy();
        if (admitted() < options_.queue_capacity) {
            const std::uint64_t id = job->id, user = job->user;
            queue_.push(id, user, entry_of(std::move(job)));
            pump();
        } else if (options_.on_queue_full == queue_full_policy::wait) {
            seldom().park(std::move(job));
        } else {
            drop(std::move(job), errc::queue_full);
        }
    }

    void drop(job_ptr job, boost::system::error_code ec)
    {
        left_.store(left_.load(std::memory_order_relaxed) + 1, std::memory_order_release); // under the lock
        (ec == asio::error::operation_aborted ? cancelled_ : rejected_).fetch_add(1, std::memory_order_relaxed);
        pending_->drop.emplace_back(std::move(job), ec);
    }

    static void add_time(std::atomic<std::int64_t>& total, std::atomic<std::int64_t>& max, std::int64_t ns)
    {
        total.fetch_add(ns, std::memory_order_relaxed);
        // `max` is written under the lock only.
        if (ns > max.load(std::memory_order_relaxed)) max.store(ns, std::memory_order_relaxed);
    }


    void cancel(std::uint64_t user, std::uint64_t id)
    {
        if (waiting_.job && waiting_.id == id) {
            // Waiting for its token: stop that wait; its completion (operation_aborted) drops
            // the job.
            cancel_waiting_ = true;
            acquire_cancel_.emit(asio::cancellation_type::terminal);
        } else if (auto queued = queue_.take(user, id)) {
            drop(std::move(queued->job), asio::error::operation_aborted);
            refill();
        } else if (!seldom_) {
            return;
        } else if (auto room = seldom_->unpark(id)) {
            drop(std::move(room->e.job), asio::error::operation_aborted);
        } else if (const auto r = seldom_->stoppable.find(id); r != seldom_->stoppable.end()) {
            pending_->stop.push_back(r->second); // running: ask it to stop
        }
    }

    // Admits tasks waiting for room, oldest first.
    void refill()
    {
        if (!seldom_) return;
        while (!seldom_->room_empty() && admitted() < options_.queue_capacity) {
            auto [id, p] = seldom_->unpark_oldest();
            queue_.push(id, p.user, std::move(p.e));
        }
    }

    void pump()
    {
        while (!closing_ && !queue_.empty() && running_.load() < options_.concurrency && !waiting_.job) {
            if (limits_->try_acquire(1)) {
                start(queue_.take_next());
                continue;
            }
            // The next task waits for its token; nothing else may start before it.
            waiting_ = queue_.take_next();
            waiting_since_ = pending_->now;
            cancel_waiting_ = false;
            limits_->async_acquire(
                1, asio::bind_cancellation_slot(
                       acquire_cancel_.slot(),
                       asio::bind_executor(home_->executor, [self = shared_from_this()](boost::system::error_code ec) {
                           self->locked([&] { self->on_token(ec); });
                       })));
            return;
        }
        maybe_finish_shutdown();
    }

    void on_token(boost::system::error_code ec)
    {
        entry e = std::exchange(waiting_, entry{});
        add_time(token_ns_total_, token_ns_max_,
                 std::chrono::duration_cast<std::chrono::nanoseconds>(pending_->now - waiting_since_)
                     .count());
        if (cancel_waiting_) {
            // Cancelled as its token was granted: the token goes back, unused.
            if (!ec) limits_->release(1);
            drop(std::move(e.job), asio::error::operation_aborted);
            refill();
        } else if (ec) {
            // The resource refused (a burst lowered below one token, or the bucket cancelled):
            // the task cannot run.
            drop(std::move(e.job), ec);
            refill();
        } else {
            start(std::move(e));
        }
        pump();
    }

    void start(entry e)
    {
        refill();
        const auto now = pending_->now;
        if (e.admitted != clock::time_point{}) // it queued
            add_time(queue_ns_total_, queue_ns_max_,
                     std::chrono::duration_cast<std::chrono::nanoseconds>(now - e.admitted).count());
        last_progress_.store(now.time_since_epoch().count(), std::memory_order_relaxed);
        running_.fetch_add(1);
        if (!e.blocking) running_async_.fetch_add(1, std::memory_order_relaxed);
        left_.store(left_.load(std::memory_order_relaxed) + 1, std::memory_order_release); // under the lock
        if (e.stoppable) {
            seldom().stoppable.emplace(e.id, *e.job->stop_source());
            attention_.fetch_add(1); // its finish must take the lock to drop it
        }
        if (job_ptr* hand_back = pending_->hand_back; hand_back && !*hand_back && e.blocking) {
            *hand_back = std::move(e.job); // the finishing worker runs it next
            return;
        }
        pending_->start.push_back(std::move(e.job));
    }

    void abort_overflow(boost::system::error_code ec)
    {
        if (!seldom_) return;
        seldom_->drain_room([&](job_ptr job) { drop(std::move(job), ec); });
    }

    void ask_running_to_stop()
    {
        if (!seldom_) return;
        for (auto& [id, stop] : seldom_->stoppable) pending_->stop.push_back(stop);
    }

    void abort_all(boost::system::error_code ec)
    {
        if (waiting_.job) {
            cancel_waiting_ = true;
            acquire_cancel_.emit(asio::cancellation_type::terminal);
        }
        abort_overflow(ec);
        queue_.drain([&](std::uint64_t, entry e) { drop(std::move(e.job), ec); });
    }

    void begin_shutdown(acquire_handler handler, std::chrono::nanoseconds grace)
    {
        const bool first = !shutdown_;
        if (first) {
            shutdown_ = std::make_unique<shutdown_state>(home_->executor);
            attention_.fetch_add(1); // before maybe_finish_shutdown() looks at the running count
        }
        // The waiter's executor keeps running until the shutdown is delivered there.
        shutdown_->work.push_back(asio::prefer(asio::get_associated_executor(handler, home_->executor),
                                               asio::execution::outstanding_work.tracked));
        shutdown_->waiters.push_back(std::move(handler));
        // Nothing new is admitted: those waiting for room are refused now.
        abort_overflow(errc::shutting_down);
        if (first) {
            shutdown_->grace_timer.expires_after(grace);
            shutdown_->grace_timer.async_wait([self = shared_from_this()](boost::system::error_code ec) {
                if (ec) return;
                self->locked([&] {
                    self->abort_all(asio::error::operation_aborted);
                    self->ask_running_to_stop();
                    self->maybe_finish_shutdown();
                });
            });
        }
        maybe_finish_shutdown();
    }

    void maybe_finish_shutdown()
    {
        if (!shutdown_ || !queue_.empty() || (seldom_ && !seldom_->room_empty()) || running_.load() != 0
            || waiting_.job)
            return;
        // Every outcome is handed over first, so that the shutdown's completion, posted after
        // them, never overtakes one: on a one-thread io_context each submitter has heard by the
        // time the shutdown's waiter runs. (Read in this order: a finishing task counts itself
        // unsettled, frees its slot, hands its outcome over (a blocking one onto the stack of
        // finished jobs), then settles; a batch counts itself, then takes the finished jobs.)
        if (unsettled_.load() != 0 || done_.load() != nullptr || batches_.load() != 0) return;
        if (inbox_.load() != nullptr) return; // its submitter admits it (and refuses it) next
        shutdown_->grace_timer.cancel();
        // Move-constructed one by one (never assigned: see STYLE.md on any_completion_handler).
        for (auto& h : shutdown_->waiters) pending_->done.emplace_back(std::move(h));
        shutdown_->waiters.clear();
        // Released after the completions are posted.
        for (auto& w : shutdown_->work) pending_->released_work.push_back(std::move(w));
        shutdown_->work.clear();
    }

    // What a decision under the lock leaves to do after it: nothing that runs user code
    // (a task's start, a stop callback, a callable's destructor) runs while the lock is held.
    // On the deciding thread's stack, with room in place for a typical decision's effects: a
    // decision costs no allocation.
    struct actions {
        boost::container::small_vector<job_ptr, 2> start;
        boost::container::small_vector<std::pair<job_ptr, boost::system::error_code>, 1> drop;
        std::vector<std::stop_source> stop;
        std::vector<acquire_handler> done;
        std::vector<asio::any_completion_executor> released_work;
        // And what the decision is given: its time, read before the lock (for the
        // statistics), and where a finishing worker wants a blocking job it may run next.
        clock::time_point now{};
        job_ptr* hand_back = nullptr;
    };

    // `now` is read before the lock, to keep it short: the decision's time for the statistics.
    template <class F>
    void locked(F&& decision, clock::time_point now = clock::now())
    {
        std::unique_lock lock{mutex_};
        decide(lock, decision, now);
    }

    // Admits what waits in the inbox, then makes the decision, under `lock`; then carries out
    // its effects without it.
    template <class F>
    void decide(std::unique_lock<adaptive_mutex>& lock, F&& decision, clock::time_point now)
    {
        actions todo;
        todo.now = now;
        pending_ = &todo;
        admit_inbox();
        decision();
        pending_ = nullptr;
        // Refusals are handed over after the lock: until they are, no shutdown completes. (A
        // decision drops at most the jobs in memory: far fewer than 2^32.)
        const auto refused = static_cast<std::uint32_t>(todo.drop.size());
        if (refused != 0) unsettled_.fetch_add(refused);
        lock.unlock();
        for (auto& source : todo.stop) source.request_stop();
        for (auto& [job, ec] : todo.drop) job->abort(ec);
        for (auto& job : todo.start) {
            job_base* raw = job.get();
            raw->run(std::move(job), *this);
        }
        for (auto& h : todo.done) asio::post(home_->executor, asio::append(std::move(h), boost::system::error_code{}));
        todo.released_work.clear();
        if (refused != 0 && unsettled_.fetch_sub(refused) == refused) after_handover();
    }

    // Outcomes have been handed over: a shutdown that waited only for them may now complete.
    void after_handover()
    {
        if (attention_.load() != 0) locked([&] { maybe_finish_shutdown(); });
    }

    adaptive_mutex mutex_;
    std::shared_ptr<resource> limits_;
    limiter_options options_;

    fair_queue<entry> queue_; // admitted: round-robin between users, FIFO within
    entry waiting_;           // the next task, waiting for its token (if its job is set)
    asio::cancellation_signal acquire_cancel_;
    struct shutdown_state {
        explicit shutdown_state(const asio::any_io_executor& ex) : grace_timer(ex) {}
        asio::steady_timer grace_timer;
        std::vector<acquire_handler> waiters;
        std::vector<asio::any_completion_executor> work;
    };
    std::unique_ptr<shutdown_state> shutdown_; // made by the first async_shutdown: shutting down

    std::chrono::steady_clock::time_point waiting_since_{};
    void admit_inbox()
    {
        job_base* fifo = nullptr;
        for (job_base* j = inbox_.exchange(nullptr); j;) {
            job_base* next = j->next_done;
            j->next_done = fifo;
            fifo = j;
            j = next;
        }
        while (fifo) admit(job_ptr{std::exchange(fifo, fifo->next_done)});
    }

    // On the limiter's executor: completes the batch of finished jobs, oldest first.
    void complete_done()
    {
        batches_.fetch_add(1);
        job_base* fifo = nullptr;
        for (job_base* j = done_.exchange(nullptr, std::memory_order_acquire); j;) {
            job_base* next = j->next_done;
            j->next_done = fifo;
            fifo = j;
            j = next;
        }
        while (fifo) {
            job_ptr job{fifo};
            fifo = fifo->next_done;
            try {
                job->complete_outcome();
            } catch (...) {
                // A handler threw (out of the io_context's run(), as Asio lets it): the rest of
                // the batch still goes out.
                while (fifo) deliver(job_ptr{std::exchange(fifo, fifo->next_done)});
                batches_.fetch_sub(1);
                after_handover();
                throw;
            }
        }
        batches_.fetch_sub(1);
        after_handover();
    }

    // Seldom needed, so made on first need: a million idle limiters do not pay for it.
    struct seldom_state {
        // Tasks waiting for room (queue_full_policy::wait), in two parts, the older first:
        // - `indexed`, by id, so that a cancellation finds its task in O(log n);
        // - then a list of jobs as they arrived, linked through `next_done`: parking a job
        //   touches nothing else, so a flood that outruns the queue costs no allocation.
        // A cancellation that must look for its task moves the list into `indexed` first:
        // each job is indexed at most once.
        arrival_queue<parked> indexed;
        job_base* list_oldest = nullptr;
        job_base* list_newest = nullptr;
        std::map<std::uint64_t, std::stop_source> stoppable; // running tasks that take a stop_token

        bool room_empty() const noexcept { return indexed.empty() && list_oldest == nullptr; }

        void park(job_ptr job) noexcept
        {
            job_base* j = job.release();
            j->next_done = nullptr;
            if (list_newest)
                list_newest->next_done = j;
            else
                list_oldest = j;
            list_newest = j;
        }

        job_ptr pop_list() noexcept
        {
            job_ptr job{list_oldest};
            list_oldest = job->next_done;
            if (!list_oldest)
                list_newest = nullptr;
            else
                __builtin_prefetch(list_oldest); // written long ago: fetched ahead of its turn
            job->next_done = nullptr;
            return job;
        }

        std::pair<std::uint64_t, parked> unpark_oldest()
        {
            if (!indexed.empty()) return indexed.pop();
            job_ptr job = pop_list();
            const std::uint64_t id = job->id, user = job->user;
            return {id, parked{user, entry_of(std::move(job))}};
        }

        std::optional<parked> unpark(std::uint64_t id)
        {
            while (list_oldest) {
                job_ptr job = pop_list();
                const std::uint64_t job_id = job->id, user = job->user;
                indexed.push(job_id, parked{user, entry_of(std::move(job))});
            }
            return indexed.take(id);
        }

        template <class F>
        void drain_room(F&& f)
        {
            indexed.drain([&](std::uint64_t, parked p) { f(std::move(p.e.job)); });
            while (list_oldest) f(pop_list());
        }

        ~seldom_state()
        {
            while (list_oldest) pop_list();
        }
    };
    seldom_state& seldom()
    {
        if (!seldom_) seldom_ = std::make_unique<seldom_state>();
        return *seldom_;
    }
    std::unique_ptr<seldom_state> seldom_;
    actions* pending_ = nullptr; // the decision under way: filled under the lock, carried out after it

    // Changed under the lock, except that a finishing task frees its slot without it.
    std::atomic<std::size_t> running_{0};
    // Submissions that have started or been dropped: written under the lock only.
    std::atomic<std::uint64_t> left_{0};
    // Finished blocking jobs waiting for their batch to run (a stack; see deliver()).
    std::atomic<job_base*> done_{nullptr};
    // Submitted jobs waiting for a decision while the lock was busy (a stack; see submit()).
    std::atomic<job_base*> inbox_{nullptr};
    // Small fields together (an idle limiter is kept small: see BENCHMARKS.md).
    // Reasons a finishing task must take the lock even with nothing queued: a shutdown in
    // progress (the count may now reach zero) and running tasks with stop sources to drop.
    std::atomic<std::uint32_t> attention_{0};
    // Batches of finished jobs being completed, and outcomes (finished tasks, refusals) decided
    // but not yet handed over: a shutdown completes only once both are zero (see
    // maybe_finish_shutdown()).
    std::atomic<std::uint32_t> batches_{0}, unsettled_{0};
    // Async tasks and tickets running: a blocking manager::shutdown from an event loop would
    // wait for them, and one may be its caller.
    std::atomic<std::uint32_t> running_async_{0};
    std::atomic<bool> admitting_{false}; // a submitter is admitting the inbox
    bool cancel_waiting_ = false;        // under the lock: the next task's token wait is cancelled
    bool closing_ = false;               // under the lock: refusing new tasks, for good
    // Statistics: relaxed counters, read by stats() from any thread.
    std::atomic<std::uint64_t> submitted_{0}, rejected_{0}, completed_{0}, failed_{0}, cancelled_{0};
    std::atomic<std::int64_t> queue_ns_total_{0}, queue_ns_max_{0}, token_ns_total_{0}, token_ns_max_{0};
    std::atomic<std::int64_t> last_progress_{0};
};

void limiter_submit(const std::shared_ptr<limiter_core>& core, std::uint64_t user, std::unique_ptr<job_base> job)
{
    core->submit(user, std::move(job));
}

void limiter_finished(limiter_core& core, std::uint64_t id, bool threw)
{
    core.async_finished();
    core.finished(id, threw ? task_outcome::threw : task_outcome::ran);
}

void limiter_finished_before_handover(limiter_core& core, std::uint64_t id, task_outcome outcome)
{
    core.async_finished();
    core.unsettle();
    core.finished(id, outcome);
}

std::size_t limiter_access::async_tasks_running(const limiter& l) noexcept { return l.core_->async_running(); }

void limiter_access::hand_to_user(limiter& l) noexcept { l.owner_ = false; }

void limiter_access::close(limiter& l) { l.core_->close(); }

void limiter_handed_over(limiter_core& core) { core.handed_over(); }

std::shared_ptr<limiter_core> limiter_share(limiter_core& core) { return core.shared_from_this(); }

void run_blocking(std::unique_ptr<job_base> job, std::shared_ptr<limiter_core> core)
{
    // A worker drains at most this many of one limiter's tasks per wake-up, so limiters that
    // share a pool still take turns on it.
    constexpr int chain = 16;
    // Each task is counted and its slot freed before its submitter hears of it, so that what
    // the submitter then reads (the statistics, a try_enter) counts it. A shutdown waits for
    // the hand-overs all the same: the chain counts as unsettled until its last is handed
    // over (see maybe_finish_shutdown()); once per chain, not per task, to keep the two
    // workers of a busy limiter off a shared counter.
    core->unsettle();
    struct settle {
        limiter_core& core;
        ~settle() { core.handed_over(); }
    } settled_at_exit{*core};
    for (int n = 0; job; ++n) {
        task_home = core->home_.get(); // a manager::shutdown from the task can tell
        const bool threw = job->execute();
        task_home = nullptr;
        const std::uint64_t id = job->id;
        std::unique_ptr<job_base> next;
        core->finished(id, threw ? task_outcome::threw : task_outcome::ran, &next);
        core->deliver(std::move(job));
        job = std::move(next);
        if (job && n + 1 == chain) {
            job_base* raw = job.get();
            raw->run(std::move(job), *core); // posted: back of the pool's queue
            return;
        }
    }
}

const asio::any_io_executor& limiter_executor(const limiter_core& core) noexcept { return core.home_->executor; }

const asio::any_io_executor& limiter_task_executor(const limiter_core& core) noexcept { return core.home_->task_executor; }

} // namespace detail

limiter::limiter(const executor_type& ex, std::shared_ptr<resource> limits, limiter_options options,
                 const executor_type& task_ex, std::shared_ptr<void> keep_alive)
    : limiter(std::make_shared<const detail::limiter_home>(std::move(keep_alive), ex, task_ex), std::move(limits),
              options)
{
}

limiter::limiter(std::shared_ptr<const detail::limiter_home> home, std::shared_ptr<resource> limits,
                 limiter_options options)
{
    if (!limits)
        detail::throw_error(errc::invalid_argument, "limiter: the resource is null; give one to limit by "
                                                    "(a bucket_resource, say)");
    if (options.concurrency == 0)
        detail::throw_error(errc::invalid_argument, "limiter: concurrency is 0 (nothing could run); give at least 1");
    if (options.queue_capacity == 0 && options.on_queue_full == queue_full_policy::wait)
        detail::throw_error(errc::invalid_argument,
                            "limiter: a zero-capacity queue with queue_full_policy::wait would never admit a task; "
                            "give the queue room or use queue_full_policy::reject");
    core_ = std::make_shared<detail::limiter_core>(std::move(home), std::move(limits), options);
}

limiter::limiter(std::shared_ptr<detail::limiter_core> core, std::uint64_t user)
    : core_(std::move(core)), user_(user), owner_(false)
{
}

limiter::~limiter()
{
    if (core_ && owner_) core_->close();
}

std::shared_ptr<limiter> limiter::for_user(std::uint64_t user) const
{
    return std::shared_ptr<limiter>(new limiter(core_, user));
}

limiter::executor_type limiter::get_executor() const noexcept { return core_->home_->executor; }

std::size_t limiter::queued() const noexcept { return core_->queued(); }

limiter_stats limiter::stats() const noexcept { return core_->stats(); }

void limiter::cancel()
{
    // A user's handle on a shared limiter cancels that user's tasks; closing it is the
    // owner's business.
    if (owner_)
        core_->close();
    else
        core_->cancel_user(user_);
}

std::size_t limiter::running() const noexcept { return core_->running(); }

permit limiter::try_enter(boost::system::error_code& ec)
{
    if (auto id = core_->try_enter(ec)) return permit{core_, *id};
    return permit{};
}

permit limiter::try_enter()
{
    boost::system::error_code ec;
    return try_enter(ec);
}

permit::permit(std::shared_ptr<detail::limiter_core> core, std::uint64_t id) noexcept
    : core_(std::move(core)), id_(id)
{
}

permit::permit(permit&& other) noexcept : core_(std::move(other.core_)), id_(other.id_) {}

permit& permit::operator=(permit&& other) noexcept
{
    if (this != &other) {
        release();
        core_ = std::move(other.core_);
        id_ = other.id_;
    }
    return *this;
}

permit::~permit() { release(); }

void permit::release(bool failed) noexcept
{
    if (auto core = std::move(core_)) {
        core->async_finished();
        core->finished(id_, failed ? detail::task_outcome::threw : detail::task_outcome::ran);
    }
}

namespace detail {

permit limiter_access::make_permit(limiter_core& core, std::uint64_t id) { return permit{core.shared_from_this(), id}; }

void limiter_access::release_cancelled(permit& p) noexcept
{
    if (auto core = std::move(p.core_)) {
        core->async_finished();
        core->finished(p.id_, task_outcome::cancelled); // its token goes back, unused
    }
}

} // namespace detail

bool limiter::shared() const noexcept { return core_.use_count() > 1; }

namespace detail {

std::chrono::steady_clock::time_point limiter_next_available(const limiter_core& core)
{
    return core.limits().next_available(1);
}

void throw_past_deadline()
{
    throw_error(errc::would_exceed_deadline,
                "limiter::submit: the limiter's next token comes after the deadline; give a later deadline or "
                "try again later");
}

} // namespace detail

double limiter::available() const { return core_->limits().available(); }

resource& limiter::limits() const noexcept { return core_->limits(); }

std::chrono::steady_clock::time_point limiter::next_available() const { return detail::limiter_next_available(*core_); }

void detail::shutdown_initiation::operator()(acquire_handler handler, const std::shared_ptr<limiter_core>& core,
                                             std::chrono::nanoseconds grace) const
{
    core->shutdown(std::move(handler), grace);
}

} // namespace valve
