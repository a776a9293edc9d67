#include <valve/error.hpp>
#include <valve/metrics.hpp>

#include "promtool.hpp"

#include <gtest/gtest.h>

#include <map>
#include <sstream>

namespace {

// A small parser of the text format: every sample line as "name{labels}" -> value, and checks
// that each family's HELP and TYPE come once, before its samples, which are contiguous.
std::map<std::string, double> parse(const std::string& text)
{
    std::map<std::string, double> out;
    std::istringstream in{text};
    std::string line;
    std::string family;
    std::map<std::string, int> seen;
    while (std::getline(in, line)) {
        if (line.starts_with("# HELP ")) {
            family = line.substr(7, line.find(' ', 7) - 7);
            EXPECT_EQ(seen[family]++, 0) << "family " << family << " appears twice";
            continue;
        }
        if (line.starts_with("# TYPE ")) {
            EXPECT_EQ(line.substr(7, family.size()), family);
            continue;
        }
        const auto space = line.rfind(' ');
        const std::string key = line.substr(0, space);
        EXPECT_TRUE(key.starts_with(family)) << key << " outside its family " << family;
        out[key] = std::stod(line.substr(space + 1));
    }
    return out;
}

} // namespace

TEST(metrics, limiter_stats_in_the_prometheus_text_format)
{
    valve::limiter_stats s;
    s.submitted = 10;
    s.rejected = 2;
    s.completed = 6;
    s.failed = 1;
    s.cancelled = 1;
    s.queued = 3;
    s.running = 2;
    s.queue_time_total = std::chrono::milliseconds(1500);
    s.token_wait_max = std::chrono::milliseconds(250);
    const std::string text = valve::to_prometheus(s, {{"profile", "free-tier"}});
    const auto m = parse(text);
    EXPECT_EQ(m.at("valve_tasks_submitted_total{profile=\"free-tier\"}"), 10);
    EXPECT_EQ(m.at("valve_tasks_rejected_total{profile=\"free-tier\"}"), 2);
    EXPECT_EQ(m.at("valve_tasks_completed_total{profile=\"free-tier\"}"), 6);
    EXPECT_EQ(m.at("valve_tasks_failed_total{profile=\"free-tier\"}"), 1);
    EXPECT_EQ(m.at("valve_tasks_cancelled_total{profile=\"free-tier\"}"), 1);
    EXPECT_EQ(m.at("valve_tasks_queued{profile=\"free-tier\"}"), 3);
    EXPECT_EQ(m.at("valve_tasks_running{profile=\"free-tier\"}"), 2);
    EXPECT_EQ(m.at("valve_queue_wait_seconds_total{profile=\"free-tier\"}"), 1.5);
    EXPECT_EQ(m.at("valve_token_wait_seconds_max{profile=\"free-tier\"}"), 0.25);
    EXPECT_EQ(m.count("valve_seconds_since_progress{profile=\"free-tier\"}"), 0u) << "no task has started";
    EXPECT_NE(text.find("# TYPE valve_tasks_submitted_total counter\n"), std::string::npos);
    EXPECT_NE(text.find("# TYPE valve_tasks_queued gauge\n"), std::string::npos);
    EXPECT_TRUE(valve::test::promtool_accepts(text));
}

TEST(metrics, samples_of_one_metric_are_grouped_and_labels_escaped)
{
    valve::prometheus_writer w{"app"};
    w.add({}, {{"profile", "a"}});
    w.gauge("rate_tokens_per_second", "Current rate.", 2.5, {{"key", "quote\" back\\slash\nnewline"}});
    w.add({}, {{"profile", "b"}});
    const std::string text = w.str();
    const auto m = parse(text); // checks grouping
    EXPECT_EQ(m.count("app_tasks_submitted_total{profile=\"a\"}"), 1u);
    EXPECT_EQ(m.count("app_tasks_submitted_total{profile=\"b\"}"), 1u);
    EXPECT_NE(text.find("app_rate_tokens_per_second{key=\"quote\\\" back\\\\slash\\nnewline\"} 2.5\n"),
              std::string::npos)
        << text;
    EXPECT_TRUE(valve::test::promtool_accepts(text)); // the escapes, grouping and HELP as Prometheus reads them
}

TEST(metrics, bad_names_are_refused)
{
    EXPECT_THROW(valve::prometheus_writer{"9lives"}, valve::error);
    valve::prometheus_writer w;
    EXPECT_THROW(w.gauge("bad-name", "", 1), valve::error);
    EXPECT_THROW(w.gauge("ok", "", 1, {{"bad label", "x"}}), valve::error);
    w.counter("things_total", "", 1);
    EXPECT_THROW(w.gauge("things_total", "", 1), valve::error) << "a counter added again as a gauge";
}
