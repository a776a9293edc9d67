// metrics.hpp and limiter_stats.hpp are for code that only reports or configures: they must not
// pull in Asio, whose headers take seconds to compile. Every Asio header includes
// boost/asio/detail/config.hpp, so its guard says whether one came in.
#include <valve/limiter_stats.hpp>
#include <valve/metrics.hpp>

#ifdef BOOST_ASIO_DETAIL_CONFIG_HPP
#error "valve/metrics.hpp or valve/limiter_stats.hpp includes Asio"
#endif

#include <gtest/gtest.h>

TEST(metrics_header, reports_a_limiters_statistics_without_asio)
{
    valve::limiter_stats s;
    s.submitted = 3;
    s.rejected = 1;
    const std::string text = valve::to_prometheus(s, {{"profile", "p"}});
    EXPECT_NE(text.find("valve_tasks_submitted_total{profile=\"p\"} 3"), std::string::npos) << text;
    EXPECT_NE(text.find("valve_tasks_rejected_total{profile=\"p\"} 1"), std::string::npos) << text;
    EXPECT_EQ(valve::limiter_options{}.on_queue_full, valve::queue_full_policy::reject);
}
