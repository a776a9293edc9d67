#ifndef VALVE_METRICS_HPP
#define VALVE_METRICS_HPP

#include <valve/limiter_stats.hpp>

#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace valve {

/// Label names and values of one sample, e.g. `{{"profile", "free-tier"}}`.
using metric_labels = std::vector<std::pair<std::string, std::string>>;

/// Writes valve's statistics in the Prometheus text exposition format (version 0.0.4), the
/// body of a `GET /metrics` answer (`Content-Type: text/plain; version=0.0.4`).
///
/// Samples of one metric are grouped under one `# HELP` and `# TYPE`, whatever order they
/// were added in; label values are escaped. Every name starts with the prefix ("valve" by
/// default). From a `limiter_stats`:
///
/// | metric | type |
/// |---|---|
/// | `valve_tasks_submitted_total`, `_rejected_total`, `_completed_total`, `_failed_total`, `_cancelled_total` | counter |
/// | `valve_tasks_queued`, `valve_tasks_running` | gauge |
/// | `valve_queue_wait_seconds_total`, `valve_token_wait_seconds_total` | counter |
/// | `valve_queue_wait_seconds_max`, `valve_token_wait_seconds_max` | gauge |
/// | `valve_seconds_since_progress` (only once a task has started) | gauge |
///
/// Not thread-safe: build one per scrape.
class prometheus_writer {
public:
    /// Throws `valve::error` (`errc::invalid_argument`) for a prefix that is not a valid
    /// Prometheus metric name.
    explicit prometheus_writer(std::string prefix = "valve");

    /// Adds the samples of `stats`, labelled with `labels`.
    prometheus_writer& add(const limiter_stats& stats, const metric_labels& labels = {});

    /// Adds one gauge sample, `<prefix>_<name>`; say, a current rate in tokens per second.
    /// Throws `valve::error` (`errc::invalid_argument`) for an invalid name or label name, or a
    /// metric already added as a counter.
    prometheus_writer& gauge(std::string_view name, std::string_view help, double value,
                             const metric_labels& labels = {});
    /// Adds one counter sample; `name` should end in `_total`.
    prometheus_writer& counter(std::string_view name, std::string_view help, double value,
                               const metric_labels& labels = {});

    /// The exposition text.
    std::string str() const;

private:
    struct family {
        std::string help;
        const char* type;
        std::vector<std::string> samples;
    };
    prometheus_writer& sample(std::string_view name, const char* type, std::string_view help, double value,
                              const metric_labels& labels);

    std::string prefix_;
    std::vector<std::string> order_;
    std::map<std::string, family, std::less<>> families_;
};

/// `prometheus_writer{}.add(stats, labels).str()`.
std::string to_prometheus(const limiter_stats& stats, const metric_labels& labels = {});

} // namespace valve

#endif
