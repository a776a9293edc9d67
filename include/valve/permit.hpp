#ifndef VALVE_PERMIT_HPP
#define VALVE_PERMIT_HPP

#include <cstdint>
#include <memory>

namespace valve {

namespace detail {
class limiter_core;
struct limiter_access;
} // namespace detail

/// A place in a limiter, for work its holder does itself (`limiter::try_enter`,
/// `limiter::async_enter`): one of its concurrency slots, held until the permit is released or
/// destroyed, and the one token it took. While it is held it counts as an async task of the
/// limiter (a blocking `manager::shutdown` from an event loop's handler is refused meanwhile:
/// its holder may be that handler). An empty permit holds nothing. Move-only; not thread-safe
/// itself (one owner at a time).
class permit {
public:
    permit() noexcept = default;
    permit(permit&& other) noexcept;
    permit& operator=(permit&& other) noexcept;
    ~permit();

    /// Whether it holds a slot.
    explicit operator bool() const noexcept { return core_ != nullptr; }

    /// Frees the slot now (the limiter may start its next task); `failed` counts the work done
    /// under it as failed in the statistics. Does nothing on an empty permit.
    void release(bool failed = false) noexcept;

private:
    friend class limiter;
    friend struct detail::limiter_access;
    permit(std::shared_ptr<detail::limiter_core> core, std::uint64_t id) noexcept;

    std::shared_ptr<detail::limiter_core> core_;
    std::uint64_t id_ = 0;
};

} // namespace valve

#endif
