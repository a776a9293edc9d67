#include <valve/token_bucket.hpp>

#include "detail/bucket_impl.hpp"
#include "detail/cancellation.hpp"

#include <valve/detail/saturate.hpp>
#include <valve/error.hpp>

#include <boost/asio/append.hpp>
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/execution/outstanding_work.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/prefer.hpp>

#include <algorithm>
#include <cmath>
#include <utility>

namespace asio = boost::asio;

namespace valve {

namespace detail {

namespace {
std::chrono::steady_clock::time_point clock_now() noexcept { return std::chrono::steady_clock::now(); }
} // namespace

bool try_acquire_now(bucket_impl& impl, std::size_t n) noexcept;

void post_completion(acquire_handler handler, const asio::any_io_executor& fallback, boost::system::error_code ec)
{
    // post() runs the handler through its own associated executor, `fallback` if it has none.
    asio::post(fallback, asio::append(std::move(handler), ec));
}

std::chrono::nanoseconds backdate_limit(const rate& r) noexcept
{
    if (r.is_unlimited() || r.is_zero()) return std::chrono::nanoseconds{0};
    const double ns = 1e9 / r.tokens_per_second();
    return std::chrono::nanoseconds{static_cast<std::int64_t>(std::min(ns, 1e15))};
}

struct bucket_impl::cancel_handler {
    cancel_handler(std::weak_ptr<bucket_impl> s, std::uint64_t i) : self(std::move(s)), id(i) {}

    std::weak_ptr<bucket_impl> self;
    std::uint64_t id;

    void operator()(asio::cancellation_type type) const
    {
        if (!cancels_waiting(type)) return;
        // A waiter exists, so the serving state does.
        if (auto s = self.lock()) s->on_strand([id = id](bucket_impl& b) { b.on_cancel(id); });
    }
};

bucket_impl::bucket_impl(const asio::any_io_executor& ex, rate r, std::size_t burst)
    : executor_(ex), core_(r, burst, clock::now())
{
}

bucket_impl::~bucket_impl() { delete serving_.load(); }

bucket_impl::serving_state& bucket_impl::serving()
{
    if (serving_state* made = serving_if_made()) return *made;
    // Two threads may race to make it: one wins, the other's copy is thrown away.
    auto fresh = std::make_unique<serving_state>(executor_);
    serving_state* expected = nullptr;
    if (serving_.compare_exchange_strong(expected, fresh.get()))
        return *fresh.release();
    return *expected;
}

template <class F>
void bucket_impl::on_strand(F&& f)
{
    if (serving_state* s = serving_if_made())
        asio::post(s->strand, [self = shared_from_this(), f = std::forward<F>(f)]() mutable { f(*self); });
}

void bucket_impl::initiate(acquire_handler handler, std::size_t n, time_point deadline)
{
    // The header has just tried the fast path (try_acquire_now); this is the waiting path.
    if (n > core_.burst() && !core_.current_rate().is_unlimited())
        return post_completion(std::move(handler), executor_, errc::exceeds_burst);
    const time_point now = clock::now();
    if (core_.earliest(n, now, pending_tokens_.load(std::memory_order_relaxed)) > deadline)
        return post_completion(std::move(handler), executor_, errc::would_exceed_deadline);

    // Made before the waiter counts as pending: whoever sees a waiter finds its strand.
    serving_state& s = serving();
    pending_.fetch_add(1, std::memory_order_acq_rel);
    pending_tokens_.fetch_add(n, std::memory_order_relaxed);
    const std::uint64_t id = s.next_id.fetch_add(1, std::memory_order_relaxed);
    // Installed before the waiter is posted, so a cancellation emitted after this call returns
    // always reaches the strand after the waiter does.
    auto slot = asio::get_associated_cancellation_slot(handler);
    if (slot.is_connected()) slot.template emplace<cancel_handler>(weak_from_this(), id);
    auto work = asio::prefer(asio::get_associated_executor(handler, executor_), asio::execution::outstanding_work.tracked);
    asio::post(s.strand, [self = shared_from_this(), id,
                          w = waiter{std::move(handler), std::move(work), n, deadline}]() mutable {
        self->enqueue(id, std::move(w));
    });
}

void bucket_impl::enqueue(std::uint64_t id, waiter w)
{
    // close() sets the flag before it looks for the strand: a waiter that arrives after the
    // close was posted, or when there was no strand yet to post it to, sees it here.
    if (closed_.load()) {
        pending_.fetch_sub(1, std::memory_order_acq_rel);
        pending_tokens_.fetch_sub(w.n, std::memory_order_relaxed);
        return post_completion(std::move(w.handler), executor_, asio::error::operation_aborted);
    }
    auto& queue = serving_if_made()->queue;
    const auto it = queue.emplace(id, std::move(w)).first;
    // Only a new head changes the plan; others wait their turn behind the armed timer.
    if (first_in_line(it)) pump(clock::now());
}

bool bucket_impl::first_in_line(std::map<std::uint64_t, waiter>::iterator it) const
{
    // Held places are never served here, so the waiter after them is the head.
    for (auto i = serving_if_made()->queue.begin(); i != it; ++i)
        if (!i->second.is_hold) return false;
    return true;
}

std::uint64_t bucket_impl::hold(std::size_t n, std::weak_ptr<bucket_watcher> owner)
{
    serving_state& s = serving();
    pending_tokens_.fetch_add(n, std::memory_order_relaxed);
    const std::uint64_t id = s.next_id.fetch_add(1, std::memory_order_relaxed);
    waiter w{{}, {}, n, time_point::max(), std::move(owner), true, false};
    asio::post(s.strand, [self = shared_from_this(), id, w = std::move(w)]() mutable {
        auto& queue = self->serving_if_made()->queue;
        const auto it = queue.emplace(id, std::move(w)).first;
        if (self->first_in_line(it)) self->pump(clock::now());
    });
    return id;
}

void bucket_impl::unhold(std::uint64_t id)
{
    on_strand([id](bucket_impl& b) {
        auto& queue = b.serving_if_made()->queue;
        const auto it = queue.find(id);
        if (it == queue.end()) return;
        b.pending_tokens_.fetch_sub(it->second.n, std::memory_order_relaxed);
        queue.erase(it);
        // The waiters behind it were planned around its tokens.
        b.serving_if_made()->planned = time_point::max();
        b.pump(clock::now());
    });
}

void bucket_impl::on_cancel(std::uint64_t id)
{
    auto& queue = serving_if_made()->queue;
    const auto it = queue.find(id);
    if (it == queue.end()) return; // already completed
    const bool was_head = first_in_line(it);
    finish(it, asio::error::operation_aborted);
    if (was_head) pump(clock::now());
}

void bucket_impl::finish(std::map<std::uint64_t, waiter>::iterator it, boost::system::error_code ec)
{
    acquire_handler handler(std::move(it->second.handler));
    pending_tokens_.fetch_sub(it->second.n, std::memory_order_relaxed);
    pending_.fetch_sub(1, std::memory_order_acq_rel);
    post_completion(std::move(handler), executor_, ec);
    serving_if_made()->queue.erase(it); // releases the work guard only after the completion is posted
}

void bucket_impl::pump(time_point cursor)
{
    serving_state& s = *serving_if_made();
    const time_point now = clock::now();
    // A timer that fired late grants as of when it was due (at most one token interval back),
    // so wake-up latency does not erode the rate.
    cursor = std::clamp(cursor, saturating_add(now, -backdate_limit(core_.current_rate())), now);
    // Tokens of the places held at the front: the waiters behind them leave those in the bucket.
    std::size_t held = 0;
    for (auto it = s.queue.begin(); it != s.queue.end();) {
        waiter& w = it->second;
        if (w.is_hold) {
            const auto owner = w.holder.lock();
            if (!owner) {
                // Its acquisition ended without giving it up (its io_context was destroyed).
                pending_tokens_.fetch_sub(w.n, std::memory_order_relaxed);
                it = s.queue.erase(it);
                continue;
            }
            held += w.n;
            if (!std::exchange(w.told, true)) owner->turn_reached();
            ++it;
            continue;
        }
        if (w.n > core_.burst() && !core_.current_rate().is_unlimited()) {
            finish(it++, errc::exceeds_burst);
            continue;
        }
        const time_point due = core_.earliest(w.n, cursor, held);
        if (due > w.deadline) {
            finish(it++, errc::would_exceed_deadline);
            continue;
        }
        if (due <= now) {
            // Taking at `due` leaves `held` tokens in the bucket, as planned.
            if (core_.try_take(w.n, due) || (held == 0 && core_.try_take(w.n, now))) {
                cursor = due;
                finish(it++, {});
            }
            // else another taker (a bucket_set) got there first: plan again
            continue;
        }
        if (due == time_point::max()) break; // zero rate: only a rate change can help
        arm(due);
        return;
    }
    s.planned = time_point::max();
    ++s.timer_generation;
    if (s.timer) s.timer->cancel();
}

void bucket_impl::arm(time_point t)
{
    serving_state& s = *serving_if_made();
    if (t == s.planned) return; // the timer is already set for this moment
    s.planned = t;
    const std::uint64_t generation = ++s.timer_generation;
    if (!s.timer) s.timer.emplace(s.strand);
    s.timer->expires_at(t);
    s.timer->async_wait([self = shared_from_this(), generation](boost::system::error_code) {
        // Superseded waits (re-planned or cancelled) are ignored by their generation.
        serving_state& st = *self->serving_if_made();
        if (generation == st.timer_generation) self->pump(st.planned);
    });
}

void bucket_impl::finish_waiters(boost::system::error_code ec)
{
    // Held places stay until their owners, told through `notify`, give them up.
    auto& queue = serving_if_made()->queue;
    for (auto it = queue.begin(); it != queue.end();) {
        if (it->second.is_hold)
            ++it;
        else
            finish(it++, ec);
    }
}

void bucket_impl::cancel_all()
{
    on_strand([](bucket_impl& b) {
        b.finish_waiters(asio::error::operation_aborted);
        b.pump(clock::now());
    });
    notify(true);
}

void bucket_impl::replan()
{
    // Without a strand nobody waits: a waiter on its way plans with the new configuration.
    on_strand([](bucket_impl& b) {
        b.fail_missed_deadlines();
        b.serving_if_made()->planned = time_point::max(); // force the timer to be set again
        b.pump(clock::now());
    });
    notify(false);
}

void bucket_impl::refund(std::size_t n, time_point now)
{
    core_.refund(n, now);
    if (pending_.load(std::memory_order_acquire) != 0) wake();
}

void bucket_impl::wake()
{
    on_strand([](bucket_impl& b) {
        b.serving_if_made()->planned = time_point::max();
        b.pump(clock::now());
    });
}

void bucket_impl::fail_missed_deadlines()
{
    // Each waiter is served after the tokens of those ahead of it; one whose turn now falls
    // after its deadline is told so at once rather than when it reaches the head.
    auto& queue = serving_if_made()->queue;
    const time_point now = clock::now();
    std::size_t ahead = 0;
    for (auto it = queue.begin(); it != queue.end();) {
        const waiter& w = it->second;
        if (!w.is_hold && w.deadline != time_point::max() && core_.earliest(w.n, now, ahead) > w.deadline) {
            finish(it++, errc::would_exceed_deadline);
            continue;
        }
        ahead += w.n;
        ++it;
    }
}

void bucket_impl::close()
{
    closed_.store(true);
    cancel_all();
}

void bucket_impl::watch(std::weak_ptr<bucket_watcher> w)
{
    serving_state& s = serving();
    std::lock_guard lock{s.watchers_mutex};
    std::erase_if(s.watchers, [](const auto& x) { return x.expired(); });
    s.watchers.push_back(std::move(w));
}

void bucket_impl::unwatch(const bucket_watcher* w)
{
    serving_state* s = serving_if_made();
    if (!s) return;
    std::lock_guard lock{s->watchers_mutex};
    std::erase_if(s->watchers, [w](const auto& x) {
        const auto p = x.lock();
        return !p || p.get() == w;
    });
}

void bucket_impl::notify(bool cancelled)
{
    serving_state* s = serving_if_made();
    if (!s) return; // nobody ever watched
    std::vector<std::shared_ptr<bucket_watcher>> targets;
    {
        std::lock_guard lock{s->watchers_mutex};
        for (const auto& w : s->watchers)
            if (auto p = w.lock()) targets.push_back(std::move(p));
    }
    // Outside the lock: a watcher may unwatch itself from inside.
    for (const auto& t : targets) t->bucket_changed(cancelled);
}

bool try_acquire_now(bucket_impl& impl, std::size_t n) noexcept
{
    if (n == 0) return true;
    if (impl.pending_.load(std::memory_order_relaxed) != 0) return false;
    // An unlimited bucket grants without asking the time (a clock read is half a grant).
    if (impl.core_.is_unlimited()) return true;
    // With no waiter queued, the tokens still queued for are those of places held by bucket_set
    // acquisitions: they stay in the bucket, or a caller that finds a token free the moment it
    // appears would keep the bucket from ever holding a set's n again.
    return impl.core_.try_take(n, clock_now(), impl.pending_tokens_.load(std::memory_order_relaxed));
}

const asio::any_io_executor& executor_of(const bucket_impl& impl) noexcept { return impl.executor_; }

void initiate_acquire(const std::shared_ptr<bucket_impl>& impl, acquire_handler handler, std::size_t n,
                      std::chrono::steady_clock::time_point deadline)
{
    impl->initiate(std::move(handler), n, deadline);
}

} // namespace detail

token_bucket::token_bucket(const executor_type& ex, rate r, std::size_t burst)
    // One allocation with its control block: a weak reference left in a cancellation slot
    // pins only the small idle part (the serving state goes with the last strong reference).
    : impl_(std::make_shared<detail::bucket_impl>(ex, r, burst))
{
}

token_bucket::~token_bucket()
{
    if (impl_) impl_->close();
}

token_bucket::executor_type token_bucket::get_executor() const noexcept { return impl_->executor_; }

bool token_bucket::try_acquire(std::size_t n) noexcept { return detail::try_acquire_now(*impl_, n); }

void token_bucket::cancel() { impl_->cancel_all(); }

void token_bucket::release(std::size_t n)
{
    if (n != 0) impl_->refund(n, clock::now());
}

void token_bucket::set_rate(rate r)
{
    impl_->core_.set_rate(r, clock::now());
    impl_->replan();
}

void token_bucket::set_burst(std::size_t burst)
{
    impl_->core_.set_burst(burst, clock::now());
    impl_->replan();
}

rate token_bucket::current_rate() const noexcept { return impl_->core_.current_rate(); }

std::size_t token_bucket::burst() const noexcept { return impl_->core_.burst(); }

double token_bucket::available() const noexcept { return impl_->core_.available(clock::now()); }

token_bucket::time_point token_bucket::next_available(std::size_t n) const noexcept
{
    return impl_->core_.earliest(n, clock::now(), impl_->pending_tokens_.load(std::memory_order_relaxed));
}

std::size_t token_bucket::waiters() const noexcept { return impl_->pending_.load(std::memory_order_acquire); }

bucket_core& token_bucket::core() noexcept { return impl_->core_; }

} // namespace valve
