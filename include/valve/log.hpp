#ifndef VALVE_LOG_HPP
#define VALVE_LOG_HPP

#include <memory>

namespace spdlog {
class logger;
}

namespace valve {

/// The logger valve writes to: an spdlog logger named "valve", created on first use with the
/// level `warn`. Per-operation messages are logged at debug or trace only.
std::shared_ptr<spdlog::logger> logger();

/// Replaces valve's logger (for example with one that writes to the application's sinks).
/// A null pointer restores the default. Thread-safe.
void set_logger(std::shared_ptr<spdlog::logger> l);

} // namespace valve

#endif
