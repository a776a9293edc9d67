#include <valve/bucket_core.hpp>

#include <valve/error.hpp>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <thread>
#include <type_traits>
#include <utility>
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

TEST(bucket_core, try_take_leaves_the_tokens_it_is_told_to_keep)
{
    bucket_core b{rate::per_second(10), 5, t0};
    EXPECT_FALSE(b.try_take(1, t0, 5)); // all five are promised
    EXPECT_TRUE(b.try_take(2, t0, 3));
    EXPECT_FALSE(b.try_take(1, t0, 3));
    EXPECT_DOUBLE_EQ(b.available(t0), 3.0); // kept, not taken
    EXPECT_TRUE(b.try_take(1, t0 + 100ms, 3));
    EXPECT_FALSE(b.try_take(1, t0, 6)); // more than the burst can ever be kept
    EXPECT_TRUE(b.try_take(0, t0, 6));
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
    auto r1 = b.reserve(1, t0, ec);
    ASSERT_FALSE(ec);
    EXPECT_EQ(r1.ready, t0);
    auto r2 = b.reserve(1, t0, ec);
    EXPECT_EQ(r2.ready, t0 + 100ms);
    auto r3 = b.reserve(1, t0, ec);
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
    bucket_core::reservation empty;
    EXPECT_DOUBLE_EQ(b.cancel(empty, t0), 0.0);
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
    expect_invalid([] { bucket_core b(rate::per(1, 24h * 365), 100, t0); }); // 100 years to refill
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
    // Far past the internal epoch's range: the bucket re-anchors itself.
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

TEST(bucket_core, a_debt_survives_a_burst_cut_and_then_a_rate_cut)
{
    // A large reservation puts the bucket 1,000 tokens in debt; the burst drops to 1 and the
    // rate to one a minute: the debt is now 1,000 minutes (about 17 hours) deep at the new rate,
    // and more when the rate drops to one a day (1,000 days, far past the state word's range).
    bucket_core b{rate::per_second(1000), 1000, t0};
    boost::system::error_code ec;
    b.reserve(1000, t0, ec);
    ASSERT_FALSE(ec);
    b.reserve(1000, t0, ec);
    ASSERT_FALSE(ec);
    EXPECT_DOUBLE_EQ(b.available(t0), -1000.0);
    b.set_burst(1, t0);
    EXPECT_DOUBLE_EQ(b.available(t0), -1000.0);
    b.set_rate(rate::per(1, 24h), t0);
    EXPECT_DOUBLE_EQ(b.available(t0), -1000.0);
    // The first token comes after the 1,000 owed, 1,001 days later, and not a nanosecond sooner.
    EXPECT_FALSE(b.try_take(1, t0 + 24h * 14));
    EXPECT_FALSE(b.try_take(1, t0 + 24h * 1001 - 1ns));
    EXPECT_EQ(b.earliest(1, t0 + 24h * 14), t0 + 24h * 1001);
    EXPECT_DOUBLE_EQ(b.available(t0 + 24h * 501), -499.0);
    EXPECT_TRUE(b.try_take(1, t0 + 24h * 1001));
    EXPECT_FALSE(b.try_take(1, t0 + 24h * 1001));
    // Back to a fast rate, the debt left (none) converts back exactly.
    b.set_rate(rate::per_second(1000), t0 + 24h * 1001);
    EXPECT_TRUE(b.try_take(1, t0 + 24h * 1001 + 1ms));
}

TEST(bucket_core, a_deep_debt_at_a_slow_rate_is_kept_through_later_changes)
{
    bucket_core b{rate::per_second(1000), 1000, t0};
    boost::system::error_code ec;
    b.reserve(1000, t0, ec);
    b.reserve(1000, t0, ec);
    b.set_burst(1, t0);
    b.set_rate(rate::per(1, 24h), t0);        // 1,000 days of debt
    b.set_rate(rate::per(1, 24h), t0 + 24h);  // a day later, 999 days of debt
    EXPECT_DOUBLE_EQ(b.available(t0 + 24h), -999.0);
    b.set_rate(rate::per(2, 24h), t0 + 24h);  // twice as fast: 499.5 days
    EXPECT_EQ(b.earliest(1, t0 + 24h), t0 + 24h + 12h * 1000);
}

TEST(bucket_core, a_rate_change_rounds_the_tokens_down)
{
    // 20/s: after 147.5 ms, 2.95 tokens have accrued. At 10^9/s the bucket counts whole tokens
    // in whole nanoseconds: 2.95 is kept as 2, never as 3.
    bucket_core b{rate::per_second(20), 5, t0};
    ASSERT_TRUE(b.try_take(5, t0));
    const tp t = t0 + 147500us;
    EXPECT_DOUBLE_EQ(b.available(t), 2.95);
    b.set_rate(rate::per_second(1e9), t);
    EXPECT_LE(b.available(t), 2.95);
    EXPECT_FALSE(b.try_take(3, t));
    EXPECT_TRUE(b.try_take(2, t));
    EXPECT_FALSE(b.try_take(1, t));

    // The other way: 2.95 tokens at 1/s keep their fraction to the nanosecond.
    bucket_core c{rate::per_second(20), 5, t0};
    ASSERT_TRUE(c.try_take(5, t0));
    c.set_rate(rate::per_second(1), t);
    EXPECT_NEAR(c.available(t), 2.95, 1e-9);
    EXPECT_LE(c.available(t), 2.95);
    EXPECT_FALSE(c.try_take(3, t));
    EXPECT_EQ(c.earliest(3, t), t + 50ms);
}

TEST(bucket_core, a_burst_change_rounds_the_tokens_down)
{
    // 3/s (interval 333,333,333.3 ns, in thirds of a nanosecond) to a burst change and back:
    // whatever the units, the bucket never gains a fraction of a token.
    bucket_core b{rate::per(3, 1s), 10, t0};
    ASSERT_TRUE(b.try_take(10, t0));
    tp t = t0;
    for (int i = 1; i <= 200; ++i) {
        t += 1234567ns;
        const double before = b.available(t);
        b.set_burst(i % 2 ? 20 : 10, t);
        b.set_rate(i % 3 ? rate::per(3, 1s) : rate::per(7, 2s), t);
        ASSERT_LE(b.available(t), before + 1e-12) << i;
    }
}

TEST(bucket_core, cancelling_a_reservation_twice_gives_its_tokens_back_once)
{
    bucket_core b{rate::per_second(1), 5, t0};
    ASSERT_TRUE(b.try_take(5, t0));
    boost::system::error_code ec;
    auto r = b.reserve(2, t0, ec);
    ASSERT_FALSE(ec);
    EXPECT_DOUBLE_EQ(b.available(t0), -2.0);
    EXPECT_DOUBLE_EQ(b.cancel(r, t0), 2.0);
    EXPECT_EQ(r.tokens, 0u);
    for (int i = 0; i < 6; ++i) EXPECT_DOUBLE_EQ(b.cancel(r, t0), 0.0) << i;
    EXPECT_DOUBLE_EQ(b.available(t0), 0.0);
    EXPECT_FALSE(b.try_take(1, t0));

    // One claim, cancelled once: it cannot be copied, and a moved-from one is empty.
    static_assert(!std::is_copy_constructible_v<bucket_core::reservation>);
    auto r2 = b.reserve(1, t0, ec);
    auto moved = std::move(r2);
    EXPECT_DOUBLE_EQ(b.cancel(r2, t0), 0.0);
    EXPECT_DOUBLE_EQ(b.cancel(moved, t0), 1.0);
    EXPECT_DOUBLE_EQ(b.available(t0), 0.0);
}

TEST(bucket_core, a_reservation_can_be_cancelled_at_the_instant_it_is_ready)
{
    bucket_core b{rate::per_second(10), 2, t0};
    boost::system::error_code ec;
    // Granted at once: ready now, and cancellable now.
    auto now = b.reserve(2, t0, ec);
    ASSERT_FALSE(ec);
    ASSERT_EQ(now.ready, t0);
    EXPECT_DOUBLE_EQ(b.cancel(now, t0), 2.0);
    EXPECT_DOUBLE_EQ(b.available(t0), 2.0);
    // In the future: cancellable up to and including its ready time, not after.
    ASSERT_TRUE(b.try_take(2, t0));
    auto later = b.reserve(1, t0, ec);
    ASSERT_EQ(later.ready, t0 + 100ms);
    EXPECT_DOUBLE_EQ(b.cancel(later, t0 + 100ms), 1.0);
    auto spent = b.reserve(1, t0 + 100ms, ec);
    ASSERT_EQ(spent.ready, t0 + 100ms);
    EXPECT_DOUBLE_EQ(b.cancel(spent, t0 + 100ms + 1ns), 0.0);
}

TEST(bucket_core, unlimited_and_back_in_the_same_instant_keeps_the_debt)
{
    bucket_core b{rate::per_second(10), 5, t0};
    ASSERT_TRUE(b.try_take(5, t0));
    boost::system::error_code ec;
    b.reserve(5, t0, ec); // 5 tokens owed: the bucket is full again at t0 + 1 s
    b.set_rate(rate::unlimited(), t0);
    EXPECT_TRUE(std::isinf(b.available(t0))); // as documented: every grant succeeds
    EXPECT_TRUE(b.try_take(100, t0));
    b.set_rate(rate::per_second(10), t0);
    EXPECT_DOUBLE_EQ(b.available(t0), -5.0);
    EXPECT_FALSE(b.try_take(1, t0 + 500ms));
    EXPECT_EQ(b.earliest(1, t0), t0 + 600ms);

    // A burst change while unlimited at that same instant changes nothing of it.
    bucket_core c{rate::per_second(10), 5, t0};
    ASSERT_TRUE(c.try_take(5, t0));
    c.set_rate(rate::unlimited(), t0);
    c.set_burst(8, t0);
    c.set_rate(rate::per_second(10), t0);
    EXPECT_DOUBLE_EQ(c.available(t0), 0.0);

    // Time actually spent at an unlimited rate refills the bucket.
    bucket_core d{rate::per_second(10), 5, t0};
    ASSERT_TRUE(d.try_take(5, t0));
    d.set_rate(rate::unlimited(), t0);
    d.set_rate(rate::per_second(10), t0 + 1ns);
    EXPECT_DOUBLE_EQ(d.available(t0 + 1ns), 5.0);
}

TEST(bucket_core, a_monthly_quota_is_exact)
{
    // 10,000 requests per 30 days, all of them at once: the most common quota paid APIs sell.
    constexpr std::size_t quota = 10'000;
    bucket_core b{rate::per(quota, 24h * 30), quota, t0};
    ASSERT_TRUE(b.try_take(quota, t0));
    EXPECT_FALSE(b.try_take(1, t0));
    EXPECT_EQ(b.earliest(1, t0), t0 + 259200ms); // 30 days / 10,000
    EXPECT_EQ(b.earliest(quota, t0), t0 + 24h * 30);
    EXPECT_DOUBLE_EQ(b.available(t0 + 24h * 15), 5000.0);
    // A year of tokens taken the instant each is due lands exactly on time: no drift.
    tp t = t0;
    for (std::size_t i = 1; i <= quota * 12; ++i) {
        const tp next = b.earliest(1, t);
        ASSERT_FALSE(b.try_take(1, next - 1ns)) << i;
        ASSERT_TRUE(b.try_take(1, next)) << i;
        t = next;
    }
    EXPECT_EQ(t, t0 + 24h * 360);
}

TEST(bucket_core, a_billion_tokens_a_year_and_more_are_exact)
{
    // A billion tokens refilled over 400 days: 34.56 ms each.
    constexpr std::size_t burst = 1'000'000'000;
    bucket_core b{rate::per(1e9, 24h * 400), burst, t0};
    ASSERT_TRUE(b.try_take(burst, t0));
    EXPECT_EQ(b.earliest(1, t0), t0 + 34560us);
    EXPECT_DOUBLE_EQ(b.available(t0 + 24h * 200), 5e8);
    EXPECT_FALSE(b.try_take(500'000'001, t0 + 24h * 200));
    EXPECT_TRUE(b.try_take(500'000'000, t0 + 24h * 200));
    EXPECT_EQ(b.earliest(burst, t0 + 24h * 200), t0 + 24h * 600);

    // Ten years per refill: counted in steps of a few nanoseconds, still exact for this rate.
    bucket_core decade{rate::per(1000, 24h * 3650), 1000, t0};
    const std::chrono::nanoseconds each = std::chrono::nanoseconds{24h * 3650} / 1000; // 3.65 days
    ASSERT_TRUE(decade.try_take(1000, t0));
    EXPECT_EQ(decade.earliest(1, t0), t0 + each);
    EXPECT_EQ(decade.earliest(1000, t0), t0 + 24h * 3650);
    EXPECT_FALSE(decade.try_take(1, t0 + each - 1ns));
    EXPECT_TRUE(decade.try_take(1, t0 + each));
}

TEST(bucket_core, a_refill_longer_than_it_supports_is_refused_up_front)
{
    EXPECT_GE(bucket_core::max_refill(), 24h * 365 * 70);
    try {
        bucket_core::check(rate::per(1, 24h * 365), 100);
        ADD_FAILURE() << "no exception";
    } catch (const valve::error& e) {
        EXPECT_EQ(e.code(), valve::errc::invalid_argument);
        const std::string what = e.what();
        EXPECT_NE(what.find("burst 100"), std::string::npos) << what;
        EXPECT_NE(what.find("100 years"), std::string::npos) << what;
        EXPECT_NE(what.find("73 years"), std::string::npos) << what;
    }
    EXPECT_NO_THROW(bucket_core::check(rate::per(1e9, 24h * 400), 1'000'000'000));
    EXPECT_THROW(bucket_core::check(rate::per_second(1), 0), valve::error);
    // A burst of 0 is refused for what it is, not for a reason that an unlimited rate belies.
    try {
        bucket_core::check(rate::unlimited(), 0);
        ADD_FAILURE() << "no exception";
    } catch (const valve::error& e) {
        const std::string what = e.what();
        EXPECT_EQ(what.find("never grant"), std::string::npos) << what;
        EXPECT_NE(what.find("burst 0"), std::string::npos) << what;
    }
    // A rate change the burst cannot take leaves the bucket as it was.
    bucket_core b{rate::per_second(10), 100, t0};
    EXPECT_THROW(b.set_rate(rate::per(1, 24h * 365), t0), valve::error);
    EXPECT_EQ(b.current_rate(), rate::per_second(10));
    EXPECT_TRUE(b.try_take(100, t0));
}

TEST(bucket_core, a_reservation_from_256_configurations_ago_gives_nothing_back)
{
    // The state word keeps 8 bits of the configuration's generation; a reservation must not be
    // taken for one of a configuration 256 changes later.
    bucket_core b{rate::per_second(10), 5, t0};
    ASSERT_TRUE(b.try_take(5, t0));
    boost::system::error_code ec;
    auto r = b.reserve(5, t0, ec);
    ASSERT_FALSE(ec);
    for (int i = 0; i < 256; ++i) b.set_burst(5, t0);
    EXPECT_DOUBLE_EQ(b.cancel(r, t0), 0.0);
    EXPECT_DOUBLE_EQ(b.available(t0), -5.0);
}
