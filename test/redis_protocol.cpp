// The protocol side of valve's Redis connection, with no server: bytes in, replies out.
#include "redis/protocol.hpp"

#include "redis/gcra.hpp"

#include <valve/error.hpp>

#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

namespace {

using valve::redis_reply;
using valve::detail::redis_pipeline;

std::string errc_message_of(const std::function<void()>& f)
{
    try {
        f();
    } catch (const valve::error& e) {
        EXPECT_EQ(e.code(), valve::errc::invalid_argument);
        return e.what();
    }
    ADD_FAILURE() << "no valve::error thrown";
    return {};
}

// Feeds `bytes` in random pieces (1 byte to all of it).
std::vector<redis_pipeline::reply_event> feed_in_pieces(redis_pipeline& p, const std::string& bytes,
                                                         std::mt19937& rng)
{
    std::vector<redis_pipeline::reply_event> out;
    std::size_t at = 0;
    while (at < bytes.size()) {
        std::uniform_int_distribution<std::size_t> len(1, bytes.size() - at);
        const std::size_t n = len(rng);
        std::string error;
        EXPECT_TRUE(p.feed(std::string_view(bytes).substr(at, n), out, error)) << error;
        at += n;
    }
    return out;
}

} // namespace

TEST(redis_protocol, commands_are_formatted_as_resp_arrays_of_bulk_strings)
{
    EXPECT_EQ(valve::detail::format_command({"SET", "k", "a b"}), "*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\na b\r\n");
    // Binary-safe: NUL and CRLF inside an argument.
    const std::string odd("x\0\r\ny", 5);
    EXPECT_EQ(valve::detail::format_command({"GET", odd}), "*2\r\n$3\r\nGET\r\n$5\r\n" + odd + "\r\n");
}

TEST(redis_protocol, scripts_are_named_by_their_sha1_as_redis_names_them)
{
    EXPECT_EQ(valve::detail::sha1_hex(""), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
    EXPECT_EQ(valve::detail::sha1_hex("abc"), "a9993e364706816aba3e25717850c26c9cd0d89d");
    EXPECT_EQ(valve::detail::sha1_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
              "84983e441c3bd26ebaae4aa1f95129e5e54670f1");
    EXPECT_EQ(valve::detail::sha1_hex(std::string(1000, 'a')), "291e9a6c66994949b57ba5e650361e98fc36b1ba");
    // What redis-cli SCRIPT LOAD "return 1" answers.
    EXPECT_EQ(valve::detail::sha1_hex("return 1"), "e0e1f9fabfc9d4800c877a703b823ac0578ff8db");
}

TEST(redis_protocol, replies_split_anywhere_are_matched_to_commands_in_order)
{
    std::mt19937 rng(7);
    for (int round = 0; round < 200; ++round) {
        redis_pipeline p;
        const auto a = p.push({"PING"});
        const auto b = p.push({"GET", "k"});
        const auto c = p.push({"INCR", "n"});
        const auto d = p.push({"LRANGE", "l", "0", "-1"});
        const auto e = p.push({"GET", "missing"});
        const auto f = p.push({"HSET", "h"});
        EXPECT_EQ(p.queued(), 6u);
        const std::string out = p.take_output();
        EXPECT_EQ(p.in_flight(), 6u);
        EXPECT_FALSE(p.has_output());
        EXPECT_TRUE(out.starts_with("*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n"));
        const std::string replies = "+PONG\r\n$5\r\nhello\r\n:42\r\n*2\r\n$1\r\na\r\n:-7\r\n$-1\r\n"
                                    "-ERR wrong number of arguments for 'hset' command\r\n";
        const auto events = feed_in_pieces(p, replies, rng);
        ASSERT_EQ(events.size(), 6u);
        EXPECT_EQ(events[0].id, a);
        EXPECT_EQ(events[0].reply.type, redis_reply::kind::status);
        EXPECT_EQ(events[0].reply.str, "PONG");
        EXPECT_EQ(events[1].id, b);
        EXPECT_EQ(events[1].reply.str, "hello");
        EXPECT_EQ(events[2].id, c);
        EXPECT_EQ(events[2].reply.integer, 42);
        EXPECT_EQ(events[3].id, d);
        ASSERT_EQ(events[3].reply.elements.size(), 2u);
        EXPECT_EQ(events[3].reply.elements[1].integer, -7);
        EXPECT_EQ(events[4].id, e);
        EXPECT_EQ(events[4].reply.type, redis_reply::kind::nil);
        EXPECT_EQ(events[5].id, f);
        EXPECT_EQ(events[5].reply.type, redis_reply::kind::error);
        EXPECT_EQ(p.in_flight(), 0u);
    }
}

TEST(redis_protocol, noscript_loads_the_script_once_and_sends_the_failed_calls_again_behind_it)
{
    std::mt19937 rng(11);
    valve::detail::redis_script script{"return 1"};
    redis_pipeline p;
    const auto a = p.push_script(script, {"0"});
    const auto b = p.push_script(script, {"0"});
    const auto c = p.push({"PING"});
    const std::string first = p.take_output();
    EXPECT_NE(first.find("EVALSHA"), std::string::npos);
    EXPECT_NE(first.find(script.sha1), std::string::npos);
    // SCRIPT FLUSH happened: both calls fail; PING answers.
    auto events = feed_in_pieces(p,
                                 "-NOSCRIPT No matching script. Please use EVAL.\r\n"
                                 "-NOSCRIPT No matching script. Please use EVAL.\r\n+PONG\r\n",
                                 rng);
    ASSERT_EQ(events.size(), 1u); // the failed calls are not completed
    EXPECT_EQ(events[0].id, c);
    EXPECT_EQ(p.script_loads(), 1u);
    const std::string again = p.take_output();
    // One SCRIPT LOAD, then both calls again, in their order.
    const auto load = again.find("SCRIPT");
    ASSERT_NE(load, std::string::npos);
    EXPECT_EQ(again.find("SCRIPT", load + 1), std::string::npos);
    EXPECT_NE(again.find("return 1"), std::string::npos);
    const auto first_call = again.find("EVALSHA");
    ASSERT_NE(first_call, std::string::npos);
    EXPECT_GT(first_call, load);
    EXPECT_NE(again.find("EVALSHA", first_call + 1), std::string::npos);
    events = feed_in_pieces(p, "$40\r\n" + script.sha1 + "\r\n:1\r\n:1\r\n", rng);
    ASSERT_EQ(events.size(), 2u);
    EXPECT_EQ(events[0].id, a);
    EXPECT_EQ(events[1].id, b);
    EXPECT_EQ(events[0].reply.integer, 1);
    EXPECT_EQ(p.in_flight(), 0u);
}

TEST(redis_protocol, a_script_that_keeps_failing_with_noscript_is_reported_not_retried_forever)
{
    valve::detail::redis_script script{"return 2"};
    redis_pipeline p;
    const auto a = p.push_script(script, {"0"});
    std::vector<redis_pipeline::reply_event> events;
    std::string error;
    for (int i = 0; i < 3; ++i) {
        const std::string out = p.take_output();
        EXPECT_EQ(out.find("SCRIPT") != std::string::npos, i > 0);
        if (i > 0) { // the LOAD fails
            ASSERT_TRUE(p.feed("-ERR scripting disabled\r\n", events, error)) << error;
        }
        ASSERT_TRUE(p.feed("-NOSCRIPT No matching script.\r\n", events, error)) << error;
    }
    EXPECT_FALSE(p.has_output());
    ASSERT_EQ(events.size(), 1u);
    EXPECT_EQ(events[0].id, a);
    EXPECT_EQ(events[0].reply.type, redis_reply::kind::error);
    EXPECT_TRUE(events[0].reply.str.starts_with("NOSCRIPT"));
}

TEST(redis_protocol, loading_and_other_errors_are_replies_for_the_caller_to_judge)
{
    redis_pipeline p;
    const auto a = p.push({"GET", "k"});
    p.take_output();
    std::vector<redis_pipeline::reply_event> events;
    std::string error;
    ASSERT_TRUE(p.feed("-LOADING Redis is loading the dataset in memory\r\n", events, error));
    ASSERT_EQ(events.size(), 1u);
    EXPECT_EQ(events[0].id, a);
    EXPECT_EQ(events[0].reply.type, redis_reply::kind::error);
    EXPECT_TRUE(events[0].reply.str.starts_with("LOADING"));
}

TEST(redis_protocol, a_dropped_connection_returns_every_command_not_answered_and_starts_clean)
{
    redis_pipeline p;
    const auto a = p.push({"GET", "a"});
    const auto b = p.push({"GET", "b"});
    p.take_output();
    const auto c = p.push({"GET", "c"}); // queued, not yet written
    std::vector<redis_pipeline::reply_event> events;
    std::string error;
    // `a` is answered; half of `b`'s reply arrives, then the connection drops.
    ASSERT_TRUE(p.feed("$1\r\nx\r\n$5\r\nhel", events, error));
    ASSERT_EQ(events.size(), 1u);
    EXPECT_EQ(events[0].id, a);
    EXPECT_EQ(p.drop(), (std::vector<std::uint64_t>{b, c}));
    EXPECT_EQ(p.in_flight(), 0u);
    EXPECT_FALSE(p.has_output());
    // The next connection's first reply is read from its start, not glued to the half reply.
    const auto d = p.push({"PING"});
    p.take_output();
    events.clear();
    ASSERT_TRUE(p.feed("+PONG\r\n", events, error));
    ASSERT_EQ(events.size(), 1u);
    EXPECT_EQ(events[0].id, d);
    EXPECT_EQ(events[0].reply.str, "PONG");
}

TEST(redis_protocol, bytes_that_are_not_resp_or_a_reply_nobody_asked_for_are_errors)
{
    {
        redis_pipeline p;
        p.push({"PING"});
        p.take_output();
        std::vector<redis_pipeline::reply_event> events;
        std::string error;
        EXPECT_FALSE(p.feed("?what\r\n", events, error));
        EXPECT_FALSE(error.empty());
    }
    {
        redis_pipeline p;
        std::vector<redis_pipeline::reply_event> events;
        std::string error;
        EXPECT_FALSE(p.feed("+PONG\r\n", events, error));
        EXPECT_NE(error.find("no command"), std::string::npos);
    }
}

TEST(redis_protocol, urls_give_host_port_database_and_credentials)
{
    using valve::detail::parse_redis_url;
    auto u = parse_redis_url("redis://127.0.0.1:6390/2");
    EXPECT_FALSE(u.unix_socket);
    EXPECT_EQ(u.host, "127.0.0.1");
    EXPECT_EQ(u.port, "6390");
    EXPECT_EQ(u.db, 2);
    EXPECT_TRUE(u.password.empty());
    u = parse_redis_url("redis://localhost");
    EXPECT_EQ(u.port, "6379");
    EXPECT_EQ(u.db, 0);
    u = parse_redis_url("redis://:s%40cret@host:1/0");
    EXPECT_EQ(u.password, "s@cret");
    EXPECT_TRUE(u.user.empty());
    EXPECT_EQ(u.shown.find("cret"), std::string::npos); // never shown
    u = parse_redis_url("redis://alice:pw@host");
    EXPECT_EQ(u.user, "alice");
    EXPECT_EQ(u.password, "pw");
    u = parse_redis_url("redis://[::1]:7000");
    EXPECT_EQ(u.host, "::1");
    EXPECT_EQ(u.port, "7000");
    u = parse_redis_url("unix:///tmp/r.sock?db=3");
    EXPECT_TRUE(u.unix_socket);
    EXPECT_EQ(u.path, "/tmp/r.sock");
    EXPECT_EQ(u.db, 3);
    u = parse_redis_url("unix://:pw@/tmp/r.sock");
    EXPECT_EQ(u.password, "pw");
    EXPECT_EQ(u.path, "/tmp/r.sock");
}

TEST(redis_protocol, a_bad_url_is_an_error_saying_what_to_fix)
{
    using valve::detail::parse_redis_url;
    EXPECT_NE(errc_message_of([] { parse_redis_url("127.0.0.1:6379"); }).find("no scheme"), std::string::npos);
    EXPECT_NE(errc_message_of([] { parse_redis_url("http://x"); }).find("unknown scheme"), std::string::npos);
    EXPECT_NE(errc_message_of([] { parse_redis_url("rediss://x"); }).find("TLS"), std::string::npos);
    EXPECT_NE(errc_message_of([] { parse_redis_url("redis://host:99999"); }).find("port"), std::string::npos);
    EXPECT_NE(errc_message_of([] { parse_redis_url("redis://host:abc"); }).find("port"), std::string::npos);
    EXPECT_NE(errc_message_of([] { parse_redis_url("redis://host/x"); }).find("database"), std::string::npos);
    EXPECT_NE(errc_message_of([] { parse_redis_url("redis://:6379"); }).find("no host"), std::string::npos);
    EXPECT_NE(errc_message_of([] { parse_redis_url("unix://relative.sock"); }).find("absolute"), std::string::npos);
    EXPECT_NE(errc_message_of([] { parse_redis_url("redis://:pw%4@host"); }).find("escape"), std::string::npos);
    // The password is not repeated in the message.
    EXPECT_EQ(errc_message_of([] { parse_redis_url("redis://:hunter2@host:0"); }).find("hunter2"), std::string::npos);
}

TEST(redis_protocol, token_intervals_are_exact_rationals_of_a_microsecond)
{
    using valve::rate;
    using valve::detail::gcra_interval_of;
    auto i = gcra_interval_of(rate::per_second(2000), 10, "t");
    EXPECT_EQ(i.q, 500);
    EXPECT_EQ(i.r, 0);
    i = gcra_interval_of(rate::per_second(3), 1, "t");
    EXPECT_EQ(i.q, 333333);
    EXPECT_EQ(i.r * 3, i.d); // a third of a microsecond
    i = gcra_interval_of(rate::per(5000, std::chrono::hours(1)), 5000, "t");
    EXPECT_EQ(i.q, 720000);
    EXPECT_EQ(i.r, 0);
    i = gcra_interval_of(rate::per_second(0.5), 1, "t");
    EXPECT_EQ(i.q, 2'000'000);
    EXPECT_EQ(i.r, 0);
    i = gcra_interval_of(rate::per_second(3'000'000), 1, "t"); // a third of a microsecond
    EXPECT_EQ(i.q, 0);
    EXPECT_EQ(i.r * 3, i.d);
    // An interval that needs a finer unit than 2^-20 us is rounded up: never faster.
    i = gcra_interval_of(rate::per_second(1'000'003), 1, "t");
    const long double exact = 1e6L / 1'000'003.0L;
    const long double got = static_cast<long double>(i.q) + static_cast<long double>(i.r) / static_cast<long double>(i.d);
    EXPECT_GE(got, exact);
    EXPECT_LT(got - exact, 1.0L / (1 << 20));
}

TEST(redis_protocol, limits_redis_cannot_hold_are_refused_with_the_reason)
{
    using valve::rate;
    using valve::detail::gcra_interval_of;
    EXPECT_NE(errc_message_of([] { gcra_interval_of(rate::zero(), 1, "t"); }).find("zero"), std::string::npos);
    EXPECT_NE(errc_message_of([] { gcra_interval_of(rate::unlimited(), 1, "t"); }).find("unlimited"),
              std::string::npos);
    EXPECT_NE(errc_message_of([] { gcra_interval_of(rate::per_second(std::nan("")), 1, "t"); }).find("not usable"),
              std::string::npos);
    EXPECT_NE(errc_message_of([] { gcra_interval_of(rate::per_second(1), 0, "t"); }).find("burst is 0"),
              std::string::npos);
    EXPECT_NE(errc_message_of([] { gcra_interval_of(rate::per_second(1), std::size_t{1} << 40, "t"); }).find("2^31"),
              std::string::npos);
    EXPECT_NE(errc_message_of([] { gcra_interval_of(rate::per(1, std::chrono::hours(24 * 365)), 40, "t"); })
                  .find("30 years"),
              std::string::npos);
}
