#include "connection.hpp"
#include "gcra.hpp"

#include "../detail/cancellation.hpp"

#include <valve/detail/saturate.hpp>

#include <valve/error.hpp>
#include <valve/log.hpp>
#include <valve/redis.hpp>

#include <boost/asio/append.hpp>
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <deque>
#include <list>
#include <mutex>
#include <utility>

namespace valve {

namespace asio = boost::asio;
using boost::system::error_code;

namespace detail {

/// Limits held in Redis: the resource behind `redis_bucket` and behind every profile
/// `stored_in(redis)`.
///
/// Local waiters queue first come, first served. One script call is in flight at a time: it
/// gives back the tokens of cancelled slots and reserves slots for up to `batch` queued
/// waiters; each then sleeps until its slot on one timer (the earliest slot's). When the
/// connection fails, waiters still without a slot are settled by the failure policy at once.
///
/// With a stock, the same call also takes up to `stock` single tokens that Redis has now, for
/// `try_acquire` to hand out with no I/O. A stocked token unused for `stock_hold` is given back
/// and never handed out: every token used was taken from Redis at most `stock_hold` earlier, so
/// the fleet gets at most rate x stock_hold tokens more in a window than the key allows.
///
/// Thread safety: every member may be called from any thread; state is under `mutex_`, and
/// nothing waits or completes a handler inline while holding it (completions are posted).
class redis_limits final : public resource, public std::enable_shared_from_this<redis_limits> {
public:
    redis_limits(std::shared_ptr<redis_connection_impl> conn, std::vector<gcra_limit> limits,
                 std::vector<store_limit> given, store_failure policy, std::size_t instances, std::size_t batch,
                 std::size_t stock, std::chrono::nanoseconds stock_hold)
        : conn_(std::move(conn)),
          limits_(std::make_shared<const std::vector<gcra_limit>>(std::move(limits))),
          given_(std::move(given)),
          policy_(policy),
          instances_(instances),
          batch_(batch),
          stock_target_(stock),
          stock_hold_(stock_hold),
          timer_(conn_->executor()),
          stock_timer_(conn_->executor())
    {
        if (policy_ == store_failure::fail_local) make_fallback();
    }

    ~redis_limits() override { close(); }

    asio::any_io_executor get_executor() const { return conn_->executor(); }

    bool try_acquire(std::size_t n) override
    {
        if (n == 0) return true;
        if (conn_->failing()) {
            switch (policy_) {
            case store_failure::fail_open:
                return true;
            case store_failure::fail_local:
                return fallback_->try_acquire(n);
            case store_failure::fail_closed:
                return false;
            }
        }
        if (stock_target_ == 0) return false; // no I/O here: only Redis grants tokens
        std::unique_lock lock{mutex_};
        if (closed_) return false;
        const bool ok = take_from_stock(n, clock::now());
        if (ok) try_granted_.fetch_add(1, std::memory_order_relaxed);
        kick(lock);
        return ok;
    }

    void async_acquire(std::size_t n, acquire_handler h) override { start(n, time_point::max(), std::move(h)); }

    void start(std::size_t n, time_point deadline, acquire_handler h)
    {
        if (std::any_of(given_.begin(), given_.end(), [&](const store_limit& l) { return n > l.burst; }))
            return post(std::move(h), errc::exceeds_burst);
        if (n == 0) return post(std::move(h), {});
        std::unique_lock lock{mutex_};
        if (closed_) return post(std::move(h), asio::error::operation_aborted);
        const std::uint64_t id = ++next_id_;
        // Installed here, on the caller's thread, and never replaced: a cancellation always
        // comes to cancel(id), whichever list (or the local fallback) holds the waiter then.
        auto slot = asio::get_associated_cancellation_slot(h);
        if (slot.is_connected()) slot.template emplace<cancel_handler>(weak_from_this(), id);
        if (conn_->failing()) return settle(lock, waiter{std::move(h), n, deadline, id}, errc::store_unavailable);
        if (stock_target_ > 0 && take_from_stock(n, clock::now())) { // nobody ahead, and tokens at hand
            granted_.fetch_add(1, std::memory_order_relaxed);
            kick(lock);
            return post(std::move(h), {});
        }
        queue_.push_back(waiter{std::move(h), n, deadline, id});
        kick(lock);
    }

    time_point next_available(std::size_t n) const override
    {
        std::lock_guard lock{mutex_};
        const auto now = clock::now();
        std::size_t ahead = 0;
        for (const auto& w : queue_) ahead += w.n;
        for (const auto& w : asking_) ahead += w.n;
        const double have = tokens_at(now) - static_cast<double>(ahead) - static_cast<double>(n);
        if (have >= 0) {
            if (slotted_.empty()) return now;
            return std::max(now, slotted_.back().ready);
        }
        const auto gap = std::chrono::nanoseconds(static_cast<std::int64_t>(-have * interval_ns()));
        return now + gap;
    }

    void release(std::size_t n) override
    {
        if (n == 0) return;
        std::unique_lock lock{mutex_};
        give_back_ += n;
        kick(lock);
    }

    double available() const override
    {
        std::lock_guard lock{mutex_};
        return tokens_at(clock::now());
    }

    bool full() const override
    {
        // The limit lives in Redis: dropping this local face loses nothing while it has no
        // waiter, and its local fallback (if any) is full.
        std::lock_guard lock{mutex_};
        return queue_.empty() && asking_.empty() && slotted_.empty() && local_.empty() && !in_flight_ &&
               give_back_ == 0 && stock_count_ == 0 && (!fallback_ || fallback_->full());
    }

    void set_rate(rate r) override
    {
        const auto interval = gcra_interval_of(r, given_.front().burst, "redis_bucket::set_rate");
        std::lock_guard lock{mutex_};
        auto changed = std::make_shared<std::vector<gcra_limit>>(*limits_); // calls in flight keep theirs
        changed->front().interval = interval;
        limits_ = std::move(changed);
        given_.front().limit = r;
        if (fallback_) fallback_->set_rate(local_rate(r));
    }

    redis_bucket_stats stats() const noexcept
    {
        return {calls_.load(), granted_.load(), given_back_.load(), store_failures_.load(), stocked_.load(),
                try_granted_.load()};
    }

    /// Aborts every local waiter and gives their slots back.
    void close()
    {
        std::vector<waiter> done;
        std::uint64_t give = 0;
        std::vector<std::string> args;
        {
            std::lock_guard lock{mutex_};
            if (closed_) return;
            closed_ = true;
            timer_.cancel();
            stock_timer_.cancel();
            for (auto* list : {&queue_, &slotted_}) {
                for (auto& w : *list) {
                    if (list == &slotted_) give += w.n;
                    done.push_back(std::move(w));
                }
                list->clear();
            }
            for (auto& w : asking_)
                if (w.handler) done.push_back(std::move(w));
            give += give_back_ + stock_count_;
            give_back_ = 0;
            stock_.clear();
            stock_count_ = 0;
            if (give > 0) args = gcra_args(*limits_, give, {});
            for (auto& l : local_) l.signal.emit(asio::cancellation_type::terminal);
        }
        for (auto& w : done) post(std::move(w.handler), asio::error::operation_aborted);
        if (give > 0) {
            given_back_.fetch_add(give, std::memory_order_relaxed);
            conn_->exec(std::move(args), &gcra_script(), redis_exec_handler([](error_code, redis_reply) {}));
        }
    }

private:
    struct waiter {
        acquire_handler handler; // empty once completed (a cancelled waiter whose slot is asked for)
        std::size_t n = 1;
        time_point deadline = time_point::max();
        std::uint64_t id = 0;
        time_point ready{};
    };

    struct cancel_handler {
        cancel_handler(std::weak_ptr<redis_limits> s, std::uint64_t i) : self(std::move(s)), id(i) {}
        std::weak_ptr<redis_limits> self;
        std::uint64_t id;
        void operator()(asio::cancellation_type type) const
        {
            if (!cancels_waiting(type)) return;
            if (auto s = self.lock()) s->cancel(id);
        }
    };

    void post(acquire_handler h, error_code ec) const
    {
        asio::post(conn_->executor(), asio::append(std::move(h), ec));
    }

    rate local_rate(const rate& r) const
    {
        return rate::per(r.count() / static_cast<double>(instances_), r.period());
    }

    void make_fallback()
    {
        const auto burst = [&](std::size_t b) { return std::max<std::size_t>(1, b / instances_); };
        fallback_burst_ = burst(given_.front().burst);
        fallback_ = std::make_unique<bucket_resource>(conn_->executor(), local_rate(given_.front().limit),
                                                      fallback_burst_);
        for (std::size_t i = 1; i < given_.size(); ++i) {
            fallback_->also_limit(local_rate(given_[i].limit), burst(given_[i].burst));
            fallback_burst_ = std::min(fallback_burst_, burst(given_[i].burst));
        }
    }

    double interval_ns() const
    {
        const auto& i = limits_->front().interval;
        return (static_cast<double>(i.q) + static_cast<double>(i.r) / static_cast<double>(i.d)) * 1000.0;
    }

    // Estimated tokens of the first limit at `now`, from the last reply (under the lock).
    double tokens_at(time_point now) const
    {
        const double burst = static_cast<double>(given_.front().burst);
        if (!last_reply_) return burst;
        const double free_ns =
            static_cast<double>(last_free_us_) * 1000.0 + static_cast<double>((now - *last_reply_).count());
        return std::min(burst, free_ns / interval_ns());
    }

    // Settles an acquisition the store could not decide, by the policy (under the lock). A
    // closed connection decides nothing: the waiter is aborted, whatever the policy.
    void settle(std::unique_lock<std::mutex>&, waiter w, error_code ec)
    {
        if (ec == asio::error::operation_aborted) return post(std::move(w.handler), ec);
        store_failures_.fetch_add(1, std::memory_order_relaxed);
        switch (policy_) {
        case store_failure::fail_open:
            return post(std::move(w.handler), {});
        case store_failure::fail_closed:
            return post(std::move(w.handler), ec);
        case store_failure::fail_local:
            break;
        }
        // The local bucket waits under a cancellation signal of ours, emitted by cancel(id)
        // under the lock: the caller's own slot keeps our handler (no foreign-thread emplace).
        local_.emplace_back(w.id);
        auto& l = local_.back();
        const std::size_t n = std::min(w.n, fallback_burst_);
        // The fallback's queue holds this handler: it holds the limits weakly (no cycle).
        fallback_->async_acquire(
            n, acquire_handler(asio::bind_cancellation_slot(
                   l.signal.slot(), [weak = weak_from_this(), ex = conn_->executor(), id = w.id,
                                     h = std::move(w.handler)](error_code e) mutable {
                       if (auto self = weak.lock()) self->local_done(id);
                       asio::post(ex, asio::append(std::move(h), e));
                   })));
    }

    void local_done(std::uint64_t id)
    {
        std::lock_guard lock{mutex_};
        local_.remove_if([id](const local_waiter& l) { return l.id == id; });
    }

    void cancel(std::uint64_t id)
    {
        std::unique_lock lock{mutex_};
        const auto match = [id](const waiter& w) { return w.id == id; };
        if (auto it = std::find_if(queue_.begin(), queue_.end(), match); it != queue_.end()) {
            auto h = std::move(it->handler);
            queue_.erase(it);
            lock.unlock();
            return post(std::move(h), asio::error::operation_aborted);
        }
        if (auto it = std::find_if(asking_.begin(), asking_.end(), match); it != asking_.end()) {
            if (!it->handler) return;
            auto h = std::move(it->handler); // leaves it empty: its slot, if granted, is given back on the reply
            lock.unlock();
            return post(std::move(h), asio::error::operation_aborted);
        }
        if (auto it = std::find_if(slotted_.begin(), slotted_.end(), match); it != slotted_.end()) {
            auto h = std::move(it->handler);
            give_back_ += it->n;
            slotted_.erase(it);
            kick(lock);
            lock.unlock();
            return post(std::move(h), asio::error::operation_aborted);
        }
        for (auto& l : local_)
            if (l.id == id) return l.signal.emit(asio::cancellation_type::terminal);
    }

    // Sends the next script call if none is in flight and there is something to ask or give
    // back (under the lock, which it keeps).
    void kick(std::unique_lock<std::mutex>&)
    {
        if (in_flight_ || closed_) return;
        const auto now = clock::now();
        drop_stale(now);
        const bool ask_stock = wants_stock(now);
        if (queue_.empty() && give_back_ == 0 && !ask_stock) return;
        std::vector<gcra_ask> asks;
        while (!queue_.empty() && asks.size() < batch_) {
            auto& w = queue_.front();
            // A deadline already past still takes a slot that is now, as token_bucket grants
            // tokens it holds whatever the deadline.
            std::int64_t max_wait = gcra_no_deadline;
            if (w.deadline <= now)
                max_wait = 0;
            else if (w.deadline != time_point::max())
                max_wait = std::min<std::int64_t>(
                    std::chrono::duration_cast<std::chrono::microseconds>(w.deadline - now).count(), gcra_no_deadline);
            asks.push_back({w.n, max_wait});
            asking_.splice(asking_.end(), queue_, queue_.begin());
        }
        // Tokens for the stock, one at a time and only if Redis has them now (max_wait 0).
        stock_asked_ = 0;
        if (ask_stock) {
            stock_asked_ = std::min(stock_target_ - stock_count_, batch_ - asks.size());
            if (stock_asked_ > 0) stock_wanted_ = false; // else the batch is full: asked next time
            for (std::size_t i = 0; i < stock_asked_; ++i) asks.push_back({1, 0});
            stock_call_at_ = now;
        }
        const std::uint64_t give = give_back_;
        give_back_ = 0;
        if (give > 0) given_back_.fetch_add(give, std::memory_order_relaxed);
        in_flight_ = true;
        calls_.fetch_add(1, std::memory_order_relaxed);
        auto args = gcra_args(*limits_, give, asks);
        conn_->exec(std::move(args), &gcra_script(),
                    // Held by the connection while in flight: weakly, so that the two never keep
                    // each other alive (the limits' destructor aborts its waiters).
                    redis_exec_handler([weak = weak_from_this(), conn = std::weak_ptr<redis_connection_impl>(conn_),
                                        limits = limits_, asks = std::move(asks)](error_code ec, redis_reply r) {
                        if (auto self = weak.lock()) return self->on_reply(ec, r, asks.size());
                        give_back_orphaned(conn, *limits, asks, ec, r);
                    }),
                    true);
    }

    // The limits were destroyed while a call was in flight: what Redis granted in it (slots of
    // the waiters their close() aborted, tokens for the stock) goes back, as close() gives back
    // what the limits held. A call that failed took what it took.
    static void give_back_orphaned(const std::weak_ptr<redis_connection_impl>& conn, const std::vector<gcra_limit>& limits,
                                   const std::vector<gcra_ask>& asks, error_code ec, const redis_reply& reply)
    {
        if (ec) return;
        const auto result = gcra_parse(reply, asks.size());
        if (!result) return;
        std::uint64_t give = 0;
        for (std::size_t i = 0; i < asks.size(); ++i)
            if (result->waits[i] >= 0) give += asks[i].n;
        if (give == 0) return;
        if (auto c = conn.lock())
            c->exec(gcra_args(limits, give, {}), &gcra_script(), redis_exec_handler([](error_code, redis_reply) {}));
    }

    void on_reply(error_code ec, const redis_reply& reply, std::size_t count)
    {
        std::vector<std::pair<acquire_handler, error_code>> done;
        {
            std::unique_lock lock{mutex_};
            in_flight_ = false;
            const auto now = clock::now();
            auto result = ec ? std::nullopt : gcra_parse(reply, count);
            if (!result) {
                error_code failure = ec ? ec : error_code{errc::store_error};
                // A reply that says Redis cannot serve now is an outage, not a fault of ours.
                if (!ec && reply.type == redis_reply::kind::error &&
                    (reply.str.starts_with("LOADING") || reply.str.starts_with("BUSY") ||
                     reply.str.starts_with("MASTERDOWN") || reply.str.starts_with("TRYAGAIN")))
                    failure = errc::store_unavailable;
                if (failure == errc::store_error && !logged_script_error_) {
                    logged_script_error_ = true;
                    if (auto l = logger(); l->should_log(spdlog::level::err))
                        l->error("valve: redis {}: valve's script failed: {}", conn_->where(),
                                 reply.type == redis_reply::kind::error ? reply.str : "a reply of another shape");
                }
                // No stock asks until a while later (the hold, from 10 ms to 1 s): a failing Redis
                // is not asked again and again, and a long hold does not turn the stock off.
                if (stock_asked_ > 0)
                    stock_retry_at_ = now + std::clamp(stock_hold_, std::chrono::nanoseconds(10'000'000),
                                                       std::chrono::nanoseconds(1'000'000'000));
                // Their fate in Redis is unknown: what they may have taken stays taken.
                for (auto& w : asking_)
                    if (w.handler) settle(lock, std::move(w), failure);
                asking_.clear();
                if (ec) { // the connection is down: every queued waiter would fail the same way
                    for (auto& w : queue_) settle(lock, std::move(w), failure);
                    queue_.clear();
                }
            } else {
                last_free_us_ = result->free_us;
                last_reply_ = now;
                std::size_t i = 0;
                for (auto& w : asking_) {
                    const std::int64_t wait = result->waits[i++];
                    if (!w.handler) { // cancelled while asked for
                        if (wait >= 0) give_back_ += w.n;
                        continue;
                    }
                    // The deadline was measured from the call; the slot counts from the reply
                    // (a slot that is now is granted, as above).
                    if (wait < 0 || (wait > 0 && now + std::chrono::microseconds(wait) > w.deadline)) {
                        if (wait >= 0) give_back_ += w.n;
                        done.emplace_back(std::move(w.handler), errc::would_exceed_deadline);
                        continue;
                    }
                    granted_.fetch_add(1, std::memory_order_relaxed);
                    if (wait == 0) {
                        done.emplace_back(std::move(w.handler), error_code{});
                        continue;
                    }
                    w.ready = now + std::chrono::microseconds(wait);
                    auto at = std::find_if(slotted_.begin(), slotted_.end(),
                                           [&](const waiter& s) { return s.ready > w.ready; });
                    slotted_.insert(at, std::move(w));
                }
                asking_.clear();
                take_stock(lock, *result, i, now);
                arm(lock);
            }
            stock_asked_ = 0;
            if (!closed_) {
                kick(lock);
            } else if (give_back_ > 0) { // slots granted after close() to waiters it aborted
                given_back_.fetch_add(give_back_, std::memory_order_relaxed);
                conn_->exec(gcra_args(*limits_, std::exchange(give_back_, 0), {}), &gcra_script(),
                            redis_exec_handler([](error_code, redis_reply) {}));
            }
        }
        for (auto& [h, e] : done) post(std::move(h), e);
    }

    // Stocks the tokens Redis granted for the stock (results from index `i` on), or, if it had
    // none, notes when it will (under the lock).
    void take_stock(std::unique_lock<std::mutex>& lock, const gcra_result& result, std::size_t i, time_point now)
    {
        std::size_t got = 0;
        for (std::size_t j = 0; j < stock_asked_; ++j) {
            const std::int64_t wait = result.waits[i + j];
            if (wait < 0) { // and so are the rest: the key has no more now
                stock_retry_at_ = now + std::chrono::microseconds(-1 - wait);
                break;
            }
            ++got;
        }
        if (got == 0) return;
        stocked_.fetch_add(got, std::memory_order_relaxed);
        if (closed_) { // after close(): back at once
            give_back_ += got;
            return;
        }
        // Counted from the call: the tokens were taken no earlier than that.
        stock_.push_back({got, stock_call_at_});
        stock_count_ += got;
        arm_stock(lock);
    }

    // Arms the stock's timer for the oldest tokens' expiry, if it is not armed (under the lock):
    // tokens nobody uses go back to Redis then, not only with some later call.
    void arm_stock(std::unique_lock<std::mutex>&)
    {
        if (stock_armed_ || stock_.empty() || closed_) return;
        stock_armed_ = true;
        const auto expiry = detail::saturating_add(stock_.front().at, stock_hold_);
        stock_timer_.expires_at(detail::saturating_add(expiry, std::chrono::milliseconds(1)));
        stock_timer_.async_wait([weak = weak_from_this()](const error_code& ec) {
            if (ec) return;
            if (auto self = weak.lock()) self->on_stock_timer();
        });
    }

    void on_stock_timer()
    {
        std::unique_lock lock{mutex_};
        stock_armed_ = false;
        if (closed_) return;
        drop_stale(clock::now());
        kick(lock); // gives them back; the stock is asked for again only when someone wants it
        arm_stock(lock);
    }

    // Whether a call should ask for stock: someone looked for it since the last ask, half of
    // it is used, and the key had tokens to spare when last asked (under the lock). With no
    // one asking, an expired stock is only given back, not taken again.
    bool wants_stock(time_point now)
    {
        if (stock_count_ > stock_target_ / 2) stock_wanted_ = false;
        return stock_wanted_ && !closed_ && now >= stock_retry_at_;
    }

    // Takes `n` stocked tokens if no waiter is ahead, queued, asking or asleep until its slot
    // (under the lock): the stock never overtakes them.
    bool take_from_stock(std::size_t n, time_point now)
    {
        drop_stale(now);
        if (n > stock_target_ || !queue_.empty() || !slotted_.empty()) return false;
        if (std::any_of(asking_.begin(), asking_.end(), [](const waiter& w) { return static_cast<bool>(w.handler); }))
            return false;
        stock_wanted_ = true; // a demand the stock could serve: wants_stock() decides on asking
        if (stock_count_ < n) return false;
        for (std::size_t left = n; left > 0;) {
            auto& front = stock_.front();
            const std::size_t k = std::min(left, front.n);
            front.n -= k;
            left -= k;
            if (front.n == 0) stock_.pop_front();
        }
        stock_count_ -= n;
        return true;
    }

    // Gives back stocked tokens held longer than stock_hold (under the lock).
    void drop_stale(time_point now)
    {
        while (!stock_.empty() && now - stock_.front().at > stock_hold_) {
            give_back_ += stock_.front().n;
            stock_count_ -= stock_.front().n;
            stock_.pop_front();
        }
    }

    // Arms the timer for the earliest slot (under the lock).
    void arm(std::unique_lock<std::mutex>&)
    {
        if (slotted_.empty()) return;
        const auto at = slotted_.front().ready;
        if (armed_ && *armed_ <= at) return;
        armed_ = at;
        timer_.expires_at(at);
        timer_.async_wait([weak = weak_from_this()](const error_code& ec) {
            if (ec) return;
            if (auto self = weak.lock()) self->on_timer();
        });
    }

    void on_timer()
    {
        std::vector<acquire_handler> due;
        {
            std::unique_lock lock{mutex_};
            armed_.reset();
            const auto now = clock::now();
            while (!slotted_.empty() && slotted_.front().ready <= now) {
                due.push_back(std::move(slotted_.front().handler));
                slotted_.pop_front();
            }
            arm(lock);
        }
        for (auto& h : due) post(std::move(h), {});
    }

    std::shared_ptr<redis_connection_impl> conn_;
    std::shared_ptr<const std::vector<gcra_limit>> limits_; // replaced, not changed: see set_rate
    std::vector<store_limit> given_;
    store_failure policy_;
    std::size_t instances_;
    std::size_t batch_;
    std::size_t stock_target_;
    std::chrono::nanoseconds stock_hold_;
    std::unique_ptr<bucket_resource> fallback_; // fail_local
    std::size_t fallback_burst_ = 1;              // the least burst of its buckets

    struct local_waiter {
        explicit local_waiter(std::uint64_t i) : id(i) {}
        std::uint64_t id;
        asio::cancellation_signal signal;
    };

    mutable std::mutex mutex_;
    std::list<waiter> queue_;   // not yet asked for
    std::list<waiter> asking_;  // in the script call in flight
    std::list<waiter> slotted_; // granted, asleep until `ready`, earliest first
    std::list<local_waiter> local_; // waiting on the fail_local bucket
    asio::steady_timer timer_;  // for slotted_.front()
    asio::steady_timer stock_timer_; // for the oldest stocked tokens' expiry
    bool stock_armed_ = false;
    std::optional<time_point> armed_;
    bool in_flight_ = false;
    bool closed_ = false;
    bool logged_script_error_ = false;
    std::uint64_t give_back_ = 0;
    std::uint64_t next_id_ = 0;
    std::int64_t last_free_us_ = 0;
    std::optional<time_point> last_reply_;

    struct stocked {
        std::size_t n;
        time_point at; // when the call that took them was made
    };
    std::deque<stocked> stock_; // tokens taken for try_acquire, oldest first
    std::size_t stock_count_ = 0;
    std::size_t stock_asked_ = 0; // stock asks in the call in flight (after its waiters')
    bool stock_wanted_ = false;   // someone looked for stock since the last ask
    time_point stock_retry_at_{}; // the key had no token to spare until then
    time_point stock_call_at_{};

    std::atomic<std::uint64_t> calls_{0}, granted_{0}, given_back_{0}, store_failures_{0}, stocked_{0}, try_granted_{0};
};

namespace {

// Escapes what would change a key's meaning: '%' (the escape), '{' and '}' (a Redis Cluster
// hash tag must be the whole name) and, in the parts of a dedicated name, '/'.
std::string escape(std::string_view s, bool slash)
{
    std::string out;
    for (char c : s) {
        if (c == '%') out += "%25";
        else if (c == '{') out += "%7B";
        else if (c == '}') out += "%7D";
        else if (slash && c == '/') out += "%2F";
        else out += c;
    }
    return out;
}

// valve:{<key>}:<i> for a shared key (the name users give), valve:{<profile>/<user>}:user:<i>
// for a dedicated profile's user: the two never meet, whatever the names.
std::string key_base(const std::string& name, const std::optional<std::string>& user)
{
    if (!user) return "valve:{" + escape(name, false) + "}:";
    return "valve:{" + escape(name, true) + "/" + escape(*user, true) + "}:user:";
}

std::vector<gcra_limit> keyed_limits(const std::string& name, const std::optional<std::string>& user,
                                     const std::vector<store_limit>& limits, std::size_t instances, std::size_t batch,
                                     const std::string& where)
{
    if (name.empty()) throw_error(errc::invalid_argument, where + ": the key is empty; give the limit a name");
    if (limits.empty()) throw_error(errc::invalid_argument, where + ": no limit given");
    if (instances == 0)
        throw_error(errc::invalid_argument, where + ": instances is 0; give the number of processes, at least 1");
    if (batch == 0) throw_error(errc::invalid_argument, where + ": batch is 0; give at least 1");
    std::vector<gcra_limit> keyed;
    const std::string base = key_base(name, user);
    for (std::size_t i = 0; i < limits.size(); ++i)
        keyed.push_back({base + std::to_string(i), gcra_interval_of(limits[i].limit, limits[i].burst, where),
                         limits[i].burst});
    return keyed;
}

// Refuses a stock the limits cannot keep, naming `where`.
void check_stock(std::size_t stock, std::chrono::nanoseconds stock_hold, std::size_t batch, const std::string& where)
{
    if (stock > 0 && stock_hold <= std::chrono::nanoseconds::zero())
        throw_error(errc::invalid_argument, where + ": stock_hold is " + std::to_string(stock_hold.count()) +
                                                " ns; give a positive hold for the stock of " + std::to_string(stock) +
                                                " tokens");
    if (stock > batch)
        throw_error(errc::invalid_argument, where + ": stock is " + std::to_string(stock) + ", more than batch (" +
                                                std::to_string(batch) + "), the most one call takes; lower it");
}

std::shared_ptr<redis_limits> make_limits(const std::shared_ptr<redis_connection_impl>& conn, const std::string& name,
                                          const std::optional<std::string>& user, const std::vector<store_limit>& limits,
                                          store_failure policy, std::size_t instances, std::size_t batch,
                                          const std::string& where, std::size_t stock,
                                          std::chrono::nanoseconds stock_hold)
{
    check_stock(stock, stock_hold, batch, where);
    return std::make_shared<redis_limits>(conn, keyed_limits(name, user, limits, instances, batch, where), limits,
                                          policy, instances, batch, stock, stock_hold);
}

// Waiters one call reserves for, for profiles stored in Redis.
constexpr std::size_t stored_batch = 64;

std::string stored_where(const std::string& shown, const store_request& request)
{
    return "valve: stored_in(" + shown + ") for \"" + request.name + "\"";
}

} // namespace

std::shared_ptr<resource> redis_connection_impl::make_resource(const store_request& request)
{
    return make_limits(shared_from_this(), request.name, request.user, request.limits, request.on_failure,
                       request.instances, stored_batch, stored_where(url_.shown, request), request.stock,
                       request.stock_hold);
}

void redis_connection_impl::check(const store_request& request) const
{
    const auto where = stored_where(url_.shown, request);
    keyed_limits(request.name, request.user, request.limits, request.instances, stored_batch, where);
    check_stock(request.stock, request.stock_hold, stored_batch, where + ": store_stock");
}

} // namespace detail

redis_bucket::redis_bucket(redis_connection& redis, std::string key, rate r, std::size_t burst,
                           redis_bucket_options options)
    : impl_(detail::make_limits(redis.impl_, key, std::nullopt, {{r, burst}}, options.on_failure, options.instances,
                                options.batch, "valve: redis_bucket(\"" + key + "\")", options.stock,
                                detail::saturating_cast<std::chrono::nanoseconds>(options.stock_hold)))
{
}

redis_bucket::~redis_bucket() { impl_->close(); }

redis_bucket::executor_type redis_bucket::get_executor() const noexcept { return impl_->get_executor(); }

void redis_bucket::start_acquire(detail::redis_limits& impl, std::size_t n, time_point deadline,
                                 detail::acquire_handler h)
{
    impl.start(n, deadline, std::move(h));
}

bool redis_bucket::try_acquire(std::size_t n) { return impl_->try_acquire(n); }
void redis_bucket::async_acquire(std::size_t n, detail::acquire_handler handler)
{
    impl_->async_acquire(n, std::move(handler));
}
redis_bucket::time_point redis_bucket::next_available(std::size_t n) const { return impl_->next_available(n); }
void redis_bucket::release(std::size_t n) { impl_->release(n); }
double redis_bucket::available() const { return impl_->available(); }
void redis_bucket::set_rate(rate r) { impl_->set_rate(r); }
redis_bucket_stats redis_bucket::stats() const noexcept { return impl_->stats(); }

} // namespace valve
