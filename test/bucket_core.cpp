#include <valve/bucket_core.hpp>

#include <valve/error.hpp>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using valve::bucket_core;
using valve::rate;
using tp = bucket_core::time_point;

namespace {

// An arbitrary, non-zero starting point: the core never reads a clock.
const tp t0 = tp{} + 1000h;

} // namespace

TEST(bucket_core, starts_full_and_grants_the_burst)
{
    bucket_core b{rate::per_second(10), 5, t0};
    EXPECT_DOUBLE_EQ(b.available(t0), 5.0);
    for (int i = 0; i < 5; ++i) EXPECT_TRUE(b.try_take(1, t0)) << i;
    EXPECT_FALSE(b.try_take(1, t0));
    EXPECT_DOUBLE_EQ(b.available(t0), 0.0);
    EXPECT_TRUE(b.try_take(0, t0));
}

TEST(bucket_core, refills_at_the_rate_to_the_nanosecond)
{
    bucket_core b{rate::per_second(10), 5, t0};
    ASSERT_TRUE(b.try_take(5, t0));
    EXPECT_FALSE(b.try_take(1, t0 + 100ms - 1ns));
    EXPECT_TRUE(b.try_take(1, t0 + 100ms));
    EXPECT_FALSE(b.try_take(1, t0 + 100ms));
    EXPECT_DOUBLE_EQ(b.available(t0 + 350ms), 2.5);
    // Never more than the burst, however long the bucket rests.
    EXPECT_DOUBLE_EQ(b.available(t0 + 1h), 5.0);
    EXPECT_FALSE(b.try_take(6, t0 + 1h));
    EXPECT_TRUE(b.try_take(5, t0 + 1h));
}

TEST(bucket_core, earliest_says_when_and_never)
{
    bucket_core b{rate::per_second(10), 5, t0};
    EXPECT_EQ(b.earliest(5, t0), t0);
    ASSERT_TRUE(b.try_take(5, t0));
    EXPECT_EQ(b.earliest(1, t0), t0 + 100ms);
    EXPECT_EQ(b.earliest(3, t0), t0 + 300ms);
    EXPECT_EQ(b.earliest(3, t0 + 50ms), t0 + 300ms);
    EXPECT_EQ(b.earliest(1, t0, 2), t0 + 300ms); // behind 2 tokens already asked for
    EXPECT_EQ(b.earliest(6, t0), tp::max());      // more than the burst: never
    EXPECT_EQ(b.earliest(1, t0 + 1s), t0 + 1s);
    // earliest() only looks
    EXPECT_TRUE(b.try_take(1, t0 + 100ms));
}

TEST(bucket_core, fractional_intervals_are_exact_and_never_drift)
{
    // 3 per second: the interval is 333,333,333.3 ns, not a whole number of nanoseconds.
    bucket_core b{rate::per(3, 1s), 2, t0};
    ASSERT_TRUE(b.try_take(2, t0));
    tp t = t0;
    for (int i = 1; i <= 3 * 3600; ++i) { // one hour, one token at a time, each as soon as it is due
        const tp next = b.earliest(1, t);
        ASSERT_FALSE(b.try_take(1, next - 1ns)) << i;
        ASSERT_TRUE(b.try_take(1, next)) << i;
        t = next;
    }
    // The 10,800th token is due exactly one hour after the start: no rounding accumulated.
    EXPECT_EQ(t, t0 + 1h);
}

TEST(bucket_core, high_rate_for_hours_lands_exactly_on_time)
{
    // 7 tokens per microsecond (interval 142.857... ns), a one-second burst, for three hours:
    // 75.6 billion tokens, with no rounding error accumulated.
    constexpr std::size_t per_second = 7'000'000;
    bucket_core b{rate::per(7, 1us), per_second, t0};
    tp t = t0;
    for (int s = 0; s < 3 * 3600; ++s) {
        ASSERT_TRUE(b.try_take(per_second, t)) << s;
        t = b.earliest(per_second, t);
    }
    EXPECT_EQ(t, t0 + 3h);
    EXPECT_FALSE(b.try_take(per_second, t0 + 3h - 1ns));
    EXPECT_TRUE(b.try_take(per_second, t0 + 3h));
}

TEST(bucket_core, zero_rate_allows_nothing_beyond_the_burst)
{
    bucket_core b{rate::zero(), 3, t0};
    EXPECT_TRUE(b.try_take(3, t0));
    EXPECT_FALSE(b.try_take(1, t0 + 24h));
    EXPECT_EQ(b.earliest(1, t0 + 1h), tp::max());
    EXPECT_DOUBLE_EQ(b.available(t0 + 24h), 0.0);
    b.set_rate(rate::per_second(1), t0 + 48h);
    EXPECT_EQ(b.earliest(1, t0 + 48h), t0 + 48h + 1s);
}

TEST(bucket_core, unlimited_grants_everything)
{
    bucket_core b{rate::unlimited(), 1, t0};
    for (int i = 0; i < 1000; ++i) EXPECT_TRUE(b.try_take(1000, t0));
    EXPECT_EQ(b.earliest(1'000'000, t0), t0);
    EXPECT_TRUE(std::isinf(b.available(t0)));
    EXPECT_TRUE(b.current_rate().is_unlimited());
    // Leaving unlimited starts from a full bucket.
    b.set_rate(rate::per_second(1), t0);
    EXPECT_TRUE(b.try_take(1, t0));
    EXPECT_FALSE(b.try_take(1, t0));
}

TEST(bucket_core, reservations_queue_up_and_cancel_returns_what_it_can)
{
    bucket_core b{rate::per_second(10), 1, t0};
    boost::system::error_code ec;
    const auto r1 = b.reserve(1, t0, ec);
    ASSERT_FALSE(ec);
    EXPECT_EQ(r1.ready, t0);
    const auto r2 = b.reserve(1, t0, ec);
    EXPECT_EQ(r2.ready, t0 + 100ms);
    const auto r3 = b.reserve(1, t0, ec);
    EXPECT_EQ(r3.ready, t0 + 200ms);
    EXPECT_DOUBLE_EQ(b.available(t0), -2.0);

    // The last reservation gives all its tokens back...
    EXPECT_DOUBLE_EQ(b.cancel(r3, t0 + 10ms), 1.0);
    EXPECT_EQ(b.reserve(1, t0 + 10ms, ec).ready, t0 + 200ms);
    // ...one with a reservation behind it gives back nothing: that one keeps its place.
    EXPECT_DOUBLE_EQ(b.cancel(r2, t0 + 10ms), 0.0);
    // ...and one that is already due has been spent.
    EXPECT_DOUBLE_EQ(b.cancel(r1, t0 + 10ms), 0.0);
    // An empty reservation cancels to nothing.
    EXPECT_DOUBLE_EQ(b.cancel(bucket_core::reservation{}, t0), 0.0);
}

TEST(bucket_core, reserve_refuses_what_it_cannot_promise)
{
    bucket_core b{rate::per_second(10), 2, t0};
    boost::system::error_code ec;
    auto r = b.reserve(3, t0, ec);
    EXPECT_EQ(ec, valve::errc::exceeds_burst);
    EXPECT_EQ(r.tokens, 0u);
    ASSERT_TRUE(b.try_take(2, t0));
    r = b.reserve(1, t0, ec, t0 + 50ms);
    EXPECT_EQ(ec, valve::errc::would_exceed_deadline);
    EXPECT_EQ(r.tokens, 0u);
    // Nothing was taken by the failed reservation.
    EXPECT_TRUE(b.try_take(1, t0 + 100ms));
    r = b.reserve(1, t0 + 100ms, ec, t0 + 200ms);
    EXPECT_FALSE(ec);
    EXPECT_EQ(r.ready, t0 + 200ms);
}

TEST(bucket_core, rate_change_keeps_the_tokens_accrued)
{
    bucket_core b{rate::per_second(10), 10, t0};
    ASSERT_TRUE(b.try_take(10, t0));
    EXPECT_DOUBLE_EQ(b.available(t0 + 500ms), 5.0);
    b.set_rate(rate::per_second(100), t0 + 500ms);
    EXPECT_EQ(b.current_rate(), rate::per_second(100));
    EXPECT_DOUBLE_EQ(b.available(t0 + 500ms), 5.0);
    EXPECT_DOUBLE_EQ(b.available(t0 + 530ms), 8.0);
    EXPECT_DOUBLE_EQ(b.available(t0 + 600ms), 10.0);

    // A slower rate keeps a debt as a debt.
    boost::system::error_code ec;
    ASSERT_TRUE(b.try_take(10, t0 + 600ms));
    b.reserve(5, t0 + 600ms, ec);
    ASSERT_FALSE(ec);
    b.set_rate(rate::per_second(1), t0 + 600ms);
    EXPECT_DOUBLE_EQ(b.available(t0 + 600ms), -5.0);
    EXPECT_EQ(b.earliest(1, t0 + 600ms), t0 + 600ms + 6s);
}

TEST(bucket_core, burst_change_keeps_the_tokens_up_to_the_new_burst)
{
    bucket_core b{rate::per_second(10), 10, t0};
    b.set_burst(4, t0);
    EXPECT_EQ(b.burst(), 4u);
    EXPECT_DOUBLE_EQ(b.available(t0), 4.0);
    b.set_burst(20, t0);
    EXPECT_DOUBLE_EQ(b.available(t0), 4.0);
    EXPECT_DOUBLE_EQ(b.available(t0 + 1s), 14.0);
    EXPECT_DOUBLE_EQ(b.available(t0 + 2s), 20.0);
}

TEST(bucket_core, refund_puts_tokens_back_but_never_beyond_the_burst)
{
    bucket_core b{rate::per_second(1), 5, t0};
    ASSERT_TRUE(b.try_take(3, t0));
    b.refund(3, t0);
    EXPECT_DOUBLE_EQ(b.available(t0), 5.0);
    b.refund(3, t0);
    EXPECT_DOUBLE_EQ(b.available(t0), 5.0);
}

TEST(bucket_core, bad_input_throws_a_clear_error)
{
    auto expect_invalid = [](auto&& f) {
        try {
            f();
            ADD_FAILURE() << "no exception";
        } catch (const valve::error& e) {
            EXPECT_EQ(e.code(), valve::errc::invalid_argument);
            EXPECT_NE(std::string(e.what()).find("valve:"), std::string::npos) << e.what();
        }
    };
    expect_invalid([] { bucket_core b(rate::per_second(std::nan("")), 1, t0); });
    expect_invalid([] { bucket_core b(rate::per_second(-3), 1, t0); });
    expect_invalid([] { bucket_core b(rate::per(1, 0s), 1, t0); });
    expect_invalid([] { bucket_core b(rate::per_second(1), 0, t0); });
    expect_invalid([] { bucket_core b(rate::per_second(20e9), 1, t0); });
    expect_invalid([] { bucket_core b(rate::per(1, 24h), 1000, t0); }); // 1000 days to refill
    expect_invalid([] { bucket_core b(rate::per_second(1e-10), 1, t0); }); // 317 years per token

    bucket_core b{rate::per_second(10), 5, t0};
    expect_invalid([&] { b.set_rate(rate::per_second(-1), t0); });
    expect_invalid([&] { b.set_burst(0, t0); });
    // A refused change leaves the bucket as it was.
    EXPECT_EQ(b.current_rate(), rate::per_second(10));
    EXPECT_EQ(b.burst(), 5u);
    EXPECT_TRUE(b.try_take(5, t0));
}

TEST(bucket_core, survives_years_and_many_reconfigurations)
{
    bucket_core b{rate::per_second(10), 5, t0};
    // Past the internal epoch's range (about 417 days): the bucket re-anchors itself.
    const tp later = t0 + 24h * 900;
    EXPECT_DOUBLE_EQ(b.available(later), 5.0);
    ASSERT_TRUE(b.try_take(5, later));
    EXPECT_EQ(b.earliest(1, later), later + 100ms);
    // More reconfigurations than the bucket has configuration slots.
    for (int i = 1; i <= 40; ++i) b.set_rate(rate::per_second(i), later);
    EXPECT_EQ(b.current_rate(), rate::per_second(40));
    EXPECT_EQ(b.earliest(1, later), later + 25ms);
}

TEST(bucket_core, inexact_rates_are_never_faster_than_asked)
{
    // 13 million per second: 76.923... ns per token, not a multiple of 1/8 ns.
    constexpr double per_second = 13e6;
    bucket_core b{rate::per_second(per_second), 1000, t0};
    ASSERT_TRUE(b.try_take(1000, t0));
    tp t = t0;
    std::size_t granted = 0;
    while (t < t0 + 1s) {
        t = b.earliest(1000, t);
        ASSERT_TRUE(b.try_take(1000, t));
        granted += 1000;
    }
    const double elapsed = std::chrono::duration<double>(t - t0).count();
    EXPECT_LE(static_cast<double>(granted), per_second * elapsed);
    EXPECT_GE(static_cast<double>(granted), per_second * elapsed * (1 - 1e-3));
}

TEST(bucket_core, concurrent_takers_never_exceed_the_tokens)
{
    // Four threads take one token at a time while a fifth keeps reconfiguring the bucket (more
    // often than it has configuration slots); a zero rate makes the total exact.
    constexpr std::size_t tokens = 20'000;
    bucket_core b{rate::zero(), tokens, t0};
    std::atomic<bool> go{false};
    std::atomic<int> done{0};
    std::atomic<std::size_t> granted{0};
    std::vector<std::thread> threads;
    for (int i = 0; i < 4; ++i)
        threads.emplace_back([&] {
            while (!go) std::this_thread::yield();
            std::size_t mine = 0;
            while (b.try_take(1, t0)) ++mine;
            granted += mine;
            ++done;
        });
    go = true;
    // Raising and lowering the burst never changes the tokens left (they never exceed either).
    for (int i = 0; done < 4; ++i) b.set_burst(i % 2 ? tokens : 2 * tokens, t0);
    for (auto& t : threads) t.join();
    EXPECT_EQ(granted.load(), tokens);
    EXPECT_FALSE(b.try_take(1, t0));
}

TEST(bucket_core, tells_whether_its_rate_is_unlimited)
{
    bucket_core b{rate::per_second(10), 1, t0};
    EXPECT_FALSE(b.is_unlimited());
    b.set_rate(rate::unlimited(), t0);
    EXPECT_TRUE(b.is_unlimited());
    b.set_rate(rate::zero(), t0);
    EXPECT_FALSE(b.is_unlimited());
}
