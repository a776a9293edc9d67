#include <valve/rate.hpp>

#include <valve/error.hpp>

#include <cmath>
#include <cstdio>

namespace valve {

boost::system::error_code validate(const rate& r) noexcept
{
    if (r.is_unlimited()) return {};
    const double c = r.count();
    if (!std::isfinite(c) || c < 0.0 || r.period().count() <= 0) return errc::invalid_argument;
    // The bucket keeps time in whole nanoseconds with at most 8 tokens per nanosecond.
    if (c / static_cast<double>(r.period().count()) > 8.0) return errc::invalid_argument;
    return {};
}

std::string to_string(const rate& r)
{
    if (r.is_unlimited()) return "unlimited";
    char buf[64];
    std::snprintf(buf, sizeof buf, "%g/s", r.tokens_per_second());
    return buf;
}

} // namespace valve
