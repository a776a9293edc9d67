#ifndef VALVE_STORE_HPP
#define VALVE_STORE_HPP

#include <valve/detail/saturate.hpp>
#include <valve/rate.hpp>

#include <chrono>
#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace valve {

class resource;

/// What a limit held in a store (Redis) does while the store cannot be reached or answered
/// too late: the switch is made at once, and undone when the store is back.
enum class store_failure {
    /// Refuse: acquisitions fail with `errc::store_unavailable` (the default: an upstream's
    /// key is never overrun).
    fail_closed,
    /// Limit locally, at `rate / instances` (see `instances`): the fleet as a whole stays near
    /// its limit if it has about that many processes.
    fail_local,
    /// No limit until the store is back.
    fail_open,
};

/// One limit of a resource held in a store.
struct store_limit {
    rate limit;
    std::size_t burst = 1;
};

/// What a profile (or a user) asks of a store: one resource named `name`, taken all or
/// nothing over `limits` (the first is the profile's own, the rest its `also_limit`s).
struct store_request {
    /// A shared resource's key, or a dedicated profile's name.
    std::string name;
    /// For a dedicated profile: the user whose limit this is (one per name and user, apart from
    /// every shared key, whatever the names).
    std::optional<std::string> user;
    std::vector<store_limit> limits;
    store_failure on_failure = store_failure::fail_closed;
    /// Processes expected to share the limits: `fail_local` limits each to `rate / instances`.
    std::size_t instances = 1;
    /// Single tokens taken ahead, at most this many, for `resource::try_acquire` to hand out
    /// with no round trip (see `store_stock`); 0: none, and `try_acquire` says no.
    std::size_t stock = 0;
    /// How long a token taken ahead may wait to be used before it is given back unused.
    std::chrono::nanoseconds stock_hold = std::chrono::milliseconds(100);
};

/// Where limits shared by many processes are kept: a seam between valve's core and a store
/// such as Redis (`valve::redis_connection`, in the `valve::redis` library). The core never
/// depends on a particular store.
///
/// Thread safety: `make_resource` may be called from any thread.
class store {
public:
    virtual ~store() = default;

    /// A resource whose limits live in the store under `request.name`. Throws `valve::error`
    /// (`errc::invalid_argument`) for limits the store cannot hold.
    virtual std::shared_ptr<resource> make_resource(const store_request& request) = 0;

    /// Throws what `make_resource(request)` would throw for its limits, and nothing otherwise: a
    /// check before a profile is registered or its rate changed. The default accepts anything.
    virtual void check(const store_request& /*request*/) const {}
};

/// Profile option: every limit of the profile lives in `where` (made by the store's own
/// `stored_in`, e.g. `valve::stored_in(redis)`): a shared profile's key is one limit for every
/// process that registers it; a dedicated profile keeps one key per user.
struct stored_in_option {
    std::shared_ptr<store> where;
};

/// Profile option: what the profile's stored limits do while the store fails (default
/// `store_failure::fail_closed`).
struct on_store_failure_option {
    store_failure policy;
};
inline on_store_failure_option on_store_failure(store_failure p) { return {p}; }

/// Profile option: how many processes are expected to share the stored limits (default 1);
/// `store_failure::fail_local` limits each process to `rate / count` meanwhile.
struct instances_option {
    std::size_t count;
};
inline instances_option instances(std::size_t count) { return {count}; }

/// Profile option: keep up to `tokens` single tokens taken ahead from the store, each used
/// within `hold` or given back (see `redis_bucket_options::stock`).
///
/// Without it, a limit held in a store grants a token only by a round trip: a limiter's
/// `try_enter` always says no, and its queued tasks start one round trip apart. With it,
/// `try_enter` and the start of queued tasks take from the stock, and the call that reserves
/// for waiters refills it. The price is said in the stock's own terms: every token used was
/// taken at most `hold` earlier, so the fleet may get up to rate x hold more tokens in a window
/// than the limit allows (and no more than the stocks hold). `tokens` above what one call
/// takes (64 for Redis), or some tokens with a `hold` that is not positive, is refused at
/// `register_profile`; 0 tokens is no stock.
struct store_stock_option {
    std::size_t tokens;
    std::chrono::nanoseconds hold;
};
template <class Rep = long, class Period = std::milli>
store_stock_option store_stock(std::size_t tokens,
                               std::chrono::duration<Rep, Period> hold = std::chrono::milliseconds(100))
{
    return {tokens, detail::saturating_cast<std::chrono::nanoseconds>(hold)};
}

} // namespace valve

#endif
