#include <valve/backoff.hpp>
#include <valve/detail/saturate.hpp>
#include <valve/error.hpp>

#include <cmath>
#include <random>
#include <string>

namespace valve {

namespace {

using std::chrono::nanoseconds;

std::string ms(nanoseconds d) { return std::to_string(static_cast<double>(d.count()) / 1e6) + " ms"; }

void check_common(const char* what, nanoseconds interval, double jitter, nanoseconds max_elapsed,
                  std::size_t max_attempts)
{
    const std::string name = what;
    if (interval < nanoseconds::zero())
        detail::throw_error(errc::invalid_argument, name + ": the interval is negative (" + ms(interval) +
                                                        "); give zero or more");
    if (!(jitter >= 0.0 && jitter <= 1.0))
        detail::throw_error(errc::invalid_argument, name + ": jitter must lie in [0, 1], got " +
                                                        std::to_string(jitter));
    if (max_elapsed < nanoseconds::zero())
        detail::throw_error(errc::invalid_argument,
                            name + ": max_elapsed is negative (" + ms(max_elapsed) + "); give zero or more");
    if (max_attempts == 0)
        detail::throw_error(errc::invalid_argument,
                            name + ": max_attempts is 0; it counts the first attempt, so give at least 1");
}

// Stops after `max_attempts`, or when the next attempt would begin after `max_elapsed`.
std::optional<nanoseconds> within_limits(nanoseconds delay, const backoff_step& s, nanoseconds max_elapsed,
                                         std::size_t max_attempts)
{
    if (s.attempts >= max_attempts) return std::nullopt;
    // Saturated: with `max_elapsed` at its longest, no delay is too long.
    if (detail::saturating_add(s.elapsed, delay) > max_elapsed) return std::nullopt;
    return delay;
}

nanoseconds randomized(double d, double jitter, double u)
{
    const double r = d * (1.0 - jitter + 2.0 * jitter * u);
    if (!(r < static_cast<double>(nanoseconds::max().count()))) return nanoseconds::max();
    return nanoseconds{std::llround(r)};
}

std::uint64_t splitmix64(std::uint64_t& state) noexcept
{
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// A fresh seed per unseeded run, without a system call each time.
std::uint64_t fresh_seed()
{
    thread_local std::uint64_t state = [] {
        std::random_device rd;
        return (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
    }();
    return splitmix64(state);
}

} // namespace

backoff_policy::backoff_policy(const exponential_backoff& p)
{
    check_common("exponential_backoff", p.initial, p.jitter, p.max_elapsed, p.max_attempts);
    if (!(p.multiplier >= 1.0) || std::isinf(p.multiplier))
        detail::throw_error(errc::invalid_argument, "exponential_backoff: multiplier must be a finite number >= 1, got " +
                                                        std::to_string(p.multiplier));
    if (p.max_interval < p.initial)
        detail::throw_error(errc::invalid_argument, "exponential_backoff: max_interval (" + ms(p.max_interval) +
                                                        ") is below initial (" + ms(p.initial) +
                                                        "); raise max_interval or lower initial");
    next_ = [p](const backoff_step& s) {
        const double base = static_cast<double>(p.initial.count()) *
                            std::pow(p.multiplier, static_cast<double>(s.attempts > 0 ? s.attempts - 1 : 0));
        const double capped = std::min(base, static_cast<double>(p.max_interval.count()));
        return within_limits(randomized(capped, p.jitter, s.random), s, p.max_elapsed, p.max_attempts);
    };
}

backoff_policy::backoff_policy(const constant_backoff& p)
{
    check_common("constant_backoff", p.interval, p.jitter, p.max_elapsed, p.max_attempts);
    next_ = [p](const backoff_step& s) {
        return within_limits(randomized(static_cast<double>(p.interval.count()), p.jitter, s.random), s,
                             p.max_elapsed, p.max_attempts);
    };
}

backoff_policy::backoff_policy(backoff_function f) : next_(std::move(f))
{
    if (!next_)
        detail::throw_error(errc::invalid_argument, "backoff_policy: the backoff function is empty; give a callable");
}

backoff_policy backoff_policy::seeded(std::uint64_t seed) const
{
    backoff_policy p = *this;
    p.seed_ = seed;
    return p;
}

backoff_schedule backoff_policy::schedule() const { return backoff_schedule{next_, seed_ ? *seed_ : fresh_seed()}; }

std::optional<nanoseconds> backoff_policy::next(const backoff_step& step) const { return next_(step); }

double backoff_schedule::uniform() noexcept
{
    return static_cast<double>(splitmix64(state_) >> 11) * 0x1.0p-53;
}

std::optional<nanoseconds> backoff_schedule::next(nanoseconds elapsed)
{
    ++attempts_;
    const backoff_step step{attempts_, elapsed, uniform()};
    auto d = next_(step);
    if (d && *d < nanoseconds::zero()) d = nanoseconds::zero();
    return d;
}

} // namespace valve
