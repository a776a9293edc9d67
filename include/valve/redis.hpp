#ifndef VALVE_REDIS_HPP
#define VALVE_REDIS_HPP

// Limits held in Redis, shared by every process that uses the same key: the `valve::redis`
// library (link `valve::redis`; the core `valve::valve` does not depend on it).

#include <valve/backoff.hpp>
#include <valve/rate.hpp>
#include <valve/resource.hpp>
#include <valve/store.hpp>

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/system/error_code.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace valve {

/// One reply of Redis, as read by hiredis's reader.
struct redis_reply {
    enum class kind { nil, integer, string, status, error, array };
    kind type = kind::nil;
    long long integer = 0;
    /// The text of a string, status or error reply.
    std::string str;
    std::vector<redis_reply> elements;
};

/// How a `redis_connection` waits and retries.
struct redis_options {
    /// A command not answered this long after it was issued fails the connection: every
    /// command waiting on it fails with `errc::store_unavailable`, new ones fail at once until
    /// it is back. Also the longest a connection attempt may take. Positive;
    /// `milliseconds::max()` waits as long as it takes.
    std::chrono::milliseconds reply_timeout{50};
    /// Delays between reconnection attempts (jittered, capped; never gives up).
    exponential_backoff reconnect{std::chrono::milliseconds(25), 2.0, std::chrono::seconds(1), 0.5,
                                  std::chrono::nanoseconds::max(), static_cast<std::size_t>(-1)};
};

/// Counters of a connection, monotonic since it was made (but `up`).
struct redis_connection_stats {
    bool up = false;               ///< connected now
    std::uint64_t commands = 0;    ///< commands answered
    std::uint64_t failures = 0;    ///< times the connection failed (timeout, socket error, refused)
    std::uint64_t recoveries = 0;  ///< times it came back after a failure
    std::uint64_t script_loads = 0; ///< scripts loaded again after a NOSCRIPT reply
};

class prometheus_writer;
/// (As in `valve/metrics.hpp`.)
using metric_labels = std::vector<std::pair<std::string, std::string>>;

namespace detail {
class redis_connection_impl;
class redis_limits;
using redis_exec_handler = boost::asio::any_completion_handler<void(boost::system::error_code, redis_reply)>;
using redis_connect_handler = boost::asio::any_completion_handler<void(boost::system::error_code)>;
void redis_exec(redis_connection_impl& c, std::vector<std::string> command, redis_exec_handler h);
void redis_wait_connected(redis_connection_impl& c, redis_connect_handler h);
} // namespace detail

/// One connection to Redis (TCP or a unix socket) on valve's own Asio socket, with hiredis as
/// the RESP codec only.
///
/// URLs: `redis://host[:port][/db]`, `redis://:password@host`, `redis://user:password@host`
/// (ACL), `unix:///path/to/redis.sock[?db=N]` (the password may be given as
/// `unix://:password@/path`). Percent-escapes are decoded in the user and password.
///
/// Commands are pipelined: whatever is queued goes out in the next write, and replies are
/// matched in order. The connection is made at construction and kept: AUTH and SELECT from
/// the URL, then valve's scripts are loaded. When a command is not answered within
/// `reply_timeout`, or the socket fails, every command waiting fails with
/// `errc::store_unavailable`, and so does every new one, at once, until a reconnection (with
/// jittered exponential backoff) succeeds: a breaker that trips on the first failure. The
/// switch and the recovery are logged once each on the `valve` logger.
///
/// Thread safety: every member may be called from any thread. Work runs on a strand of the
/// executor given.
class redis_connection {
public:
    using executor_type = boost::asio::any_io_executor;

    /// Connects to `url` on `ex`. Throws `valve::error` (`errc::invalid_argument`) for a URL
    /// it cannot use, saying what is wrong; a refused connection or a wrong password is
    /// reported by `async_connect` and `last_error()`.
    redis_connection(const executor_type& ex, std::string_view url, redis_options options = {});
    /// Closes the connection; commands still waiting fail with `operation_aborted`.
    ~redis_connection();

    redis_connection(const redis_connection&) = delete;
    redis_connection& operator=(const redis_connection&) = delete;

    executor_type get_executor() const noexcept;

    /// Sends one command (`{"SET", "k", "v"}`) and completes with its reply.
    ///
    /// Completion signature: `void(boost::system::error_code, redis_reply)`. An error reply
    /// is a reply (`kind::error`), not an error code; the error code is
    /// `errc::store_unavailable` when the connection failed or is down.
    ///
    /// Per-operation cancellation: not supported (a command sent cannot be taken back); it
    /// completes within `reply_timeout` in any case.
    template <class CompletionToken>
    auto async_exec(std::vector<std::string> command, CompletionToken&& token)
    {
        return boost::asio::async_initiate<CompletionToken, void(boost::system::error_code, redis_reply)>(
            exec_initiation{impl_}, token, std::move(command));
    }

    /// Completes when the connection is up (at once if it is), or with the error of the
    /// attempt under way when it fails: `boost::asio::error::connection_refused`,
    /// `errc::store_error` for a refused AUTH or SELECT (see `last_error()`),
    /// `errc::store_unavailable` for a timeout.
    ///
    /// Completion signature: `void(boost::system::error_code)`. Per-operation cancellation:
    /// not supported; the attempt ends within `reply_timeout`.
    template <class CompletionToken>
    auto async_connect(CompletionToken&& token)
    {
        return boost::asio::async_initiate<CompletionToken, void(boost::system::error_code)>(
            connect_initiation{impl_}, token);
    }

    /// Closes the connection for good: commands waiting fail with `operation_aborted`, no
    /// reconnection is tried, and the executor may run out of work (`io_context::run` returns).
    void close();

    /// Whether the connection is up now (commands are sent, not failed at once).
    bool is_up() const noexcept;

    /// What went wrong last, in words (empty if nothing did): what failed and what to fix.
    std::string last_error() const;

    redis_connection_stats stats() const noexcept;

    /// The URL with any password hidden, for logs.
    std::string where() const;

private:
    friend stored_in_option stored_in(redis_connection& redis);
    friend class redis_bucket;

    struct exec_initiation {
        std::shared_ptr<detail::redis_connection_impl> impl;
        template <class Handler>
        void operator()(Handler&& h, std::vector<std::string> command) const
        {
            detail::redis_exec(*impl, std::move(command), detail::redis_exec_handler(std::forward<Handler>(h)));
        }
    };
    struct connect_initiation {
        std::shared_ptr<detail::redis_connection_impl> impl;
        template <class Handler>
        void operator()(Handler&& h) const
        {
            detail::redis_wait_connected(*impl, detail::redis_connect_handler(std::forward<Handler>(h)));
        }
    };

    std::shared_ptr<detail::redis_connection_impl> impl_;
};

/// Profile option: every limit of the profile lives in Redis on `redis` (see `store`).
/// `redis` must outlive the manager's use of the profile.
stored_in_option stored_in(redis_connection& redis);

/// Options of a `redis_bucket`.
struct redis_bucket_options {
    /// What acquisitions do while Redis fails. Under `fail_local`, the local bucket holds
    /// `burst / instances` tokens (at least 1); an acquisition of more takes them all.
    store_failure on_failure = store_failure::fail_closed;
    /// Processes expected to share the key: `fail_local` allows `rate / instances` here.
    std::size_t instances = 1;
    /// The most local waiters one script call reserves for.
    std::size_t batch = 64;
    /// Tokens this process may take from Redis ahead of need, so that `try_acquire` can say
    /// yes with no I/O (at most `batch`); an `async_acquire` with nobody ahead of it takes
    /// them too, with no round trip. The stock never overtakes a waiter. 0: `try_acquire`
    /// says no while Redis is reachable. Once a caller finds half of it used, a script call
    /// asks for more, if the key had tokens to spare when last asked.
    std::size_t stock = 0;
    /// How long a stocked token may wait to be used; after that it is never handed out, and
    /// it is given back to Redis (and not taken again until a caller wants stock). Every token
    /// used was taken from Redis at most this long before, so the fleet gets at most
    /// rate x stock_hold more tokens in any window than the key allows (and no more than the
    /// stocks hold). Positive when `stock` is.
    std::chrono::milliseconds stock_hold{100};
};

/// Counters of a bucket held in Redis, monotonic since it was made.
struct redis_bucket_stats {
    std::uint64_t calls = 0;          ///< script calls made
    std::uint64_t granted = 0;        ///< acquisitions granted through Redis
    std::uint64_t given_back = 0;     ///< tokens given back: cancelled waiters' slots, stale stock, stock on close
    std::uint64_t store_failures = 0; ///< acquisitions settled by the failure policy
    std::uint64_t stocked = 0;        ///< tokens taken from Redis for the stock
    std::uint64_t try_granted = 0;    ///< `try_acquire` calls answered yes from the stock
};

/// A token bucket held in Redis under `valve:{key}:0`: one rate for every process using the
/// key. GCRA in one Lua script, with Redis's clock (`TIME`) as the only clock.
///
/// `async_acquire` queues locally, first come first served; one script call per key is in
/// flight per process, reserving slots for up to `batch` queued waiters at once; each waiter
/// then sleeps on a local timer until its slot. So a process calls Redis about once per grant
/// when the key is busy, and far less when many local waiters share it. `try_acquire` does no
/// I/O: while Redis is reachable it says yes only from tokens already taken from Redis for
/// this process (`redis_bucket_options::stock`; none by default), and while Redis fails it
/// answers by the failure policy (`fail_open`: yes; `fail_local`: the local bucket's answer).
///
/// Thread safety: every member may be called from any thread.
class redis_bucket final : public resource {
public:
    using executor_type = boost::asio::any_io_executor;

    redis_bucket(const redis_bucket&) = delete;
    redis_bucket& operator=(const redis_bucket&) = delete;

    /// A bucket of `burst` tokens refilled at `r`, held in Redis on `redis` under `key`.
    /// Throws `valve::error` (`errc::invalid_argument`) for an empty key, an invalid, zero or
    /// unlimited rate, a zero burst, or a burst too long to refill (over 30 years).
    redis_bucket(redis_connection& redis, std::string key, rate r, std::size_t burst = 1,
                 redis_bucket_options options = {});
    /// Completes every local waiter with `operation_aborted`; slots reserved are given back.
    ~redis_bucket() override;

    executor_type get_executor() const noexcept;

    /// Waits until `n` tokens are granted by Redis (or by the failure policy).
    ///
    /// Completion signature: `void(boost::system::error_code)`. Errors: `errc::exceeds_burst`
    /// at once for `n > burst`; `errc::store_unavailable` when Redis fails under
    /// `fail_closed`; `operation_aborted` when cancelled. The handler is invoked through its
    /// associated executor, never inside this call.
    ///
    /// Per-operation cancellation: terminal, partial and total are honoured until the tokens
    /// are granted; a waiter cancelled after Redis reserved its slot gives the slot back.
    template <class CompletionToken>
    auto async_acquire(std::size_t n, CompletionToken&& token)
    {
        return async_acquire(n, time_point::max(), std::forward<CompletionToken>(token));
    }

    /// As above, but fails with `errc::would_exceed_deadline` when Redis's answer is that the
    /// slot would come after `deadline` (nothing is kept then: a slot granted too late is given
    /// back). A slot Redis has now is granted whatever the deadline, as `token_bucket` grants
    /// tokens it holds: `async_acquire(1, steady_clock::now(), ...)` is a fleet-wide "now or
    /// no" in one round trip. Under `fail_local` the deadline is not applied to the local bucket.
    template <class CompletionToken>
    auto async_acquire(std::size_t n, time_point deadline, CompletionToken&& token)
    {
        return boost::asio::async_initiate<CompletionToken, void(boost::system::error_code)>(
            acquire_initiation{}, token, impl_, n, deadline);
    }

    bool try_acquire(std::size_t n = 1) override;
    void async_acquire(std::size_t n, detail::acquire_handler handler) override;
    /// An estimate: now while local waiters are few; else when the last reply said the queue
    /// ahead would be served.
    time_point next_available(std::size_t n = 1) const override;
    /// Gives `n` tokens back to Redis (the key's time moves back by their interval).
    void release(std::size_t n = 1) override;
    /// An estimate from the last reply (the burst before the first).
    double available() const override;
    /// Changes the rate this process asks Redis to apply; every process sharing the key should
    /// use the same.
    void set_rate(rate r) override;

    redis_bucket_stats stats() const noexcept;

private:
    static void start_acquire(detail::redis_limits& impl, std::size_t n, time_point deadline,
                              detail::acquire_handler h);

    struct acquire_initiation {
        template <class Handler>
        void operator()(Handler&& handler, const std::shared_ptr<detail::redis_limits>& impl, std::size_t n,
                        time_point deadline) const
        {
            start_acquire(*impl, n, deadline, detail::acquire_handler(std::forward<Handler>(handler)));
        }
    };
    std::shared_ptr<detail::redis_limits> impl_;
};

/// Adds a connection's samples to a `/metrics` answer: `valve_redis_up` (gauge),
/// `valve_redis_commands_total`, `valve_redis_failures_total`, `valve_redis_recoveries_total`,
/// `valve_redis_script_loads_total` (counters).
prometheus_writer& add_metrics(prometheus_writer& w, const redis_connection_stats& s, const metric_labels& labels = {});

/// Adds a Redis bucket's samples: `valve_redis_calls_total`, `valve_redis_granted_total`,
/// `valve_redis_given_back_total`, `valve_redis_store_failures_total` (acquisitions settled by
/// the failure policy), `valve_redis_stocked_total`, `valve_redis_try_granted_total`.
prometheus_writer& add_metrics(prometheus_writer& w, const redis_bucket_stats& s, const metric_labels& labels = {});

} // namespace valve

#endif
