#ifndef VALVE_RATE_HPP
#define VALVE_RATE_HPP

#include <valve/detail/saturate.hpp>

#include <boost/system/error_code.hpp>

#include <chrono>
#include <cstdint>
#include <limits>
#include <string>

namespace valve {

/// A rate of tokens: `count` tokens every `period`, or unlimited.
///
/// A value type; building one never fails. A rate that makes no sense (NaN or negative count,
/// a zero or negative period) is reported as `errc::invalid_argument` by the call that uses it,
/// and `validate()` tells in advance. A zero rate allows nothing beyond a bucket's burst.
class rate {
public:
    /// The zero rate.
    constexpr rate() noexcept = default;

    /// `tokens` tokens per second (may be fractional: 0.5 is one every two seconds).
    static constexpr rate per_second(double tokens) noexcept { return rate{tokens, 1'000'000'000}; }

    /// `tokens` tokens every `period`, e.g. `rate::per(10, std::chrono::minutes(1))`.
    template <class Rep, class Period>
    static constexpr rate per(double tokens, std::chrono::duration<Rep, Period> period) noexcept
    {
        return rate{tokens, detail::saturating_cast<std::chrono::nanoseconds>(period).count()};
    }

    /// One token every `interval`.
    template <class Rep, class Period>
    static constexpr rate every(std::chrono::duration<Rep, Period> interval) noexcept
    {
        return per(1.0, interval);
    }

    /// No limit at all: every request is granted at once.
    static constexpr rate unlimited() noexcept
    {
        rate r;
        r.unlimited_ = true;
        return r;
    }

    /// No refill: only the burst is ever granted.
    static constexpr rate zero() noexcept { return rate{}; }

    /// Tokens per second; infinity when unlimited.
    constexpr double tokens_per_second() const noexcept
    {
        if (unlimited_) return std::numeric_limits<double>::infinity();
        return count_ * 1e9 / static_cast<double>(period_ns_);
    }

    constexpr bool is_unlimited() const noexcept { return unlimited_; }
    constexpr bool is_zero() const noexcept { return !unlimited_ && count_ == 0.0; }

    /// The token count of `count per period`.
    constexpr double count() const noexcept { return count_; }
    /// The period of `count per period`, in nanoseconds.
    constexpr std::chrono::nanoseconds period() const noexcept
    {
        return std::chrono::nanoseconds{period_ns_};
    }

    friend constexpr bool operator==(const rate& a, const rate& b) noexcept
    {
        if (a.unlimited_ || b.unlimited_) return a.unlimited_ == b.unlimited_;
        return a.tokens_per_second() == b.tokens_per_second();
    }

private:
    constexpr rate(double count, std::int64_t period_ns) noexcept : count_(count), period_ns_(period_ns) {}

    double count_ = 0.0;
    std::int64_t period_ns_ = 1'000'000'000;
    bool unlimited_ = false;
};

/// `errc::invalid_argument` when `r` is not a usable rate (NaN, infinite or negative count, zero
/// or negative period, more than 8 tokens per nanosecond); an empty error code otherwise.
boost::system::error_code validate(const rate& r) noexcept;

/// A readable form such as "10/s", "0.5/s" or "unlimited", for messages and logs.
std::string to_string(const rate& r);

} // namespace valve

#endif
