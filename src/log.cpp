#include <valve/log.hpp>

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <mutex>

namespace valve {

namespace {

std::mutex mutex;
std::shared_ptr<spdlog::logger> current;

std::shared_ptr<spdlog::logger> make_default()
{
    auto l = std::make_shared<spdlog::logger>("valve", std::make_shared<spdlog::sinks::stderr_color_sink_mt>());
    l->set_level(spdlog::level::warn);
    return l;
}

} // namespace

std::shared_ptr<spdlog::logger> logger()
{
    std::lock_guard lock{mutex};
    if (!current) current = make_default();
    return current;
}

void set_logger(std::shared_ptr<spdlog::logger> l)
{
    std::lock_guard lock{mutex};
    current = l ? std::move(l) : make_default();
}

} // namespace valve
