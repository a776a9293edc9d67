#include "detail/fair_queue.hpp"

#include <gtest/gtest.h>

#include <string>
#include <vector>

using valve::detail::arrival_queue;
using valve::detail::fair_queue;

namespace {

std::vector<std::string> serve_all(fair_queue<std::string>& q)
{
    std::vector<std::string> order;
    while (q.next()) order.push_back(q.take_next());
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

TEST(fair_queue, a_newcomer_goes_ahead_of_a_flood_just_served)
{
    fair_queue<int> q;
    std::uint64_t id = 0;
    for (int i = 0; i < 1000; ++i) q.push(++id, 1, i);
    // Two of the flood are served, then the newcomer arrives.
    q.take_next();
    q.take_next();
    q.push(++id, 2, -1);
    int position = 0;
    while (q.take_next() != -1) ++position;
    EXPECT_EQ(position, 0);
}

TEST(fair_queue, newcomers_go_ahead_of_the_user_served_last_but_not_of_users_waiting)
{
    fair_queue<std::string> q;
    std::uint64_t id = 0;
    q.push(++id, 1, "a0");
    q.push(++id, 1, "a1");
    q.push(++id, 2, "b0");
    q.push(++id, 2, "b1");
    EXPECT_EQ(q.take_next(), "a0"); // a was served last; b waits
    q.push(++id, 3, "c0");          // c arrives: behind b, ahead of a
    q.push(++id, 4, "d0");          // d arrives: behind c
    EXPECT_EQ(serve_all(q), (std::vector<std::string>{"b0", "c0", "d0", "a1", "b1"}));
}

TEST(fair_queue, a_newcomer_goes_ahead_of_a_user_who_was_just_served_and_refilled)
{
    // A user's first item is taken as soon as it arrives (it empties its queue), then it
    // queues more; another user arrives after that. The newcomer has the next turn.
    fair_queue<std::string> q;
    std::uint64_t id = 0;
    q.push(++id, 1, "a0");
    EXPECT_EQ(q.take_next(), "a0");
    q.push(++id, 1, "a1");
    q.push(++id, 1, "a2");
    q.push(++id, 2, "b0");
    q.push(++id, 2, "b1");
    EXPECT_EQ(serve_all(q), (std::vector<std::string>{"b0", "a1", "b1", "a2"}));
}

TEST(fair_queue, a_user_who_empties_and_refills_goes_behind_those_waiting)
{
    fair_queue<std::string> q;
    std::uint64_t id = 0;
    q.push(++id, 1, "a0");
    q.push(++id, 2, "b0");
    q.push(++id, 2, "b1");
    EXPECT_EQ(q.take_next(), "a0"); // a has nothing left: it leaves
    q.push(++id, 1, "a1");          // and comes back at once
    EXPECT_EQ(serve_all(q), (std::vector<std::string>{"b0", "a1", "b1"}));
}

TEST(fair_queue, cancelling_keeps_order_and_turns)
{
    fair_queue<std::string> q;
    q.push(1, 1, "a0");
    q.push(2, 1, "a1");
    q.push(3, 2, "b0");
    q.push(4, 1, "a2");
    EXPECT_EQ(q.take(1, 2), "a1"); // from the middle of a user's queue
    EXPECT_EQ(q.take(2, 3), "b0"); // a user's only item: the user leaves the ring
    EXPECT_TRUE(q.contains(1, 4));
    EXPECT_FALSE(q.contains(2, 3));
    EXPECT_FALSE(q.take(2, 3));    // gone already
    EXPECT_FALSE(q.take(1, 3));    // not this user's
    EXPECT_EQ(serve_all(q), (std::vector<std::string>{"a0", "a2"}));
}

TEST(fair_queue, cancelling_the_next_item_does_not_cost_its_user_the_turn)
{
    fair_queue<std::string> q;
    q.push(1, 1, "a0");
    q.push(2, 1, "a1");
    q.push(3, 2, "b0");
    EXPECT_EQ(q.take(1, 1), "a0");
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

TEST(fair_queue, draining_one_user_leaves_the_others_and_their_turns)
{
    fair_queue<int> q;
    q.push(1, 1, 10);
    q.push(2, 2, 20);
    q.push(3, 1, 30);
    q.push(4, 3, 40);
    q.push(5, 2, 50);
    std::vector<int> seen;
    q.drain_user(1, [&](std::uint64_t, int v) { seen.push_back(v); });
    EXPECT_EQ(seen, (std::vector<int>{10, 30}));
    EXPECT_EQ(q.size(), 3u);
    std::vector<int> served;
    while (q.next()) served.push_back(q.take_next());
    EXPECT_EQ(served, (std::vector<int>{20, 40, 50}));
    q.drain_user(9, [&](std::uint64_t, int) { ADD_FAILURE(); }); // nobody: nothing
}

TEST(fair_queue, cancelling_the_newest_item_keeps_appending_in_order)
{
    fair_queue<std::string> q;
    q.push(1, 1, "a0");
    q.push(2, 1, "a1");
    EXPECT_EQ(q.take(1, 2), "a1"); // the tail
    q.push(3, 1, "a2");
    EXPECT_EQ(serve_all(q), (std::vector<std::string>{"a0", "a2"}));
}

TEST(fair_queue, reused_nodes_and_users_keep_the_order)
{
    // Users come and go and items are taken and pushed again many times over (taken nodes
    // and user entries are reused): the order stays round-robin, first come first served.
    fair_queue<int> q;
    std::uint64_t id = 0;
    for (int round = 0; round < 50; ++round) {
        const std::uint64_t a = static_cast<std::uint64_t>(round % 3), b = a + 10;
        for (int i = 0; i < 3; ++i) q.push(++id, a, i);
        q.push(++id, b, 100);
        std::vector<int> seen;
        while (q.next()) seen.push_back(q.take_next());
        EXPECT_EQ(seen, (std::vector<int>{0, 100, 1, 2}));
        EXPECT_TRUE(q.empty());
    }
}

TEST(arrival_queue, oldest_first_and_removal_by_id_anywhere)
{
    arrival_queue<std::string> q;
    for (std::uint64_t id = 1; id <= 5; ++id) q.push(id * 10, "x" + std::to_string(id));
    EXPECT_EQ(q.size(), 5u);
    EXPECT_EQ(q.take(30), "x3"); // from the middle
    EXPECT_EQ(q.take(10), "x1"); // the oldest
    EXPECT_FALSE(q.take(30));    // gone already
    EXPECT_FALSE(q.take(35));    // never there
    EXPECT_EQ(q.size(), 3u);
    auto [id, v] = q.pop();
    EXPECT_EQ(id, 20u);
    EXPECT_EQ(v, "x2");
    EXPECT_EQ(q.take(50), "x5"); // the newest
    q.push(60, "x6");
    std::vector<std::string> rest;
    q.drain([&](std::uint64_t, std::string s) { rest.push_back(std::move(s)); });
    EXPECT_EQ(rest, (std::vector<std::string>{"x4", "x6"}));
    EXPECT_TRUE(q.empty());
}

TEST(arrival_queue, an_item_arriving_late_takes_the_place_of_its_id)
{
    arrival_queue<int> q;
    q.push(1, 1);
    q.push(3, 3);
    q.push(2, 2); // submitted before 3, arrived after it
    q.push(4, 4);
    q.push(6, 6);
    q.push(5, 5);
    EXPECT_EQ(q.take(5), 5); // found where its id puts it
    std::vector<int> order;
    while (!q.empty()) order.push_back(q.pop().second);
    EXPECT_EQ(order, (std::vector<int>{1, 2, 3, 4, 6}));
}
