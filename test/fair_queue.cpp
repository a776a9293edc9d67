#include "detail/fair_queue.hpp"

#include <gtest/gtest.h>

#include <string>
#include <vector>

using valve::detail::fair_queue;

namespace {

std::vector<std::string> serve_all(fair_queue<std::string>& q)
{
    std::vector<std::string> order;
    while (auto id = q.next()) order.push_back(q.take(*id, true));
    return order;
}

} // namespace

TEST(fair_queue, one_user_is_first_come_first_served)
{
    fair_queue<std::string> q;
    q.push(1, 7, "a");
    q.push(2, 7, "b");
    q.push(3, 7, "c");
    EXPECT_EQ(q.size(), 3u);
    EXPECT_EQ(serve_all(q), (std::vector<std::string>{"a", "b", "c"}));
    EXPECT_TRUE(q.empty());
    EXPECT_FALSE(q.next());
}

TEST(fair_queue, users_take_turns)
{
    fair_queue<std::string> q;
    std::uint64_t id = 0;
    for (int i = 0; i < 3; ++i) q.push(++id, 1, "flood" + std::to_string(i));
    q.push(++id, 2, "single");
    q.push(++id, 3, "x0");
    q.push(++id, 3, "x1");
    EXPECT_EQ(serve_all(q), (std::vector<std::string>{"flood0", "single", "x0", "flood1", "x1", "flood2"}));
}

TEST(fair_queue, a_flood_delays_a_newcomer_by_one_turn_at_most)
{
    fair_queue<int> q;
    std::uint64_t id = 0;
    for (int i = 0; i < 1000; ++i) q.push(++id, 1, i);
    // Two of the flood are served, then the newcomer arrives.
    q.take(*q.next(), true);
    q.take(*q.next(), true);
    q.push(++id, 2, -1);
    int position = 0;
    while (q.take(*q.next(), true) != -1) ++position;
    EXPECT_LE(position, 1);
}

TEST(fair_queue, cancelling_keeps_order_and_turns)
{
    fair_queue<std::string> q;
    q.push(1, 1, "a0");
    q.push(2, 1, "a1");
    q.push(3, 2, "b0");
    q.push(4, 1, "a2");
    EXPECT_EQ(q.take(2, false), "a1"); // from the middle of a user's queue
    EXPECT_EQ(q.take(3, false), "b0"); // a user's only item: the user leaves the ring
    EXPECT_TRUE(q.contains(4));
    EXPECT_FALSE(q.contains(3));
    EXPECT_EQ(serve_all(q), (std::vector<std::string>{"a0", "a2"}));
}

TEST(fair_queue, cancelling_the_next_item_does_not_cost_its_user_the_turn)
{
    fair_queue<std::string> q;
    q.push(1, 1, "a0");
    q.push(2, 1, "a1");
    q.push(3, 2, "b0");
    EXPECT_EQ(q.take(1, false), "a0");
    EXPECT_EQ(*q.next(), 2u); // still user 1's turn
}

TEST(fair_queue, drain_empties_everything)
{
    fair_queue<int> q;
    q.push(1, 1, 10);
    q.push(2, 2, 20);
    q.push(3, 1, 30);
    std::vector<int> seen;
    q.drain([&](std::uint64_t, int v) { seen.push_back(v); });
    EXPECT_EQ(seen, (std::vector<int>{10, 20, 30}));
    EXPECT_TRUE(q.empty());
    EXPECT_FALSE(q.next());
}
