#ifndef VALVE_SRC_DETAIL_FAIR_QUEUE_HPP
#define VALVE_SRC_DETAIL_FAIR_QUEUE_HPP

// Internal: the order in which a limiter serves queued tasks. Plain code, no I/O, no clock.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <iterator>
#include <optional>
#include <unordered_map>
#include <utility>
#include <vector>

namespace valve::detail {

/// Queued items of many users, served round-robin between users and first come, first served
/// within each user's own items: a user with a thousand items queued delays another user's
/// single item by at most one item of every other user with work.
///
/// Turns go to the user served least recently: a user just served goes to the back, and a
/// user who arrives (with no items queued before) goes ahead of the user served last, as if
/// served just before it. So a newcomer never waits behind a user who has just had a turn
/// (alone in the queue, that user would otherwise keep the turn), and a user who empties its
/// queue and refills it at once still goes behind every user who was waiting.
///
/// Items are named by unique ids; an item can be removed (cancelled) by its user and id in the
/// length of that user's queue. Each user's
/// items are a linked list of nodes that are kept for reuse (a few of them) once taken, and a
/// user who leaves the ring leaves its entry for the next newcomer: in a steady flow, queueing
/// and serving allocate nothing.
///
/// `T` must be default-constructible and move-assignable (a taken node keeps a moved-from `T`).
template <class T>
class fair_queue {
public:
    fair_queue() = default;
    fair_queue(const fair_queue&) = delete;
    fair_queue& operator=(const fair_queue&) = delete;

    ~fair_queue()
    {
        for (auto& [user, u] : users_) free_list(u.head);
        free_list(spare_);
    }

    bool empty() const noexcept { return size_ == 0; }
    std::size_t size() const noexcept { return size_; }

    /// Whether `user`'s item `id` is queued.
    bool contains(std::uint64_t user, std::uint64_t id) const
    {
        const auto u = users_.find(user);
        if (u == users_.end()) return false;
        for (const node* n = u->second.head; n; n = n->next)
            if (n->id == id) return true;
        return false;
    }

    /// Adds `value` as `user`'s newest item. `id` must be new.
    void push(std::uint64_t id, std::uint64_t user, T value)
    {
        node* n = make_node(id, std::move(value));
        user_state& u = find_or_add(user);
        if (u.tail)
            u.tail->next = n;
        else
            u.head = n;
        u.tail = n;
        ++size_;
    }

    /// The id of the item to serve next, if any: the oldest item of the user whose turn it is.
    std::optional<std::uint64_t> next() const
    {
        if (!turn_) return std::nullopt;
        return turn_->head->id;
    }

    /// Removes and returns the item `next()` names; its user's turn passes to the next user
    /// with work. The queue must not be empty.
    T take_next()
    {
        user_state& u = *turn_;
        T value = unlink_head(u);
        served_last_ = u.user;
        has_served_ = true;
        if (u.head)
            turn_ = u.ring_next;
        else
            leave(u);
        return value;
    }

    /// Removes `user`'s item `id` (cancelled, not served: the user keeps its turn), if queued.
    std::optional<T> take(std::uint64_t user, std::uint64_t id)
    {
        const auto found = users_.find(user);
        if (found == users_.end()) return std::nullopt;
        user_state& u = found->second;
        if (u.head->id == id) {
            std::optional<T> value{unlink_head(u)};
            if (!u.head) leave(u);
            return value;
        }
        for (node* prev = u.head; prev->next; prev = prev->next) {
            node* n = prev->next;
            if (n->id != id) continue;
            prev->next = n->next;
            if (u.tail == n) u.tail = prev;
            --size_;
            std::optional<T> value{std::move(n->value)};
            recycle(n);
            return value;
        }
        return std::nullopt;
    }

    /// Removes every item of `user`, oldest first, calling `f(id, value)` on each (its user
    /// cancelled them all: not served, the others keep their turns).
    template <class F>
    void drain_user(std::uint64_t user, F&& f)
    {
        for (auto found = users_.find(user); found != users_.end(); found = users_.find(user)) {
            const std::uint64_t id = found->second.head->id;
            f(id, std::move(*take(user, id)));
        }
    }

    /// Removes every item, oldest (smallest id) first, calling `f(id, value)` on each.
    template <class F>
    void drain(F&& f)
    {
        std::vector<std::pair<std::uint64_t, std::uint64_t>> order; // (id, user)
        order.reserve(size_);
        for (const auto& [user, u] : users_)
            for (const node* n = u.head; n; n = n->next) order.emplace_back(n->id, user);
        std::sort(order.begin(), order.end());
        for (const auto& [id, user] : order) f(id, std::move(*take(user, id)));
    }

private:
    struct node {
        std::uint64_t id;
        node* next;
        T value;
    };
    // A user with items queued: its items, oldest first, and its place in the ring of turns.
    struct user_state {
        node* head = nullptr;
        node* tail = nullptr;
        user_state* ring_next = nullptr;
        user_state* ring_prev = nullptr;
        std::uint64_t user = 0;
    };
    using user_map = std::unordered_map<std::uint64_t, user_state>;

    // Taken nodes kept for reuse, at most this many, so an idle queue holds little.
    static constexpr std::size_t spare_limit = 16;

    node* make_node(std::uint64_t id, T value)
    {
        if (node* n = spare_) {
            spare_ = n->next;
            --spare_count_;
            n->id = id;
            n->next = nullptr;
            n->value = std::move(value);
            return n;
        }
        return new node{id, nullptr, std::move(value)};
    }

    void recycle(node* n) noexcept
    {
        if (spare_count_ == spare_limit) {
            delete n;
            return;
        }
        n->next = spare_;
        spare_ = n;
        ++spare_count_;
    }

    static void free_list(node* n) noexcept
    {
        while (n) delete std::exchange(n, n->next);
    }

    T unlink_head(user_state& u)
    {
        node* n = u.head;
        u.head = n->next;
        if (!u.head)
            u.tail = nullptr;
        else
            // A long queue's nodes were written long ago (or by another thread): fetch the
            // user's next one now, ahead of its turn, rather than stall on it then.
            __builtin_prefetch(u.head);
        --size_;
        T value = std::move(n->value);
        recycle(n);
        return value;
    }

    user_state& find_or_add(std::uint64_t user)
    {
        auto found = users_.find(user);
        if (found == users_.end()) {
            if (spare_user_) {
                spare_user_.key() = user;
                spare_user_.mapped() = user_state{};
                found = users_.insert(std::move(spare_user_)).position;
            } else {
                found = users_.emplace(user, user_state{}).first;
            }
        }
        user_state& u = found->second;
        if (!u.ring_next) {
            u.user = user;
            join(u);
        }
        return u;
    }

    // A user with new work joins the ring as the last to take a turn, but ahead of the user
    // served last if that one is in the ring: it is then last (or alone, with the turn). The
    // user served last, coming back, is simply last.
    void join(user_state& u) noexcept
    {
        if (!turn_) {
            u.ring_next = u.ring_prev = &u;
            turn_ = &u;
            return;
        }
        user_state* recent = served_last(*turn_->ring_prev) ? turn_->ring_prev : nullptr;
        const bool newcomer = !served_last(u);
        user_state* before = newcomer && recent ? recent : turn_;
        user_state* last = before->ring_prev;
        u.ring_prev = last;
        u.ring_next = before;
        last->ring_next = &u;
        before->ring_prev = &u;
        if (newcomer && recent == turn_) turn_ = &u; // the user served last was alone: the newcomer goes first
    }

    bool served_last(const user_state& u) const noexcept { return has_served_ && u.user == served_last_; }

    // A user without work leaves the ring; if it had the turn, the next user has it.
    void leave(user_state& u)
    {
        if (u.ring_next == &u) {
            turn_ = nullptr;
        } else {
            u.ring_prev->ring_next = u.ring_next;
            u.ring_next->ring_prev = u.ring_prev;
            if (turn_ == &u) turn_ = u.ring_next;
        }
        const auto it = users_.find(u.user);
        // Its map entry is kept for the next newcomer, if none is kept yet.
        if (!spare_user_)
            spare_user_ = users_.extract(it);
        else
            users_.erase(it);
    }

    user_map users_;
    user_state* turn_ = nullptr; // the user whose turn it is; the ring runs on from there
    std::uint64_t served_last_ = 0; // the user served last (if `has_served_`), in the ring or not
    std::size_t size_ = 0;
    node* spare_ = nullptr;
    std::uint32_t spare_count_ = 0;
    bool has_served_ = false;
    typename user_map::node_type spare_user_;
};

/// Items in the order of their ids (the order they were submitted), any of which can be
/// removed by id in O(log n): a removed item leaves a hole, dropped when it reaches the front.
/// Appending and taking the oldest allocate only a block now and then.
template <class T>
class arrival_queue {
public:
    bool empty() const noexcept { return live_ == 0; }
    std::size_t size() const noexcept { return live_; }

    /// Adds `value` in the place of its id (which must be new): usually the newest, but an
    /// item may arrive a little after younger ones.
    void push(std::uint64_t id, T value)
    {
        auto pos = items_.end();
        while (pos != items_.begin() && std::prev(pos)->id > id) --pos;
        items_.insert(pos, entry{id, std::move(value), true});
        ++live_;
    }

    /// Removes and returns the oldest item and its id. The queue must not be empty.
    std::pair<std::uint64_t, T> pop()
    {
        entry& e = items_.front();
        std::pair<std::uint64_t, T> oldest{e.id, std::move(e.value)};
        items_.pop_front();
        --live_;
        drop_holes();
        return oldest;
    }

    /// Removes item `id`, if queued.
    std::optional<T> take(std::uint64_t id)
    {
        const auto it = std::lower_bound(items_.begin(), items_.end(), id,
                                         [](const entry& e, std::uint64_t v) { return e.id < v; });
        if (it == items_.end() || it->id != id || !it->live) return std::nullopt;
        std::optional<T> value{std::move(it->value)};
        it->live = false;
        --live_;
        drop_holes();
        return value;
    }

    /// Removes every item, oldest first, calling `f(id, value)` on each.
    template <class F>
    void drain(F&& f)
    {
        auto items = std::move(items_);
        items_.clear();
        live_ = 0;
        for (auto& e : items)
            if (e.live) f(e.id, std::move(e.value));
    }

private:
    struct entry {
        std::uint64_t id;
        T value;
        bool live;
    };

    void drop_holes()
    {
        while (!items_.empty() && !items_.front().live) items_.pop_front();
    }

    std::deque<entry> items_;
    std::size_t live_ = 0;
};

} // namespace valve::detail

#endif
