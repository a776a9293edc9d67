#ifndef VALVE_MANAGER_HPP
#define VALVE_MANAGER_HPP

#include <valve/detail/saturate.hpp>
#include <valve/limiter.hpp>
#include <valve/rate.hpp>
#include <valve/store.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/async_result.hpp>

#include <chrono>
#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace valve {

/// Profile option: all users of the profile share one resource, named `key`; profiles naming
/// the same key share that one resource (they must give it the same limits and store options).
struct shared_resource_option {
    std::string key;
    rate limit;
    std::size_t burst = 1;
};
inline shared_resource_option shared_resource(std::string key, rate limit, std::size_t burst = 1)
{
    return {std::move(key), limit, burst};
}

/// Profile option: every user of the profile gets a private resource of its own.
struct dedicated_resource_option {
    rate limit;
    std::size_t burst = 1;
};
inline dedicated_resource_option dedicated_resource(rate limit, std::size_t burst = 1) { return {limit, burst}; }

/// Profile option: a further limit every task must pass too (any number; all or nothing).
struct also_limit_option {
    rate limit;
    std::size_t burst = 1;
};
inline also_limit_option also_limit(rate limit, std::size_t burst) { return {limit, burst}; }

/// Profile option: at most `concurrency` tasks running and `queue_capacity` waiting, per
/// limiter. Default: 1 and 100. `concurrency` also caps the threads of the profile's pool
/// (shared by its limiters), which are started only as blocking tasks need them.
struct worker_pool_option {
    std::size_t concurrency;
    std::size_t queue_capacity;
};
inline worker_pool_option worker_pool(std::size_t concurrency, std::size_t queue_capacity)
{
    return {concurrency, queue_capacity};
}

/// Profile option: what a full queue does (default `queue_full_policy::reject`).
struct on_queue_full_option {
    queue_full_policy policy;
};
inline on_queue_full_option on_queue_full(queue_full_policy p) { return {p}; }

/// How long a dedicated profile keeps an idle user's limiter when no `idle_timeout` is given.
inline constexpr std::chrono::seconds default_idle_timeout{60};

/// Profile option (dedicated profiles): a user's limiter is dropped after `timeout` with nothing
/// queued or running, nobody holding it, and its resource full again (every bucket at its
/// burst, see `resource::full`); the next `get_limiter` makes a fresh one, which gives the user
/// nothing that keeping the old one would not have. Without this option a dedicated profile
/// uses `default_idle_timeout`, swept by `get_limiter` (every `timeout / 2` at most; no timer,
/// so an `io_context` with nothing else to do still runs out of work); with it, a timer on the
/// manager's executor sweeps as well (every `timeout / 2`), so limiters go even when no
/// `get_limiter` comes. A limiter whose buckets never refill (a zero rate) is kept once its
/// user has taken a token.
struct idle_timeout_option {
    std::chrono::nanoseconds timeout;
};
template <class Rep, class Period>
idle_timeout_option idle_timeout(std::chrono::duration<Rep, Period> d)
{
    return {detail::saturating_cast<std::chrono::nanoseconds>(d)};
}

/// Profile option: run the profile's blocking tasks on `ex` instead of a thread pool the
/// manager makes for the profile.
struct run_on_option {
    boost::asio::any_io_executor executor;
};
inline run_on_option run_on(boost::asio::any_io_executor ex) { return {std::move(ex)}; }

namespace detail {

struct profile_config {
    std::optional<shared_resource_option> shared;
    std::optional<dedicated_resource_option> dedicated;
    std::vector<also_limit_option> also;
    std::optional<worker_pool_option> pool;
    std::optional<queue_full_policy> policy;
    std::optional<std::chrono::nanoseconds> idle;
    std::optional<boost::asio::any_io_executor> executor;
    std::shared_ptr<store> stored_in;
    std::optional<store_failure> on_failure;
    std::optional<std::size_t> instances;
    std::optional<store_stock_option> stock;
    std::vector<std::string> errors; // options given twice, in words
};

void apply(profile_config& c, shared_resource_option o);
void apply(profile_config& c, dedicated_resource_option o);
void apply(profile_config& c, also_limit_option o);
void apply(profile_config& c, worker_pool_option o);
void apply(profile_config& c, on_queue_full_option o);
void apply(profile_config& c, idle_timeout_option o);
void apply(profile_config& c, run_on_option o);
void apply(profile_config& c, stored_in_option o);
void apply(profile_config& c, on_store_failure_option o);
void apply(profile_config& c, instances_option o);
void apply(profile_config& c, store_stock_option o);

class manager_state;

} // namespace detail

/// Named profiles of limits, and the limiters of their users.
///
/// ```
/// valve::manager mgr{ioc.get_executor()};
/// mgr.register_profile("free-tier", valve::shared_resource("free-key", valve::rate::per_second(2)),
///                      valve::worker_pool(5, 100));
/// mgr.register_profile("pro-tier", valve::dedicated_resource(valve::rate::per_second(10)),
///                      valve::worker_pool(10, 200));
/// auto pro = mgr.get_limiter("pro-tier", "pro-user-123");
/// int n = co_await pro->submit([] { return expensive_call(); });
/// ```
///
/// A shared profile has one limiter (one queue, one resource) for all its users, who take turns
/// (see `limiter::for_user`); a dedicated profile makes one limiter, with its own resource, per user on first
/// use. Each profile's blocking tasks run on a thread
/// pool that the manager owns (or on `run_on`'s executor).
///
/// What a profile costs: no thread at registration. A thread starts when a blocking task is
/// to run and none of the pool's threads is idle, up to the profile's `concurrency`; one idle
/// for 5 seconds ends. So a profile whose tasks are all async (or `run_on`) never has a
/// thread, and one with blocking tasks has as many as ran at once lately. Each dedicated
/// user costs a limiter and its bucket(s) while it is kept (see `idle_timeout`).
///
/// Thread safety: every member function may be called from any thread, concurrently.
class manager {
public:
    using executor_type = boost::asio::any_io_executor;

    /// A manager whose limiters keep their books on `ex` (usually the application's io_context).
    explicit manager(const executor_type& ex);

    /// A manager that runs its bookkeeping on a thread of its own (an `io_context` that thread
    /// runs: `get_executor()`).
    manager();

    /// Closes every limiter at once (as `limiter::cancel` closes a limiter of one's own: new
    /// tasks refused, queued ones aborted) and waits for
    /// running blocking tasks to finish. Limiters that users still hold stay valid: they refuse
    /// new tasks with `errc::shutting_down`. With `manager{}`, the completions this causes (and
    /// whatever else was posted to the manager's thread) have run when it returns, and the
    /// thread runs on, for the refusals of the limiters still held, until the last of them is
    /// released. It may be destroyed from a handler on its own thread, or inside one of its
    /// blocking tasks (a task cannot wait for itself: it then waits for neither that task nor
    /// what it caused on its own thread, which runs after).
    ~manager();

    manager(const manager&) = delete;
    manager& operator=(const manager&) = delete;

    executor_type get_executor() const noexcept;

    /// Registers a profile. Throws `valve::error`: `errc::duplicate_profile` for a name already
    /// registered; `errc::invalid_argument` for an empty name, options that do not fit together
    /// (neither or both of a shared and a dedicated resource, an option given twice, an idle
    /// timeout on a shared profile, a resource key already registered with other limits or other
    /// store options), zero concurrency, a zero-capacity queue with `queue_full_policy::wait`,
    /// or an invalid rate or burst.
    template <class... Options>
    void register_profile(std::string name, Options&&... options)
    {
        detail::profile_config config;
        (detail::apply(config, std::forward<Options>(options)), ...);
        register_profile(std::move(name), std::move(config));
    }

    /// The limiter for `user` under `profile`: for a shared profile, a handle on the profile's
    /// one limiter that marks the tasks as `user`'s (see `limiter::for_user`); for a dedicated
    /// profile, the user's own limiter. Throws `valve::error` with
    /// `errc::unknown_profile` for a profile never registered, `errc::invalid_argument` for an
    /// empty profile name, `errc::shutting_down` after shutdown began. An empty user name is an
    /// ordinary user.
    std::shared_ptr<limiter> get_limiter(std::string_view profile, std::string_view user);

    /// Limiters alive for `profile` now (1 for a shared profile; one per recent user for a
    /// dedicated one).
    std::size_t limiter_count(std::string_view profile) const;

    /// Threads `profile`'s pool has now: none before its first blocking task, nor with
    /// `run_on`; 0 for a name never registered.
    std::size_t thread_count(std::string_view profile) const;

    /// The idle timeout in force for `profile`'s limiters: its `idle_timeout`, else
    /// `default_idle_timeout`; none for a shared profile. `errc::unknown_profile` for a name
    /// never registered.
    std::optional<std::chrono::nanoseconds> idle_timeout_of(std::string_view profile) const;

    /// The statistics of every limiter the manager holds, added up (maxima are maxima), with
    /// those of evicted limiters, so that counters only grow.
    limiter_stats stats() const;
    /// The same for one profile; `errc::unknown_profile` for a name never registered.
    limiter_stats stats(std::string_view profile) const;

    /// Changes the rate of a profile's resource at run time (an `aimd_controller` can drive
    /// it): for a shared profile, its shared resource's (so every profile naming the same key
    /// sees it); for a dedicated one, every user's, now and to come. The burst and the
    /// `also_limit`s stay. Throws `valve::error`: `errc::unknown_profile`, or
    /// `errc::invalid_argument` for an invalid rate.
    void set_rate(std::string_view profile, rate r);

    /// Logs a warning (through `valve::logger()`) when a limiter has tasks queued but none has
    /// started or finished for `after`: a stalled upstream, a zero rate, a pool blocked by
    /// hung tasks. Checked every `after / 2`; one warning per stall. Zero turns it off.
    void warn_on_stall(std::chrono::nanoseconds after);

    /// Shuts every limiter down (see `limiter::async_shutdown`) and completes when all are
    /// done. Completion signature: `void(boost::system::error_code)`.
    template <class Rep, class Period, class CompletionToken>
    auto async_shutdown(std::chrono::duration<Rep, Period> grace, CompletionToken&& token)
    {
        return boost::asio::async_initiate<CompletionToken, void(boost::system::error_code)>(
            [](detail::acquire_handler h, manager* self, std::chrono::nanoseconds g) {
                self->start_shutdown(std::move(h), g);
            },
            token, this, detail::saturating_cast<std::chrono::nanoseconds>(grace));
    }

    /// Blocking `async_shutdown`, then joins the profiles' threads. The shutdown's steps and
    /// completions run on the manager's executor: with `manager{ioc.get_executor()}` (or a
    /// strand of `ioc`, or its executor tracking work), either
    /// `ioc.run()` runs on another thread meanwhile, or `ioc` is stopped and no thread is inside
    /// its `run()` (it has returned), and then this call runs it (restarted, and stopped again
    /// before returning) until the shutdown completes, handlers of the program's own included.
    /// Throws `valve::error` (`errc::invalid_argument`) when
    /// called from a thread inside that `io_context`'s `run()` (with `manager{}`, from its own
    /// thread), where it could only hang: use `async_shutdown` there. (An `io_context` never
    /// run, and not running, is not detected.) The same from inside one of the manager's tasks,
    /// which the shutdown would wait for while it waits for the shutdown: a blocking task on a
    /// profile's threads, or, while any async task of the manager runs or any `permit` of its
    /// limiters is held, any handler of an Asio event loop (an `io_context`'s or a
    /// `thread_pool`'s: the caller may be that task, or the permit's holder).
    void shutdown(std::chrono::nanoseconds grace = std::chrono::seconds(30));

private:
    void register_profile(std::string name, detail::profile_config config);
    void start_shutdown(detail::acquire_handler handler, std::chrono::nanoseconds grace);

    std::shared_ptr<detail::manager_state> state_;
};

} // namespace valve

#endif
