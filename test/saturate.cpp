#include <valve/detail/saturate.hpp>

#include <gtest/gtest.h>

#include <chrono>
#include <cstddef>

using namespace std::chrono_literals;
using std::chrono::hours;
using std::chrono::nanoseconds;
using tp = std::chrono::steady_clock::time_point;
using valve::detail::saturating_add;
using valve::detail::saturating_cast;
using valve::detail::saturating_mul;
using valve::detail::saturating_sub;

TEST(saturate, add_clamps_time_points_at_both_ends)
{
    const tp t0 = tp{} + 1000h;
    EXPECT_EQ(saturating_add(t0, 5ns), t0 + 5ns);
    EXPECT_EQ(saturating_add(t0, nanoseconds::max()), tp::max());
    EXPECT_EQ(saturating_add(tp::max(), 1ns), tp::max());
    EXPECT_EQ(saturating_add(tp{} - 1000h, nanoseconds::min()), tp::min());
    EXPECT_EQ(saturating_add(t0, hours::max()), tp::max()); // beyond nanoseconds too
    EXPECT_EQ(saturating_add(t0, -2h), t0 - 2h);
}

TEST(saturate, durations_add_subtract_and_multiply_without_wrapping)
{
    EXPECT_EQ(saturating_add(nanoseconds::max(), 1ns), nanoseconds::max());
    EXPECT_EQ(saturating_add(nanoseconds::min(), -1ns), nanoseconds::min());
    EXPECT_EQ(saturating_sub(nanoseconds::max(), -1ns), nanoseconds::max());
    EXPECT_EQ(saturating_sub(0ns, nanoseconds::min()), nanoseconds::max());
    EXPECT_EQ(saturating_sub(5ns, 7ns), -2ns);
    EXPECT_EQ(saturating_mul(3ms, std::size_t{4}), 12ms);
    EXPECT_EQ(saturating_mul(nanoseconds::max(), std::size_t{2}), nanoseconds::max());
    EXPECT_EQ(saturating_mul(-1ns * (1LL << 62), std::size_t{4}), nanoseconds::min());
    EXPECT_EQ(saturating_mul(nanoseconds::max(), std::size_t{0}), 0ns);
}

TEST(saturate, cast_clamps_to_the_target_range)
{
    EXPECT_EQ(saturating_cast<nanoseconds>(hours::max()), nanoseconds::max());
    EXPECT_EQ(saturating_cast<nanoseconds>(hours::min()), nanoseconds::min());
    EXPECT_EQ(saturating_cast<nanoseconds>(2h), nanoseconds(2h));
    EXPECT_EQ(saturating_cast<nanoseconds>(std::chrono::duration<double>(1e300)), nanoseconds::max());
    EXPECT_EQ(saturating_cast<nanoseconds>(std::chrono::duration<double>(0.25)), 250ms);
    static_assert(saturating_cast<nanoseconds>(hours::max()) == nanoseconds::max());
}

TEST(saturate, cast_of_a_period_that_does_not_reduce_is_exact_where_the_result_fits)
{
    // 2e10 thirds of a second is 6'666'666'666.67 s: it fits in nanoseconds, but duration_cast
    // multiplies by 1e9 before it divides by 3, and that step overflows a 64-bit count.
    using thirds = std::chrono::duration<long long, std::ratio<1, 3>>;
    EXPECT_EQ(saturating_cast<nanoseconds>(thirds{20'000'000'000}), nanoseconds{6'666'666'666'666'666'666});
    EXPECT_EQ(saturating_cast<nanoseconds>(thirds{-20'000'000'000}), nanoseconds{-6'666'666'666'666'666'666});
    EXPECT_EQ(saturating_cast<nanoseconds>(thirds{28'000'000'000}), nanoseconds::max());
    EXPECT_EQ(saturating_cast<nanoseconds>(thirds::max()), nanoseconds::max());
    EXPECT_EQ(saturating_cast<nanoseconds>(thirds::min()), nanoseconds::min());
    // Undefined behaviour would not be a constant expression.
    static_assert(saturating_cast<nanoseconds>(thirds{20'000'000'000}) == nanoseconds{6'666'666'666'666'666'666});
}
