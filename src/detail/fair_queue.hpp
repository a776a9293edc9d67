#ifndef VALVE_SRC_DETAIL_FAIR_QUEUE_HPP
#define VALVE_SRC_DETAIL_FAIR_QUEUE_HPP

// Internal: the order in which a limiter serves queued tasks. Plain code, no I/O, no clock.

#include <cstddef>
#include <cstdint>
#include <deque>
#include <iterator>
#include <list>
#include <map>
#include <optional>
#include <unordered_map>
#include <utility>

namespace valve::detail {

/// Queued items of many users, served round-robin between users and first come, first served
/// within each user's own items: a user with a thousand items queued delays another user's
/// single item by at most one item of every other user with work.
///
/// Items are named by unique ids; any item can be removed (cancelled) in O(log n) plus the
/// length of its user's queue.
template <class T>
class fair_queue {
public:
    bool empty() const noexcept { return items_.empty(); }
    std::size_t size() const noexcept { return items_.size(); }
    bool contains(std::uint64_t id) const { return items_.count(id) != 0; }

    /// Adds `value` as `user`'s newest item. `id` must be new.
    void push(std::uint64_t id, std::uint64_t user, T value)
    {
        items_.emplace(id, item{user, std::move(value)});
        auto [it, fresh] = users_.try_emplace(user);
        it->second.ids.push_back(id);
        if (fresh) it->second.in_ring = ring_.insert(ring_.end(), user);
    }

    /// The id of the item to serve next, if any: the oldest item of the user whose turn it is.
    std::optional<std::uint64_t> next() const
    {
        if (ring_.empty()) return std::nullopt;
        return users_.at(ring_.front()).ids.front();
    }

    /// Removes and returns item `id`. If it was served (rather than cancelled), its user's
    /// turn passes to the next user with work.
    T take(std::uint64_t id, bool served)
    {
        auto found = items_.find(id);
        const std::uint64_t user = found->second.user;
        T value = std::move(found->second.value);
        items_.erase(found);
        auto u = users_.find(user);
        auto& ids = u->second.ids;
        if (!ids.empty() && ids.front() == id)
            ids.pop_front();
        else
            for (auto i = ids.begin(); i != ids.end(); ++i)
                if (*i == id) {
                    ids.erase(i);
                    break;
                }
        if (ids.empty()) {
            ring_.erase(u->second.in_ring);
            users_.erase(u);
        } else if (served && u->second.in_ring == ring_.begin()) {
            ring_.splice(ring_.end(), ring_, u->second.in_ring);
        }
        return value;
    }

    /// Removes every item, oldest first within each user, calling `f(id, value)` on each.
    template <class F>
    void drain(F&& f)
    {
        while (!items_.empty()) {
            const std::uint64_t id = items_.begin()->first;
            f(id, take(id, false));
        }
    }

private:
    struct item {
        std::uint64_t user;
        T value;
    };
    struct user_state {
        std::deque<std::uint64_t> ids;
        std::list<std::uint64_t>::iterator in_ring;
    };

    std::map<std::uint64_t, item> items_; // node-based: values never move once queued
    std::unordered_map<std::uint64_t, user_state> users_;
    std::list<std::uint64_t> ring_; // users with items, in the order of their turns
};

} // namespace valve::detail

#endif
