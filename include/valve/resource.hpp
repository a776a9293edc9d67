#ifndef VALVE_RESOURCE_HPP
#define VALVE_RESOURCE_HPP

#include <valve/rate.hpp>
#include <valve/token_bucket.hpp>

#include <boost/asio/any_io_executor.hpp>

#include <chrono>
#include <cstddef>
#include <memory>
#include <utility>
#include <vector>

namespace valve {

class bucket_set;

/// The limits a task must pass before it runs: the one seam between a limiter and what it
/// limits by. In-process token buckets stand here today; a limit shared by many processes (held
/// in Redis, say) can stand here later without changing limiters or their callers.
///
/// Thread safety: implementations must allow every member to be called from any thread. A
/// limiter calls them under its lock: they must not block or call back into the limiter
/// (complete `async_acquire` through the handler's executor, as Asio operations do).
class resource {
public:
    using clock = std::chrono::steady_clock;
    using time_point = clock::time_point;

    virtual ~resource() = default;

    /// Takes `n` tokens if that needs no waiting.
    virtual bool try_acquire(std::size_t n) = 0;

    /// Waits for `n` tokens; completes `handler` with an error code as
    /// `token_bucket::async_acquire` does, including per-operation cancellation.
    virtual void async_acquire(std::size_t n, detail::acquire_handler handler) = 0;

    /// When `n` tokens could be had by a caller arriving now.
    virtual time_point next_available(std::size_t n) const = 0;

    /// Gives back `n` tokens taken and not used (a task cancelled at the instant its token was
    /// granted). A resource that cannot take tokens back keeps them spent: the default.
    virtual void release(std::size_t /*n*/) {}

    /// Tokens a caller arriving now could take (the least over all limits); infinity when
    /// unlimited.
    virtual double available() const = 0;

    /// Whether every limit is at its burst now: a caller arriving now would find it as a new
    /// resource of the same limits. A manager evicts an idle limiter only then, so that
    /// eviction never hands its user a fresh burst. The default answers `false` (cannot tell:
    /// the limiter is kept).
    virtual bool full() const { return false; }

    /// Changes the rate of the first limit (a profile's own, not its `also_limit`s), keeping
    /// the tokens accrued so far. The default throws `valve::error` (`errc::invalid_argument`):
    /// the resource's rate is fixed.
    virtual void set_rate(rate r);
};

/// A resource made of in-process token buckets, taken from all or none: a rate and burst, plus
/// any number of further limits (10 per minute *and* 2 per second, ...).
class bucket_resource final : public resource {
public:
    /// One bucket of `r` and `burst` on `ex`. Throws `valve::error` for an invalid rate or burst.
    bucket_resource(const boost::asio::any_io_executor& ex, rate r, std::size_t burst = 1);
    ~bucket_resource() override;

    /// Adds a further limit that every acquisition must pass too.
    void also_limit(rate r, std::size_t burst);

    /// The first bucket: its rate can be changed at run time.
    token_bucket& primary() noexcept { return primary_; }

    bool try_acquire(std::size_t n) override;
    void async_acquire(std::size_t n, detail::acquire_handler handler) override;
    time_point next_available(std::size_t n) const override;
    void release(std::size_t n) override;
    double available() const override;
    /// Every bucket, the `also_limit`s included, holds its burst (always, for an unlimited rate;
    /// for a zero rate, only until its first token is taken).
    bool full() const override;
    /// Changes the first bucket's rate (as `primary().set_rate(r)`).
    void set_rate(rate r) override;

private:
    token_bucket primary_;             // held in place: one allocation less per dedicated limiter
    std::vector<token_bucket> more_;   // further limits
    std::unique_ptr<bucket_set> set_;  // when there is more than one bucket
};

} // namespace valve

#endif
