#ifndef VALVE_SRC_DETAIL_ELASTIC_POOL_HPP
#define VALVE_SRC_DETAIL_ELASTIC_POOL_HPP

// Internal: the threads a manager's profile runs blocking tasks on.

#include <boost/asio/execution/blocking.hpp>
#include <boost/asio/execution/context.hpp>
#include <boost/asio/execution/executor.hpp>
#include <boost/asio/execution/outstanding_work.hpp>
#include <boost/asio/execution_context.hpp>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <memory>
#include <type_traits>
#include <utility>

namespace valve::detail {

/// A thread pool that starts its threads only when work needs them: posting work when no
/// thread is idle starts one, up to `max_threads`; a thread idle for `idle_time` ends. A pool
/// nobody posts to has no thread at all, and one whose work comes in bursts keeps only what
/// the bursts need. What it costs: about 200 bytes and a mutex while it has no thread; a
/// thread (and its stack) per task running at once, kept `idle_time` after its last task;
/// one allocation per posted function.
///
/// Its executor is an Asio standard executor (`execute`, `query(execution::context)`,
/// `require(blocking.never)`, `prefer(outstanding_work.tracked/untracked)`), so it fits in an
/// `any_io_executor` and works with `asio::post`. Posted functions must not throw (an exception
/// escaping one ends the program, as on an `asio::thread_pool` run by plain threads).
///
/// Posting never throws but for `bad_alloc`. If the system has no thread to give, the work
/// stays queued for a running thread; with none running, the next post, or `join`, tries again
/// to start one (until then the work waits).
///
/// Thread safety: every member may be called from any thread, concurrently, the pool's own
/// included; the destructor, as with any object, only when no other call is under way.
class elastic_pool {
    struct state;

public:
    class executor_type;

    /// How long a thread waits for work before it ends, unless the constructor says otherwise.
    static constexpr std::chrono::seconds default_idle_time{5};

    /// A pool of at most `max_threads` threads (at least 1), none started yet.
    explicit elastic_pool(std::size_t max_threads,
                          std::chrono::nanoseconds idle_time = default_idle_time);

    /// Joins (see `join`). From one of the pool's own threads, which cannot wait for itself,
    /// it waits for nothing: the threads end as their work runs out, keeping what they use.
    /// Executors outliving the pool keep what they need: work posted through them still runs
    /// (on threads that end when it runs out).
    ~elastic_pool();

    elastic_pool(const elastic_pool&) = delete;
    elastic_pool& operator=(const elastic_pool&) = delete;

    executor_type get_executor() noexcept;

    /// The execution context its executors name (for Asio's services, e.g. strands); it lives
    /// as long as the pool or any of its executors.
    boost::asio::execution_context& context() noexcept;

    /// Waits until the pool has no work (nothing queued or running, no executor tracking
    /// work) and every thread has ended. Later work starts threads again. Called from one of
    /// the pool's own threads, it cannot wait for that thread and returns at once.
    void join();

    /// Threads started and not ended now.
    std::size_t threads() const noexcept;

    /// The most threads it starts.
    std::size_t max_threads() const noexcept;

    /// Whether the calling thread is one of the pool's.
    bool running_in_this_thread() const noexcept;

    /// Tests only: this many of the next thread starts (any pool's) fail as if the system had
    /// no thread to give (`EAGAIN`).
    static inline std::atomic<std::size_t> fail_thread_starts_for_testing{0};

private:
    // A posted function, type-erased once; `run` invokes it and frees it.
    struct op {
        op* next = nullptr;
        virtual void run() noexcept = 0;
        virtual void destroy() noexcept = 0;

    protected:
        ~op() = default;
    };

    template <class F>
    struct op_for final : op {
        explicit op_for(F&& fn) : f(std::move(fn)) {}
        void run() noexcept override
        {
            F local{std::move(f)}; // freed before it runs, as Asio does, so it may post again
            delete this;
            local();
        }
        void destroy() noexcept override { delete this; }
        F f;
    };

    static void post(state& s, op* o) noexcept;
    static bool start_thread(state& s) noexcept; // under the lock; false if none could start
    static void work_started(state& s) noexcept;
    static void work_finished(state& s) noexcept;
    static void run_thread(std::shared_ptr<state> s, const void* self) noexcept;

    std::shared_ptr<state> state_;
};

/// Posts to an `elastic_pool`; copies that track work keep `join` waiting. Each shares the
/// pool's state (a reference count), so it stays usable after the pool is destroyed.
class elastic_pool::executor_type {
public:
    /// Runs `f` on one of the pool's threads, never inside this call.
    template <class F>
    void execute(F&& f) const
    {
        using fn = std::decay_t<F>;
        post(*state_, new op_for<fn>(fn(std::forward<F>(f))));
    }

    boost::asio::execution_context& query(boost::asio::execution::context_t) const noexcept;
    static constexpr boost::asio::execution::blocking_t query(boost::asio::execution::blocking_t) noexcept
    {
        return boost::asio::execution::blocking.never;
    }
    boost::asio::execution::outstanding_work_t query(boost::asio::execution::outstanding_work_t) const noexcept
    {
        return tracked_ ? boost::asio::execution::outstanding_work_t(boost::asio::execution::outstanding_work.tracked)
                        : boost::asio::execution::outstanding_work_t(boost::asio::execution::outstanding_work.untracked);
    }

    executor_type require(boost::asio::execution::blocking_t::never_t) const noexcept { return *this; }
    executor_type require(boost::asio::execution::outstanding_work_t::tracked_t) const noexcept
    {
        return executor_type{state_, true};
    }
    executor_type require(boost::asio::execution::outstanding_work_t::untracked_t) const noexcept
    {
        return executor_type{state_, false};
    }

    bool running_in_this_thread() const noexcept;

    executor_type(const executor_type& other) noexcept : executor_type(other.state_, other.tracked_) {}
    executor_type(executor_type&& other) noexcept
        : state_(std::move(other.state_)), tracked_(std::exchange(other.tracked_, false))
    {
    }
    executor_type& operator=(executor_type other) noexcept // copy or move, then swap
    {
        swap(other);
        return *this;
    }
    ~executor_type()
    {
        if (tracked_) work_finished(*state_);
    }

    friend bool operator==(const executor_type& a, const executor_type& b) noexcept
    {
        return a.state_ == b.state_ && a.tracked_ == b.tracked_;
    }
    friend bool operator!=(const executor_type& a, const executor_type& b) noexcept { return !(a == b); }

private:
    friend class elastic_pool;
    executor_type(std::shared_ptr<state> s, bool tracked) noexcept : state_(std::move(s)), tracked_(tracked)
    {
        if (tracked_) work_started(*state_);
    }
    void swap(executor_type& other) noexcept
    {
        std::swap(state_, other.state_);
        std::swap(tracked_, other.tracked_);
    }

    std::shared_ptr<state> state_;
    bool tracked_;
};

} // namespace valve::detail

#endif
