#ifndef VALVE_SRC_REDIS_GCRA_HPP
#define VALVE_SRC_REDIS_GCRA_HPP

// Internal: the arguments of valve's GCRA script (src/redis/gcra.lua) and what it returns.

#include "protocol.hpp"

#include <valve/rate.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace valve::detail {

/// The script, loaded once per process.
const redis_script& gcra_script();

/// A token interval of q + r/d microseconds, d <= 2^20: exact for any rate whose interval is
/// a multiple of 1/d us, else rounded up (never faster than asked) by less than 1/2^20 us.
struct gcra_interval {
    std::int64_t q = 0;
    std::int64_t r = 0;
    std::int64_t d = 1;
};

/// The largest burst a limit in Redis may have (every product of the script stays below 2^53).
inline constexpr std::size_t gcra_max_burst = std::size_t{1} << 31;

/// The interval of `r`, for a burst of `burst`. Throws `valve::error` (`errc::invalid_argument`),
/// naming `where`, for a rate that is not usable, zero or unlimited, a zero burst, a burst above
/// `gcra_max_burst`, or one taking over 30 years to refill.
gcra_interval gcra_interval_of(const rate& r, std::size_t burst, const std::string& where);

/// One limit's part of the script's arguments.
struct gcra_limit {
    std::string key;
    gcra_interval interval;
    std::size_t burst = 1;
};

/// One waiter's part: `n` tokens, granted only if the slot comes within `max_wait_us`.
struct gcra_ask {
    std::size_t n = 1;
    std::int64_t max_wait_us = 0;
};

/// "No deadline" as a maximum wait.
inline constexpr std::int64_t gcra_no_deadline = std::int64_t{1} << 52;

/// The arguments of EVALSHA after the script's SHA: numkeys, keys, then ARGV.
std::vector<std::string> gcra_args(const std::vector<gcra_limit>& limits, std::uint64_t give_back,
                                   const std::vector<gcra_ask>& asks, std::optional<std::int64_t> now_us = {});

/// What the script answered.
struct gcra_result {
    std::int64_t free_us = 0;          // of the first limit after the call
    std::vector<std::int64_t> waits;   // >= 0: taken, slot in us; < 0: refused, slot would be -w - 1
};

/// Reads the script's reply; nothing for a reply of another shape (an error reply, say).
std::optional<gcra_result> gcra_parse(const redis_reply& reply, std::size_t asks);

} // namespace valve::detail

#endif
