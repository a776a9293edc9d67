// Property tests of bucket_core against a reference model.
//
// The model is the token bucket's specification written as plainly as possible: whole
// nanoseconds and 128-bit integers, the time at which the bucket is full again kept as an
// absolute time, no packing, no epochs, no units finer than a nanosecond, no atomics. Where a
// rate's interval is a whole number of nanoseconds, bucket_core must answer every call exactly
// as the model does. For any rate, the tokens it grants over any interval must not exceed the
// burst plus the rate times the interval.
//
// Sequences are random but reproducible: a failing one is shrunk (operations dropped while it
// still fails) and printed with its seed. VALVE_MODEL_SEED=<n> replays one sequence.

#include <valve/bucket_core.hpp>

#include <valve/error.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

using namespace std::chrono_literals;
using valve::bucket_core;
using valve::rate;
using tp = bucket_core::time_point;

namespace {

__extension__ typedef __int128 wide;

const tp t0 = tp{} + 1000h;
// Sequences stay inside the span after which a bucket re-anchors its epoch (2^51 ns), which
// makes reservations made before it give nothing back: a documented, conservative difference
// the model does not copy.
constexpr std::int64_t max_span_ns = (std::int64_t{1} << 51) - 24LL * 3600 * 1'000'000'000;
// A zero or unlimited rate counts tokens in millionths.
constexpr wide timeless_cost = 1'000'000;

std::int64_t ns_of(tp t) { return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count(); }
tp tp_of(wide ns) { return tp{std::chrono::nanoseconds{static_cast<std::int64_t>(ns)}}; }

wide floor_div(wide a, wide b)
{
    const wide q = a / b;
    return (a % b != 0 && a < 0) ? q - 1 : q;
}

// A limit as the model sees it: `count` tokens every `count * interval` ns, zero or unlimited.
struct limit {
    enum kind_t { finite, zero, unlimited } kind = finite;
    std::int64_t count = 1;
    std::int64_t interval = 1; // ns per token, a whole number

    rate as_rate() const
    {
        if (kind == zero) return rate::zero();
        if (kind == unlimited) return rate::unlimited();
        return rate::per(static_cast<double>(count), std::chrono::nanoseconds{count * interval});
    }
    std::string text() const
    {
        if (kind == zero) return "zero";
        if (kind == unlimited) return "unlimited";
        return std::to_string(count) + " per " + std::to_string(count * interval) + "ns";
    }
};

// The specification: GCRA on whole nanoseconds. `tat` is when the bucket is full again
// (absolute ns); a zero or unlimited rate stops time, and `tat` then counts millionths of a
// token owed.
class model {
public:
    model(limit l, std::uint64_t burst, std::int64_t now) : limit_(l), burst_(burst), since_(now)
    {
        tat_ = timeless() ? 0 : now;
    }

    bool take(std::uint64_t n, std::int64_t now)
    {
        if (n == 0 || limit_.kind == limit::unlimited) return true;
        if (n > burst_) return false;
        const wide x = std::max(tat_, at(now)) + n * cost();
        if (x - at(now) > window()) return false;
        tat_ = x;
        return true;
    }

    // ns of the earliest time, or -1 for never.
    wide earliest(std::uint64_t n, std::int64_t now, std::uint64_t ahead) const
    {
        if (limit_.kind == limit::unlimited || (n == 0 && ahead == 0)) return now;
        if (n > burst_) return -1;
        const wide ready = std::max(tat_, at(now)) + (n + ahead) * cost() - window();
        if (ready <= at(now)) return now;
        if (limit_.kind == limit::zero) return -1;
        return ready;
    }

    struct held {
        std::uint64_t tokens = 0;
        wide ready = 0; // -1: never (zero rate)
        wide after = 0;
        std::uint64_t version = 0;
    };

    // An empty optional: refused with `why`.
    std::optional<held> reserve(std::uint64_t n, std::int64_t now, wide deadline, valve::errc& why)
    {
        if (n == 0 || limit_.kind == limit::unlimited) return held{n, now, 0, version_};
        if (n > burst_) {
            why = valve::errc::exceeds_burst;
            return std::nullopt;
        }
        const wide x = std::max(tat_, at(now)) + n * cost();
        wide ready = now;
        if (x - window() > at(now)) ready = limit_.kind == limit::zero ? -1 : x - window();
        if (ready == -1 ? deadline != -1 : ready > deadline) {
            why = valve::errc::would_exceed_deadline;
            return std::nullopt;
        }
        tat_ = x;
        return held{n, ready, x, version_};
    }

    // Tokens given back, in the bucket's cost units over `cost` (a fraction).
    double cancel(held& r, std::int64_t now)
    {
        const held h = r;
        r.tokens = 0;
        if (h.tokens == 0 || h.version != version_ || limit_.kind == limit::unlimited) return 0.0;
        if (limit_.kind == limit::finite && now > h.ready) return 0.0;
        const wide later = std::max<wide>(tat_ - h.after, 0);
        const wide restore = h.tokens * cost() - later;
        if (restore <= 0) return 0.0;
        const wide nx = std::max(tat_ - restore, std::min(tat_, at(now)));
        const wide back = tat_ - nx;
        tat_ = nx;
        return static_cast<double>(static_cast<long double>(back) / static_cast<long double>(cost()));
    }

    void refund(std::uint64_t n, std::int64_t now)
    {
        if (limit_.kind == limit::unlimited) return;
        tat_ = std::max(tat_ - static_cast<wide>(std::min(n, burst_)) * cost(), std::min(tat_, at(now)));
    }

    void set(limit l, std::uint64_t burst, std::int64_t now)
    {
        // Tokens accrued, in the old cost units; an unlimited rate that lasted any time refills.
        wide accrued = window();
        if (!(limit_.kind == limit::unlimited && now > since_)) accrued -= std::max<wide>(tat_ - at(now), 0);
        const wide old_cost = cost();
        limit_ = l;
        burst_ = burst;
        // The same tokens at the new cost, rounded down: a change never speeds the bucket up.
        const wide tokens = std::min(floor_div(accrued * cost(), old_cost), window());
        tat_ = at(now) + window() - tokens;
        since_ = now;
        ++version_;
    }

    double available(std::int64_t now) const
    {
        if (limit_.kind == limit::unlimited) return std::numeric_limits<double>::infinity();
        return static_cast<double>(static_cast<long double>(window() - std::max<wide>(tat_ - at(now), 0))
                                   / static_cast<long double>(cost()));
    }

    std::uint64_t burst() const { return burst_; }
    const limit& current() const { return limit_; }

private:
    bool timeless() const { return limit_.kind != limit::finite; }
    wide cost() const { return timeless() ? timeless_cost : limit_.interval; }
    wide window() const { return static_cast<wide>(burst_) * cost(); }
    wide at(std::int64_t now) const { return timeless() ? 0 : now; }

    limit limit_;
    std::uint64_t burst_;
    std::int64_t since_; // when the limit in force was set
    wide tat_ = 0;
    std::uint64_t version_ = 0;
};

enum class op_kind { advance, take, earliest, reserve, cancel, refund, set_rate, set_burst, wait_and_take };

struct op {
    op_kind kind;
    std::int64_t a = 0; // ns to advance; n; the held reservation's index
    std::int64_t b = 0; // ahead; deadline offset (-1: none)
    limit l{};
};

std::string describe(const op& o)
{
    switch (o.kind) {
    case op_kind::advance: return "advance " + std::to_string(o.a) + "ns";
    case op_kind::take: return "try_take(" + std::to_string(o.a) + ")";
    case op_kind::earliest: return "earliest(" + std::to_string(o.a) + ", ahead " + std::to_string(o.b) + ")";
    case op_kind::reserve:
        return "reserve(" + std::to_string(o.a) + ", deadline " + (o.b < 0 ? "none" : "+" + std::to_string(o.b) + "ns")
               + ")";
    case op_kind::cancel: return "cancel(held #" + std::to_string(o.a) + ")";
    case op_kind::refund: return "try_take(" + std::to_string(o.a) + ") then refund(" + std::to_string(o.a) + ")";
    case op_kind::set_rate: return "set_rate(" + o.l.text() + ")";
    case op_kind::set_burst: return "set_burst(" + std::to_string(o.a) + ")";
    case op_kind::wait_and_take: return "try_take(" + std::to_string(o.a) + ") at earliest and 1ns before";
    }
    return "?";
}

struct sequence {
    limit first;
    std::uint64_t burst = 1;
    std::vector<op> ops;
};

std::string describe(const sequence& s)
{
    std::ostringstream out;
    out << "bucket_core{" << s.first.text() << ", burst " << s.burst << "}\n";
    for (std::size_t i = 0; i < s.ops.size(); ++i) out << "  " << i << ": " << describe(s.ops[i]) << "\n";
    return out.str();
}

std::string text_of(tp t)
{
    if (t == tp::max()) return "never";
    return "t0+" + std::to_string(ns_of(t) - ns_of(t0)) + "ns";
}

// Replays `s` on a bucket_core and the model; the first disagreement, if any.
std::optional<std::string> disagreement(const sequence& s)
{
    std::int64_t now = ns_of(t0);
    const std::int64_t start = now;
    bucket_core b{s.first.as_rate(), s.burst, tp_of(now)};
    model m{s.first, s.burst, now};
    std::vector<bucket_core::reservation> held;
    std::vector<model::held> model_held;
    auto differ = [&](std::size_t i, const std::string& what) {
        return "op " + std::to_string(i) + " (" + describe(s.ops[i]) + ") at t0+" + std::to_string(now - start)
               + "ns: " + what;
    };
    for (std::size_t i = 0; i < s.ops.size(); ++i) {
        const op& o = s.ops[i];
        const auto n = static_cast<std::uint64_t>(o.a);
        switch (o.kind) {
        case op_kind::advance:
            now = std::min(now + o.a, start + max_span_ns);
            break;
        case op_kind::take: {
            const bool got = b.try_take(n, tp_of(now));
            const bool want = m.take(n, now);
            if (got != want) return differ(i, "bucket " + std::to_string(got) + ", model " + std::to_string(want));
            break;
        }
        case op_kind::earliest:
        case op_kind::wait_and_take: {
            const auto ahead = static_cast<std::uint64_t>(o.kind == op_kind::earliest ? o.b : 0);
            const tp got = b.earliest(n, tp_of(now), ahead);
            const wide want = m.earliest(n, now, ahead);
            const tp want_tp = want < 0 ? tp::max() : tp_of(want);
            if (got != want_tp) return differ(i, "bucket " + text_of(got) + ", model " + text_of(want_tp));
            if (o.kind == op_kind::wait_and_take && want >= 0 && want - start <= max_span_ns) {
                const auto at = static_cast<std::int64_t>(want);
                if (at > now) {
                    const bool early = b.try_take(n, tp_of(at - 1));
                    if (early != m.take(n, at - 1)) return differ(i, "1ns before: bucket " + std::to_string(early));
                }
                now = at;
                const bool got_it = b.try_take(n, tp_of(now));
                if (got_it != m.take(n, now)) return differ(i, "at earliest: bucket " + std::to_string(got_it));
            }
            break;
        }
        case op_kind::reserve: {
            boost::system::error_code ec;
            const tp deadline = o.b < 0 ? tp::max() : tp_of(now + o.b);
            auto r = b.reserve(n, tp_of(now), ec, deadline);
            valve::errc why{};
            auto want = m.reserve(n, now, o.b < 0 ? wide{-1} : wide{now + o.b}, why);
            if (static_cast<bool>(ec) != !want)
                return differ(i, "bucket " + ec.message() + ", model " + (want ? "granted" : "refused"));
            if (!want) {
                if (ec != why) return differ(i, "refused for " + ec.message());
                break;
            }
            const tp want_ready = want->ready < 0 ? tp::max() : tp_of(want->ready);
            if (r.tokens != want->tokens || r.ready != want_ready)
                return differ(i, "bucket ready " + text_of(r.ready) + ", model " + text_of(want_ready));
            held.push_back(std::move(r));
            model_held.push_back(*want);
            break;
        }
        case op_kind::cancel: {
            if (held.empty()) break;
            const auto k = static_cast<std::size_t>(o.a) % held.size();
            const double got = b.cancel(held[k], tp_of(now));
            const double want = m.cancel(model_held[k], now);
            if (std::abs(got - want) > 1e-9 * std::max(1.0, std::abs(want)))
                return differ(i, "bucket gave back " + std::to_string(got) + ", model " + std::to_string(want));
            break;
        }
        case op_kind::refund: {
            const bool got = b.try_take(n, tp_of(now));
            if (got != m.take(n, now)) return differ(i, "the take before the refund: bucket " + std::to_string(got));
            if (got) {
                b.refund(n, tp_of(now));
                m.refund(n, now);
            }
            break;
        }
        case op_kind::set_rate:
            b.set_rate(o.l.as_rate(), tp_of(now));
            m.set(o.l, m.burst(), now);
            break;
        case op_kind::set_burst:
            b.set_burst(n, tp_of(now));
            m.set(m.current(), n, now);
            break;
        }
        const double got = b.available(tp_of(now));
        const double want = m.available(now);
        if (!(std::isinf(got) && std::isinf(want)) && std::abs(got - want) > 1e-9 * std::max(1.0, std::abs(want)))
            return differ(i, "available(): bucket " + std::to_string(got) + ", model " + std::to_string(want));
        if (b.burst() != m.burst()) return differ(i, "burst()");
    }
    return std::nullopt;
}

// Drops operations, one at a time, while the sequence still fails: what is left is the short
// story of the failure.
sequence shrink(sequence s)
{
    for (bool smaller = true; smaller;) {
        smaller = false;
        for (std::size_t i = s.ops.size(); i-- > 0;) {
            sequence t = s;
            t.ops.erase(t.ops.begin() + static_cast<std::ptrdiff_t>(i));
            if (disagreement(t)) {
                s = std::move(t);
                smaller = true;
            }
        }
    }
    return s;
}

// Limits whose intervals are whole nanoseconds; one family per sequence, so that a debt
// converted from the fastest to the slowest stays within what a bucket can hold.
struct family {
    std::vector<std::int64_t> intervals;
    std::uint64_t max_burst;
    std::int64_t max_deadline_ns;
};

const family fast{{10'000, 33'333, 1'000'000, 7'000'000, 100'000'000, 1'000'000'000}, 1000, 3600'000'000'000};
// Quotas: per second, per 100 hours (36 s), per month (259.2 s), per 400 days (3456 s).
const family quota{{1'000'000'000, 36'000'000'000, 259'200'000'000, 3'456'000'000'000}, 10'000, 86400'000'000'000};

sequence random_sequence(std::uint64_t seed, std::size_t length)
{
    std::mt19937_64 rng{seed};
    auto uniform = [&](std::int64_t lo, std::int64_t hi) { return std::uniform_int_distribution<std::int64_t>{lo, hi}(rng); };
    const family& f = uniform(0, 3) == 0 ? quota : fast;
    auto random_limit = [&] {
        limit l;
        const auto k = uniform(0, 19);
        if (k == 0) l.kind = limit::zero;
        if (k == 1) l.kind = limit::unlimited;
        const std::int64_t counts[] = {1, 2, 3, 5, 10};
        l.count = counts[uniform(0, 4)];
        l.interval = f.intervals[static_cast<std::size_t>(uniform(0, static_cast<std::int64_t>(f.intervals.size()) - 1))];
        return l;
    };
    auto random_burst = [&] {
        // Mostly small, sometimes the family's largest.
        return static_cast<std::uint64_t>(uniform(0, 3) == 0 ? uniform(1, static_cast<std::int64_t>(f.max_burst)) : uniform(1, 10));
    };
    sequence s;
    s.first = random_limit();
    if (s.first.kind != limit::finite && uniform(0, 1) == 0) s.first.kind = limit::finite;
    s.burst = random_burst();
    std::uint64_t burst = s.burst;
    std::int64_t interval = s.first.interval;
    for (std::size_t i = 0; i < length; ++i) {
        op o{};
        const auto n = [&] { return uniform(0, 4) == 0 ? uniform(0, static_cast<std::int64_t>(burst) + 1) : uniform(0, 2); };
        switch (uniform(0, 19)) {
        case 0:
        case 1:
        case 2:
        case 3: {
            o.kind = op_kind::advance;
            const auto k = uniform(0, 5);
            o.a = k == 0 ? 1 : k == 1 ? uniform(0, interval) : k == 2 ? uniform(0, 3 * interval) : k == 3 ? interval
                : uniform(0, static_cast<std::int64_t>(burst) * interval);
            break;
        }
        case 4:
        case 5:
        case 6:
        case 7: o.kind = op_kind::take; o.a = n(); break;
        case 8: o.kind = op_kind::earliest; o.a = n(); o.b = uniform(0, 1) ? 0 : uniform(0, 5); break;
        case 9:
        case 10: o.kind = op_kind::wait_and_take; o.a = n(); break;
        case 11:
        case 12:
            o.kind = op_kind::reserve;
            o.a = n();
            o.b = uniform(0, 3) == 0 ? uniform(0, 2 * interval) : uniform(0, f.max_deadline_ns);
            break;
        case 13:
        case 14: o.kind = op_kind::cancel; o.a = uniform(0, 1000); break;
        case 15: o.kind = op_kind::refund; o.a = n(); break;
        case 16:
        case 17: {
            o.kind = op_kind::set_rate;
            o.l = random_limit();
            if (o.l.kind == limit::finite) interval = o.l.interval;
            break;
        }
        default:
            o.kind = op_kind::set_burst;
            burst = random_burst();
            o.a = static_cast<std::int64_t>(burst);
            break;
        }
        s.ops.push_back(o);
    }
    return s;
}

std::optional<std::uint64_t> replay_seed()
{
    if (const char* env = std::getenv("VALVE_MODEL_SEED")) return std::strtoull(env, nullptr, 10);
    return std::nullopt;
}

} // namespace

TEST(bucket_core_model, answers_every_call_as_the_model_does)
{
    constexpr std::uint64_t sequences = 4000;
    const auto only = replay_seed();
    for (std::uint64_t seed = only.value_or(1); seed <= only.value_or(sequences); ++seed) {
        const sequence s = random_sequence(seed, 80);
        if (const auto why = disagreement(s)) {
            const sequence small = shrink(s);
            ADD_FAILURE() << "seed " << seed << " (replay: VALVE_MODEL_SEED=" << seed << "): " << *why
                          << "\nshrunk to " << small.ops.size() << " operations:\n" << describe(small)
                          << "first disagreement of the shrunk sequence: " << disagreement(small).value_or("none");
            return;
        }
    }
}

namespace {

// The tokens a bucket hands out, each at the time it may be used.
struct grant {
    std::int64_t at;
    std::int64_t tokens;
};

// The most tokens used in any interval, less what the rate allows in it: never above the burst.
long double worst_excess(std::vector<grant> grants, long double per_ns)
{
    std::sort(grants.begin(), grants.end(), [](const grant& a, const grant& b) { return a.at < b.at; });
    long double worst = -std::numeric_limits<long double>::infinity();
    for (std::size_t i = 0; i < grants.size(); ++i) {
        long double used = 0;
        for (std::size_t j = i; j < grants.size(); ++j) {
            used += static_cast<long double>(grants[j].tokens);
            worst = std::max(worst, used - per_ns * static_cast<long double>(grants[j].at - grants[i].at));
        }
    }
    return worst;
}

} // namespace

TEST(bucket_core_model, any_rate_grants_at_most_the_burst_plus_the_rate_over_any_interval)
{
    constexpr std::uint64_t sequences = 1500;
    const auto only = replay_seed();
    for (std::uint64_t seed = only.value_or(1); seed <= only.value_or(sequences); ++seed) {
        std::mt19937_64 rng{seed * 7919};
        auto uniform = [&](std::int64_t lo, std::int64_t hi) { return std::uniform_int_distribution<std::int64_t>{lo, hi}(rng); };
        // Rates whose interval is no whole number of units: 0.37/s .. 9.7 million/s.
        const double per_second = std::exp(std::uniform_real_distribution<double>{std::log(0.37), std::log(9.7e6)}(rng));
        const auto burst = static_cast<std::uint64_t>(uniform(1, 50));
        const auto interval_ns = static_cast<std::int64_t>(1e9 / per_second);
        bucket_core b{rate::per_second(per_second), burst, t0};
        std::int64_t now = ns_of(t0);
        std::vector<grant> grants;
        struct mine {
            bucket_core::reservation r;
            std::size_t grant;
        };
        std::vector<mine> held;
        std::ostringstream story;
        story << "seed " << seed << " (replay: VALVE_MODEL_SEED=" << seed << "): " << per_second << "/s, burst " << burst
              << "\n";
        for (int i = 0; i < 150; ++i) {
            const auto n = static_cast<std::size_t>(uniform(0, 3) == 0 ? uniform(1, static_cast<std::int64_t>(burst)) : 1);
            switch (uniform(0, 5)) {
            case 0: now += uniform(0, 2 * interval_ns + 1); break;
            case 1:
                if (b.try_take(n, tp_of(now))) grants.push_back({now, static_cast<std::int64_t>(n)});
                story << "take " << n << " at +" << now - ns_of(t0) << "\n";
                break;
            case 2: {
                // Waiting until earliest() is enough, and 1 ns less is not.
                const tp at = b.earliest(n, tp_of(now));
                ASSERT_NE(at, tp::max()) << story.str();
                if (ns_of(at) > now) {
                    ASSERT_FALSE(b.try_take(n, at - 1ns)) << story.str();
                }
                now = ns_of(at);
                ASSERT_TRUE(b.try_take(n, at)) << story.str();
                grants.push_back({now, static_cast<std::int64_t>(n)});
                story << "take " << n << " at earliest +" << now - ns_of(t0) << "\n";
                break;
            }
            case 3: {
                boost::system::error_code ec;
                auto r = b.reserve(n, tp_of(now), ec, tp_of(now + uniform(0, 4 * interval_ns)));
                if (ec) break;
                grants.push_back({ns_of(r.ready), static_cast<std::int64_t>(n)});
                held.push_back({std::move(r), grants.size() - 1});
                story << "reserve " << n << " at +" << now - ns_of(t0) << " ready +" << ns_of(held.back().r.ready) - ns_of(t0) << "\n";
                break;
            }
            case 4: {
                if (held.empty()) break;
                auto& h = held[static_cast<std::size_t>(uniform(0, static_cast<std::int64_t>(held.size()) - 1))];
                const bool not_yet_used = now <= ns_of(h.r.ready);
                const double back = b.cancel(h.r, tp_of(now));
                // Tokens given back are tokens not used.
                if (back > 0) {
                    ASSERT_TRUE(not_yet_used) << story.str();
                    grants[h.grant].tokens = 0;
                }
                story << "cancel at +" << now - ns_of(t0) << " gave back " << back << "\n";
                break;
            }
            default:
                if (b.try_take(n, tp_of(now))) b.refund(n, tp_of(now));
                break;
            }
        }
        const long double per_ns = static_cast<long double>(per_second) / 1e9L;
        const long double excess = worst_excess(grants, per_ns);
        // A reservation's ready time is rounded up to a whole nanosecond: its tokens, used then,
        // may fall into an interval that began less than 1 ns after they were due.
        ASSERT_LE(excess, static_cast<long double>(burst) + per_ns)
            << static_cast<double>(excess - static_cast<long double>(burst)) << " over\n" << story.str();
    }
}
