#include <valve/bucket_core.hpp>

#include <valve/error.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <mutex>
#include <string>

namespace valve {

namespace {

// The state word: | generation (8 bits) | time (56 bits) |.
// The time is the GCRA "theoretical arrival time": when the bucket would be full again, in the
// configuration's units since its epoch. A unit is 1/scale ns (scale 1..8) or, for buckets whose
// burst takes years to refill, 2^shift ns (shift 1..6). The generation names the configuration in
// force; it selects one of the configuration slots, and its 8 bits make a stale reader's
// compare-exchange fail.
constexpr int generation_shift = 56;
constexpr std::int64_t max_units = (std::int64_t{1} << generation_shift) - 1;
// The epoch is re-anchored after ~26 days.
constexpr std::int64_t rebase_after_ns = std::int64_t{1} << 51;
constexpr int max_shift = 6;
// In a zero-rate (or unlimited) bucket time stands still; a token is this many (timeless) units.
constexpr std::int64_t frozen_cost = 1'000'000;
// The furthest an epoch is put ahead of now to hold a debt too deep for the state word (about
// 146 years of the clock): deeper debts are kept as that.
constexpr std::int64_t max_epoch_ns = std::int64_t{1} << 62;

__extension__ typedef __int128 wide;

enum mode : int { finite = 0, frozen = 1, unlimited = 2 };

void cpu_relax() noexcept
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

// After a lost compare-exchange, wait a little (exponentially longer each time) before trying
// again: the winner then finishes its next grants while the state's cache line is still its
// own, instead of both threads pulling the line back and forth.
class contention_backoff {
public:
    void pause() noexcept
    {
        for (unsigned i = 0; i < spins_; ++i) cpu_relax();
        if (spins_ < 256) spins_ *= 2;
    }

private:
    unsigned spins_ = 4;
};

std::int64_t to_ns(bucket_core::time_point t) noexcept
{
    return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
}

unsigned generation_of(std::uint64_t s) noexcept { return static_cast<unsigned>(s >> generation_shift); }

std::uint64_t encode(unsigned generation, std::int64_t units) noexcept
{
    return (std::uint64_t{generation & 0xffu} << generation_shift) | static_cast<std::uint64_t>(units);
}

std::int64_t decode(std::uint64_t s) noexcept { return static_cast<std::int64_t>(s & static_cast<std::uint64_t>(max_units)); }

// Floor division for a positive divisor.
wide floor_div(wide a, wide b) noexcept
{
    const wide q = a / b;
    return (a % b != 0 && a < 0) ? q - 1 : q;
}

std::string days_text(long double ns)
{
    char buf[64];
    const long double days = ns / 86'400e9L;
    if (days >= 730.0L)
        std::snprintf(buf, sizeof buf, "%.0Lf years", days / 365.25L);
    else
        std::snprintf(buf, sizeof buf, "%.4Lg days", days);
    return buf;
}

// The writers of one bucket (rate and burst changes, re-anchoring) serialise on one of these,
// picked by the bucket's address. Writes are rare and short, and a mutex of its own would cost
// each of a million per-user buckets 40 bytes.
std::mutex& writer_mutex(const void* bucket) noexcept
{
    static std::array<std::mutex, 61> mutexes;
    return mutexes[(reinterpret_cast<std::uintptr_t>(bucket) >> 6) % mutexes.size()];
}

} // namespace

struct bucket_core::config {
    std::uint64_t generation = 0; // all of it, where the state word keeps 8 bits
    std::int64_t epoch = 0;
    std::int64_t scale = 1; // units per ns (with shift 0)
    std::int64_t shift = 0; // 2^shift ns per unit (with scale 1)
    std::int64_t cost = 1;
    std::uint64_t burst = 1;
    int mode = finite;
    double count = 0.0;
    std::int64_t period = 1;
    std::int64_t window = 1; // burst * cost: how far ahead of now the state may run

    std::int64_t rel_ns(time_point now) const noexcept { return std::max<std::int64_t>(to_ns(now) - epoch, 0); }

    // "now" in state units, rounded down (time is never credited early); time stands still at
    // the epoch in a zero-rate or unlimited bucket, and before an epoch that lies ahead.
    std::int64_t now_units(time_point now) const noexcept
    {
        return mode == finite ? (rel_ns(now) * scale) >> shift : 0;
    }

    // How far the bucket's full time lies ahead of `now`, in units (0 if full): the debt.
    // An epoch ahead of `now` (a debt too deep for the state word) counts, rounded up.
    wide debt(std::uint64_t s, time_point now) const noexcept
    {
        wide ahead = 0;
        if (mode == finite) {
            const std::int64_t before = epoch - to_ns(now);
            if (before > 0) ahead = ((static_cast<wide>(before) * scale) + (wide{1} << shift) - 1) >> shift;
        }
        return std::max<wide>(static_cast<wide>(decode(s)) - now_units(now) + ahead, 0);
    }

    // The time point of `units`, rounded up (a token is never promised early).
    time_point time_of(std::int64_t units) const noexcept
    {
        const wide ns = ((static_cast<wide>(units) << shift) + scale - 1) / scale + epoch;
        if (ns >= std::numeric_limits<std::int64_t>::max()) return time_point::max();
        return time_point{std::chrono::duration_cast<clock::duration>(std::chrono::nanoseconds{static_cast<std::int64_t>(ns)})};
    }

    bool needs_rebase(time_point now) const noexcept { return mode == finite && rel_ns(now) >= rebase_after_ns; }
};

bucket_core::config bucket_core::make_config(const rate& r, std::size_t burst, std::int64_t epoch)
{
    if (validate(r))
        detail::throw_error(errc::invalid_argument,
                            "valve: invalid rate (count " + std::to_string(r.count()) + " per "
                                + std::to_string(r.period().count())
                                + " ns): use a finite, non-negative count over a positive period, "
                                  "at most 8 tokens per nanosecond, or rate::unlimited()");
    if (burst == 0)
        detail::throw_error(errc::invalid_argument,
                            "valve: burst 0: a bucket holds at least 1 token; use a burst of 1 or more");
    config c;
    c.epoch = epoch;
    c.burst = burst;
    c.count = r.count();
    c.period = r.period().count();
    if (r.is_unlimited() || r.is_zero()) {
        // Timeless: a zero rate grants only what the bucket holds; an unlimited one grants
        // everything but keeps, in the same units, what the bucket held when it became unlimited
        // (given back only if the rate comes back at that same instant).
        c.mode = r.is_zero() ? frozen : unlimited;
        c.cost = frozen_cost;
        if (static_cast<long double>(burst) * frozen_cost > static_cast<long double>(max_units / 2))
            detail::throw_error(errc::invalid_argument,
                                "valve: burst " + std::to_string(burst) + " is too large; at most "
                                    + std::to_string(max_units / 2 / frozen_cost) + " tokens");
        c.window = static_cast<std::int64_t>(burst) * c.cost;
        return c;
    }
    // The refill time of the burst bounds every quantity below; checked before any cast.
    const long double interval_ns = static_cast<long double>(c.period) / static_cast<long double>(c.count);
    const long double refill_ns = static_cast<long double>(burst) * interval_ns;
    // A resolution fits when the state word holds the epoch's range, the window, and as much
    // debt again: 2 * window + rebase <= 2^56 units.
    const auto fits = [&](std::int64_t scale, std::int64_t shift) {
        const long double units_per_ns = static_cast<long double>(scale) / std::ldexp(1.0L, static_cast<int>(shift));
        return (2.0L * refill_ns + static_cast<long double>(rebase_after_ns)) * units_per_ns
               <= static_cast<long double>(max_units);
    };
    // Pick the finest exact resolution (1/1 .. 1/8 ns) that fits, else the one closest to exact,
    // rounding the cost up so the bucket is never faster than the rate; only a refill too long
    // for 1 ns units takes coarser ones (2 .. 64 ns).
    long double best_err = std::numeric_limits<long double>::infinity();
    const auto consider = [&](std::int64_t scale, std::int64_t shift) {
        const long double ideal = static_cast<long double>(scale) * interval_ns / std::ldexp(1.0L, static_cast<int>(shift));
        // Shave a rounding error's worth so that exact intervals are not pushed up a unit.
        const long double rounded = std::max(1.0L, std::ceil(ideal * (1.0L - 1e-15L)));
        const long double err = (rounded - ideal) / ideal;
        if (err < best_err) {
            best_err = err;
            c.scale = scale;
            c.shift = shift;
            c.cost = static_cast<std::int64_t>(rounded);
        }
        return err <= 0.0L;
    };
    for (std::int64_t scale = 1; scale <= 8 && fits(scale, 0); ++scale)
        if (consider(scale, 0)) break;
    for (std::int64_t shift = 1; best_err == std::numeric_limits<long double>::infinity() && shift <= max_shift; ++shift)
        if (fits(1, shift)) consider(1, shift);
    if (best_err == std::numeric_limits<long double>::infinity())
        detail::throw_error(errc::invalid_argument,
                            "valve: burst " + std::to_string(burst) + " at rate " + to_string(r) + " takes "
                                + days_text(refill_ns) + " to refill, more than the " + days_text(max_refill_ns())
                                + " a bucket supports: lower the burst or raise the rate");
    c.window = static_cast<std::int64_t>(burst) * c.cost;
    return c;
}

long double bucket_core::max_refill_ns() noexcept
{
    return (std::ldexp(static_cast<long double>(max_units), max_shift) - rebase_after_ns) / 2.0L;
}

std::chrono::nanoseconds bucket_core::max_refill() noexcept
{
    return std::chrono::nanoseconds{static_cast<std::int64_t>(max_refill_ns())};
}

void bucket_core::check(rate r, std::size_t burst) { make_config(r, burst, 0); }

// Inlined: it is half of every grant. Returns false if the slot was being written or recycled
// meanwhile; the caller then reloads the state and tries again.
[[gnu::always_inline]] inline bool bucket_core::read(std::uint64_t s, config& c) const noexcept
{
    const unsigned g = generation_of(s);
    const slot& sl = slots_[g & (slot_count - 1)];
    const std::uint64_t seq = sl.seq.load(std::memory_order_acquire);
    if ((seq & 1) != 0 || ((seq >> 1) & 0xffu) != g) return false;
    // Acquire loads: if any of them sees a newer writer's value, the check of `seq` below sees
    // that writer's odd mark or later (the writer stores seq before the fields, fields with
    // release), and the copy is thrown away.
    c.epoch = sl.epoch.load(std::memory_order_acquire);
    c.cost = sl.cost.load(std::memory_order_acquire);
    c.window = sl.window.load(std::memory_order_acquire);
    c.burst = sl.burst.load(std::memory_order_acquire);
    c.scale = sl.scale.load(std::memory_order_acquire);
    c.shift = sl.shift.load(std::memory_order_acquire);
    c.mode = sl.mode.load(std::memory_order_acquire);
    c.generation = seq >> 1;
    return sl.seq.load(std::memory_order_relaxed) == seq;
}

bucket_core::config bucket_core::snapshot(std::uint64_t& s) const noexcept
{
    config c;
    while (!read(s, c)) {
        cpu_relax();
        s = state_.load(std::memory_order_acquire);
    }
    return c;
}

void bucket_core::publish(std::uint64_t generation, const config& c) noexcept
{
    slot& sl = slots_[generation & (slot_count - 1)];
    sl.seq.store(generation * 2 + 1, std::memory_order_relaxed);
    sl.epoch.store(c.epoch, std::memory_order_release);
    sl.cost.store(c.cost, std::memory_order_release);
    sl.window.store(c.window, std::memory_order_release);
    sl.burst.store(c.burst, std::memory_order_release);
    sl.period.store(c.period, std::memory_order_release);
    sl.count.store(c.count, std::memory_order_release);
    sl.scale.store(static_cast<std::int16_t>(c.scale), std::memory_order_release);
    sl.shift.store(static_cast<std::int16_t>(c.shift), std::memory_order_release);
    sl.mode.store(c.mode, std::memory_order_release);
    sl.seq.store(generation * 2, std::memory_order_release);
}

bucket_core::bucket_core(rate r, std::size_t burst, time_point now)
{
    const config c = make_config(r, burst, to_ns(now));
    publish(0, c);
    // Full time at the epoch: the bucket starts full.
    state_.store(encode(0, 0), std::memory_order_release);
}

bool bucket_core::try_take(std::size_t n, time_point now, std::size_t keep) noexcept
{
    if (n == 0) return true;
    contention_backoff backoff;
    std::uint64_t s = state_.load(std::memory_order_acquire);
    for (;;) {
        const config c = snapshot(s);
        if (c.mode == unlimited) [[unlikely]]
            return true;
        if (n > c.burst) return false;
        std::int64_t now_u = 0;
        if (c.mode == finite) [[likely]] {
            const std::int64_t rel = c.rel_ns(now);
            if (rel >= rebase_after_ns) [[unlikely]] {
                rebase(now);
                s = state_.load(std::memory_order_acquire);
                continue;
            }
            now_u = (rel * c.scale) >> c.shift;
        }
        const std::int64_t x = std::max(decode(s), now_u) + static_cast<std::int64_t>(n) * c.cost;
        if (x - now_u > c.window) return false;
        if (keep != 0) {
            // The kept tokens are not taken, only required to be there after the take.
            std::int64_t kept = 0;
            if (keep > c.burst || __builtin_mul_overflow(static_cast<std::int64_t>(keep), c.cost, &kept)
                || x - now_u > c.window - kept)
                return false;
        }
        if (state_.compare_exchange_weak(s, encode(generation_of(s), x), std::memory_order_acq_rel,
                                         std::memory_order_acquire))
            return true;
        // `s` now holds the winner's state, and the failed exchange left the cache line here:
        // after a short pause the next attempt usually succeeds without another transfer.
        backoff.pause();
    }
}

bucket_core::time_point bucket_core::earliest(std::size_t n, time_point now, std::size_t ahead) const noexcept
{
    std::uint64_t s = state_.load(std::memory_order_acquire);
    const config c = snapshot(s);
    if (c.mode == unlimited || (n == 0 && ahead == 0)) return now;
    if (n > c.burst) return time_point::max();
    const std::int64_t now_u = c.now_units(now);
    std::int64_t need = 0;
    std::int64_t x = 0;
    if (__builtin_mul_overflow(static_cast<std::int64_t>(n + ahead), c.cost, &need)
        || __builtin_add_overflow(std::max(decode(s), now_u), need, &x))
        return time_point::max();
    const std::int64_t ready = x - c.window;
    if (ready <= now_u) return now;
    if (c.mode == frozen) return time_point::max();
    return std::max(now, c.time_of(ready));
}

bucket_core::reservation bucket_core::reserve(std::size_t n, time_point now, boost::system::error_code& ec,
                                              time_point deadline) noexcept
{
    ec = {};
    std::uint64_t s = state_.load(std::memory_order_acquire);
    for (;;) {
        const config c = snapshot(s);
        const unsigned g = generation_of(s);
        if (n == 0 || c.mode == unlimited) return reservation{n, now, 0, c.generation};
        if (n > c.burst) {
            ec = errc::exceeds_burst;
            return {};
        }
        if (c.needs_rebase(now)) {
            rebase(now);
            s = state_.load(std::memory_order_acquire);
            continue;
        }
        const std::int64_t now_u = c.now_units(now);
        const std::int64_t x = std::max(decode(s), now_u) + static_cast<std::int64_t>(n) * c.cost;
        const std::int64_t ready_u = x - c.window;
        time_point ready = now;
        if (ready_u > now_u) ready = c.mode == frozen ? time_point::max() : std::max(now, c.time_of(ready_u));
        if (ready > deadline || x > max_units) {
            ec = errc::would_exceed_deadline;
            return {};
        }
        if (state_.compare_exchange_weak(s, encode(g, x), std::memory_order_acq_rel, std::memory_order_acquire))
            return reservation{n, ready, x, c.generation};
    }
}

double bucket_core::cancel(reservation& r, time_point now) noexcept
{
    const reservation taken = std::move(r); // a reservation gives its tokens back once
    if (taken.tokens == 0) return 0.0;
    std::uint64_t s = state_.load(std::memory_order_acquire);
    for (;;) {
        const config c = snapshot(s);
        const unsigned g = generation_of(s);
        // The same configuration, not one whose 8 bits of generation merely match.
        if (c.generation != taken.version_) return 0.0;
        if (c.mode == unlimited) return 0.0;
        if (c.mode != frozen && now > taken.ready) return 0.0; // past due: the tokens are spent
        const std::int64_t now_u = c.now_units(now);
        const std::int64_t x = decode(s);
        // Tokens reserved behind this one keep their place; only the rest comes back.
        const std::int64_t later = std::max<std::int64_t>(x - taken.after_, 0);
        const std::int64_t restore = static_cast<std::int64_t>(taken.tokens) * c.cost - later;
        if (restore <= 0) return 0.0;
        const std::int64_t nx = std::max(x - restore, std::min(x, now_u));
        if (nx == x) return 0.0;
        if (state_.compare_exchange_weak(s, encode(g, nx), std::memory_order_acq_rel, std::memory_order_acquire))
            return static_cast<double>(x - nx) / static_cast<double>(c.cost);
    }
}

void bucket_core::refund(std::size_t n, time_point now) noexcept
{
    if (n == 0) return;
    std::uint64_t s = state_.load(std::memory_order_acquire);
    for (;;) {
        const config c = snapshot(s);
        if (c.mode == unlimited) return;
        const std::int64_t now_u = c.now_units(now);
        const std::int64_t x = decode(s);
        const std::int64_t nx = std::max(x - static_cast<std::int64_t>(std::min<std::uint64_t>(n, c.burst)) * c.cost,
                                         std::min(x, now_u));
        if (nx == x) return;
        if (state_.compare_exchange_weak(s, encode(generation_of(s), nx), std::memory_order_acq_rel,
                                         std::memory_order_acquire))
            return;
    }
}

void bucket_core::set_rate(rate r, time_point now) { reconfigure(&r, nullptr, now); }

void bucket_core::set_burst(std::size_t burst, time_point now) { reconfigure(nullptr, &burst, now); }

void bucket_core::rebase(time_point now) noexcept
{
    // Only reached for a valid configuration, which stays valid with a new epoch.
    try {
        reconfigure(nullptr, nullptr, now);
    } catch (...) {
    }
}

void bucket_core::reconfigure(const rate* r, const std::size_t* burst, time_point now)
{
    std::lock_guard lock{writer_mutex(this)};
    std::uint64_t s = state_.load(std::memory_order_acquire);
    const config old = snapshot(s);
    if (!r && !burst && !old.needs_rebase(now)) return; // another thread re-anchored already
    const rate next_rate = r ? *r : rate_of(generation_of(s));
    // The new configuration counts from `now` (or later, see below), which keeps every state in range.
    const std::int64_t now_ns = to_ns(now);
    config next = make_config(next_rate, burst ? *burst : old.burst, now_ns);
    const std::uint64_t g = ++generation_;
    for (;;) {
        // Tokens accrued so far, in the old units (negative while reservations are in debt); an
        // unlimited bucket that stayed so for any time at all is full.
        wide accrued = old.window;
        if (old.mode != unlimited || now_ns <= old.epoch) accrued -= old.debt(s, now);
        // The same tokens in the new units, rounded down: a change never makes the bucket faster.
        const wide tokens = std::min<wide>(floor_div(accrued * next.cost, old.cost), next.window);
        wide x = next.window - tokens; // units after `now`
        next.epoch = now_ns;
        if (x > max_units - next.window) {
            if (next.mode != finite) {
                x = max_units - next.window; // a timeless bucket keeps a debt this deep at most
            } else {
                // Too deep a debt for the state word: the epoch moves ahead by whole units, so
                // that nothing accrues before it, and the word keeps the rest.
                const wide step = wide{1} << next.shift; // ns per `scale` units
                wide k = (x - next.window) / next.scale;
                k = std::min<wide>(k, (max_epoch_ns - now_ns) / step);
                next.epoch = static_cast<std::int64_t>(now_ns + k * step);
                x = std::min<wide>(x - k * next.scale, max_units - next.window);
            }
        }
        publish(g, next);
        // Only grants race with this exchange (writers hold the mutex), and they keep the
        // generation: on failure, `s` is the old configuration's state, converted again.
        if (state_.compare_exchange_weak(s, encode(static_cast<unsigned>(g), static_cast<std::int64_t>(x)),
                                         std::memory_order_acq_rel, std::memory_order_acquire))
            return;
    }
}

rate bucket_core::rate_of(unsigned generation) const noexcept
{
    const slot& sl = slots_[generation & (slot_count - 1)];
    for (;;) {
        const std::uint64_t seq = sl.seq.load(std::memory_order_acquire);
        const int mode = sl.mode.load(std::memory_order_acquire);
        const double count = sl.count.load(std::memory_order_acquire);
        const std::int64_t period = sl.period.load(std::memory_order_acquire);
        if ((seq & 1) == 0 && sl.seq.load(std::memory_order_relaxed) == seq)
            return mode == unlimited ? rate::unlimited() : rate::per(count, std::chrono::nanoseconds{period});
        cpu_relax();
    }
}

rate bucket_core::current_rate() const noexcept
{
    return rate_of(generation_of(state_.load(std::memory_order_acquire)));
}

std::size_t bucket_core::burst() const noexcept
{
    std::uint64_t s = state_.load(std::memory_order_acquire);
    return snapshot(s).burst;
}

bool bucket_core::is_unlimited() const noexcept
{
    // Asked before every grant that reads the clock: only the mode, not the whole configuration.
    for (;;) {
        const std::uint64_t s = state_.load(std::memory_order_acquire);
        const unsigned g = generation_of(s);
        const slot& sl = slots_[g & (slot_count - 1)];
        const std::uint64_t seq = sl.seq.load(std::memory_order_acquire);
        const int m = sl.mode.load(std::memory_order_acquire);
        if ((seq & 1) == 0 && ((seq >> 1) & 0xffu) == g && sl.seq.load(std::memory_order_relaxed) == seq)
            return m == unlimited;
        cpu_relax();
    }
}

double bucket_core::available(time_point now) const noexcept
{
    std::uint64_t s = state_.load(std::memory_order_acquire);
    const config c = snapshot(s);
    if (c.mode == unlimited) return std::numeric_limits<double>::infinity();
    return static_cast<double>(static_cast<long double>(c.window - c.debt(s, now)) / static_cast<long double>(c.cost));
}

} // namespace valve
