#include <valve/bucket_set.hpp>

#include "detail/bucket_impl.hpp"

#include <valve/error.hpp>

#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/execution/outstanding_work.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/prefer.hpp>

#include <algorithm>

namespace asio = boost::asio;

namespace valve {

namespace detail {

namespace {

// Re-check this often while some bucket's rate is zero: only a rate change can help then.
constexpr std::chrono::milliseconds zero_rate_poll{100};

bool exceeds_burst(const bucket_impl& b, std::size_t n) noexcept
{
    return n > b.core_.burst() && !b.core_.current_rate().is_unlimited();
}

// Takes n from every bucket at `now`, or from none.
bool take_all(const std::vector<std::shared_ptr<bucket_impl>>& buckets, std::size_t n,
              std::chrono::steady_clock::time_point now) noexcept
{
    std::size_t taken = 0;
    while (taken < buckets.size() && buckets[taken]->core_.try_take(n, now)) ++taken;
    if (taken == buckets.size()) return true;
    while (taken > 0) buckets[--taken]->core_.refund(n, now);
    return false;
}

std::chrono::steady_clock::time_point earliest_all(const std::vector<std::shared_ptr<bucket_impl>>& buckets,
                                                   std::size_t n, std::chrono::steady_clock::time_point now) noexcept
{
    auto due = now;
    for (const auto& b : buckets)
        due = std::max(due, b->core_.earliest(n, now, b->pending_tokens_.load(std::memory_order_relaxed)));
    return due;
}

class acquire_all_op : public std::enable_shared_from_this<acquire_all_op> {
public:
    acquire_all_op(std::vector<std::shared_ptr<bucket_impl>> buckets, const asio::any_io_executor& ex,
                   acquire_handler handler, std::size_t n, std::chrono::steady_clock::time_point deadline)
        : buckets_(std::move(buckets)), executor_(ex), strand_(asio::make_strand(ex)), timer_(strand_),
          work_(asio::prefer(asio::get_associated_executor(handler, ex), asio::execution::outstanding_work.tracked)),
          handler_(std::move(handler)), n_(n), deadline_(deadline)
    {
    }

    void start()
    {
        auto slot = asio::get_associated_cancellation_slot(handler_);
        if (slot.is_connected()) slot.template emplace<cancel_handler>(weak_from_this());
        asio::post(strand_, [self = shared_from_this()] { self->step(); });
    }

private:
    struct cancel_handler {
        explicit cancel_handler(std::weak_ptr<acquire_all_op> o) : op(std::move(o)) {}

        std::weak_ptr<acquire_all_op> op;
        void operator()(asio::cancellation_type type) const
        {
            // Nothing is held while waiting, so every kind of cancellation is safe to honour.
            constexpr auto honoured = asio::cancellation_type::terminal | asio::cancellation_type::partial
                                      | asio::cancellation_type::total;
            if ((type & honoured) == asio::cancellation_type::none) return;
            if (auto self = op.lock())
                asio::post(self->strand_, [self] {
                    self->cancelled_ = true;
                    self->timer_.cancel();
                });
        }
    };

    void step()
    {
        if (done_) return;
        if (cancelled_) return complete(asio::error::operation_aborted);
        for (const auto& b : buckets_)
            if (exceeds_burst(*b, n_)) return complete(errc::exceeds_burst);
        const auto now = std::chrono::steady_clock::now();
        if (take_all(buckets_, n_, now)) return complete({});
        auto due = earliest_all(buckets_, n_, now);
        if (due > deadline_) return complete(errc::would_exceed_deadline);
        if (due == std::chrono::steady_clock::time_point::max()) due = now + zero_rate_poll;
        // `due <= now` means another caller took what we were about to take: plan again after
        // letting it through.
        timer_.expires_at(std::max(due, now));
        timer_.async_wait([self = shared_from_this()](boost::system::error_code) { self->step(); });
    }

    void complete(boost::system::error_code ec)
    {
        done_ = true;
        post_completion(std::move(handler_), executor_, ec);
    }

    std::vector<std::shared_ptr<bucket_impl>> buckets_;
    asio::any_io_executor executor_;
    asio::strand<asio::any_io_executor> strand_;
    asio::steady_timer timer_;
    asio::any_completion_executor work_;
    acquire_handler handler_;
    std::size_t n_;
    std::chrono::steady_clock::time_point deadline_;
    bool cancelled_ = false;
    bool done_ = false;
};

} // namespace

void initiate_acquire_all(const std::vector<std::shared_ptr<bucket_impl>>& buckets, const asio::any_io_executor& ex,
                          acquire_handler handler, std::size_t n, std::chrono::steady_clock::time_point deadline)
{
    std::make_shared<acquire_all_op>(buckets, ex, std::move(handler), n, deadline)->start();
}

} // namespace detail

bucket_set::bucket_set(std::initializer_list<std::reference_wrapper<token_bucket>> buckets)
    : bucket_set(std::vector<std::reference_wrapper<token_bucket>>(buckets))
{
}

bucket_set::bucket_set(const std::vector<std::reference_wrapper<token_bucket>>& buckets)
{
    if (buckets.empty())
        detail::throw_error(errc::invalid_argument, "valve: a bucket_set needs at least one bucket");
    for (token_bucket& b : buckets) buckets_.push_back(b.impl_);
    executor_ = buckets_.front()->executor_;
}

bool bucket_set::try_acquire(std::size_t n) noexcept
{
    if (n == 0) return true;
    for (const auto& b : buckets_)
        if (b->pending_.load(std::memory_order_acquire) != 0) return false;
    return detail::take_all(buckets_, n, clock::now());
}

bucket_set::time_point bucket_set::next_available(std::size_t n) const noexcept
{
    return detail::earliest_all(buckets_, n, clock::now());
}

} // namespace valve
