#include <valve/resource.hpp>

#include <valve/bucket_set.hpp>
#include <valve/error.hpp>

#include <algorithm>

namespace valve {

bucket_resource::bucket_resource(const boost::asio::any_io_executor& ex, rate r, std::size_t burst)
    : primary_(ex, r, burst)
{
}

bucket_resource::~bucket_resource() = default;

void bucket_resource::also_limit(rate r, std::size_t burst)
{
    more_.emplace_back(primary_.get_executor(), r, burst);
    std::vector<std::reference_wrapper<token_bucket>> refs{primary_};
    for (auto& b : more_) refs.emplace_back(b);
    set_ = std::make_unique<bucket_set>(refs);
}

bool bucket_resource::try_acquire(std::size_t n)
{
    return set_ ? set_->try_acquire(n) : primary_.try_acquire(n);
}

void bucket_resource::async_acquire(std::size_t n, detail::acquire_handler handler)
{
    if (set_)
        set_->async_acquire(n, std::move(handler));
    else
        primary_.async_acquire(n, std::move(handler));
}

resource::time_point bucket_resource::next_available(std::size_t n) const
{
    return set_ ? set_->next_available(n) : primary_.next_available(n);
}

void bucket_resource::release(std::size_t n)
{
    if (set_)
        set_->release(n);
    else
        primary_.release(n);
}

double bucket_resource::available() const
{
    double a = primary_.available();
    for (const auto& b : more_) a = std::min(a, b.available());
    return a;
}

bool bucket_resource::full() const
{
    // `available()` is exactly the burst once a bucket has refilled (infinity if unlimited).
    auto is_full = [](const token_bucket& b) { return b.available() >= static_cast<double>(b.burst()); };
    return is_full(primary_) && std::all_of(more_.begin(), more_.end(), is_full);
}

void resource::set_rate(rate r)
{
    detail::throw_error(errc::invalid_argument,
                        "valve: resource::set_rate(" + to_string(r) + "): this resource's rate is fixed; "
                        "make a new one with the rate you want");
}

void bucket_resource::set_rate(rate r) { primary_.set_rate(r); }

} // namespace valve
