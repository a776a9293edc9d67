#include <valve/adaptive.hpp>
#include <valve/bucket_core.hpp>
#include <valve/error.hpp>
#include <valve/manager.hpp>
#include <valve/token_bucket.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>

#include <gtest/gtest.h>

#include <stdexcept>
#include <vector>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using time_point = valve::aimd_controller::time_point;

namespace {

const time_point t0{std::chrono::hours(1)};

// A client sending as fast as the controller allows to an upstream that takes `capacity`
// calls per second (burst 5) and answers the rest with "overloaded". Returns the controller's
// rate at each whole simulated second, and the calls served per second.
struct simulation {
    std::vector<double> rate_at_second;
    std::vector<int> served_per_second;
};

simulation simulate(valve::aimd_controller& ctl, double capacity, std::chrono::seconds length)
{
    valve::bucket_core upstream{valve::rate::per_second(capacity), 5, t0};
    simulation sim;
    time_point t = t0;
    int served = 0;
    auto next_second = t0 + 1s;
    while (t < t0 + length) {
        if (upstream.try_take(1, t)) {
            ++served;
            ctl.on_success(t);
        } else {
            ctl.on_overload(t);
        }
        t += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::duration<double>(1.0 / ctl.current().tokens_per_second()));
        while (t >= next_second) {
            sim.rate_at_second.push_back(ctl.current().tokens_per_second());
            sim.served_per_second.push_back(served);
            served = 0;
            next_second += 1s;
        }
    }
    return sim;
}

} // namespace

TEST(aimd, converges_to_within_20_percent_of_an_upstreams_capacity_and_stays_there)
{
    for (double capacity : {50.0, 400.0}) {
        std::vector<double> applied;
        valve::aimd_controller ctl{{.initial = capacity * 4, .floor = 1, .ceiling = 10'000, .decrease = 0.9,
                                    .step = capacity / 50, .interval = 1s},
                                   [&](valve::rate r) { applied.push_back(r.tokens_per_second()); }};
        const auto sim = simulate(ctl, capacity, 300s);
        ASSERT_EQ(sim.rate_at_second.size(), 300u);
        // 4x too fast at first: 0.9^n brings it down within ln(4)/ln(1/0.9) = 14 intervals.
        for (std::size_t s = 60; s < sim.rate_at_second.size(); ++s) {
            EXPECT_GE(sim.rate_at_second[s], capacity * 0.8) << "capacity " << capacity << ", second " << s;
            EXPECT_LE(sim.rate_at_second[s], capacity * 1.2) << "capacity " << capacity << ", second " << s;
        }
        double served = 0;
        for (std::size_t s = 60; s < sim.served_per_second.size(); ++s) served += sim.served_per_second[s];
        served /= static_cast<double>(sim.served_per_second.size() - 60);
        EXPECT_GE(served, capacity * 0.8) << "served per second, capacity " << capacity;
        EXPECT_LE(served, capacity * 1.01);
        // The target saw every change, and the stats agree with it.
        const auto st = ctl.stats();
        EXPECT_EQ(applied.size(), 1 + st.increases + st.decreases);
        EXPECT_EQ(applied.back(), st.rate);
        EXPECT_GT(st.decreases, 14u);
        EXPECT_GT(st.increases, 0u);
    }
}

TEST(aimd, decreases_once_per_interval_and_never_below_the_floor)
{
    valve::aimd_controller ctl{{.initial = 100, .floor = 40, .ceiling = 200, .decrease = 0.5, .step = 5,
                                .interval = 1s},
                               [](valve::rate) {}};
    ctl.on_overload(t0);
    EXPECT_EQ(ctl.current().tokens_per_second(), 50);
    ctl.on_overload(t0 + 500ms); // sent at the old rate: ignored
    EXPECT_EQ(ctl.current().tokens_per_second(), 50);
    ctl.on_overload(t0 + 1s);
    EXPECT_EQ(ctl.current().tokens_per_second(), 40) << "the floor holds";
    ctl.on_success(t0 + 1500ms);
    EXPECT_EQ(ctl.current().tokens_per_second(), 40) << "no increase within an interval of the decrease";
    ctl.on_success(t0 + 2s);
    EXPECT_EQ(ctl.current().tokens_per_second(), 45);
    ctl.on_success(t0 + 2500ms);
    EXPECT_EQ(ctl.current().tokens_per_second(), 45);
    for (int s = 3; s < 100; ++s) ctl.on_success(t0 + std::chrono::seconds(s));
    EXPECT_EQ(ctl.current().tokens_per_second(), 200) << "the ceiling holds";
    const auto st = ctl.stats();
    EXPECT_EQ(st.overloads, 3u);
    EXPECT_EQ(st.decreases, 2u);
}

TEST(aimd, observe_tells_overload_from_other_errors)
{
    valve::aimd_controller ctl{{.initial = 100, .floor = 1, .ceiling = 200, .decrease = 0.5, .interval = 1s},
                               [](valve::rate) {}};
    EXPECT_FALSE(ctl.observe(std::make_exception_ptr(std::runtime_error("bug")), t0));
    EXPECT_EQ(ctl.current().tokens_per_second(), 100);
    EXPECT_TRUE(ctl.observe(std::make_exception_ptr(valve::error(valve::errc::overloaded)), t0));
    EXPECT_EQ(ctl.current().tokens_per_second(), 50);
    EXPECT_TRUE(ctl.observe(std::make_exception_ptr(valve::error(valve::errc::timed_out)), t0 + 2s));
    EXPECT_EQ(ctl.current().tokens_per_second(), 25);
    ctl.classify([](const std::exception_ptr& e) {
        try {
            std::rethrow_exception(e);
        } catch (const std::runtime_error&) {
            return true;
        }
    });
    EXPECT_TRUE(ctl.observe(std::make_exception_ptr(std::runtime_error("503")), t0 + 4s));
    EXPECT_EQ(ctl.current().tokens_per_second(), 12.5);
}

TEST(aimd, the_first_overload_lowers_the_rate_even_near_the_clocks_epoch)
{
    // steady_clock counts from boot: on a machine up for less than an interval, a first
    // overload after a success must still lower the rate.
    valve::aimd_controller ctl{{.initial = 100, .floor = 1, .ceiling = 200, .decrease = 0.5, .interval = 1h},
                               [](valve::rate) {}};
    const time_point boot{};
    ctl.on_success(boot + 1s);
    ctl.on_overload(boot + 2s);
    EXPECT_EQ(ctl.current().tokens_per_second(), 50);
    ctl.on_overload(boot + 3s); // within the interval of the first decrease
    EXPECT_EQ(ctl.current().tokens_per_second(), 50);
    ctl.on_overload(boot + 2s + 1h);
    EXPECT_EQ(ctl.current().tokens_per_second(), 25);
}

TEST(aimd, drives_a_token_bucket_and_wrapped_tasks_report_their_outcome)
{
    asio::io_context ioc;
    valve::token_bucket bucket{ioc.get_executor(), valve::rate::per_second(1)};
    valve::aimd_controller ctl{{.initial = 100, .floor = 1, .ceiling = 200, .decrease = 0.5, .interval = 1h}, bucket};
    EXPECT_EQ(bucket.current_rate().tokens_per_second(), 100);

    auto ok = ctl.wrap([] { return 1; });
    EXPECT_EQ(ok(), 1);
    auto overloaded = ctl.wrap([]() -> int { throw valve::error(valve::errc::overloaded); });
    EXPECT_THROW(overloaded(), valve::error);
    EXPECT_EQ(bucket.current_rate().tokens_per_second(), 50);

    auto async_overloaded = ctl.wrap([]() -> asio::awaitable<void> {
        throw valve::error(valve::errc::overloaded);
        co_return;
    });
    auto async_ok = ctl.wrap([]() -> asio::awaitable<int> { co_return 2; });
    int value = 0;
    int errors = 0;
    asio::co_spawn(ioc, async_ok(), [&](std::exception_ptr e, int v) {
        value = v;
        errors += e ? 1 : 0;
    });
    asio::co_spawn(ioc, async_overloaded(), [&](std::exception_ptr e) { errors += e ? 1 : 0; });
    ioc.run();
    EXPECT_EQ(value, 2);
    EXPECT_EQ(errors, 1);
    const auto st = ctl.stats();
    EXPECT_EQ(st.successes, 2u);
    EXPECT_EQ(st.overloads, 2u);
    EXPECT_EQ(st.decreases, 1u) << "the second overload came within the hour-long interval";
}

TEST(aimd, bad_options_are_refused)
{
    auto make = [](valve::aimd_options o) { valve::aimd_controller c{std::move(o), [](valve::rate) {}}; };
    EXPECT_THROW(make({.floor = 0}), valve::error);
    EXPECT_THROW(make({.initial = 5, .floor = 10}), valve::error);
    EXPECT_THROW(make({.ceiling = 0.5}), valve::error);
    EXPECT_THROW(make({.decrease = 1.0}), valve::error);
    EXPECT_THROW(make({.step = -1}), valve::error);
    EXPECT_THROW(make({.interval = 0s}), valve::error);
    EXPECT_THROW(valve::aimd_controller({}, valve::aimd_controller::target{}), valve::error);
}

TEST(aimd, drives_a_profiles_rate_through_the_manager)
{
    asio::io_context ioc;
    valve::manager mgr{ioc.get_executor()};
    mgr.register_profile("shared", valve::shared_resource("key", valve::rate::per_second(100)));
    mgr.register_profile("pro", valve::dedicated_resource(valve::rate::per_second(100), 5),
                         valve::also_limit(valve::rate::per(1000, std::chrono::minutes(1)), 1000));
    auto rate_of = [](const std::shared_ptr<valve::limiter>& l) {
        return static_cast<valve::bucket_resource&>(l->limits()).primary().current_rate().tokens_per_second();
    };
    const auto before = mgr.get_limiter("pro", "old-user");
    valve::aimd_controller shared{{.initial = 40, .floor = 1, .ceiling = 100, .decrease = 0.5},
                                  [&](valve::rate r) { mgr.set_rate("shared", r); }};
    valve::aimd_controller pro{{.initial = 60, .floor = 1, .ceiling = 100, .decrease = 0.5},
                               [&](valve::rate r) { mgr.set_rate("pro", r); }};
    EXPECT_EQ(rate_of(mgr.get_limiter("shared", "a")), 40);
    EXPECT_EQ(rate_of(before), 60);
    pro.on_overload(t0);
    EXPECT_EQ(rate_of(before), 30) << "an existing user's limiter follows";
    EXPECT_EQ(rate_of(mgr.get_limiter("pro", "new-user")), 30) << "and so does a new user's";
    EXPECT_EQ(static_cast<valve::bucket_resource&>(before->limits()).primary().burst(), 5u) << "the burst stays";
    EXPECT_THROW(mgr.set_rate("gold", valve::rate::per_second(1)), valve::error);
    EXPECT_THROW(mgr.set_rate("pro", valve::rate::per_second(std::nan(""))), valve::error);
}
