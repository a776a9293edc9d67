#include <valve/rate.hpp>

#include <valve/error.hpp>

#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <limits>

using namespace std::chrono_literals;

TEST(rate, constructors_agree_on_tokens_per_second)
{
    EXPECT_DOUBLE_EQ(valve::rate::per_second(100).tokens_per_second(), 100.0);
    EXPECT_DOUBLE_EQ(valve::rate::per(10, 1min).tokens_per_second(), 10.0 / 60.0);
    EXPECT_DOUBLE_EQ(valve::rate::every(250ms).tokens_per_second(), 4.0);
    EXPECT_DOUBLE_EQ(valve::rate::per_second(0.5).tokens_per_second(), 0.5);
    EXPECT_EQ(valve::rate::per(3, 1s), valve::rate::per_second(3));
    EXPECT_EQ(valve::rate::per(10, 1min).period(), std::chrono::nanoseconds(60s));
}

TEST(rate, unlimited_and_zero)
{
    const auto u = valve::rate::unlimited();
    EXPECT_TRUE(u.is_unlimited());
    EXPECT_TRUE(std::isinf(u.tokens_per_second()));
    EXPECT_FALSE(u.is_zero());
    EXPECT_TRUE(valve::rate::zero().is_zero());
    EXPECT_TRUE(valve::rate{}.is_zero());
    EXPECT_EQ(valve::rate::zero().tokens_per_second(), 0.0);
    EXPECT_NE(u, valve::rate::per_second(1e9));
    EXPECT_EQ(valve::to_string(u), "unlimited");
    EXPECT_EQ(valve::to_string(valve::rate::per_second(10)), "10/s");
}

TEST(rate, validate_rejects_nan_negative_and_empty_periods)
{
    EXPECT_FALSE(valve::validate(valve::rate::per_second(5)));
    EXPECT_FALSE(valve::validate(valve::rate::zero()));
    EXPECT_FALSE(valve::validate(valve::rate::unlimited()));
    EXPECT_EQ(valve::validate(valve::rate::per_second(std::nan(""))), valve::errc::invalid_argument);
    EXPECT_EQ(valve::validate(valve::rate::per_second(-1)), valve::errc::invalid_argument);
    EXPECT_EQ(valve::validate(valve::rate::per_second(std::numeric_limits<double>::infinity())),
              valve::errc::invalid_argument);
    EXPECT_EQ(valve::validate(valve::rate::per(1, 0s)), valve::errc::invalid_argument);
    EXPECT_EQ(valve::validate(valve::rate::every(-1s)), valve::errc::invalid_argument);
    EXPECT_EQ(valve::validate(valve::rate::per_second(9e9)), valve::errc::invalid_argument);
}
