#ifndef VALVE_TOKEN_BUCKET_HPP
#define VALVE_TOKEN_BUCKET_HPP

#include <valve/rate.hpp>

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/append.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/system/error_code.hpp>

#include <chrono>
#include <cstddef>
#include <memory>
#include <type_traits>

namespace valve {

class bucket_core;

namespace detail {
class bucket_impl;
using acquire_handler = boost::asio::any_completion_handler<void(boost::system::error_code)>;
void initiate_acquire(const std::shared_ptr<bucket_impl>& impl, acquire_handler handler, std::size_t n,
                      std::chrono::steady_clock::time_point deadline);
/// Takes `n` tokens if that needs no waiting: no waiter queued and the tokens are there.
bool try_acquire_now(bucket_impl& impl, std::size_t n) noexcept;
const boost::asio::any_io_executor& executor_of(const bucket_impl& impl) noexcept;
} // namespace detail

/// A token bucket on an Asio executor: `burst` tokens, refilled at a `rate`.
///
/// `try_acquire` answers at once and never blocks (the HTTP 429 path); `async_acquire` waits for
/// tokens on a `steady_timer`. Waiters are served first come, first served on a strand of the
/// bucket's executor; a `try_acquire` never overtakes a queued waiter, nor takes the tokens of a
/// place held by a `bucket_set` acquisition (nor does an `async_acquire` that finds tokens free:
/// it queues behind that place). Rate and burst can change
/// while waiters are queued: they are re-planned at once.
///
/// Thread safety: every member function may be called from any thread, concurrently.
/// `try_acquire`, `available` and `next_available` are lock-free. Destroying the bucket while
/// other threads call it is, as with any object, not allowed.
class token_bucket {
public:
    using executor_type = boost::asio::any_io_executor;
    using clock = std::chrono::steady_clock;
    using time_point = clock::time_point;

    /// A full bucket of `burst` tokens refilled at `r`, serving waiters on `ex`.
    /// Throws `valve::error` (`errc::invalid_argument`) for an invalid rate or a zero burst.
    token_bucket(const executor_type& ex, rate r, std::size_t burst = 1);

    /// As above, on `ctx.get_executor()`.
    template <class ExecutionContext>
        requires std::is_convertible_v<ExecutionContext&, boost::asio::execution_context&>
    token_bucket(ExecutionContext& ctx, rate r, std::size_t burst = 1)
        : token_bucket(executor_type(ctx.get_executor()), r, burst)
    {
    }

    /// Completes every queued waiter with `boost::asio::error::operation_aborted`.
    ~token_bucket();

    token_bucket(token_bucket&&) noexcept = default;
    token_bucket& operator=(token_bucket&&) = delete;

    executor_type get_executor() const noexcept;

    /// Takes `n` tokens if they are there now, no waiter is queued, and the tokens of the places
    /// held by `bucket_set` acquisitions stay in the bucket; never blocks or throws.
    /// `n == 0` always succeeds; `n > burst()` never does (unless the rate is unlimited).
    bool try_acquire(std::size_t n = 1) noexcept;

    /// Waits until `n` tokens can be taken, and takes them.
    ///
    /// Completion signature: `void(boost::system::error_code)`. The handler is invoked through
    /// its associated executor (the bucket's by default), never from inside this call. Errors:
    /// `errc::exceeds_burst` at once when `n > burst()` (or when the burst is later lowered
    /// below `n`); `operation_aborted` when cancelled.
    ///
    /// Per-operation cancellation: terminal, partial and total cancellation are all honoured
    /// while the waiter is queued; a cancelled waiter takes no tokens. `cancel()` and the
    /// destructor cancel every waiter.
    ///
    /// The bucket need not outlive the operation: its queue lives until every waiter completed.
    template <class CompletionToken>
    auto async_acquire(std::size_t n, CompletionToken&& token)
    {
        return async_acquire(n, time_point::max(), std::forward<CompletionToken>(token));
    }

    /// As above, but fails with `errc::would_exceed_deadline` instead of waiting when the tokens
    /// would not be granted by `deadline`: at once when known at the call (as `x/time/rate`'s
    /// `Wait` does), or as soon as a later rate change makes it so. Nothing is taken then.
    template <class CompletionToken>
    auto async_acquire(std::size_t n, time_point deadline, CompletionToken&& token)
    {
        return boost::asio::async_initiate<CompletionToken, void(boost::system::error_code)>(
            initiation{}, token, impl_, n, deadline);
    }

    /// Completes every queued waiter with `operation_aborted`. Later calls work as usual.
    void cancel();

    /// Gives back `n` tokens that were taken and not used (their work was cancelled after the
    /// grant): the bucket is as if they had not been taken, up to its burst (tokens whose time
    /// has passed are not restored beyond it), and queued waiters are served sooner.
    void release(std::size_t n = 1);

    /// Changes the rate, keeping the tokens accrued so far; queued waiters are re-planned.
    /// Throws `valve::error` (`errc::invalid_argument`) for an invalid rate.
    void set_rate(rate r);

    /// Changes the burst, keeping the tokens accrued so far up to the new burst; queued waiters
    /// asking for more than the new burst fail with `errc::exceeds_burst`.
    /// Throws `valve::error` (`errc::invalid_argument`) for zero.
    void set_burst(std::size_t burst);

    /// The rate in force.
    rate current_rate() const noexcept;

    /// The burst in force.
    std::size_t burst() const noexcept;

    /// Tokens in the bucket now, at most `burst()` (infinity when the rate is unlimited).
    double available() const noexcept;

    /// When `n` tokens could be granted to a caller arriving now, behind the queued waiters;
    /// now if at once, `time_point::max()` if never at the current rate. (The basis of an HTTP
    /// `Retry-After`.)
    time_point next_available(std::size_t n = 1) const noexcept;

    /// Waiters queued now.
    std::size_t waiters() const noexcept;

    /// The clock-free bucket underneath, for composing (see `bucket_set`).
    bucket_core& core() noexcept;

private:
    friend class bucket_set;

    struct initiation {
        template <class Handler>
        void operator()(Handler&& handler, const std::shared_ptr<detail::bucket_impl>& impl, std::size_t n,
                        time_point deadline) const
        {
            namespace asio = boost::asio;
            if (detail::try_acquire_now(*impl, n)) {
                // Granted at once: posted like any immediate completion, with the handler as it
                // is (no type erasure, no strand), through its associated executor.
                const asio::any_io_executor& ex = detail::executor_of(*impl);
                if (const auto* io = ex.target<asio::io_context::executor_type>())
                    asio::post(*io, asio::append(std::forward<Handler>(handler), boost::system::error_code{}));
                else
                    asio::post(ex, asio::append(std::forward<Handler>(handler), boost::system::error_code{}));
                return;
            }
            detail::initiate_acquire(impl, detail::acquire_handler(std::forward<Handler>(handler)), n, deadline);
        }
    };

    std::shared_ptr<detail::bucket_impl> impl_;
};

} // namespace valve

#endif
