#ifndef VALVE_TEST_SUPPORT_HPP
#define VALVE_TEST_SUPPORT_HPP

// Small helpers shared by valve's tests.

#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/system/error_code.hpp>
#include <boost/system/system_error.hpp>

#include <gtest/gtest.h>

#include <exception>
#include <functional>
#include <utility>

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

/// Runs `aw` on `ioc` until the io_context runs out of work; returns its exception (if any)
/// and value, and checks it completed exactly once. `then` runs in its completion handler.
template <class T>
std::pair<std::exception_ptr, T> run_to_end(boost::asio::io_context& ioc, boost::asio::awaitable<T> aw,
                                            const std::function<void()>& then = {})
{
    std::pair<std::exception_ptr, T> out{};
    int done = 0;
    boost::asio::co_spawn(ioc, std::move(aw), [&](std::exception_ptr e, T v) {
        out = {e, std::move(v)};
        ++done;
        if (then) then();
    });
    ioc.run();
    EXPECT_EQ(done, 1);
    return out;
}

} // namespace valve::test

#endif
