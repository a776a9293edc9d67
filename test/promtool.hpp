#ifndef VALVE_TEST_PROMTOOL_HPP
#define VALVE_TEST_PROMTOOL_HPP

// Checks a Prometheus text exposition with the real `promtool check metrics` (Debian's
// `prometheus` package; `bash .ci/deps` installs it). Fails the test, with a message saying
// what to install, when promtool is missing: it never skips.

#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include <sys/wait.h>
#include <unistd.h>

namespace valve::test {

/// Runs `promtool check metrics` on `text`; a gtest assertion result with promtool's words.
inline ::testing::AssertionResult promtool_accepts(const std::string& text)
{
    if (std::system("command -v promtool >/dev/null 2>&1") != 0)
        return ::testing::AssertionFailure()
               << "promtool is not installed: install Debian's prometheus package (bash .ci/deps does)";
    const auto path = std::filesystem::temp_directory_path() / ("valve-metrics-" + std::to_string(::getpid()) + ".txt");
    {
        std::ofstream out{path};
        out << text;
    }
    const std::string cmd = "promtool check metrics < '" + path.string() + "' 2>&1";
    std::string said;
    int status = -1;
    if (FILE* p = ::popen(cmd.c_str(), "r")) {
        std::array<char, 512> buf{};
        while (std::fgets(buf.data(), static_cast<int>(buf.size()), p)) said += buf.data();
        status = ::pclose(p);
    }
    std::error_code ignored;
    std::filesystem::remove(path, ignored);
    if (status == 0) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "promtool check metrics failed (status " << status << "): " << said
                                         << "\non:\n"
                                         << text;
}

} // namespace valve::test

#endif
