#ifndef VALVE_TEST_SUPPORT_HPP
#define VALVE_TEST_SUPPORT_HPP

// Small helpers shared by valve's tests.

#include <boost/system/error_code.hpp>
#include <boost/system/system_error.hpp>

#include <exception>

namespace valve::test {

/// Records the one completion an operation must deliver: how often, and with which error.
struct completion_probe {
    int calls = 0;
    boost::system::error_code ec;

    auto handler()
    {
        return [this](boost::system::error_code e) {
            ++calls;
            ec = e;
        };
    }
};

/// The error code carried by an exception from a limiter (empty if none, or not a system_error).
inline boost::system::error_code code_of(const std::exception_ptr& e)
{
    try {
        if (e) std::rethrow_exception(e);
    } catch (const boost::system::system_error& se) {
        return se.code();
    } catch (...) {
    }
    return {};
}

} // namespace valve::test

#endif
