#include <valve/hedge.hpp>

#include <valve/error.hpp>

#include <string>

namespace valve::detail {

void check_hedge(std::size_t copies, std::chrono::nanoseconds delay)
{
    if (copies == 0)
        throw_error(errc::invalid_argument, "hedge: copies is 0; give at least 1 (1 runs the operation once)");
    if (delay < std::chrono::nanoseconds::zero())
        throw_error(errc::invalid_argument, "hedge: the delay between copies is negative (" +
                                                std::to_string(delay.count()) + " ns); give zero or more");
}

} // namespace valve::detail
