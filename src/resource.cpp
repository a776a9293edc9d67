#include <valve/resource.hpp>

#include <valve/bucket_set.hpp>

namespace valve {

bucket_resource::bucket_resource(const boost::asio::any_io_executor& ex, rate r, std::size_t burst) : executor_(ex)
{
    buckets_.push_back(std::make_unique<token_bucket>(ex, r, burst));
}

bucket_resource::~bucket_resource() = default;

void bucket_resource::also_limit(rate r, std::size_t burst)
{
    buckets_.push_back(std::make_unique<token_bucket>(executor_, r, burst));
    std::vector<std::reference_wrapper<token_bucket>> refs;
    for (auto& b : buckets_) refs.emplace_back(*b);
    set_ = std::make_unique<bucket_set>(refs);
}

bool bucket_resource::try_acquire(std::size_t n)
{
    return set_ ? set_->try_acquire(n) : buckets_.front()->try_acquire(n);
}

void bucket_resource::async_acquire(std::size_t n, detail::acquire_handler handler)
{
    if (set_)
        set_->async_acquire(n, std::move(handler));
    else
        buckets_.front()->async_acquire(n, std::move(handler));
}

resource::time_point bucket_resource::next_available(std::size_t n) const
{
    return set_ ? set_->next_available(n) : buckets_.front()->next_available(n);
}

} // namespace valve
