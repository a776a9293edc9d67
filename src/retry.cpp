#include <valve/retry.hpp>

#include <valve/error.hpp>
#include <valve/log.hpp>

#include <boost/asio/error.hpp>
#include <boost/system/system_error.hpp>

#include <spdlog/spdlog.h>

#include <cmath>
#include <string>

namespace valve {

namespace {

std::string describe(const std::exception_ptr& e)
{
    try {
        if (e) std::rethrow_exception(e);
    } catch (const std::exception& x) {
        return x.what();
    } catch (...) {
    }
    return "unknown exception";
}

enum class verdict { permanent, never, ask };

// What no predicate decides: a permanent error (whose inner one is what to rethrow), and
// errors that mean the caller or a shutdown ended the work. One rethrow tells them all.
verdict classify(std::exception_ptr& error)
{
    try {
        std::rethrow_exception(error);
    } catch (const permanent_error& p) {
        if (p.inner()) error = p.inner();
        return verdict::permanent;
    } catch (const boost::system::system_error& x) {
        if (x.code() == boost::asio::error::operation_aborted || x.code() == errc::shutting_down)
            return verdict::never;
    } catch (...) {
    }
    return verdict::ask;
}

} // namespace

retry_budget::retry_budget(retry_budget_options options) : options_(options), slot_length_(options.window / slots)
{
    if (!(options.ratio >= 0.0) || std::isinf(options.ratio))
        detail::throw_error(errc::invalid_argument,
                            "retry_budget: ratio must be a finite number >= 0, got " + std::to_string(options.ratio));
    if (!(options.min_retries_per_second >= 0.0) || std::isinf(options.min_retries_per_second))
        detail::throw_error(errc::invalid_argument, "retry_budget: min_retries_per_second must be a finite number >= 0, got " +
                                                        std::to_string(options.min_retries_per_second));
    if (options.window < std::chrono::nanoseconds(slots))
        detail::throw_error(errc::invalid_argument, "retry_budget: the window is " +
                                                        std::to_string(options.window.count()) +
                                                        " ns; give at least 10 ns");
}

retry_budget::slot& retry_budget::at(time_point now)
{
    const std::int64_t tag = now.time_since_epoch() / slot_length_;
    slot& s = slots_[static_cast<std::size_t>(tag) % slots];
    if (s.tag != tag) s = slot{tag, 0, 0};
    return s;
}

template <class F>
std::uint64_t retry_budget::sum(time_point now, F field) const
{
    const std::int64_t tag = now.time_since_epoch() / slot_length_;
    std::uint64_t n = 0;
    for (const slot& s : slots_)
        if (s.tag <= tag && s.tag > tag - static_cast<std::int64_t>(slots)) n += field(s);
    return n;
}

void retry_budget::record_call(time_point now)
{
    std::lock_guard lock{mutex_};
    ++at(now).calls;
}

bool retry_budget::try_retry(time_point now)
{
    std::lock_guard lock{mutex_};
    const auto calls = sum(now, [](const slot& s) { return s.calls; });
    const auto retries = sum(now, [](const slot& s) { return s.retries; });
    const double window_s = std::chrono::duration<double>(options_.window).count();
    const double allowed = options_.ratio * static_cast<double>(calls) + options_.min_retries_per_second * window_s;
    if (static_cast<double>(retries + 1) > allowed) {
        ++refused_;
        return false;
    }
    ++at(now).retries;
    return true;
}

std::uint64_t retry_budget::calls(time_point now) const
{
    std::lock_guard lock{mutex_};
    return sum(now, [](const slot& s) { return s.calls; });
}

std::uint64_t retry_budget::retries(time_point now) const
{
    std::lock_guard lock{mutex_};
    return sum(now, [](const slot& s) { return s.retries; });
}

std::uint64_t retry_budget::refused() const
{
    std::lock_guard lock{mutex_};
    return refused_;
}

namespace detail {

retry_state::retry_state(const backoff_policy& policy, retry_options options)
    : schedule_(policy.schedule()), options_(std::move(options)), start_(std::chrono::steady_clock::now())
{
}

void retry_state::starting()
{
    if (attempts_++ == 0 && options_.budget) options_.budget->record_call();
}

std::optional<std::chrono::nanoseconds> retry_state::failed(std::exception_ptr& error, bool cancelled)
{
    auto log = logger();
    const verdict v = classify(error);
    if (v == verdict::permanent) {
        log->debug("retry: attempt {} failed with a permanent error ({}); not retrying", attempts_, describe(error));
        return std::nullopt;
    }
    if (cancelled || v == verdict::never) return std::nullopt;
    if (options_.retry_if && !options_.retry_if(error)) {
        log->debug("retry: attempt {} failed with a non-transient error ({}); not retrying", attempts_,
                   describe(error));
        return std::nullopt;
    }
    const auto elapsed = std::chrono::steady_clock::now() - start_;
    const auto delay = schedule_.next(std::chrono::duration_cast<std::chrono::nanoseconds>(elapsed));
    if (!delay) {
        log->debug("retry: giving up after {} attempts ({})", attempts_, describe(error));
        return std::nullopt;
    }
    if (options_.budget && !options_.budget->try_retry()) {
        log->debug("retry: the retry budget is spent; giving up after {} attempts ({})", attempts_,
                   describe(error));
        return std::nullopt;
    }
    if (options_.on_retry)
        options_.on_retry(retry_event{attempts_, *delay, error});
    else
        log->debug("retry: attempt {} failed ({}); retrying in {} ms", attempts_, describe(error),
                   std::chrono::duration<double, std::milli>(*delay).count());
    return delay;
}

} // namespace detail

} // namespace valve
