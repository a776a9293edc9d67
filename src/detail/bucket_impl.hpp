#ifndef VALVE_SRC_DETAIL_BUCKET_IMPL_HPP
#define VALVE_SRC_DETAIL_BUCKET_IMPL_HPP

// Internal: the state behind valve::token_bucket, shared by token_bucket.cpp and acquire_all.cpp.

#include <valve/bucket_core.hpp>
#include <valve/token_bucket.hpp>

#include <boost/asio/any_completion_executor.hpp>
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <vector>
#include <optional>

namespace valve::detail {

/// Delivers `ec` to `handler` through its associated executor (defaulting to `fallback`), never
/// inline.
void post_completion(acquire_handler handler, const boost::asio::any_io_executor& fallback,
                     boost::system::error_code ec);

/// How far a late timer may backdate a grant: one token's interval, so a late wake-up loses no
/// capacity yet never releases more than one token beyond the burst at once.
std::chrono::nanoseconds backdate_limit(const rate& r) noexcept;

/// An operation that waits on several buckets at once (a bucket_set acquisition): told when a
/// bucket's rate or burst changes, or when the bucket cancels its waiters; and, for each place
/// it holds in a bucket's queue, when every waiter ahead of that place has been served.
class bucket_watcher {
public:
    virtual void bucket_changed(bool cancelled) = 0;
    /// A place it holds (see `bucket_impl::hold`) has reached the front of its queue.
    virtual void turn_reached() = 0;

protected:
    ~bucket_watcher() = default;
};

/// The state behind a `token_bucket`. A bucket that never makes anyone wait is its executor,
/// its core and two counters: the Asio parts that serve waiters (a strand, a timer, the waiter
/// map) and the watchers' list are made the first time they are needed, so that a million idle
/// per-user buckets cost little.
class bucket_impl : public std::enable_shared_from_this<bucket_impl> {
public:
    using clock = std::chrono::steady_clock;
    using time_point = clock::time_point;

    bucket_impl(const boost::asio::any_io_executor& ex, rate r, std::size_t burst);
    ~bucket_impl();

    bucket_impl(const bucket_impl&) = delete;
    bucket_impl& operator=(const bucket_impl&) = delete;

    void initiate(acquire_handler handler, std::size_t n, time_point deadline);
    void cancel_all();
    /// After a rate or burst change: re-check every waiter's deadline and re-plan the head.
    void replan();
    /// Re-plan the head only (tokens came back).
    void wake();
    /// Gives `n` tokens taken at or before `now` back to the core, and wakes a queued head
    /// that may now go sooner.
    void refund(std::size_t n, time_point now);
    void close();

    void watch(std::weak_ptr<bucket_watcher> w);
    void unwatch(const bucket_watcher* w);

    /// Holds a place for `n` tokens at the back of the queue for `owner`, which takes the tokens
    /// itself (all or nothing with other buckets): waiters that come later are planned behind
    /// those `n` tokens, and `owner->turn_reached()` is called once the waiters ahead are
    /// served. Safe from any thread; returns the place's id, for `unhold`.
    std::uint64_t hold(std::size_t n, std::weak_ptr<bucket_watcher> owner);
    /// Gives up a place taken by `hold` (the owner took its tokens, or stopped waiting).
    void unhold(std::uint64_t id);

    boost::asio::any_io_executor executor_;
    bucket_core core_;
    // Waiters between initiation and completion (queued, or on their way to the queue); while
    // any exist, try_acquire says no so that nobody overtakes them. Written only by waiters.
    std::atomic<std::size_t> pending_{0};
    // Tokens those waiters and held places ask for, for projections (deadlines, next_available,
    // bucket_set).
    std::atomic<std::size_t> pending_tokens_{0};

private:
    struct waiter {
        acquire_handler handler;
        boost::asio::any_completion_executor work; // keeps the handler's executor from running out of work
        std::size_t n;
        time_point deadline;
        // A place held by a bucket_set acquisition (see `hold`): no handler; never served here.
        std::weak_ptr<bucket_watcher> holder = {};
        bool is_hold = false;
        bool told = false;
    };
    struct cancel_handler;

    // What serves waiters, made on first need (see `serving`).
    struct serving_state {
        explicit serving_state(const boost::asio::any_io_executor& ex) : strand(boost::asio::make_strand(ex)) {}

        boost::asio::strand<boost::asio::any_io_executor> strand;
        // On strand only:
        // Made on first need, so a bucket that never makes anyone wait adds no timer to the
        // io_context (whose reactor would then run on every turn).
        std::optional<boost::asio::steady_timer> timer;
        std::map<std::uint64_t, waiter> queue; // in arrival order; node-based, so handlers never move
        std::uint64_t timer_generation = 0;
        time_point planned = time_point::max();

        std::atomic<std::uint64_t> next_id{0};
        std::mutex watchers_mutex;
        std::vector<std::weak_ptr<bucket_watcher>> watchers;
    };

    /// The serving state, made now if nobody made it before; safe from any thread.
    serving_state& serving();
    /// The serving state if it was made (else nobody ever waited or watched).
    /// Sequentially consistent, as is `closed_`: close() stores the flag then looks for the
    /// state, a first waiter makes the state then reads the flag; one of them sees the other.
    serving_state* serving_if_made() const noexcept { return serving_.load(); }
    /// Runs `f(self)` on the strand, if there is one (else no waiter exists to act on).
    template <class F>
    void on_strand(F&& f);

    // All below: on the strand only.
    void enqueue(std::uint64_t id, waiter w);
    void on_cancel(std::uint64_t id);
    void pump(time_point cursor);
    void fail_missed_deadlines();
    void notify(bool cancelled);
    void finish(std::map<std::uint64_t, waiter>::iterator it, boost::system::error_code ec);
    void finish_waiters(boost::system::error_code ec);
    bool first_in_line(std::map<std::uint64_t, waiter>::iterator it) const;
    void arm(time_point t);

    std::atomic<serving_state*> serving_{nullptr}; // owned; made once, freed by the destructor
    std::atomic<bool> closed_{false};
};

} // namespace valve::detail

#endif
