#include <valve/bucket_core.hpp>

#include <valve/error.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <string>

namespace valve {

namespace {

// The state word: | generation (8 bits) | whole ns since the epoch (53) | remainder (3) |.
// The time it holds is the GCRA "theoretical arrival time": when the bucket would be full again,
// in units of 1/scale ns (remainder < scale). The generation names the configuration in force;
// it selects one of the configuration slots, and its 8 bits make a stale reader's compare-exchange fail.
constexpr int generation_shift = 56;
constexpr int rem_bits = 3;
constexpr std::uint64_t rel_mask = (std::uint64_t{1} << 53) - 1;
// The epoch is re-anchored after ~26 days, well inside the 53-bit (104 day) range.
constexpr std::int64_t rebase_after_ns = std::int64_t{1} << 51;
// The longest refill of a whole burst, and the deepest debt of reservations (~13 days each).
constexpr std::int64_t max_window_ns = std::int64_t{1} << 50;
// In a zero-rate bucket time stands still; a token is this many (timeless) units.
constexpr std::int64_t frozen_cost = 1'000'000;

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
    std::int64_t epoch = 0;
    std::int64_t scale = 1;
    std::int64_t cost = 1;
    std::uint64_t burst = 1;
    int mode = finite;
    double count = 0.0;
    std::int64_t period = 1;
    std::int64_t window = 1; // burst * cost: how far ahead of now the state may run

    std::int64_t rel_ns(time_point now) const noexcept { return std::max<std::int64_t>(to_ns(now) - epoch, 0); }

    // "now" in state units; time stands still at the epoch in a zero-rate bucket.
    std::int64_t now_units(time_point now) const noexcept { return mode == frozen ? 0 : rel_ns(now) * scale; }

    time_point time_of(std::int64_t units) const noexcept
    {
        const std::int64_t ns = (units + scale - 1) / scale;
        return time_point{std::chrono::duration_cast<clock::duration>(std::chrono::nanoseconds{epoch + ns})};
    }

    std::int64_t decode(std::uint64_t s) const noexcept
    {
        return static_cast<std::int64_t>((s >> rem_bits) & rel_mask) * scale
               + static_cast<std::int64_t>(s & ((1u << rem_bits) - 1));
    }

    static std::uint64_t encode(unsigned generation, std::int64_t units, std::int64_t scale) noexcept
    {
        // Division by a constant is a multiply; a 64-bit division by a variable would cost more
        // than the rest of a grant together.
        const auto u = static_cast<std::uint64_t>(units);
        std::uint64_t ns = u;
        switch (scale) {
        case 2: ns = u / 2; break;
        case 3: ns = u / 3; break;
        case 4: ns = u / 4; break;
        case 5: ns = u / 5; break;
        case 6: ns = u / 6; break;
        case 7: ns = u / 7; break;
        case 8: ns = u / 8; break;
        default: break;
        }
        const std::uint64_t rem = u - ns * static_cast<std::uint64_t>(scale);
        return (std::uint64_t{generation & 0xffu} << generation_shift) | ((ns & rel_mask) << rem_bits) | rem;
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
                            "valve: burst must be at least 1 (a bucket with burst 0 could never grant)");
    config c;
    c.epoch = epoch;
    c.burst = burst;
    c.count = r.count();
    c.period = r.period().count();
    if (r.is_unlimited()) {
        c.mode = unlimited;
        c.window = static_cast<std::int64_t>(std::min<std::uint64_t>(burst, std::numeric_limits<std::int64_t>::max()));
        return c;
    }
    const auto too_long = [&] {
        detail::throw_error(errc::invalid_argument,
                            "valve: burst " + std::to_string(burst) + " at rate " + to_string(r)
                                + " takes more than 13 days to refill: lower the burst or raise the rate");
    };
    if (r.is_zero()) {
        c.mode = frozen;
        c.cost = frozen_cost;
        if (static_cast<long double>(burst) * frozen_cost > static_cast<long double>(max_window_ns)) too_long();
    } else {
        // The refill time of the burst bounds every quantity below; checked before any cast.
        const long double interval_ns = static_cast<long double>(c.period) / static_cast<long double>(c.count);
        if (static_cast<long double>(burst) * interval_ns > static_cast<long double>(max_window_ns)) too_long();
        // Pick the state resolution (1/1 .. 1/8 ns) in which one token's interval is closest to
        // a whole number of units, rounding up so the bucket is never faster than the rate.
        long double best_err = std::numeric_limits<long double>::infinity();
        for (std::int64_t n = 1; n <= 8; ++n) {
            const long double ideal = static_cast<long double>(n) * interval_ns;
            // Shave a rounding error's worth so that exact intervals are not pushed up a unit.
            const long double rounded = std::max(1.0L, std::ceil(ideal * (1.0L - 1e-15L)));
            const long double err = (rounded - ideal) / ideal;
            if (err < best_err) {
                best_err = err;
                c.scale = n;
                c.cost = static_cast<std::int64_t>(rounded);
            }
            if (err <= 0.0L) break;
        }
    }
    c.window = static_cast<std::int64_t>(burst) * c.cost;
    return c;
}

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
    c.mode = sl.mode.load(std::memory_order_acquire);
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
    sl.scale.store(static_cast<std::int32_t>(c.scale), std::memory_order_release);
    sl.mode.store(c.mode, std::memory_order_release);
    sl.seq.store(generation * 2, std::memory_order_release);
}

bucket_core::bucket_core(rate r, std::size_t burst, time_point now)
{
    const config c = make_config(r, burst, to_ns(now));
    publish(0, c);
    // Full time at the epoch: the bucket starts full.
    state_.store(config::encode(0, 0, c.scale), std::memory_order_release);
}

bool bucket_core::try_take(std::size_t n, time_point now) noexcept
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
            now_u = rel * c.scale;
        }
        const std::int64_t x = std::max(c.decode(s), now_u) + static_cast<std::int64_t>(n) * c.cost;
        if (x - now_u > c.window) return false;
        if (state_.compare_exchange_weak(s, config::encode(generation_of(s), x, c.scale), std::memory_order_acq_rel,
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
        || __builtin_add_overflow(std::max(c.decode(s), now_u), need, &x))
        return time_point::max();
    const std::int64_t ready = x - c.window;
    if (ready <= now_u) return now;
    if (c.mode == frozen) return time_point::max();
    return c.time_of(ready);
}

bucket_core::reservation bucket_core::reserve(std::size_t n, time_point now, boost::system::error_code& ec,
                                              time_point deadline) noexcept
{
    ec = {};
    std::uint64_t s = state_.load(std::memory_order_acquire);
    for (;;) {
        const config c = snapshot(s);
        const unsigned g = generation_of(s);
        if (n == 0 || c.mode == unlimited) return {n, now, 0, g};
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
        const std::int64_t x = std::max(c.decode(s), now_u) + static_cast<std::int64_t>(n) * c.cost;
        const std::int64_t ready_u = x - c.window;
        time_point ready = now;
        if (ready_u > now_u) ready = c.mode == frozen ? time_point::max() : c.time_of(ready_u);
        if (ready > deadline || x - now_u > max_window_ns * c.scale + c.window) {
            ec = errc::would_exceed_deadline;
            return {};
        }
        if (state_.compare_exchange_weak(s, config::encode(g, x, c.scale), std::memory_order_acq_rel,
                                         std::memory_order_acquire))
            return {n, ready, x, g};
    }
}

double bucket_core::cancel(const reservation& r, time_point now) noexcept
{
    if (r.tokens == 0) return 0.0;
    std::uint64_t s = state_.load(std::memory_order_acquire);
    for (;;) {
        const config c = snapshot(s);
        const unsigned g = generation_of(s);
        if (g != r.version_) return 0.0;
        if (c.mode == unlimited) return 0.0;
        if (c.mode != frozen && now >= r.ready) return 0.0; // already due: the tokens are spent
        const std::int64_t now_u = c.now_units(now);
        const std::int64_t x = c.decode(s);
        // Tokens reserved behind this one keep their place; only the rest comes back.
        const std::int64_t later = std::max<std::int64_t>(x - r.after_, 0);
        const std::int64_t restore = static_cast<std::int64_t>(r.tokens) * c.cost - later;
        if (restore <= 0) return 0.0;
        const std::int64_t nx = std::max(x - restore, std::min(x, now_u));
        if (nx == x) return 0.0;
        if (state_.compare_exchange_weak(s, config::encode(g, nx, c.scale), std::memory_order_acq_rel,
                                         std::memory_order_acquire))
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
        const std::int64_t x = c.decode(s);
        const std::int64_t nx = std::max(x - static_cast<std::int64_t>(n) * c.cost, std::min(x, now_u));
        if (nx == x) return;
        if (state_.compare_exchange_weak(s, config::encode(generation_of(s), nx, c.scale),
                                         std::memory_order_acq_rel, std::memory_order_acquire))
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
    // The new configuration counts from `now`, which keeps every state in range.
    const config next = make_config(next_rate, burst ? *burst : old.burst, to_ns(now));
    const std::uint64_t g = ++generation_;
    publish(g, next);
    for (;;) {
        // Tokens accrued so far under the old configuration (negative while in debt).
        long double tokens = static_cast<long double>(old.burst);
        if (old.mode != unlimited) {
            const std::int64_t debt = std::max<std::int64_t>(old.decode(s) - old.now_units(now), 0);
            tokens -= static_cast<long double>(debt) / static_cast<long double>(old.cost);
        }
        std::int64_t x = 0;
        if (next.mode != unlimited) {
            tokens = std::min(tokens, static_cast<long double>(next.burst));
            const long double limit = static_cast<long double>(max_window_ns * next.scale + next.window);
            const long double units = (static_cast<long double>(next.burst) - tokens)
                                      * static_cast<long double>(next.cost);
            x = static_cast<std::int64_t>(std::llround(std::min(units, limit)));
        }
        // Only grants race with this exchange (writers hold the mutex), and they keep the
        // generation: on failure, `s` is the old configuration's state, converted again.
        if (state_.compare_exchange_weak(s, config::encode(static_cast<unsigned>(g), x, next.scale),
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
    std::uint64_t s = state_.load(std::memory_order_acquire);
    return snapshot(s).mode == unlimited;
}

double bucket_core::available(time_point now) const noexcept
{
    std::uint64_t s = state_.load(std::memory_order_acquire);
    const config c = snapshot(s);
    if (c.mode == unlimited) return std::numeric_limits<double>::infinity();
    const std::int64_t debt = std::max<std::int64_t>(c.decode(s) - c.now_units(now), 0);
    return static_cast<double>(c.window - debt) / static_cast<double>(c.cost);
}

} // namespace valve
