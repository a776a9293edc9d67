#include <valve/bucket_set.hpp>

#include "detail/bucket_impl.hpp"
#include "detail/cancellation.hpp"

#include <valve/detail/saturate.hpp>
#include <valve/error.hpp>

#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/execution/outstanding_work.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/prefer.hpp>

#include <algorithm>
#include <string>

namespace asio = boost::asio;

namespace valve {

namespace detail {

struct bucket_set_state {
    std::vector<std::shared_ptr<bucket_impl>> buckets;
    asio::any_io_executor executor;
};

namespace {

using time_point = std::chrono::steady_clock::time_point;
using bucket_list = std::vector<std::shared_ptr<bucket_impl>>;

// Re-check this often while some bucket's rate is zero and no change has been announced.
constexpr std::chrono::seconds zero_rate_poll{1};

bool exceeds_burst(const bucket_impl& b, std::size_t n) noexcept
{
    return n > b.core_.burst() && !b.core_.current_rate().is_unlimited();
}

bool any_queued(const bucket_list& buckets) noexcept
{
    return std::any_of(buckets.begin(), buckets.end(),
                       [](const auto& b) { return b->pending_.load(std::memory_order_acquire) != 0; });
}

// Takes n from every bucket at `now`, or from none; with `keep_held`, only where that leaves
// the tokens of the places held in the bucket's queue (for a caller that does not queue). A
// bucket whose tokens were taken and given back may have a waiter that missed them meanwhile:
// it is woken to plan again.
bool take_all(const bucket_list& buckets, std::size_t n, time_point now, bool keep_held = false) noexcept
{
    const auto take = [&](bucket_impl& b) {
        return b.core_.try_take(n, now, keep_held ? b.pending_tokens_.load(std::memory_order_relaxed) : 0);
    };
    std::size_t taken = 0;
    while (taken < buckets.size() && take(*buckets[taken])) ++taken;
    if (taken == buckets.size()) return true;
    while (taken > 0) buckets[--taken]->refund(n, now);
    return false;
}

// When n tokens could be taken from every bucket, behind the tokens queued on each (less
// `mine`, the acquisition's own place there).
time_point earliest_all(const bucket_list& buckets, std::size_t n, time_point now, std::size_t mine = 0) noexcept
{
    auto due = now;
    for (const auto& b : buckets) {
        const std::size_t queued = b->pending_tokens_.load(std::memory_order_relaxed);
        due = std::max(due, b->core_.earliest(n, now, queued - std::min(queued, mine)));
    }
    return due;
}

class acquire_all_op final : public bucket_watcher, public std::enable_shared_from_this<acquire_all_op> {
public:
    acquire_all_op(std::shared_ptr<const bucket_set_state> set, acquire_handler handler, std::size_t n,
                   time_point deadline)
        : set_(std::move(set)), strand_(asio::make_strand(set_->executor)), timer_(strand_),
          work_(asio::prefer(asio::get_associated_executor(handler, set_->executor),
                             asio::execution::outstanding_work.tracked)),
          handler_(std::move(handler)), n_(n), deadline_(deadline)
    {
    }

    void start()
    {
        auto slot = asio::get_associated_cancellation_slot(handler_);
        if (slot.is_connected()) slot.template emplace<cancel_handler>(weak_from_this());
        const auto& buckets = set_->buckets;
        // An acquisition that can never be served holds no place: it would only keep tokens
        // from others (try_acquire leaves held tokens in the bucket) until it failed.
        for (const auto& b : buckets)
            if (exceeds_burst(*b, n_)) {
                asio::post(strand_, [self = shared_from_this()] { self->complete(errc::exceeds_burst); });
                return;
            }
        places_.reserve(buckets.size());
        for (std::size_t i = 0; i < buckets.size(); ++i) {
            buckets[i]->watch(weak_from_this());
            // The acquisition's place in each queue: waiters that come later line up behind it.
            places_.push_back(buckets[i]->hold(n_, weak_from_this()));
        }
        asio::post(strand_, [self = shared_from_this()] { self->step(); });
    }

    void bucket_changed(bool cancelled) override
    {
        asio::post(strand_, [self = shared_from_this(), cancelled] {
            if (cancelled) self->cancelled_ = true;
            self->wake(); // step again now, with the new rates
        });
    }

    void turn_reached() override
    {
        asio::post(strand_, [self = shared_from_this()] {
            ++self->turns_;
            self->wake();
        });
    }

private:
    struct cancel_handler {
        explicit cancel_handler(std::weak_ptr<acquire_all_op> o) : op(std::move(o)) {}

        std::weak_ptr<acquire_all_op> op;

        void operator()(asio::cancellation_type type) const
        {
            if (!cancels_waiting(type)) return; // nothing is held while waiting
            if (auto self = op.lock())
                asio::post(self->strand_, [self] {
                    self->cancelled_ = true;
                    self->wake();
                });
        }
    };

    void step()
    {
        if (done_) return;
        if (cancelled_) return complete(asio::error::operation_aborted);
        const auto& buckets = set_->buckets;
        for (const auto& b : buckets)
            if (exceeds_burst(*b, n_)) return complete(errc::exceeds_burst);
        const auto now = std::chrono::steady_clock::now();
        // The waiters queued ahead of the set's place in each bucket go first; waiters that came
        // later are planned behind its tokens, so it is not starved by a stream of small ones.
        const bool my_turn = turns_ == buckets.size();
        if (my_turn && take_all(buckets, n_, now)) return complete({});
        auto due = earliest_all(buckets, n_, now, n_);
        if (due > deadline_) return complete(errc::would_exceed_deadline);
        if (!my_turn) {
            // Waiting for the last queue to reach its place (`turn_reached`), or the deadline.
            if (now >= deadline_) return complete(errc::would_exceed_deadline);
            due = deadline_;
        } else if (due == time_point::max())
            due = saturating_add(now, zero_rate_poll);
        // The timer's wait also keeps this operation alive; a bucket holds it only weakly.
        // `due <= now` means another caller took what we were about to take: plan again after
        // letting it through.
        armed_ = true;
        timer_.expires_at(std::max(due, now));
        timer_.async_wait([self = shared_from_this()](boost::system::error_code) {
            self->armed_ = false;
            self->step();
        });
    }

    // Steps again now: at once if no timer is armed, else by cancelling it.
    void wake()
    {
        if (armed_)
            timer_.cancel();
        else
            step();
    }

    void complete(boost::system::error_code ec)
    {
        done_ = true;
        for (std::size_t i = 0; i < places_.size(); ++i) { // none if it failed at the start
            set_->buckets[i]->unwatch(this);
            set_->buckets[i]->unhold(places_[i]);
        }
        post_completion(std::move(handler_), set_->executor, ec);
    }

    std::shared_ptr<const bucket_set_state> set_;
    asio::strand<asio::any_io_executor> strand_;
    asio::steady_timer timer_;
    asio::any_completion_executor work_;
    acquire_handler handler_;
    std::size_t n_;
    time_point deadline_;
    std::vector<std::uint64_t> places_; // this acquisition's place in each bucket's queue
    std::size_t turns_ = 0;             // queues whose waiters ahead of that place are served
    bool cancelled_ = false;
    bool armed_ = false;
    bool done_ = false;
};

} // namespace

void initiate_acquire_all(const std::shared_ptr<const bucket_set_state>& set, acquire_handler handler,
                          std::size_t n, time_point deadline)
{
    std::make_shared<acquire_all_op>(set, std::move(handler), n, deadline)->start();
}

} // namespace detail

bucket_set::bucket_set(std::initializer_list<std::reference_wrapper<token_bucket>> buckets)
    : bucket_set(std::vector<std::reference_wrapper<token_bucket>>(buckets))
{
}

bucket_set::bucket_set(const std::vector<std::reference_wrapper<token_bucket>>& buckets)
{
    if (buckets.empty())
        detail::throw_error(errc::invalid_argument, "bucket_set: the list of buckets is empty; give at least one");
    auto state = std::make_shared<detail::bucket_set_state>();
    for (token_bucket& b : buckets) {
        const auto same = std::find(state->buckets.begin(), state->buckets.end(), b.impl_);
        if (same != state->buckets.end())
            detail::throw_error(errc::invalid_argument,
                                "bucket_set: buckets " + std::to_string(same - state->buckets.begin()) + " and " +
                                    std::to_string(state->buckets.size()) +
                                    " (from 0) are the same bucket; list each bucket once");
        state->buckets.push_back(b.impl_);
    }
    state->executor = state->buckets.front()->executor_;
    state_ = std::move(state);
}

bucket_set::executor_type bucket_set::get_executor() const noexcept { return state_->executor; }

std::size_t bucket_set::size() const noexcept { return state_->buckets.size(); }

bool bucket_set::try_acquire(std::size_t n) noexcept
{
    if (n == 0) return true;
    if (detail::any_queued(state_->buckets)) return false;
    // Places held by other sets' acquisitions are left their tokens, as token_bucket::try_acquire
    // leaves them.
    return detail::take_all(state_->buckets, n, clock::now(), true);
}

void bucket_set::release(std::size_t n)
{
    if (n == 0) return;
    const auto now = clock::now();
    for (const auto& b : state_->buckets) b->refund(n, now);
}

bucket_set::time_point bucket_set::next_available(std::size_t n) const noexcept
{
    return detail::earliest_all(state_->buckets, n, clock::now());
}

} // namespace valve
