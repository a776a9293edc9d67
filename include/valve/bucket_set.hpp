#ifndef VALVE_BUCKET_SET_HPP
#define VALVE_BUCKET_SET_HPP

#include <valve/token_bucket.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/async_result.hpp>

#include <chrono>
#include <cstddef>
#include <functional>
#include <initializer_list>
#include <memory>
#include <vector>

namespace valve {

namespace detail {
struct bucket_set_state;
void initiate_acquire_all(const std::shared_ptr<const bucket_set_state>& set, acquire_handler handler,
                          std::size_t n, std::chrono::steady_clock::time_point deadline);
} // namespace detail

/// Several buckets taken from together, all or nothing: 2/s *and* 10/min *and* a disk bucket.
///
/// An acquisition takes `n` tokens from every bucket at one instant or from none. It waits its
/// turn like any waiter: it holds a place in each bucket's queue, behind the waiters already
/// queued there. Callers that come later leave its `n` tokens in each bucket: waiters are planned
/// behind them, and `try_acquire` (of a bucket or of another set), or an `async_acquire` that
/// finds tokens free, takes only tokens beyond them. So a stream of small callers, queued or
/// taking tokens the moment they appear, cannot starve it: it waits at most for the callers
/// queued ahead of it and its own `n`. Once its turn has come on every bucket it sleeps until the
/// moment every bucket could give `n`, then takes from all; if another caller got there first (a
/// `try_acquire` that read the bucket just before the place was taken), it gives back what it
/// took and plans again. It takes nothing while it waits, so a bucket goes on serving others
/// while another bucket is slow, but only with tokens beyond the `n` it keeps for the set: an
/// acquisition of a bucket's whole burst pauses that bucket for later callers until it is
/// served. A change of rate or burst on any bucket re-plans it at once; `cancel()` or destruction
/// of any bucket cancels it.
///
/// The buckets are shared, not owned: each may be used on its own and in other sets. Their
/// queues stay alive as long as an acquisition needs them, and so does the set's own state:
/// an operation (even a `deferred` one) may outlive the `bucket_set` object.
///
/// Thread safety: every member function may be called from any thread, concurrently.
class bucket_set {
public:
    using executor_type = boost::asio::any_io_executor;
    using clock = std::chrono::steady_clock;
    using time_point = clock::time_point;

    /// The set of `buckets`; acquisitions wait on the first bucket's executor.
    /// Throws `valve::error` (`errc::invalid_argument`) when `buckets` is empty or names one
    /// bucket twice.
    bucket_set(std::initializer_list<std::reference_wrapper<token_bucket>> buckets);

    /// As above, from any range of bucket references.
    explicit bucket_set(const std::vector<std::reference_wrapper<token_bucket>>& buckets);

    executor_type get_executor() const noexcept;

    /// Takes `n` tokens from every bucket if all have them now, beyond the tokens of places held
    /// by waiting acquisitions, and none has a queued waiter; otherwise takes nothing. Never
    /// blocks or throws.
    bool try_acquire(std::size_t n = 1) noexcept;

    /// Waits until `n` tokens can be taken from every bucket at once, and takes them.
    ///
    /// Completion signature: `void(boost::system::error_code)`, invoked through the handler's
    /// associated executor (the set's by default), never from inside this call. Errors:
    /// `errc::exceeds_burst` at once when `n` exceeds any bucket's burst; `operation_aborted`
    /// when cancelled.
    ///
    /// Per-operation cancellation: terminal, partial and total cancellation are honoured while
    /// waiting; a cancelled acquisition has taken nothing from any bucket.
    template <class CompletionToken>
    auto async_acquire(std::size_t n, CompletionToken&& token)
    {
        return async_acquire(n, time_point::max(), std::forward<CompletionToken>(token));
    }

    /// As above, but fails with `errc::would_exceed_deadline` (taking nothing) as soon as the
    /// tokens are known not to be available by `deadline`.
    template <class CompletionToken>
    auto async_acquire(std::size_t n, time_point deadline, CompletionToken&& token)
    {
        return boost::asio::async_initiate<CompletionToken, void(boost::system::error_code)>(
            initiation{}, token, state_, n, deadline);
    }

    /// Gives back `n` tokens to every bucket (taken together and not used): see
    /// `token_bucket::release`.
    void release(std::size_t n = 1);

    /// When `n` tokens could be taken from every bucket, behind their queued waiters.
    time_point next_available(std::size_t n = 1) const noexcept;

    /// The number of buckets in the set.
    std::size_t size() const noexcept;

private:
    struct initiation {
        template <class Handler>
        void operator()(Handler&& handler, const std::shared_ptr<const detail::bucket_set_state>& state,
                        std::size_t n, time_point deadline) const
        {
            detail::initiate_acquire_all(state, detail::acquire_handler(std::forward<Handler>(handler)), n,
                                         deadline);
        }
    };

    std::shared_ptr<const detail::bucket_set_state> state_;
};

} // namespace valve

#endif
