#include <valve/limiter.hpp>

#include "detail/cancellation.hpp"
#include "detail/fair_queue.hpp"

#include <valve/error.hpp>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/any_completion_executor.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/execution/outstanding_work.hpp>
#include <boost/asio/prefer.hpp>
#include <boost/asio/steady_timer.hpp>

#include <atomic>
#include <map>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

namespace asio = boost::asio;

namespace valve {

namespace detail {

std::exception_ptr make_exception(boost::system::error_code ec)
{
    return std::make_exception_ptr(boost::system::system_error(ec));
}

/// The limiter's state, guarded by `mutex_`: every decision is a few steps of plain code, and
/// nothing under the lock waits or runs a handler inline (completions are posted), so a
/// submitter, a finishing worker or a cancellation decides on its own thread and starts the next
/// task from there, with no hop to a strand. Counters for `stats()` are atomics.
class limiter_core : public std::enable_shared_from_this<limiter_core> {
public:
    limiter_core(const asio::any_io_executor& ex, std::shared_ptr<resource> limits, limiter_options options,
                 const asio::any_io_executor& task_ex, std::shared_ptr<void> keep_alive)
        : keep_alive_(std::move(keep_alive)), executor_(ex), task_executor_(task_ex), limits_(std::move(limits)),
          options_(options)
    {
    }

    void submit(std::uint64_t user, std::unique_ptr<job_base> job)
    {
        submitted_.fetch_add(1, std::memory_order_relaxed);
        queued_.fetch_add(1, std::memory_order_relaxed);
        const std::uint64_t id = next_id_.fetch_add(1, std::memory_order_relaxed);
        // Installed before the job is admitted; a cancellation emitted after this call returns
        // finds the job (or its outcome) under the lock.
        auto slot = job->cancellation_slot();
        if (slot.is_connected()) slot.template emplace<cancel_handler>(weak_from_this(), id);
        locked([&] { admit(id, user, std::move(job)); });
    }

    /// Frees the slot of task `id` and starts what that allows. With `hand_back`, a blocking
    /// job the slot lets start is handed back to run on the calling worker instead of posted.
    void finished(std::uint64_t id, bool threw, std::unique_ptr<job_base>* hand_back = nullptr)
    {
        (threw ? failed_ : completed_).fetch_add(1, std::memory_order_relaxed);
        progress();
        locked([&] {
            stoppable_.erase(id);
            --running_;
            running_count_.fetch_sub(1, std::memory_order_relaxed);
            hand_back_ = hand_back;
            pump();
            hand_back_ = nullptr;
        });
    }

    void shutdown(acquire_handler handler, std::chrono::nanoseconds grace)
    {
        locked([&] { begin_shutdown(std::move(handler), grace); });
    }

    /// Refuses new tasks, aborts queued ones and asks running ones (with a stop token) to stop,
    /// all before returning.
    void close()
    {
        locked([&] {
            closing_ = true;
            abort_all(asio::error::operation_aborted);
            for (auto& [id, stop] : stoppable_) pending_.stop.push_back(stop);
        });
    }

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

    std::size_t queued() const noexcept { return queued_.load(std::memory_order_relaxed); }
    std::size_t running() const noexcept { return running_count_.load(std::memory_order_relaxed); }

private:
    // First, so it is destroyed last: the executors below may point into it (a thread pool).
    std::shared_ptr<void> keep_alive_;

public:
    asio::any_io_executor executor_;
    asio::any_io_executor task_executor_;

private:
    using job_ptr = std::unique_ptr<job_base>;
    struct parked {
        std::uint64_t user;
        job_ptr job;
    };

    struct cancel_handler {
        cancel_handler(std::weak_ptr<limiter_core> c, std::uint64_t i) : core(std::move(c)), id(i) {}

        std::weak_ptr<limiter_core> core;
        std::uint64_t id;

        void operator()(asio::cancellation_type type) const
        {
            if (!cancels_waiting(type)) return; // a running task is asked to stop, see cancel()
            // Runs on the emitting thread; the lock serialises it with everything else.
            if (auto c = core.lock()) c->locked([&] { c->cancel(id); });
        }
    };

    // Tasks admitted and not yet running: the fair queue plus the one waiting for its token.
    std::size_t admitted() const noexcept { return queue_.size() + (waiting_ ? 1 : 0); }

    void admit(std::uint64_t id, std::uint64_t user, job_ptr job)
    {
        if (closing_ || shutting_down_) return drop(std::move(job), errc::shutting_down);
        job->id = id;
        // Nobody waiting, a free slot and a token at hand: start at once, without queueing.
        if (queue_.empty() && !waiting_ && running_ < options_.concurrency && limits_->try_acquire(1))
            return start(std::move(job));
        job->admitted = std::chrono::steady_clock::now();
        job->keep_busy();
        if (admitted() < options_.queue_capacity) {
            queue_.push(id, user, std::move(job));
            pump();
        } else if (options_.on_queue_full == queue_full_policy::wait) {
            overflow_.emplace(id, parked{user, std::move(job)});
        } else {
            drop(std::move(job), errc::queue_full);
        }
    }

    void drop(job_ptr job, boost::system::error_code ec)
    {
        queued_.fetch_sub(1, std::memory_order_relaxed);
        (ec == asio::error::operation_aborted ? cancelled_ : rejected_).fetch_add(1, std::memory_order_relaxed);
        pending_.drop.emplace_back(std::move(job), ec);
    }

    static void add_time(std::atomic<std::int64_t>& total, std::atomic<std::int64_t>& max, std::int64_t ns)
    {
        total.fetch_add(ns, std::memory_order_relaxed);
        // `max` is written under the lock only.
        if (ns > max.load(std::memory_order_relaxed)) max.store(ns, std::memory_order_relaxed);
    }

    void progress() noexcept
    {
        last_progress_.store(std::chrono::steady_clock::now().time_since_epoch().count(), std::memory_order_relaxed);
    }

    void cancel(std::uint64_t id)
    {
        if (waiting_ && waiting_->first == id) {
            // Waiting for its token: stop that wait; its completion (operation_aborted) drops
            // the job.
            cancel_waiting_ = true;
            acquire_cancel_.emit(asio::cancellation_type::terminal);
        } else if (queue_.contains(id)) {
            drop(queue_.take(id, false), asio::error::operation_aborted);
            refill();
        } else if (const auto it = overflow_.find(id); it != overflow_.end()) {
            job_ptr job = std::move(it->second.job);
            overflow_.erase(it);
            drop(std::move(job), asio::error::operation_aborted);
        } else if (const auto r = stoppable_.find(id); r != stoppable_.end()) {
            pending_.stop.push_back(r->second); // running: ask it to stop
        }
    }

    // Admits tasks waiting for room, oldest first.
    void refill()
    {
        while (!overflow_.empty() && admitted() < options_.queue_capacity) {
            auto node = overflow_.extract(overflow_.begin());
            queue_.push(node.key(), node.mapped().user, std::move(node.mapped().job));
        }
    }

    void pump()
    {
        while (!closing_ && !queue_.empty() && running_ < options_.concurrency && !waiting_) {
            const std::uint64_t id = *queue_.next();
            if (limits_->try_acquire(1)) {
                start(queue_.take(id, true));
                continue;
            }
            // The next task waits for its token; nothing else may start before it.
            waiting_.emplace(id, queue_.take(id, true));
            waiting_since_ = std::chrono::steady_clock::now();
            cancel_waiting_ = false;
            limits_->async_acquire(
                1, asio::bind_cancellation_slot(
                       acquire_cancel_.slot(),
                       asio::bind_executor(executor_, [self = shared_from_this()](boost::system::error_code ec) {
                           self->locked([&] { self->on_token(ec); });
                       })));
            return;
        }
        maybe_finish_shutdown();
    }

    void on_token(boost::system::error_code ec)
    {
        job_ptr job = std::move(waiting_->second);
        waiting_.reset();
        add_time(token_ns_total_, token_ns_max_,
                 std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - waiting_since_)
                     .count());
        if (cancel_waiting_) {
            // A token granted just before the cancellation landed is not returned: the resource
            // has no way to take it back exactly.
            drop(std::move(job), asio::error::operation_aborted);
            refill();
        } else if (ec) {
            // The resource refused (a burst lowered below one token, or the bucket cancelled):
            // the task cannot run.
            drop(std::move(job), ec);
            refill();
        } else {
            start(std::move(job));
        }
        pump();
    }

    void start(job_ptr job)
    {
        refill();
        const auto now = std::chrono::steady_clock::now();
        if (job->admitted != std::chrono::steady_clock::time_point{}) // it queued
            add_time(queue_ns_total_, queue_ns_max_,
                     std::chrono::duration_cast<std::chrono::nanoseconds>(now - job->admitted).count());
        last_progress_.store(now.time_since_epoch().count(), std::memory_order_relaxed);
        ++running_;
        running_count_.fetch_add(1, std::memory_order_relaxed);
        queued_.fetch_sub(1, std::memory_order_relaxed);
        if (auto stop = job->stop_source()) stoppable_.emplace(job->id, std::move(*stop));
        if (hand_back_ && !*hand_back_ && job->blocking()) {
            *hand_back_ = std::move(job); // the finishing worker runs it next
            return;
        }
        pending_.start.push_back(std::move(job));
    }

    void abort_all(boost::system::error_code ec)
    {
        if (waiting_) {
            cancel_waiting_ = true;
            acquire_cancel_.emit(asio::cancellation_type::terminal);
        }
        for (auto& [id, p] : overflow_) drop(std::move(p.job), ec);
        overflow_.clear();
        queue_.drain([&](std::uint64_t, job_ptr job) { drop(std::move(job), ec); });
    }

    void begin_shutdown(acquire_handler handler, std::chrono::nanoseconds grace)
    {
        shutting_down_ = true;
        // The waiter's executor keeps running until the shutdown is delivered there.
        shutdown_work_.push_back(asio::prefer(asio::get_associated_executor(handler, executor_),
                                              asio::execution::outstanding_work.tracked));
        shutdown_waiters_.push_back(std::move(handler));
        // Nothing new is admitted: those waiting for room are refused now.
        for (auto& [id, p] : overflow_) drop(std::move(p.job), errc::shutting_down);
        overflow_.clear();
        if (!grace_timer_) {
            grace_timer_ = std::make_unique<asio::steady_timer>(executor_);
            grace_timer_->expires_after(grace);
            grace_timer_->async_wait([self = shared_from_this()](boost::system::error_code ec) {
                if (ec) return;
                self->locked([&] {
                    self->abort_all(asio::error::operation_aborted);
                    for (auto& [id, stop] : self->stoppable_) self->pending_.stop.push_back(stop);
                    self->maybe_finish_shutdown();
                });
            });
        }
        maybe_finish_shutdown();
    }

    void maybe_finish_shutdown()
    {
        if (!shutting_down_ || !queue_.empty() || !overflow_.empty() || running_ != 0 || waiting_) return;
        if (grace_timer_) grace_timer_->cancel();
        for (auto& h : shutdown_waiters_) pending_.done.push_back(std::move(h));
        shutdown_waiters_.clear();
        pending_.released_work.swap(shutdown_work_); // released after the completions are posted
    }

    // What a decision under the lock leaves to do after it: nothing that runs user code
    // (a task's start, a stop callback, a callable's destructor) runs while the lock is held.
    struct actions {
        std::vector<job_ptr> start;
        std::vector<std::pair<job_ptr, boost::system::error_code>> drop;
        std::vector<std::stop_source> stop;
        std::vector<acquire_handler> done;
        std::vector<asio::any_completion_executor> released_work;
    };

    template <class F>
    void locked(F&& decide)
    {
        actions todo;
        {
            std::lock_guard lock{mutex_};
            decide();
            todo = std::exchange(pending_, actions{});
        }
        for (auto& source : todo.stop) source.request_stop();
        for (auto& [job, ec] : todo.drop) job->abort(ec);
        for (auto& job : todo.start) {
            job_base* raw = job.get();
            raw->run(std::move(job), shared_from_this());
        }
        for (auto& h : todo.done) asio::post(executor_, asio::append(std::move(h), boost::system::error_code{}));
        todo.released_work.clear();
    }

    std::mutex mutex_;
    std::shared_ptr<resource> limits_;
    limiter_options options_;

    fair_queue<job_ptr> queue_;                  // admitted: round-robin between users, FIFO within
    std::map<std::uint64_t, parked> overflow_;   // waiting for room (queue_full_policy::wait)
    std::optional<std::pair<std::uint64_t, job_ptr>> waiting_; // the next task, waiting for its token
    bool cancel_waiting_ = false;
    asio::cancellation_signal acquire_cancel_;
    std::size_t running_ = 0;
    bool shutting_down_ = false;
    bool closing_ = false;
    std::unique_ptr<asio::steady_timer> grace_timer_; // made only on shutdown
    std::vector<acquire_handler> shutdown_waiters_;
    std::vector<asio::any_completion_executor> shutdown_work_;

    std::chrono::steady_clock::time_point waiting_since_{};
    std::map<std::uint64_t, std::stop_source> stoppable_; // running tasks that take a stop_token
    job_ptr* hand_back_ = nullptr; // set while a finishing worker asks for its next job
    actions pending_;              // filled under the lock, carried out after it

    std::atomic<std::uint64_t> next_id_{0};
    std::atomic<std::size_t> queued_{0};
    std::atomic<std::size_t> running_count_{0};
    // Statistics: relaxed counters, read by stats() from any thread.
    std::atomic<std::uint64_t> submitted_{0}, rejected_{0}, completed_{0}, failed_{0}, cancelled_{0};
    std::atomic<std::int64_t> queue_ns_total_{0}, queue_ns_max_{0}, token_ns_total_{0}, token_ns_max_{0};
    std::atomic<std::int64_t> last_progress_{0};
};

void limiter_submit(const std::shared_ptr<limiter_core>& core, std::uint64_t user, std::unique_ptr<job_base> job)
{
    core->submit(user, std::move(job));
}

void limiter_finished(const std::shared_ptr<limiter_core>& core, std::uint64_t id, bool threw)
{
    core->finished(id, threw);
}

void run_blocking(std::unique_ptr<job_base> job, std::shared_ptr<limiter_core> core)
{
    // A worker drains at most this many of one limiter's tasks per wake-up, so limiters that
    // share a pool still take turns on it.
    constexpr int chain = 16;
    for (int n = 0; job; ++n) {
        const bool threw = job->execute();
        // The finished job keeps its submitter's executor busy until the bookkeeping (which may
        // post a shutdown's completion there) is done.
        std::unique_ptr<job_base> next;
        core->finished(job->id, threw, &next);
        job = std::move(next);
        if (job && n + 1 == chain) {
            job_base* raw = job.get();
            raw->run(std::move(job), std::move(core)); // posted: back of the pool's queue
            return;
        }
    }
}

const asio::any_io_executor& limiter_executor(const limiter_core& core) noexcept { return core.executor_; }

const asio::any_io_executor& limiter_task_executor(const limiter_core& core) noexcept { return core.task_executor_; }

} // namespace detail

limiter::limiter(const executor_type& ex, std::shared_ptr<resource> limits, limiter_options options,
                 const executor_type& task_ex, std::shared_ptr<void> keep_alive)
{
    if (!limits) detail::throw_error(errc::invalid_argument, "valve: a limiter needs a resource to limit by");
    if (options.concurrency == 0)
        detail::throw_error(errc::invalid_argument, "valve: concurrency must be at least 1 (nothing could run)");
    if (options.queue_capacity == 0 && options.on_queue_full == queue_full_policy::wait)
        detail::throw_error(errc::invalid_argument,
                            "valve: a zero-capacity queue with queue_full_policy::wait would never admit a task: "
                            "give the queue room or use queue_full_policy::reject");
    core_ = std::make_shared<detail::limiter_core>(ex, std::move(limits), options, task_ex, std::move(keep_alive));
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

limiter::executor_type limiter::get_executor() const noexcept { return core_->executor_; }

std::size_t limiter::queued() const noexcept { return core_->queued(); }

limiter_stats limiter::stats() const noexcept { return core_->stats(); }

void limiter::cancel() { core_->close(); }

std::size_t limiter::running() const noexcept { return core_->running(); }

void limiter::shutdown_initiation::operator()(detail::acquire_handler handler,
                                              const std::shared_ptr<detail::limiter_core>& core,
                                              std::chrono::nanoseconds grace) const
{
    core->shutdown(std::move(handler), grace);
}

} // namespace valve
