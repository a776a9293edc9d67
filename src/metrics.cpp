#include <valve/metrics.hpp>

#include <valve/error.hpp>

#include <charconv>
#include <cmath>

namespace valve {

namespace {

bool valid_name(std::string_view n, bool metric)
{
    if (n.empty()) return false;
    for (std::size_t i = 0; i < n.size(); ++i) {
        const char c = n[i];
        const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || (metric && c == ':');
        if (!alpha && !(i > 0 && c >= '0' && c <= '9')) return false;
    }
    return true;
}

std::string number(double v)
{
    if (std::isnan(v)) return "NaN";
    if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
    char buf[32];
    const auto r = std::to_chars(buf, buf + sizeof buf, v); // shortest form that reads back exactly
    return std::string(buf, r.ptr);
}

void escape(std::string& out, std::string_view s, bool quote)
{
    for (char c : s) {
        if (c == '\\')
            out += "\\\\";
        else if (c == '\n')
            out += "\\n";
        else if (c == '"' && quote)
            out += "\\\"";
        else
            out += c;
    }
}

double seconds(std::chrono::nanoseconds d) { return std::chrono::duration<double>(d).count(); }

} // namespace

prometheus_writer::prometheus_writer(std::string prefix) : prefix_(std::move(prefix))
{
    if (!valid_name(prefix_, true))
        detail::throw_error(errc::invalid_argument, "prometheus_writer: \"" + prefix_ +
                                                        "\" is not a valid metric name prefix ([a-zA-Z_:][a-zA-Z0-9_:]*)");
}

prometheus_writer& prometheus_writer::sample(std::string_view name, const char* type, std::string_view help,
                                             double value, const metric_labels& labels)
{
    if (!valid_name(name, true))
        detail::throw_error(errc::invalid_argument, "prometheus_writer: \"" + std::string{name} +
                                                        "\" is not a valid metric name");
    std::string full = prefix_ + "_" + std::string{name};
    auto it = families_.find(full);
    if (it == families_.end()) {
        it = families_.emplace(full, family{std::string{help}, type, {}}).first;
        order_.push_back(full);
    } else if (std::string_view{it->second.type} != type) {
        detail::throw_error(errc::invalid_argument, "prometheus_writer: " + full + " was added as a " +
                                                        it->second.type + " before, now as a " + type);
    }
    std::string line = full;
    if (!labels.empty()) {
        line += '{';
        bool first = true;
        for (const auto& [k, v] : labels) {
            if (!valid_name(k, false) || k.starts_with("__"))
                detail::throw_error(errc::invalid_argument, "prometheus_writer: \"" + k + "\" is not a valid label name");
            if (!first) line += ',';
            first = false;
            line += k;
            line += "=\"";
            escape(line, v, true);
            line += '"';
        }
        line += '}';
    }
    line += ' ';
    line += number(value);
    it->second.samples.push_back(std::move(line));
    return *this;
}

prometheus_writer& prometheus_writer::gauge(std::string_view name, std::string_view help, double value,
                                            const metric_labels& labels)
{
    return sample(name, "gauge", help, value, labels);
}

prometheus_writer& prometheus_writer::counter(std::string_view name, std::string_view help, double value,
                                              const metric_labels& labels)
{
    return sample(name, "counter", help, value, labels);
}

prometheus_writer& prometheus_writer::add(const limiter_stats& s, const metric_labels& labels)
{
    auto n = [](std::uint64_t v) { return static_cast<double>(v); };
    counter("tasks_submitted_total", "Tasks submitted, accepted or not.", n(s.submitted), labels);
    counter("tasks_rejected_total", "Tasks refused at once: queue full or shutting down.", n(s.rejected), labels);
    counter("tasks_completed_total", "Tasks that ran and returned normally.", n(s.completed), labels);
    counter("tasks_failed_total", "Tasks that ran and threw.", n(s.failed), labels);
    counter("tasks_cancelled_total", "Tasks removed before running: cancelled or aborted by shutdown.",
            n(s.cancelled), labels);
    gauge("tasks_queued", "Tasks waiting to run now.", n(s.queued), labels);
    gauge("tasks_running", "Tasks running now.", n(s.running), labels);
    counter("queue_wait_seconds_total", "Time tasks spent between admission and start.", seconds(s.queue_time_total),
            labels);
    gauge("queue_wait_seconds_max", "The longest time a task spent between admission and start.",
          seconds(s.queue_time_max), labels);
    counter("token_wait_seconds_total", "Time spent waiting for rate tokens.", seconds(s.token_wait_total), labels);
    gauge("token_wait_seconds_max", "The longest wait for a rate token.", seconds(s.token_wait_max), labels);
    if (s.last_progress != std::chrono::steady_clock::time_point{})
        gauge("seconds_since_progress", "Seconds since a task last started or finished.",
              seconds(std::chrono::steady_clock::now() - s.last_progress), labels);
    return *this;
}

std::string prometheus_writer::str() const
{
    std::string out;
    for (const auto& name : order_) {
        const family& f = families_.find(name)->second;
        out += "# HELP " + name + ' ';
        escape(out, f.help, false);
        out += "\n# TYPE " + name + ' ' + f.type + '\n';
        for (const auto& line : f.samples) out += line + '\n';
    }
    return out;
}

std::string to_prometheus(const limiter_stats& stats, const metric_labels& labels)
{
    return prometheus_writer{}.add(stats, labels).str();
}

} // namespace valve
