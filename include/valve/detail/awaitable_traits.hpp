#ifndef VALVE_DETAIL_AWAITABLE_TRAITS_HPP
#define VALVE_DETAIL_AWAITABLE_TRAITS_HPP

#include <boost/asio/awaitable.hpp>

#include <type_traits>

namespace valve::detail {

/// Whether `T` is an `asio::awaitable`, and what it yields.
template <class T>
struct awaitable_value {
    static constexpr bool is_awaitable = false;
};
template <class T, class Executor>
struct awaitable_value<boost::asio::awaitable<T, Executor>> {
    static constexpr bool is_awaitable = true;
    using type = T;
};

/// What calling `F` with no arguments yields in the end: `T` for a callable returning
/// `asio::awaitable<T>`, its return type otherwise.
template <class F, class R = std::invoke_result_t<F&>>
using eventual_result_t =
    typename std::conditional_t<awaitable_value<R>::is_awaitable, awaitable_value<R>, std::type_identity<R>>::type;

} // namespace valve::detail

#endif
