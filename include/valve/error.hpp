#ifndef VALVE_ERROR_HPP
#define VALVE_ERROR_HPP

#include <boost/system/error_code.hpp>
#include <boost/system/system_error.hpp>

#include <stdexcept>
#include <string>
#include <type_traits>

namespace valve {

/// Errors reported by valve, in the "valve" error category.
enum class errc {
    /// An argument was out of range: a NaN or negative rate, a zero burst, a bad option.
    invalid_argument = 1,
    /// More tokens were asked for at once than the bucket's burst can ever hold.
    exceeds_burst,
    /// The wait for tokens would end after the deadline the caller gave.
    would_exceed_deadline,
    /// The bounded queue is full; the work was refused at once.
    queue_full,
    /// The limiter or manager is shutting down and accepts no new work.
    shutting_down,
    /// No profile of that name was registered.
    unknown_profile,
    /// A profile of that name is already registered.
    duplicate_profile,
    /// An operation did not complete in the time allowed.
    timed_out,
    /// The upstream said it is overloaded (an HTTP 429 or 503, say): an adaptive rate lowers
    /// itself when a task reports this.
    overloaded,
    /// The store holding a shared limit (Redis) cannot be reached, did not answer in time, or is
    /// failing fast after such a failure; under `store_failure::fail_closed` the work is refused.
    store_unavailable,
    /// The store answered with an error: a wrong password, an unknown database, a script error.
    store_error,
};

/// The category of valve's error codes; its `name()` is "valve".
const boost::system::error_category& error_category() noexcept;

/// Makes an error code in valve's category.
inline boost::system::error_code make_error_code(errc e) noexcept
{
    return {static_cast<int>(e), error_category()};
}

/// The exception thrown by valve's throwing APIs (constructors, configuration calls).
///
/// It carries the same `error_code` an asynchronous operation would report (`code()`), and a
/// message that names the call and the offending value and says what to do. `what()` is that
/// message alone: unlike `boost::system::system_error`'s, it does not repeat the category's
/// message or append the code.
class error : public boost::system::system_error {
public:
    /// `what()` returns `what_arg`.
    error(errc e, const std::string& what_arg);
    /// `what()` returns the category's message for `e`.
    explicit error(errc e);

    const char* what() const noexcept override;

private:
    std::runtime_error message_; // copied without allocating, as exceptions should be
};

namespace detail {
/// Throws `valve::error(e, what)`; kept out of line so callers stay small.
[[noreturn]] void throw_error(errc e, const std::string& what);
} // namespace detail

} // namespace valve

template <>
struct boost::system::is_error_code_enum<valve::errc> : std::true_type {};

#endif
