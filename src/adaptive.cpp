#include <valve/adaptive.hpp>

#include <valve/error.hpp>
#include <valve/log.hpp>
#include <valve/token_bucket.hpp>

#include <boost/system/system_error.hpp>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>

namespace valve {

namespace {

std::string num(double x) { return std::to_string(x); }

void check(const aimd_options& o)
{
    const std::string n = "aimd_controller \"" + o.name + "\": ";
    auto finite = [](double x) { return std::isfinite(x); };
    if (!finite(o.floor) || o.floor <= 0.0)
        detail::throw_error(errc::invalid_argument, n + "floor must be a positive rate, got " + num(o.floor));
    if (!finite(o.ceiling) || o.ceiling < o.floor)
        detail::throw_error(errc::invalid_argument, n + "ceiling (" + num(o.ceiling) + ") is below floor (" +
                                                        num(o.floor) + ") or not finite");
    if (!(o.initial >= o.floor && o.initial <= o.ceiling))
        detail::throw_error(errc::invalid_argument, n + "initial rate " + num(o.initial) + " lies outside [" +
                                                        num(o.floor) + ", " + num(o.ceiling) + "]");
    if (!(o.decrease > 0.0 && o.decrease < 1.0))
        detail::throw_error(errc::invalid_argument, n + "decrease must lie in (0, 1), got " + num(o.decrease));
    if (!finite(o.step) || o.step < 0.0)
        detail::throw_error(errc::invalid_argument, n + "step must be a finite number >= 0, got " + num(o.step));
    if (o.interval <= std::chrono::nanoseconds::zero())
        detail::throw_error(errc::invalid_argument, n + "interval must be positive, got " +
                                                        std::to_string(o.interval.count()) + " ns");
}

} // namespace

aimd_controller::aimd_controller(aimd_options options, target apply)
    : options_(std::move(options)), apply_(std::move(apply)), is_overload_(&default_is_overload)
{
    check(options_);
    if (!apply_)
        detail::throw_error(errc::invalid_argument, "aimd_controller \"" + options_.name +
                                                        "\": the target is empty; give a callable that applies the rate");
    stats_.rate = options_.initial;
    apply_(rate::per_second(options_.initial));
}

aimd_controller::aimd_controller(aimd_options options, token_bucket& bucket)
    : aimd_controller(std::move(options), [&bucket](rate r) { bucket.set_rate(r); })
{
}

bool aimd_controller::default_is_overload(const std::exception_ptr& error)
{
    try {
        if (error) std::rethrow_exception(error);
    } catch (const boost::system::system_error& e) {
        return e.code() == errc::overloaded || e.code() == errc::timed_out;
    } catch (...) {
    }
    return false;
}

void aimd_controller::classify(std::function<bool(const std::exception_ptr&)> is_overload)
{
    std::lock_guard lock{mutex_};
    is_overload_ = is_overload ? std::move(is_overload) : std::function<bool(const std::exception_ptr&)>{&default_is_overload};
}

void aimd_controller::set(double r, bool up)
{
    if (r == stats_.rate) return;
    stats_.rate = r;
    ++(up ? stats_.increases : stats_.decreases);
    apply_(rate::per_second(r));
    if (up)
        logger()->debug("{}: rate raised to {:.3f}/s", options_.name, r);
    else
        logger()->info("{}: overload; rate lowered to {:.3f}/s", options_.name, r);
}

void aimd_controller::on_success(time_point now)
{
    std::lock_guard lock{mutex_};
    ++stats_.successes;
    if (!started_) {
        started_ = true;
        last_increase_ = now;
        return;
    }
    if (now - last_increase_ < options_.interval) return;
    last_increase_ = now;
    set(std::min(options_.ceiling, stats_.rate + options_.step), true);
}

void aimd_controller::on_overload(time_point now)
{
    std::lock_guard lock{mutex_};
    ++stats_.overloads;
    // Tasks sent at the old rate still report overload: one decrease per interval. (The first
    // is never held back, however close `now` is to the clock's epoch.)
    if (decreased_ && now - last_decrease_ < options_.interval) return;
    started_ = true;
    decreased_ = true;
    last_decrease_ = now;
    last_increase_ = now;
    set(std::max(options_.floor, stats_.rate * options_.decrease), false);
}

bool aimd_controller::observe(const std::exception_ptr& error, time_point now)
{
    if (!error) {
        on_success(now);
        return false;
    }
    bool overload;
    {
        std::lock_guard lock{mutex_};
        overload = is_overload_(error);
    }
    if (overload) on_overload(now);
    return overload;
}

rate aimd_controller::current() const
{
    std::lock_guard lock{mutex_};
    return rate::per_second(stats_.rate);
}

aimd_stats aimd_controller::stats() const
{
    std::lock_guard lock{mutex_};
    return stats_;
}

} // namespace valve
