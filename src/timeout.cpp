#include <valve/timeout.hpp>

#include <valve/error.hpp>

#include <string>

namespace valve::detail {

void throw_timed_out(std::chrono::nanoseconds allowed)
{
    if (allowed > std::chrono::nanoseconds::zero())
        throw_error(errc::timed_out, "with_timeout: the operation did not complete within " +
                                         std::to_string(std::chrono::duration<double, std::milli>(allowed).count()) +
                                         " ms and was cancelled");
    throw_error(errc::timed_out, "with_deadline: the operation did not complete by its deadline and was cancelled");
}

} // namespace valve::detail
