#include "gcra.hpp"

#include <valve/error.hpp>

#include <valve/gcra_script.hpp>

#include <cmath>
#include <numeric>

namespace valve::detail {

const redis_script& gcra_script()
{
    static const redis_script script{gcra_lua};
    return script;
}

gcra_interval gcra_interval_of(const rate& r, std::size_t burst, const std::string& where)
{
    if (validate(r))
        throw_error(errc::invalid_argument, where + ": rate " + to_string(r) +
                                                " is not usable; give a finite, positive count over a positive period");
    if (r.is_unlimited() || r.is_zero())
        throw_error(errc::invalid_argument,
                    where + ": rate " + to_string(r) +
                        " cannot be held in Redis (a zero rate would keep its key forever, an unlimited one "
                        "needs no Redis); give a positive, finite rate");
    if (burst == 0) throw_error(errc::invalid_argument, where + ": burst is 0; give at least 1");
    if (burst > gcra_max_burst)
        throw_error(errc::invalid_argument, where + ": burst " + std::to_string(burst) +
                                                " is more than a limit in Redis can hold (2^31); give a smaller one");
    __extension__ typedef __int128 i128;
    // count * 2^k must be a whole number: a double is a dyadic fraction, so some k <= 60 makes it
    // one unless the count is tiny, in which case it is rounded (up in time, down in rate).
    double count = r.count();
    int k = 0;
    while (count != std::floor(count) && k < 60 && count < 1e15) {
        count *= 2;
        ++k;
    }
    const i128 c = static_cast<i128>(std::floor(count));
    if (c <= 0) throw_error(errc::invalid_argument, where + ": rate " + to_string(r) + " is too small to hold");
    // interval (us) = period_ns * 2^k / (1000 * count * 2^k)
    i128 num = static_cast<i128>(r.period().count());
    if (k > 0) num <<= k;
    i128 den = 1000 * c;
    const i128 g = [](i128 a, i128 b) {
        while (b != 0) {
            const i128 t = a % b;
            a = b;
            b = t;
        }
        return a;
    }(num, den);
    num /= g;
    den /= g;
    gcra_interval out;
    constexpr i128 max_d = i128{1} << 20;
    i128 q = num / den;
    i128 rem = num % den;
    if (den > max_d) {
        rem = (rem * max_d + den - 1) / den;
        den = max_d;
        if (rem == den) {
            ++q;
            rem = 0;
        }
    }
    // The whole burst must refill within 2^50 us (about 35 years): the script's sums stay exact.
    constexpr i128 max_window = i128{1} << 50;
    if (q >= max_window || static_cast<i128>(burst) * q + static_cast<i128>(burst) * rem / den >= max_window ||
        static_cast<i128>(burst) * q >= i128{30} * 365 * 24 * 3600 * 1000000)
        throw_error(errc::invalid_argument, where + ": a burst of " + std::to_string(burst) + " at " +
                                                to_string(r) + " takes over 30 years to refill; give a faster rate "
                                                               "or a smaller burst");
    out.q = static_cast<std::int64_t>(q);
    out.r = static_cast<std::int64_t>(rem);
    out.d = static_cast<std::int64_t>(den);
    return out;
}

std::vector<std::string> gcra_args(const std::vector<gcra_limit>& limits, std::uint64_t give_back,
                                   const std::vector<gcra_ask>& asks, std::optional<std::int64_t> now_us)
{
    std::vector<std::string> a;
    a.reserve(1 + limits.size() * 5 + 2 + asks.size() * 2);
    a.push_back(std::to_string(limits.size()));
    for (const auto& l : limits) a.push_back(l.key);
    a.push_back(now_us ? std::to_string(*now_us) : std::string{});
    a.push_back(std::to_string(give_back));
    for (const auto& l : limits) {
        a.push_back(std::to_string(l.interval.q));
        a.push_back(std::to_string(l.interval.r));
        a.push_back(std::to_string(l.interval.d));
        a.push_back(std::to_string(l.burst));
    }
    for (const auto& w : asks) {
        a.push_back(std::to_string(w.n));
        a.push_back(std::to_string(w.max_wait_us));
    }
    return a;
}

std::optional<gcra_result> gcra_parse(const redis_reply& reply, std::size_t asks)
{
    if (reply.type != redis_reply::kind::array || reply.elements.size() != asks + 1) return std::nullopt;
    gcra_result out;
    for (const auto& e : reply.elements)
        if (e.type != redis_reply::kind::integer) return std::nullopt;
    out.free_us = reply.elements[0].integer;
    out.waits.reserve(asks);
    for (std::size_t i = 1; i < reply.elements.size(); ++i) out.waits.push_back(reply.elements[i].integer);
    return out;
}

} // namespace valve::detail
