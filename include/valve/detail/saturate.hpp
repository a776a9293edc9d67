#ifndef VALVE_DETAIL_SATURATE_HPP
#define VALVE_DETAIL_SATURATE_HPP

// Internal: duration and time-point arithmetic that clamps at the ends of the range instead of
// overflowing, so that `nanoseconds::max()` (or `hours::max()`) means "never", not "at once".
// Every sum, product or conversion of a caller's duration in valve goes through these.

#include <chrono>
#include <concepts>
#include <limits>
#include <ratio>
#include <utility>

namespace valve::detail {

/// `d` as a `To`, clamped to `To`'s range (a NaN becomes zero).
template <class To, class Rep, class Period>
constexpr To saturating_cast(std::chrono::duration<Rep, Period> d) noexcept
{
    using to_rep = typename To::rep;
    if constexpr (std::integral<Rep> && std::integral<to_rep> && sizeof(Rep) <= 8 && sizeof(to_rep) <= 8) {
        // Exact, in 128 bits: `duration_cast` multiplies before it divides, and for a ratio that does
        // not reduce (thirds of a second to nanoseconds) the product can overflow 64 bits although
        // the quotient fits. A 64-bit count times a 64-bit numerator always fits in 128 bits.
        __extension__ typedef __int128 wide;
        using ratio = std::ratio_divide<Period, typename To::period>;
        const wide q = static_cast<wide>(d.count()) * static_cast<wide>(ratio::num) / static_cast<wide>(ratio::den);
        if (q >= static_cast<wide>(std::numeric_limits<to_rep>::max())) return To::max();
        if (q <= static_cast<wide>(std::numeric_limits<to_rep>::min())) return To::min();
        return To{static_cast<to_rep>(q)};
    }
    using wide = std::chrono::duration<long double, typename To::period>;
    const wide w = std::chrono::duration_cast<wide>(d);
    if (w != w) return To::zero();
    if (w >= std::chrono::duration_cast<wide>(To::max())) return To::max();
    if (w <= std::chrono::duration_cast<wide>(To::min())) return To::min();
    return std::chrono::duration_cast<To>(d);
}

/// `a + b`, clamped to the range of `a`'s type.
template <class Rep, class Period>
    requires std::integral<Rep>
constexpr std::chrono::duration<Rep, Period> saturating_add(std::chrono::duration<Rep, Period> a,
                                                            std::chrono::duration<Rep, Period> b) noexcept
{
    using D = std::chrono::duration<Rep, Period>;
    Rep sum{};
    if (__builtin_add_overflow(a.count(), b.count(), &sum)) return b.count() > 0 ? D::max() : D::min();
    return D{sum};
}

/// `a - b`, clamped to the range of `a`'s type.
template <class Rep, class Period>
    requires std::integral<Rep>
constexpr std::chrono::duration<Rep, Period> saturating_sub(std::chrono::duration<Rep, Period> a,
                                                            std::chrono::duration<Rep, Period> b) noexcept
{
    using D = std::chrono::duration<Rep, Period>;
    Rep difference{};
    if (__builtin_sub_overflow(a.count(), b.count(), &difference)) return b.count() < 0 ? D::max() : D::min();
    return D{difference};
}

/// `d * n`, clamped to the range of `d`'s type.
template <class Rep, class Period, std::integral N>
    requires std::integral<Rep>
constexpr std::chrono::duration<Rep, Period> saturating_mul(std::chrono::duration<Rep, Period> d, N n) noexcept
{
    using D = std::chrono::duration<Rep, Period>;
    Rep product{};
    if (__builtin_mul_overflow(d.count(), n, &product)) return (d.count() < 0) == std::cmp_less(n, 0) ? D::max() : D::min();
    return D{product};
}

/// `t + d`, clamped to the range of `t`'s type: the latest (or earliest) time point rather
/// than one on the other side of the clock.
template <class Clock, class Duration, class Rep, class Period>
constexpr std::chrono::time_point<Clock, Duration> saturating_add(std::chrono::time_point<Clock, Duration> t,
                                                                  std::chrono::duration<Rep, Period> d) noexcept
{
    return std::chrono::time_point<Clock, Duration>{
        saturating_add(t.time_since_epoch(), saturating_cast<Duration>(d))};
}

} // namespace valve::detail

#endif
