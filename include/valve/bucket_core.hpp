#ifndef VALVE_BUCKET_CORE_HPP
#define VALVE_BUCKET_CORE_HPP

#include <valve/rate.hpp>

#include <boost/system/error_code.hpp>

#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <utility>

namespace valve {

/// The arithmetic of a token bucket, with time passed in: no clock, no I/O, no executor.
///
/// A bucket of `burst` tokens refilled at a `rate`, kept in the GCRA ("generic cell rate
/// algorithm") form: one integer, the theoretical time at which the bucket would be full again,
/// in fractions of a nanosecond (1/1 to 1/8, chosen per rate) so that most rates are exact:
/// any rate whose token interval is a multiple of 1/N ns for some N <= 8 (3/s, 7/us, 10/min,
/// 1000/s, 10,000 per 30 days, ...). Other rates are rounded so the bucket is never faster than
/// asked, by less than one part in 16 x interval (in ns). Granting, refilling and waiting are
/// additions and comparisons on that integer, so there is no floating drift however long the
/// bucket lives.
///
/// A burst may take up to about 73 years to refill (`max_refill()`): a yearly quota of a
/// billion tokens is exact to the nanosecond (refills longer than about 400 days count time in
/// steps of 2 to 64 ns). Every conversion (a rate or burst change, a time between two units)
/// rounds against the caller: the bucket is never faster than asked.
///
/// Time points must come from one monotonic clock (`steady_clock`); a time earlier than one the
/// bucket has already seen is treated as that earlier time's successor, never as going back.
///
/// Thread safety: every member may be called concurrently from any thread. `try_take`,
/// `earliest`, `reserve`, `cancel`, `refund` and `available` are lock-free (one atomic word and
/// a sequence-locked configuration); `set_rate` and `set_burst` serialise among themselves on a
/// mutex (one of a small pool shared by all buckets) that the other calls take only to
/// re-anchor the epoch, once every 26 days.
class bucket_core {
public:
    using clock = std::chrono::steady_clock;
    using time_point = clock::time_point;

    /// The result of `reserve`: tokens taken now and granted at `ready`. Move-only: one claim
    /// on the bucket, cancelled at most once (a moved-from reservation is empty).
    class reservation {
    public:
        /// Tokens reserved; zero for an empty, failed, moved-from or cancelled reservation.
        std::size_t tokens = 0;
        /// When the tokens may be used; `time_point::max()` when the rate is zero and they
        /// will only come from a later rate change.
        time_point ready{};

        reservation() = default;
        reservation(reservation&& o) noexcept
            : tokens(std::exchange(o.tokens, 0)), ready(o.ready), after_(o.after_), version_(o.version_)
        {
        }
        reservation& operator=(reservation&& o) noexcept
        {
            tokens = std::exchange(o.tokens, 0);
            ready = o.ready;
            after_ = o.after_;
            version_ = o.version_;
            return *this;
        }
        reservation(const reservation&) = delete;
        reservation& operator=(const reservation&) = delete;

    private:
        friend class bucket_core;
        reservation(std::size_t n, time_point at, std::int64_t after, std::uint64_t version) noexcept
            : tokens(n), ready(at), after_(after), version_(version)
        {
        }
        // Where the bucket's state stood right after this reservation, to tell on cancel whether
        // later reservations were made behind it.
        std::int64_t after_ = 0;
        std::uint64_t version_ = 0; // the configuration's generation
    };

    /// A full bucket of `burst` tokens refilled at `r`, starting at `now`.
    ///
    /// Throws `valve::error` (`errc::invalid_argument`) for an invalid rate (see `validate`), a
    /// zero burst, or a burst that takes longer than `max_refill()` to refill at `r`.
    bucket_core(rate r, std::size_t burst, time_point now);

    /// Throws what the constructor would throw for `r` and `burst`, and nothing otherwise: a
    /// check before a change is applied anywhere.
    static void check(rate r, std::size_t burst);

    /// The longest time a burst may take to refill (about 73 years).
    static std::chrono::nanoseconds max_refill() noexcept;

    bucket_core(const bucket_core&) = delete;
    bucket_core& operator=(const bucket_core&) = delete;

    /// Takes `n` tokens if the bucket holds them at `now`, and `keep` more that must stay in it
    /// (tokens promised to someone else); returns whether it did. `n == 0` always succeeds;
    /// `n + keep > burst()` always fails (unless the rate is unlimited).
    bool try_take(std::size_t n, time_point now, std::size_t keep = 0) noexcept;

    /// The earliest time at which `n` tokens could be taken, if `ahead` tokens were taken
    /// first and nobody else took any; `now` if at once. `time_point::max()` if never: the
    /// rate is zero and the burst is used up, or `n > burst()`.
    time_point earliest(std::size_t n, time_point now, std::size_t ahead = 0) const noexcept;

    /// Takes `n` tokens now, to be used at the returned reservation's `ready` time (which may
    /// be in the future: the bucket goes into debt, and later callers wait behind it).
    ///
    /// Fails with `errc::exceeds_burst` if `n > burst()`, or `errc::would_exceed_deadline` if
    /// the tokens would only be ready after `deadline`; a failed reservation takes nothing.
    reservation reserve(std::size_t n, time_point now, boost::system::error_code& ec,
                        time_point deadline = time_point::max()) noexcept;

    /// Cancels a reservation whose `ready` time has not passed (`now <= r.ready`), returning
    /// its tokens less any that reservations made after it have already claimed (as
    /// `x/time/rate` does), and empties `r`: a second cancel gives back nothing. Returns the
    /// number of tokens given back (possibly fractional). A reservation made before a later
    /// rate or burst change, or before the bucket re-anchored its epoch (every 26 days), gives
    /// back nothing. Reservations may run into debt by at least one burst's refill time (by
    /// weeks for a short one); beyond what the bucket can hold `reserve` fails with
    /// `errc::would_exceed_deadline`.
    double cancel(reservation& r, time_point now) noexcept;

    /// Puts back `n` tokens taken at `now` that turned out not to be needed (for example one
    /// bucket of an all-or-nothing acquisition that another bucket refused). Never fills the
    /// bucket beyond its burst.
    void refund(std::size_t n, time_point now) noexcept;

    /// Changes the rate, keeping the tokens accrued so far (and any debt of reservations, however
    /// deep at the new rate), rounded down to the new rate's units. Time spent at an unlimited
    /// rate refills the bucket; leaving it at the instant it was entered keeps what was owed.
    /// Throws `valve::error` (`errc::invalid_argument`) for an invalid rate or one at which the
    /// burst would take longer than `max_refill()` to refill; the bucket is then unchanged.
    void set_rate(rate r, time_point now);

    /// Changes the burst, keeping the tokens accrued so far up to the new burst.
    /// Throws `valve::error` (`errc::invalid_argument`) for zero or a burst too long to refill;
    /// the bucket is then unchanged.
    void set_burst(std::size_t burst, time_point now);

    /// The rate in force.
    rate current_rate() const noexcept;

    /// The burst in force.
    std::size_t burst() const noexcept;

    /// Whether the rate in force is unlimited: every grant succeeds, whatever the time.
    bool is_unlimited() const noexcept;

    /// Tokens in the bucket at `now`: at most `burst()`, negative while reservations are in
    /// debt; infinity while the rate is unlimited (every grant succeeds).
    double available(time_point now) const noexcept;

private:
    struct config;
    // One configuration, read by every call in the fast path. `seq` is a sequence lock: odd
    // while being written, else twice the configuration's generation, so a reader can tell a
    // consistent, current copy from a recycled one. Packed, not cache-line aligned: a bucket
    // per user must stay small, and every grant reads the state word and its slot together.
    struct slot {
        std::atomic<std::uint64_t> seq{1};
        std::atomic<std::int64_t> epoch{0};   // ns since the clock's epoch that state times count from
        std::atomic<std::int64_t> cost{1};    // state units per token
        std::atomic<std::int64_t> window{1};  // burst * cost
        std::atomic<std::uint64_t> burst{1};
        std::atomic<std::int64_t> period{1};  // the rate as given, for current_rate()
        std::atomic<double> count{0.0};
        std::atomic<std::int16_t> scale{1};   // state units per nanosecond (1..8), with shift 0
        std::atomic<std::int16_t> shift{0};   // 2^shift ns per state unit (0..6), with scale 1
        std::atomic<std::int32_t> mode{0};
    };

    static config make_config(const rate& r, std::size_t burst, std::int64_t epoch);
    static long double max_refill_ns() noexcept;
    bool read(std::uint64_t s, config& c) const noexcept;
    config snapshot(std::uint64_t& s) const noexcept;
    rate rate_of(unsigned generation) const noexcept;
    void publish(std::uint64_t generation, const config& c) noexcept;
    void reconfigure(const rate* r, const std::size_t* burst, time_point now);
    void rebase(time_point now) noexcept;

    // The state word, written by every grant.
    std::atomic<std::uint64_t> state_;
    // Two slots: a writer fills the one not in force, and the sequence locks make reuse safe
    // (a reader of a recycled slot retries). A power of two.
    static constexpr unsigned slot_count = 2;
    std::array<slot, slot_count> slots_;
    // Writers serialise on one of a few mutexes shared by all buckets (see bucket_core.cpp).
    std::uint64_t generation_ = 0; // under that mutex
};

} // namespace valve

#endif
