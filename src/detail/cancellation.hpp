#ifndef VALVE_SRC_DETAIL_CANCELLATION_HPP
#define VALVE_SRC_DETAIL_CANCELLATION_HPP

// Internal: which cancellation requests valve's waiting operations honour.

#include <boost/asio/cancellation_type.hpp>

namespace valve::detail {

/// A waiter that is still queued has taken nothing (no token, no slot), so terminal, partial
/// and total cancellation are all safe to honour.
inline bool cancels_waiting(boost::asio::cancellation_type type) noexcept
{
    constexpr auto honoured = boost::asio::cancellation_type::terminal | boost::asio::cancellation_type::partial
                              | boost::asio::cancellation_type::total;
    return (type & honoured) != boost::asio::cancellation_type::none;
}

} // namespace valve::detail

#endif
