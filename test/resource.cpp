#include <valve/resource.hpp>

#include <boost/asio/io_context.hpp>

#include <gtest/gtest.h>

#include <chrono>

using valve::rate;

TEST(resource, full_means_every_bucket_at_its_burst)
{
    boost::asio::io_context ioc;
    valve::bucket_resource r{ioc.get_executor(), rate::per(1, std::chrono::minutes(1)), 3};
    EXPECT_TRUE(r.full());
    ASSERT_TRUE(r.try_acquire(1));
    EXPECT_FALSE(r.full());
    r.release(1);
    EXPECT_TRUE(r.full());

    valve::bucket_resource also{ioc.get_executor(), rate::unlimited(), 1};
    also.also_limit(rate::per(1, std::chrono::minutes(1)), 2);
    EXPECT_TRUE(also.full());
    ASSERT_TRUE(also.try_acquire(1));
    EXPECT_FALSE(also.full()) << "the also_limit bucket is drained";
}

TEST(resource, an_unlimited_bucket_is_always_full_a_zero_rate_one_only_until_used)
{
    boost::asio::io_context ioc;
    valve::bucket_resource unlimited{ioc.get_executor(), rate::unlimited(), 1};
    ASSERT_TRUE(unlimited.try_acquire(5));
    EXPECT_TRUE(unlimited.full());
    valve::bucket_resource zero{ioc.get_executor(), rate::zero(), 2};
    EXPECT_TRUE(zero.full());
    ASSERT_TRUE(zero.try_acquire(1));
    EXPECT_FALSE(zero.full()) << "it never refills: evicting it would give a new burst";
}
