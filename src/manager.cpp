#include <valve/manager.hpp>

#include "detail/bucket_impl.hpp"
#include "detail/elastic_pool.hpp"
#include "detail/threads.hpp"

#include <valve/bucket_core.hpp>
#include <valve/error.hpp>
#include <valve/log.hpp>

#include <boost/asio/execution/context.hpp>
#include <boost/asio/execution/outstanding_work.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/prefer.hpp>
#include <boost/asio/query.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/asio/use_future.hpp>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <functional>
#include <future>
#include <atomic>
#include <map>
#include <mutex>
#include <thread>
#include <type_traits>
#include <unordered_map>

namespace asio = boost::asio;

namespace valve {

namespace detail {

store_request store_request_of(const rate& r, std::size_t burst, const profile_config& c, const std::string& name,
                               std::optional<std::string> user)
{
    store_request req{name, std::move(user), {{r, burst}}, c.on_failure.value_or(store_failure::fail_closed),
                      c.instances.value_or(1)};
    if (c.stock) {
        req.stock = c.stock->tokens;
        req.stock_hold = c.stock->hold;
    }
    for (const auto& a : c.also) req.limits.push_back({a.limit, a.burst});
    return req;
}

namespace {

template <class T>
void set_once(std::optional<T>& slot, T value, profile_config& c, const char* what)
{
    if (slot) c.errors.push_back(std::string(what) + " given twice");
    slot = std::move(value);
}

// Refuses a limit the bucket would refuse, with the bucket's own message after `where` (the
// call and option), said once.
void check_limit(const rate& r, std::size_t burst, const std::string& where)
{
    try {
        bucket_core::check(r, burst);
    } catch (const error& e) {
        std::string_view inner = e.what();
        if (inner.starts_with("valve: ")) inner.remove_prefix(7); // `where` names the call already
        throw_error(errc::invalid_argument, where + ": " + std::string{inner});
    }
}

} // namespace

void apply(profile_config& c, shared_resource_option o) { set_once(c.shared, std::move(o), c, "shared_resource"); }
void apply(profile_config& c, dedicated_resource_option o) { set_once(c.dedicated, o, c, "dedicated_resource"); }
void apply(profile_config& c, also_limit_option o) { c.also.push_back(o); }
void apply(profile_config& c, worker_pool_option o) { set_once(c.pool, o, c, "worker_pool"); }
void apply(profile_config& c, on_queue_full_option o) { set_once(c.policy, o.policy, c, "on_queue_full"); }
void apply(profile_config& c, idle_timeout_option o) { set_once(c.idle, o.timeout, c, "idle_timeout"); }
void apply(profile_config& c, run_on_option o) { set_once(c.executor, std::move(o.executor), c, "run_on"); }
void apply(profile_config& c, stored_in_option o)
{
    if (c.stored_in) c.errors.push_back("stored_in given twice");
    if (!o.where) c.errors.push_back("stored_in(...) was given no store");
    c.stored_in = std::move(o.where);
}
void apply(profile_config& c, on_store_failure_option o) { set_once(c.on_failure, o.policy, c, "on_store_failure"); }
void apply(profile_config& c, instances_option o) { set_once(c.instances, o.count, c, "instances"); }
void apply(profile_config& c, store_stock_option o) { set_once(c.stock, o, c, "store_stock"); }

// The thread of a `manager{}`: an io_context that one thread of its own runs while it is
// kept. `drain` runs what is left there to the end (the manager's destructor waits so for the
// completions it caused) and starts a fresh thread on the same io_context, for what limiters
// that users still hold post afterwards (their refusals). Its last owner may let go on the
// thread itself (a handler): see make_manager_thread().
class manager_thread {
public:
    manager_thread() { start(); }
    ~manager_thread() { stop(); }

    manager_thread(const manager_thread&) = delete;
    manager_thread& operator=(const manager_thread&) = delete;

    asio::io_context& context() noexcept { return context_; }

    /// Waits until nothing is left to run, then runs on. Not from the thread itself.
    void drain()
    {
        stop();
        context_.restart();
        start();
    }

private:
    void start()
    {
        work_.emplace(context_.get_executor());
        thread_ = std::thread([this] { context_.run(); });
    }

    // Lets the thread run out of work, and joins it.
    void stop()
    {
        work_.reset();
        if (thread_.joinable()) thread_.join();
    }

    asio::io_context context_{1};
    std::optional<asio::executor_work_guard<asio::io_context::executor_type>> work_;
    std::thread thread_;
};

// A manager_thread that, released last on its own thread, is ended on another (a thread cannot
// join itself, nor an io_context be destroyed inside its run()).
std::shared_ptr<manager_thread> make_manager_thread()
{
    return std::shared_ptr<manager_thread>(new manager_thread, [](manager_thread* t) {
        if (t->context().get_executor().running_in_this_thread())
            release_elsewhere(std::shared_ptr<void>(std::unique_ptr<manager_thread>(t)));
        else
            delete t;
    });
}

struct profile {
    std::string name;
    profile_config config;
    limiter_options options;
    std::shared_ptr<elastic_pool> pool; // when not run_on: threads started as blocking tasks need them
    // Where the profile's limiters run, one for all of them (made with the first).
    std::shared_ptr<const limiter_home> home;
    asio::any_io_executor task_executor;
    std::shared_ptr<resource> shared_limits; // shared profiles
    std::shared_ptr<limiter> shared_limiter; // shared profiles
    struct user {
        std::shared_ptr<limiter> lim;
        std::chrono::steady_clock::time_point last_used;
    };
    std::unordered_map<std::string, user> users; // dedicated profiles
    // Dedicated profiles: the idle timeout in force (zero for a shared profile: no eviction).
    std::chrono::nanoseconds idle() const
    {
        return config.dedicated ? config.idle.value_or(default_idle_timeout) : std::chrono::nanoseconds{0};
    }
    limiter_stats retired;                       // the counters of evicted limiters
};

// Adds `st` into `sum`: counters and totals add up, maxima are maxima.
void accumulate(limiter_stats& sum, const limiter_stats& st)
{
    sum.submitted += st.submitted;
    sum.rejected += st.rejected;
    sum.completed += st.completed;
    sum.failed += st.failed;
    sum.cancelled += st.cancelled;
    sum.queued += st.queued;
    sum.running += st.running;
    sum.queue_time_total += st.queue_time_total;
    sum.queue_time_max = std::max(sum.queue_time_max, st.queue_time_max);
    sum.token_wait_total += st.token_wait_total;
    sum.token_wait_max = std::max(sum.token_wait_max, st.token_wait_max);
    sum.last_progress = std::max(sum.last_progress, st.last_progress);
}

class manager_state : public std::enable_shared_from_this<manager_state> {
public:
    explicit manager_state(const asio::any_io_executor& ex) : executor(ex) {}

    asio::any_io_executor executor;
    std::shared_ptr<manager_thread> own_thread; // for manager()
    std::mutex join_mutex;                      // one join at a time

    mutable std::mutex mutex;
    std::map<std::string, std::unique_ptr<profile>, std::less<>> profiles;
    // Shared keys: the limits registered under each, with the store options they were made
    // with (another profile shares a key only with the same limits and the same options).
    struct shared_key {
        shared_resource_option option;
        std::shared_ptr<resource> limits;
        std::shared_ptr<store> stored_in;
        store_failure on_failure = store_failure::fail_closed;
        std::size_t instances = 1;
        std::size_t stock = 0;
        std::chrono::nanoseconds stock_hold{0};
    };
    std::map<std::string, shared_key, std::less<>> resources;
    bool shutting_down = false;
    std::chrono::nanoseconds sweep_every = std::chrono::nanoseconds::max();
    std::chrono::steady_clock::time_point last_sweep{};
    std::unique_ptr<asio::steady_timer> sweeper;
    std::chrono::nanoseconds stall_after{0};
    std::unique_ptr<asio::steady_timer> stall_timer;
    std::map<const limiter*, bool> stalled; // warned already, until progress resumes

    void arm_stall_check()
    {
        stall_timer->expires_after(std::max<std::chrono::nanoseconds>(stall_after / 2, std::chrono::milliseconds(1)));
        stall_timer->async_wait([weak = weak_from_this()](boost::system::error_code ec) {
            if (ec) return;
            if (auto self = weak.lock()) self->check_stalls();
        });
    }

    void check_stalls()
    {
        std::lock_guard lock{mutex};
        if (shutting_down || stall_after.count() == 0) return;
        const auto now = std::chrono::steady_clock::now();
        std::map<const limiter*, bool> still;
        auto check = [&](const std::string& profile_name, const std::string& user, const limiter& l) {
            const limiter_stats st = l.stats();
            // A limiter that never made progress counts from when the check began.
            const auto since = std::max(st.last_progress, stall_checks_since);
            if (st.queued == 0 || now - since < stall_after) return;
            const bool warned = stalled.count(&l) != 0;
            still[&l] = true;
            if (warned) return;
            logger()->warn("valve: profile \"{}\"{}{}: {} tasks queued, {} running, and none started or finished "
                           "for {} ms",
                           profile_name, user.empty() ? "" : ", user ", user, st.queued, st.running,
                           std::chrono::duration_cast<std::chrono::milliseconds>(now - since).count());
        };
        for (auto& [name, p] : profiles) {
            if (p->shared_limiter) check(name, "", *p->shared_limiter);
            for (auto& [user, u] : p->users) check(name, user, *u.lim);
        }
        stalled = std::move(still);
        arm_stall_check();
    }

    std::chrono::steady_clock::time_point stall_checks_since{};

    std::shared_ptr<limiter> make_limiter(profile& p, std::shared_ptr<resource> limits)
    {
        // The limiter keeps alive the threads its executors point into, should it outlive the
        // manager (its user still holds it): the profile's pool and the manager's own thread.
        if (!p.home) {
            auto keep = std::make_shared<std::pair<std::shared_ptr<elastic_pool>, std::shared_ptr<manager_thread>>>(
                p.pool, own_thread);
            p.home = std::make_shared<const limiter_home>(std::move(keep), executor, p.task_executor);
        }
        return std::make_shared<limiter>(p.home, std::move(limits), p.options);
    }

    std::shared_ptr<resource> make_resource(const rate& r, std::size_t burst, const profile_config& c,
                                            const std::string& name, std::optional<std::string> user = {})
    {
        if (c.stored_in) return c.stored_in->make_resource(store_request_of(r, burst, c, name, std::move(user)));
        auto res = std::make_shared<bucket_resource>(executor, r, burst);
        for (const auto& a : c.also) res->also_limit(a.limit, a.burst);
        return res;
    }

    // Called with `mutex` held: sweep at least every `idle / 2`, from get_limiter and, when
    // `on_timer`, from a timer too.
    void schedule_sweep(std::chrono::nanoseconds idle, bool on_timer)
    {
        const auto every = std::max<std::chrono::nanoseconds>(idle / 2, std::chrono::milliseconds(1));
        const bool sooner = every < sweep_every;
        if (sooner) sweep_every = every;
        if (!on_timer) return;
        if (!sweeper) {
            sweeper = std::make_unique<asio::steady_timer>(executor);
            arm_sweep();
        } else if (sooner) {
            arm_sweep();
        }
    }

    void arm_sweep()
    {
        sweeper->expires_after(sweep_every);
        sweeper->async_wait([weak = weak_from_this()](boost::system::error_code ec) {
            if (ec) return;
            if (auto self = weak.lock()) self->sweep();
        });
    }

    void sweep()
    {
        std::vector<std::shared_ptr<limiter>> dropped; // released outside the lock
        std::lock_guard lock{mutex};
        if (shutting_down) return;
        evict_idle(std::chrono::steady_clock::now(), dropped);
        arm_sweep();
    }

    // Called with `mutex` held: moves into `dropped` the dedicated limiters that have rested
    // for their profile's idle timeout and that a new one would replace exactly.
    void evict_idle(std::chrono::steady_clock::time_point now, std::vector<std::shared_ptr<limiter>>& dropped)
    {
        last_sweep = now;
        const auto before = dropped.size();
        for (auto& [name, p] : profiles) {
            const auto idle = p->idle();
            if (idle.count() == 0) continue;
            for (auto it = p->users.begin(); it != p->users.end();) {
                const auto& u = it->second;
                // Only the manager holds it (no handle of it, nor of its queue through
                // `for_user`), nothing is queued or running, it has rested, and its buckets
                // are full again: dropping a drained one would give its user a fresh burst.
                if (u.lim.use_count() == 1 && !u.lim->shared() && u.lim->queued() == 0 && u.lim->running() == 0
                    && now - std::max(u.last_used, u.lim->stats().last_progress) >= idle
                    && u.lim->limits().full()) {
                    accumulate(p->retired, u.lim->stats()); // counters only grow
                    dropped.push_back(std::move(it->second.lim));
                    it = p->users.erase(it);
                } else {
                    ++it;
                }
            }
        }
        if (dropped.size() > before) logger()->debug("valve: evicted {} idle limiters", dropped.size() - before);
    }

    // Waits for the profiles' threads to run out of work and end (once shutdown has begun).
    void join_pools()
    {
        std::vector<std::shared_ptr<elastic_pool>> pools;
        {
            std::lock_guard lock{mutex};
            for (auto& [name, p] : profiles)
                if (p->pool) pools.push_back(p->pool);
        }
        std::lock_guard join{join_mutex};
        for (auto& p : pools) p->join();
    }

    // Whether the calling thread is inside a task of the manager's limiters, which a blocking
    // shutdown would wait for forever: a blocking task of its profiles, or (not known exactly)
    // any handler of an Asio event loop while an async task runs.
    bool inside_a_task()
    {
        if (inside_a_blocking_task()) return true;
        std::vector<std::shared_ptr<limiter>> limiters;
        {
            std::lock_guard lock{mutex};
            if (!inside_event_loop()) return false;
            limiters = all_limiters();
        }
        return std::any_of(limiters.begin(), limiters.end(),
                           [](const auto& l) { return limiter_access::async_tasks_running(*l) != 0; });
    }

    // Whether the calling thread runs a blocking task of the manager's profiles (known exactly).
    bool inside_a_blocking_task()
    {
        const limiter_home* home = running_task_home();
        if (!home) return false;
        std::lock_guard lock{mutex};
        return std::any_of(profiles.begin(), profiles.end(), [&](const auto& p) { return p.second->home.get() == home; });
    }

    // Called with `mutex` held: the profile named `name`, or errc::unknown_profile for the call `where`.
    profile& named(std::string_view name, const std::string& where) const
    {
        const auto found = profiles.find(name);
        if (found == profiles.end())
            throw_error(errc::unknown_profile,
                        where + ": no profile \"" + std::string{name} + "\" is registered; register it first");
        return *found->second;
    }

    std::vector<std::shared_ptr<limiter>> all_limiters()
    {
        std::vector<std::shared_ptr<limiter>> out;
        for (auto& [name, p] : profiles) {
            if (p->shared_limiter) out.push_back(p->shared_limiter);
            for (auto& [user, u] : p->users) out.push_back(u.lim);
        }
        return out;
    }
};

} // namespace detail

manager::manager(const executor_type& ex) : state_(std::make_shared<detail::manager_state>(ex)) {}

manager::manager()
{
    auto own = detail::make_manager_thread();
    state_ = std::make_shared<detail::manager_state>(own->context().get_executor());
    state_->own_thread = std::move(own);
}

manager::~manager()
{
    // A task of its own cannot wait for itself: a manager destroyed inside one (its last
    // owner was the task) waits for neither that task's pool nor its own thread.
    const bool inside_own_task = state_->inside_a_blocking_task();
    std::vector<std::shared_ptr<limiter>> limiters;
    {
        std::lock_guard lock{state_->mutex};
        state_->shutting_down = true;
        limiters = state_->all_limiters();
        state_->sweeper.reset();
        state_->stall_timer.reset();
    }
    // No grace: queued tasks are aborted before this returns; running ones are asked to stop
    // (if they take a stop token) and finish on their threads, which are then joined.
    for (auto& l : limiters) detail::limiter_access::close(*l);
    limiters.clear();
    state_->join_pools();
    // What that caused (the aborted tasks' completions) runs on the manager's own thread before
    // this returns; the thread then runs on for the limiters that users still hold (their
    // refusals), and ends with the last of them. A thread cannot wait for itself: a manager
    // destroyed on its own thread leaves them to run after it.
    if (state_->own_thread && !inside_own_task && !state_->own_thread->context().get_executor().running_in_this_thread())
        state_->own_thread->drain();
}

manager::executor_type manager::get_executor() const noexcept { return state_->executor; }

void manager::register_profile(std::string name, detail::profile_config config)
{
    using detail::throw_error;
    const std::string where = "manager::register_profile(\"" + name + "\")";
    if (name.empty()) throw_error(errc::invalid_argument, where + ": the profile name is empty; give it a name");
    if (!config.errors.empty())
        throw_error(errc::invalid_argument, where + ": " + config.errors.front() + "; give each option once");
    if (config.shared.has_value() == config.dedicated.has_value())
        throw_error(errc::invalid_argument, where + ": " + (config.shared ? "both" : "neither") +
                                                " of shared_resource(...) and dedicated_resource(...) given; "
                                                "give exactly one");
    if (config.shared && config.idle)
        throw_error(errc::invalid_argument, where + ": idle_timeout applies to dedicated profiles only (a shared "
                                                    "one has one limiter); remove it or use dedicated_resource(...)");
    if (config.idle && config.idle->count() <= 0)
        throw_error(errc::invalid_argument, where + ": idle_timeout is " + std::to_string(config.idle->count()) +
                                                " ns; give a positive duration");
    const auto pool = config.pool.value_or(worker_pool_option{1, 100});
    const limiter_options options{pool.concurrency, pool.queue_capacity,
                                  config.policy.value_or(queue_full_policy::reject)};
    if (options.concurrency == 0)
        throw_error(errc::invalid_argument, where + ": worker_pool concurrency is 0; give at least 1");
    if (options.queue_capacity == 0 && options.on_queue_full == queue_full_policy::wait)
        throw_error(errc::invalid_argument, where + ": a zero-capacity queue with on_queue_full(wait) would never "
                                                    "admit a task; give the queue room or use on_queue_full(reject)");
    if (config.shared) detail::check_limit(config.shared->limit, config.shared->burst, where + ": shared_resource");
    if (config.dedicated)
        detail::check_limit(config.dedicated->limit, config.dedicated->burst, where + ": dedicated_resource");
    for (const auto& a : config.also) detail::check_limit(a.limit, a.burst, where + ": also_limit");
    if (!config.stored_in && (config.on_failure || config.instances || config.stock))
        throw_error(errc::invalid_argument, where + ": on_store_failure, instances and store_stock apply to limits "
                                                    "kept in a store; add stored_in(...) or remove them");
    if (config.instances && *config.instances == 0)
        throw_error(errc::invalid_argument, where + ": instances(0); give the number of processes sharing the "
                                                    "limit, at least 1");
    if (config.stored_in) {
        // Limits the store cannot hold are refused now, not at every get_limiter.
        if (config.shared)
            config.stored_in->check(
                detail::store_request_of(config.shared->limit, config.shared->burst, config, config.shared->key, {}));
        else
            config.stored_in->check(
                detail::store_request_of(config.dedicated->limit, config.dedicated->burst, config, name, "user"));
    }

    std::lock_guard lock{state_->mutex};
    if (state_->shutting_down)
        throw_error(errc::shutting_down, where + ": the manager is shutting down and accepts no new profiles");
    if (state_->profiles.count(name) != 0)
        throw_error(errc::duplicate_profile, where + ": a profile of that name is already registered; choose "
                                                     "another name");

    auto p = std::make_unique<detail::profile>();
    p->name = name;
    p->options = options;
    if (config.executor) {
        p->task_executor = *config.executor;
    } else {
        // No thread yet, and never more than `concurrency`, shared by the profile's limiters
        // (one limiter never runs more tasks at once).
        p->pool = std::make_shared<detail::elastic_pool>(options.concurrency);
        p->task_executor = p->pool->get_executor();
    }
    if (config.shared) {
        const auto& key = config.shared->key;
        const detail::manager_state::shared_key wanted{
            *config.shared,
            nullptr,
            config.stored_in,
            config.on_failure.value_or(store_failure::fail_closed),
            config.instances.value_or(1),
            config.stock ? config.stock->tokens : 0,
            config.stock ? config.stock->hold : std::chrono::nanoseconds{0}};
        auto found = state_->resources.find(key);
        if (found != state_->resources.end()) {
            const auto& known = found->second;
            if (!(known.option.limit == config.shared->limit) || known.option.burst != config.shared->burst ||
                !config.also.empty())
                throw_error(errc::invalid_argument,
                            where + ": shared_resource \"" + key + "\" is already registered as " +
                                to_string(known.option.limit) + ", burst " + std::to_string(known.option.burst) +
                                "; give the same limits and no also_limit to share it, or use another key");
            // Sharing a key with another store (or none), policy or stock would silently keep the
            // first profile's: a limit asked to be fleet-wide could stay in this process.
            if (known.stored_in != wanted.stored_in || known.on_failure != wanted.on_failure ||
                known.instances != wanted.instances || known.stock != wanted.stock ||
                known.stock_hold != wanted.stock_hold)
                throw_error(errc::invalid_argument,
                            where + ": shared_resource \"" + key + "\" is already registered " +
                                (known.stored_in ? "stored in a store" : "in this process") +
                                " with other store options (stored_in, on_store_failure, instances, store_stock); "
                                "give the same ones to share it, or use another key");
            p->shared_limits = known.limits;
        } else {
            p->shared_limits = state_->make_resource(config.shared->limit, config.shared->burst, config, key);
            auto entry = wanted;
            entry.limits = p->shared_limits;
            state_->resources.emplace(key, std::move(entry));
        }
        p->shared_limiter = state_->make_limiter(*p, p->shared_limits);
    }
    p->config = std::move(config);
    if (p->config.dedicated) state_->schedule_sweep(p->idle(), p->config.idle.has_value());
    state_->profiles.emplace(std::move(name), std::move(p));
}

std::shared_ptr<limiter> manager::get_limiter(std::string_view profile_name, std::string_view user)
{
    std::vector<std::shared_ptr<limiter>> dropped; // released outside the lock
    const auto where = [&] {
        return "manager::get_limiter(\"" + std::string{profile_name} + "\", \"" + std::string{user} + "\")";
    };
    if (profile_name.empty())
        detail::throw_error(errc::invalid_argument, where() + ": the profile name is empty; give a registered one");
    std::lock_guard lock{state_->mutex};
    if (state_->shutting_down)
        detail::throw_error(errc::shutting_down, where() + ": the manager is shutting down and hands out no limiters");
    detail::profile& p = state_->named(profile_name, where());
    // Users of a shared profile share its queue, each under an id of its own so that they are
    // served round-robin; a handle is cheap and not kept (a million one-off users cost nothing).
    if (p.shared_limiter) return p.shared_limiter->for_user(std::hash<std::string_view>{}(user));
    // Sweeping here, when due, bounds the limiters kept without a timer: they grow only here.
    const auto now = std::chrono::steady_clock::now();
    if (now - state_->last_sweep >= state_->sweep_every) state_->evict_idle(now, dropped);
    auto& u = p.users[std::string(user)];
    if (!u.lim) {
        const auto& d = *p.config.dedicated;
        // A stored limit is kept per user under the profile's name and the user's: the same
        // user of the same profile is one limit in every process.
        u.lim = state_->make_limiter(p, state_->make_resource(d.limit, d.burst, p.config, p.name, std::string(user)));
        // Its user's cancel() aborts the user's queued tasks; closing it (and so dropping the
        // limit it keeps) is the manager's business, as for a shared profile.
        detail::limiter_access::hand_to_user(*u.lim);
    }
    u.last_used = now;
    return u.lim;
}

limiter_stats manager::stats() const
{
    std::vector<std::shared_ptr<limiter>> limiters;
    limiter_stats sum;
    {
        std::lock_guard lock{state_->mutex};
        limiters = state_->all_limiters();
        for (const auto& [name, p] : state_->profiles) detail::accumulate(sum, p->retired);
    }
    for (const auto& l : limiters) detail::accumulate(sum, l->stats());
    return sum;
}

limiter_stats manager::stats(std::string_view profile_name) const
{
    std::vector<std::shared_ptr<limiter>> limiters;
    limiter_stats sum;
    {
        std::lock_guard lock{state_->mutex};
        const auto& p = state_->named(profile_name, "manager::stats(\"" + std::string{profile_name} + "\")");
        sum = p.retired;
        if (p.shared_limiter) limiters.push_back(p.shared_limiter);
        for (const auto& [user, u] : p.users) limiters.push_back(u.lim);
    }
    for (const auto& l : limiters) detail::accumulate(sum, l->stats());
    return sum;
}

void manager::set_rate(std::string_view profile_name, rate r)
{
    const std::string where = "manager::set_rate(\"" + std::string{profile_name} + "\", " + to_string(r) + ")";
    if (const auto ec = validate(r))
        detail::throw_error(errc::invalid_argument,
                            where + ": not a usable rate; give a finite, non-negative count over a positive "
                                    "period, at most 8 tokens per nanosecond, or rate::unlimited()");
    std::lock_guard lock{state_->mutex};
    auto& p = state_->named(profile_name, where);
    // Checked against the profile's burst before anything changes: a rate its bucket cannot
    // take must not reach the users' limiters, nor the ones made later.
    detail::check_limit(r, p.shared_limits ? p.config.shared->burst : p.config.dedicated->burst, where);
    if (p.config.stored_in)
        p.config.stored_in->check(detail::store_request_of(
            r, p.shared_limits ? p.config.shared->burst : p.config.dedicated->burst, p.config, p.name, {}));
    if (p.shared_limits) {
        p.shared_limits->set_rate(r);
        return;
    }
    p.config.dedicated->limit = r;
    for (auto& [user, u] : p.users) u.lim->limits().set_rate(r);
}

void manager::warn_on_stall(std::chrono::nanoseconds after)
{
    std::lock_guard lock{state_->mutex};
    state_->stall_after = after;
    if (after.count() <= 0) {
        if (state_->stall_timer) state_->stall_timer->cancel();
        return;
    }
    state_->stall_checks_since = std::chrono::steady_clock::now();
    if (!state_->stall_timer) state_->stall_timer = std::make_unique<asio::steady_timer>(state_->executor);
    state_->arm_stall_check();
}

std::size_t manager::limiter_count(std::string_view profile_name) const
{
    std::lock_guard lock{state_->mutex};
    const auto found = state_->profiles.find(profile_name);
    if (found == state_->profiles.end()) return 0;
    return found->second->shared_limiter ? 1 : found->second->users.size();
}

std::size_t manager::thread_count(std::string_view profile_name) const
{
    std::lock_guard lock{state_->mutex};
    const auto found = state_->profiles.find(profile_name);
    if (found == state_->profiles.end() || !found->second->pool) return 0;
    return found->second->pool->threads();
}

std::optional<std::chrono::nanoseconds> manager::idle_timeout_of(std::string_view profile_name) const
{
    std::lock_guard lock{state_->mutex};
    const auto& p = state_->named(profile_name, "manager::idle_timeout_of(\"" + std::string{profile_name} + "\")");
    if (p.shared_limiter) return std::nullopt;
    return p.idle();
}

void manager::start_shutdown(detail::acquire_handler handler, std::chrono::nanoseconds grace)
{
    std::vector<std::shared_ptr<limiter>> limiters;
    {
        std::lock_guard lock{state_->mutex};
        state_->shutting_down = true;
        limiters = state_->all_limiters();
        if (state_->sweeper) state_->sweeper->cancel();
        if (state_->stall_timer) state_->stall_timer->cancel();
    }
    struct join_state {
        // Move-constructed, never move-assigned: Boost 1.81's any_completion_handler would wrap
        // itself on assignment instead of moving.
        join_state(std::size_t n, detail::acquire_handler h, asio::any_io_executor ex)
            : left(n), handler(std::move(h)), executor(std::move(ex))
        {
        }
        std::atomic<std::size_t> left;
        detail::acquire_handler handler;
        asio::any_io_executor executor;
    };
    // +1: released below, so a manager without limiters completes too.
    auto js = std::make_shared<join_state>(limiters.size() + 1, std::move(handler), state_->executor);
    auto one_done = [js](boost::system::error_code) {
        if (--js->left == 0) detail::post_completion(std::move(js->handler), js->executor, {});
    };
    for (auto& l : limiters) l->async_shutdown(grace, one_done);
    one_done({});
}

namespace {

// The io_context behind `ex`, if `ex` is one's executor (tracking work or not) or a strand
// of one.
asio::io_context* io_context_of(const asio::any_io_executor& ex) noexcept
{
    using plain = asio::io_context::executor_type;
    using tracked = std::decay_t<decltype(asio::prefer(std::declval<plain>(), asio::execution::outstanding_work.tracked))>;
    if (const auto* io = ex.target<plain>()) return &asio::query(*io, asio::execution::context);
    if (const auto* io = ex.target<tracked>()) return &asio::query(*io, asio::execution::context);
    if (const auto* s = ex.target<asio::strand<plain>>())
        return &asio::query(s->get_inner_executor(), asio::execution::context);
    if (const auto* s = ex.target<asio::strand<tracked>>())
        return &asio::query(s->get_inner_executor(), asio::execution::context);
    return nullptr;
}

} // namespace

void manager::shutdown(std::chrono::nanoseconds grace)
{
    asio::io_context* io = io_context_of(state_->executor);
    if (io && io->get_executor().running_in_this_thread())
        detail::throw_error(errc::invalid_argument,
                            "manager::shutdown: called on a thread that runs the manager's io_context, which must "
                            "run for the shutdown to complete: it would wait forever; use async_shutdown there");
    if (state_->inside_a_task())
        detail::throw_error(errc::invalid_argument,
                            "manager::shutdown: called from inside a task of the manager's limiters (or from an Asio "
                            "event loop while one of its async tasks runs, which may be the caller): the shutdown "
                            "waits for running tasks to finish, so it would wait for itself forever; call it from "
                            "outside the tasks, or use async_shutdown without waiting for it there");
    auto done = async_shutdown(grace, asio::use_future);
    if (io) {
        // A stopped io_context (its run() has returned) is run by no thread: this one runs it
        // until the shutdown has completed, so that waiting for it cannot hang. It is left
        // stopped again, as it was found.
        asio::io_context& ctx = *io;
        bool restarted = false;
        while (done.wait_for(std::chrono::milliseconds(10)) != std::future_status::ready) {
            if (!ctx.stopped()) continue; // run elsewhere
            ctx.restart();
            restarted = true;
            while (done.wait_for(std::chrono::seconds(0)) != std::future_status::ready && !ctx.stopped())
                ctx.run_one_for(std::chrono::milliseconds(10));
        }
        if (restarted) ctx.stop();
    }
    done.get();
    state_->join_pools();
}

} // namespace valve
