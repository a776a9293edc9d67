#include <valve/token_bucket.hpp>

#include "detail/bucket_impl.hpp"
#include "detail/cancellation.hpp"

#include <valve/error.hpp>

#include <boost/asio/append.hpp>
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/execution/outstanding_work.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/prefer.hpp>

#include <algorithm>
#include <cmath>

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
        if (auto s = self.lock()) asio::post(s->strand_, [s, id = id] { s->on_cancel(id); });
    }
};

bucket_impl::bucket_impl(const asio::any_io_executor& ex, rate r, std::size_t burst)
    : executor_(ex), core_(r, burst, clock::now()), strand_(asio::make_strand(ex))
{
}


void bucket_impl::initiate(acquire_handler handler, std::size_t n, time_point deadline)
{
    // The header has just tried the fast path (try_acquire_now); this is the waiting path.
    if (n > core_.burst() && !core_.current_rate().is_unlimited())
        return post_completion(std::move(handler), executor_, errc::exceeds_burst);
    const time_point now = clock::now();
    if (core_.earliest(n, now, pending_tokens_.load(std::memory_order_relaxed)) > deadline)
        return post_completion(std::move(handler), executor_, errc::would_exceed_deadline);

    pending_.fetch_add(1, std::memory_order_acq_rel);
    pending_tokens_.fetch_add(n, std::memory_order_relaxed);
    const std::uint64_t id = next_id_.fetch_add(1, std::memory_order_relaxed);
    // Installed before the waiter is posted, so a cancellation emitted after this call returns
    // always reaches the strand after the waiter does.
    auto slot = asio::get_associated_cancellation_slot(handler);
    if (slot.is_connected()) slot.template emplace<cancel_handler>(weak_from_this(), id);
    auto work = asio::prefer(asio::get_associated_executor(handler, executor_), asio::execution::outstanding_work.tracked);
    asio::post(strand_, [self = shared_from_this(), id,
                         w = waiter{std::move(handler), std::move(work), n, deadline}]() mutable {
        self->enqueue(id, std::move(w));
    });
}

void bucket_impl::enqueue(std::uint64_t id, waiter w)
{
    if (closed_) {
        pending_.fetch_sub(1, std::memory_order_acq_rel);
        pending_tokens_.fetch_sub(w.n, std::memory_order_relaxed);
        return post_completion(std::move(w.handler), executor_, asio::error::operation_aborted);
    }
    const auto it = queue_.emplace(id, std::move(w)).first;
    // Only a new head changes the plan; others wait their turn behind the armed timer.
    if (it == queue_.begin()) pump(clock::now());
}

void bucket_impl::on_cancel(std::uint64_t id)
{
    const auto it = queue_.find(id);
    if (it == queue_.end()) return; // already completed
    const bool was_head = it == queue_.begin();
    finish(it, asio::error::operation_aborted);
    if (was_head) pump(clock::now());
}

void bucket_impl::finish(std::map<std::uint64_t, waiter>::iterator it, boost::system::error_code ec)
{
    acquire_handler handler(std::move(it->second.handler));
    pending_tokens_.fetch_sub(it->second.n, std::memory_order_relaxed);
    pending_.fetch_sub(1, std::memory_order_acq_rel);
    post_completion(std::move(handler), executor_, ec);
    queue_.erase(it); // releases the work guard only after the completion is posted
}

void bucket_impl::pump(time_point cursor)
{
    const time_point now = clock::now();
    // A timer that fired late grants as of when it was due (at most one token interval back),
    // so wake-up latency does not erode the rate.
    cursor = std::clamp(cursor, now - backdate_limit(core_.current_rate()), now);
    while (!queue_.empty()) {
        const auto it = queue_.begin();
        const waiter& w = it->second;
        if (w.n > core_.burst() && !core_.current_rate().is_unlimited()) {
            finish(it, errc::exceeds_burst);
            continue;
        }
        const time_point due = core_.earliest(w.n, cursor);
        if (due > w.deadline) {
            finish(it, errc::would_exceed_deadline);
            continue;
        }
        if (due <= now) {
            if (core_.try_take(w.n, due) || core_.try_take(w.n, now)) {
                cursor = due;
                finish(it, {});
            }
            // else another taker (a bucket_set) got there first: plan again
            continue;
        }
        if (due == time_point::max()) break; // zero rate: only a rate change can help
        arm(due);
        return;
    }
    planned_ = time_point::max();
    ++timer_generation_;
    if (timer_) timer_->cancel();
}

void bucket_impl::arm(time_point t)
{
    if (t == planned_) return; // the timer is already set for this moment
    planned_ = t;
    const std::uint64_t generation = ++timer_generation_;
    if (!timer_) timer_.emplace(strand_);
    timer_->expires_at(t);
    timer_->async_wait([self = shared_from_this(), generation](boost::system::error_code) {
        // Superseded waits (re-planned or cancelled) are ignored by their generation.
        if (generation == self->timer_generation_) self->pump(self->planned_);
    });
}

void bucket_impl::cancel_all()
{
    asio::post(strand_, [self = shared_from_this()] {
        while (!self->queue_.empty()) self->finish(self->queue_.begin(), asio::error::operation_aborted);
        self->pump(clock::now());
    });
    notify(true);
}

void bucket_impl::replan()
{
    asio::post(strand_, [self = shared_from_this()] {
        self->fail_missed_deadlines();
        self->planned_ = time_point::max(); // force the timer to be set again
        self->pump(clock::now());
    });
    notify(false);
}

void bucket_impl::wake()
{
    asio::post(strand_, [self = shared_from_this()] {
        self->planned_ = time_point::max();
        self->pump(clock::now());
    });
}

void bucket_impl::fail_missed_deadlines()
{
    // Each waiter is served after the tokens of those ahead of it; one whose turn now falls
    // after its deadline is told so at once rather than when it reaches the head.
    const time_point now = clock::now();
    std::size_t ahead = 0;
    for (auto it = queue_.begin(); it != queue_.end();) {
        const waiter& w = it->second;
        if (w.deadline != time_point::max() && core_.earliest(w.n, now, ahead) > w.deadline) {
            finish(it++, errc::would_exceed_deadline);
            continue;
        }
        ahead += w.n;
        ++it;
    }
}

void bucket_impl::close()
{
    asio::post(strand_, [self = shared_from_this()] {
        self->closed_ = true;
        while (!self->queue_.empty()) self->finish(self->queue_.begin(), asio::error::operation_aborted);
        self->pump(clock::now());
    });
    notify(true);
}

void bucket_impl::watch(std::weak_ptr<bucket_watcher> w)
{
    std::lock_guard lock{watchers_mutex_};
    std::erase_if(watchers_, [](const auto& x) { return x.expired(); });
    watchers_.push_back(std::move(w));
}

void bucket_impl::unwatch(const bucket_watcher* w)
{
    std::lock_guard lock{watchers_mutex_};
    std::erase_if(watchers_, [w](const auto& x) {
        const auto p = x.lock();
        return !p || p.get() == w;
    });
}

void bucket_impl::notify(bool cancelled)
{
    std::vector<std::shared_ptr<bucket_watcher>> targets;
    {
        std::lock_guard lock{watchers_mutex_};
        for (const auto& w : watchers_)
            if (auto p = w.lock()) targets.push_back(std::move(p));
    }
    // Outside the lock: a watcher may unwatch itself from inside.
    for (const auto& t : targets) t->bucket_changed(cancelled);
}

bool try_acquire_now(bucket_impl& impl, std::size_t n) noexcept
{
    return n == 0 || (impl.pending_.load(std::memory_order_relaxed) == 0 && impl.core_.try_take(n, clock_now()));
}

const asio::any_io_executor& executor_of(const bucket_impl& impl) noexcept { return impl.executor_; }

void initiate_acquire(const std::shared_ptr<bucket_impl>& impl, acquire_handler handler, std::size_t n,
                      std::chrono::steady_clock::time_point deadline)
{
    impl->initiate(std::move(handler), n, deadline);
}

} // namespace detail

token_bucket::token_bucket(const executor_type& ex, rate r, std::size_t burst)
    : impl_(new detail::bucket_impl(ex, r, burst)) // not make_shared: weak references left in
                                                  // cancellation slots must not pin the memory
{
}

token_bucket::~token_bucket()
{
    if (impl_) impl_->close();
}

token_bucket::executor_type token_bucket::get_executor() const noexcept { return impl_->executor_; }

bool token_bucket::try_acquire(std::size_t n) noexcept { return detail::try_acquire_now(*impl_, n); }

void token_bucket::cancel() { impl_->cancel_all(); }

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
