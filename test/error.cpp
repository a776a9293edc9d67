#include <valve/error.hpp>

#include <gtest/gtest.h>

#include <string>

TEST(error, category_is_named_valve_and_stable)
{
    const boost::system::error_code ec = valve::errc::queue_full;
    EXPECT_STREQ(ec.category().name(), "valve");
    EXPECT_EQ(&ec.category(), &valve::error_category());
    EXPECT_EQ(ec.value(), static_cast<int>(valve::errc::queue_full));
    EXPECT_EQ(ec, valve::make_error_code(valve::errc::queue_full));
    EXPECT_NE(ec, valve::make_error_code(valve::errc::shutting_down));
}

TEST(error, every_code_has_a_message_that_says_what_to_do)
{
    using valve::errc;
    for (errc e : {errc::invalid_argument, errc::exceeds_burst, errc::would_exceed_deadline, errc::queue_full,
                   errc::shutting_down, errc::unknown_profile, errc::duplicate_profile, errc::timed_out,
                   errc::overloaded, errc::store_unavailable, errc::store_error}) {
        const std::string m = make_error_code(e).message();
        EXPECT_GT(m.size(), 20u) << static_cast<int>(e);
        EXPECT_NE(m, "unknown valve error") << static_cast<int>(e);
    }
    EXPECT_NE(make_error_code(valve::errc::exceeds_burst).message().find("burst"), std::string::npos);
    EXPECT_EQ(valve::error_category().message(9999), "unknown valve error");
}

TEST(error, valve_error_is_a_system_error_carrying_the_code)
{
    try {
        throw valve::error(valve::errc::unknown_profile, "profile \"gold\"");
    } catch (const boost::system::system_error& e) {
        EXPECT_EQ(e.code(), valve::errc::unknown_profile);
        EXPECT_NE(std::string(e.what()).find("gold"), std::string::npos);
        return;
    }
    FAIL() << "not caught as boost::system::system_error";
}

TEST(error, what_is_the_message_given_once_and_code_is_kept)
{
    const valve::error e{valve::errc::unknown_profile, "manager::stats(\"gold\"): no profile \"gold\" is registered"};
    EXPECT_STREQ(e.what(), "manager::stats(\"gold\"): no profile \"gold\" is registered");
    EXPECT_EQ(e.code(), valve::errc::unknown_profile);
    // A copy (as thrown and caught by value) says the same.
    const valve::error copy = e;
    EXPECT_STREQ(copy.what(), e.what());
}

TEST(error, without_a_message_what_is_the_category_message)
{
    const valve::error e{valve::errc::queue_full};
    EXPECT_EQ(std::string{e.what()}, make_error_code(valve::errc::queue_full).message());
    EXPECT_EQ(e.code(), valve::errc::queue_full);
    EXPECT_EQ(std::string{e.what()}.find("[valve:"), std::string::npos);
}
