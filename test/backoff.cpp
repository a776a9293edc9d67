#include <valve/backoff.hpp>
#include <valve/error.hpp>

#include <gtest/gtest.h>

#include <vector>

using namespace std::chrono_literals;
using std::chrono::nanoseconds;

namespace {

// Runs a schedule to its end with every attempt failing at once (no time elapsing).
std::vector<nanoseconds> delays(const valve::backoff_policy& p, nanoseconds elapsed_each = 0ns)
{
    std::vector<nanoseconds> out;
    auto s = p.schedule();
    nanoseconds elapsed{0};
    while (auto d = s.next(elapsed)) {
        out.push_back(*d);
        elapsed += *d + elapsed_each;
        if (out.size() > 1000) break;
    }
    return out;
}

} // namespace

TEST(backoff, exponential_without_jitter_doubles_up_to_the_cap_and_stops_at_max_attempts)
{
    valve::backoff_policy p = valve::exponential_backoff{
        .initial = 10ms, .multiplier = 2.0, .max_interval = 1s, .jitter = 0.0, .max_elapsed = 1h, .max_attempts = 10};
    const std::vector<nanoseconds> want{10ms, 20ms, 40ms, 80ms, 160ms, 320ms, 640ms, 1s, 1s};
    EXPECT_EQ(delays(p), want); // 10 attempts: 9 sleeps between them
}

TEST(backoff, jitter_under_a_fixed_seed_gives_an_exact_sequence)
{
    const valve::backoff_policy p = valve::backoff_policy{valve::exponential_backoff{
                                        .initial = 10ms, .multiplier = 2.0, .max_interval = 1s, .jitter = 0.5,
                                        .max_elapsed = 1h, .max_attempts = 6}}
                                        .seeded(42);
    // splitmix64(42) drawn into [0, 1) with 53 bits, then d * (0.5 + u), computed independently.
    const std::vector<nanoseconds> want{12'415'649ns, 13'198'208ns, 31'144'045ns, 67'535'257ns, 86'084'827ns};
    EXPECT_EQ(delays(p), want);
    EXPECT_EQ(delays(p), want) << "every run of a seeded policy repeats the sequence";
}

TEST(backoff, jitter_stays_within_its_bounds_and_unseeded_runs_differ)
{
    const valve::exponential_backoff e{
        .initial = 100ms, .multiplier = 1.5, .max_interval = 2s, .jitter = 0.25, .max_elapsed = 1h, .max_attempts = 12};
    const valve::backoff_policy p = e;
    const auto a = delays(p);
    const auto b = delays(p);
    ASSERT_EQ(a.size(), 11u);
    double d = 100e6;
    for (std::size_t i = 0; i < a.size(); ++i) {
        const double base = std::min(d, 2e9);
        EXPECT_GE(static_cast<double>(a[i].count()), base * 0.75 - 1) << i;
        EXPECT_LE(static_cast<double>(a[i].count()), base * 1.25 + 1) << i;
        d *= 1.5;
    }
    EXPECT_NE(a, b) << "two unseeded runs drew the same 11 random delays";
    EXPECT_NE(delays(valve::backoff_policy{e}.seeded(1)), delays(valve::backoff_policy{e}.seeded(2)));
}

TEST(backoff, stops_when_the_next_attempt_would_start_after_max_elapsed)
{
    const valve::backoff_policy p = valve::exponential_backoff{
        .initial = 10ms, .multiplier = 2.0, .max_interval = 1s, .jitter = 0.0, .max_elapsed = 100ms, .max_attempts = 100};
    auto s = p.schedule();
    EXPECT_EQ(s.next(0ms), nanoseconds{10ms});
    EXPECT_EQ(s.next(50ms), nanoseconds{20ms});  // would start at 70 ms
    EXPECT_EQ(s.next(60ms), nanoseconds{40ms});  // would start at 100 ms: still within
    EXPECT_EQ(s.next(61ms), std::nullopt);       // 80 ms more would pass 100 ms
    // Without time passing, the same policy goes on: 10+20+40 = 70 ms < 100 ms, +80 ms is not.
    EXPECT_EQ(delays(p), (std::vector<nanoseconds>{10ms, 20ms, 40ms}));
}

TEST(backoff, constant_and_user_defined_policies)
{
    const valve::backoff_policy c = valve::constant_backoff{.interval = 50ms, .max_attempts = 4};
    EXPECT_EQ(delays(c), (std::vector<nanoseconds>{50ms, 50ms, 50ms}));

    // A user-defined policy: linear steps of 5 ms, three retries, and it sees the attempt count.
    const valve::backoff_policy u{[](const valve::backoff_step& s) -> std::optional<nanoseconds> {
        if (s.attempts > 3) return std::nullopt;
        return 5ms * static_cast<int>(s.attempts);
    }};
    EXPECT_EQ(delays(u), (std::vector<nanoseconds>{5ms, 10ms, 15ms}));
    auto s = u.schedule();
    s.next(0ns);
    s.next(0ns);
    EXPECT_EQ(s.attempts(), 2u);
}

TEST(backoff, bad_policies_are_refused_with_a_clear_error)
{
    auto code_of = [](auto make) {
        try {
            make();
        } catch (const valve::error& e) {
            EXPECT_NE(std::string{e.what()}.find("backoff"), std::string::npos) << e.what();
            return e.code();
        }
        return boost::system::error_code{};
    };
    const auto invalid = make_error_code(valve::errc::invalid_argument);
    EXPECT_EQ(code_of([] { valve::backoff_policy{valve::exponential_backoff{.multiplier = 0.5}}; }), invalid);
    EXPECT_EQ(code_of([] { valve::backoff_policy{valve::exponential_backoff{.jitter = 1.5}}; }), invalid);
    EXPECT_EQ(code_of([] { valve::backoff_policy{valve::exponential_backoff{.initial = 2s, .max_interval = 1s}}; }),
              invalid);
    EXPECT_EQ(code_of([] { valve::backoff_policy{valve::exponential_backoff{.max_attempts = 0}}; }), invalid);
    EXPECT_EQ(code_of([] { valve::backoff_policy{valve::constant_backoff{.interval = -1ms}}; }), invalid);
    EXPECT_EQ(code_of([] { valve::backoff_policy{valve::backoff_function{}}; }), invalid);
}

TEST(backoff, the_longest_durations_saturate_instead_of_overflowing)
{
    // `max_elapsed - elapsed` overflowed for an elapsed time below zero, and the policy gave up.
    const valve::backoff_policy forever =
        valve::constant_backoff{.interval = 1s, .max_elapsed = nanoseconds::max(), .max_attempts = 5};
    EXPECT_EQ(forever.next({.attempts = 1, .elapsed = -1ns, .random = 0.0}), nanoseconds(1s));
    EXPECT_EQ(forever.next({.attempts = 1, .elapsed = nanoseconds::min(), .random = 0.0}), nanoseconds(1s));
    // The longest interval, even with jitter upwards, is the longest delay.
    const valve::backoff_policy longest = valve::exponential_backoff{.initial = nanoseconds::max(),
                                                                     .multiplier = 2.0,
                                                                     .max_interval = nanoseconds::max(),
                                                                     .jitter = 1.0,
                                                                     .max_elapsed = nanoseconds::max(),
                                                                     .max_attempts = 5};
    EXPECT_EQ(longest.next({.attempts = 3, .elapsed = 0ns, .random = 0.99}), nanoseconds::max());
}
