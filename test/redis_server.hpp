#ifndef VALVE_TEST_REDIS_SERVER_HPP
#define VALVE_TEST_REDIS_SERVER_HPP

// A real redis-server for tests: started by the test on a free loopback port and a unix socket
// in a temporary directory, stopped by its PID. If it cannot start, the test fails and says why
// (it never skips).

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include <gtest/gtest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace valve::test {

/// The redis-server binary: $VALVE_REDIS_SERVER, else redis-server on the PATH.
inline std::string redis_server_binary()
{
    if (const char* e = std::getenv("VALVE_REDIS_SERVER")) return e;
    const char* path = std::getenv("PATH");
    std::string dirs = path ? path : "/usr/bin:/usr/sbin";
    dirs += ":/usr/bin:/usr/sbin";
    std::size_t start = 0;
    while (start <= dirs.size()) {
        const auto end = dirs.find(':', start);
        const std::string dir = dirs.substr(start, end == std::string::npos ? std::string::npos : end - start);
        const std::string candidate = dir + "/redis-server";
        if (!dir.empty() && ::access(candidate.c_str(), X_OK) == 0) return candidate;
        if (end == std::string::npos) break;
        start = end + 1;
    }
    return {};
}

/// A loopback TCP port nobody listens on now.
inline unsigned short free_port()
{
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = 0;
    ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
    socklen_t len = sizeof a;
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
    ::close(fd);
    return ntohs(a.sin_port);
}

/// An io_context run by one thread for as long as this object lives.
struct running_context {
    boost::asio::io_context ioc;
    boost::asio::executor_work_guard<boost::asio::io_context::executor_type> guard{ioc.get_executor()};
    std::thread thread{[this] { ioc.run(); }};
    ~running_context()
    {
        guard.reset();
        ioc.stop();
        thread.join();
    }
};

class redis_server {
public:
    /// Starts redis-server with `extra` arguments (e.g. {"--requirepass", "secret"}).
    explicit redis_server(std::vector<std::string> extra = {}, unsigned short port = 0) : extra_(std::move(extra))
    {
        char tmpl[] = "/tmp/valve-redis-XXXXXX";
        if (::mkdtemp(tmpl) == nullptr) throw std::runtime_error("mkdtemp failed");
        dir_ = tmpl;
        port_ = port != 0 ? port : free_port();
        start();
    }

    ~redis_server()
    {
        stop();
        std::error_code ec;
        std::filesystem::remove_all(dir_, ec);
    }

    redis_server(const redis_server&) = delete;
    redis_server& operator=(const redis_server&) = delete;

    unsigned short port() const { return port_; }
    std::string socket_path() const { return dir_ + "/redis.sock"; }
    std::string url(const std::string& creds = {}) const
    {
        return "redis://" + (creds.empty() ? "" : creds + "@") + "127.0.0.1:" + std::to_string(port_);
    }
    std::string unix_url() const { return "unix://" + socket_path(); }
    pid_t pid() const { return pid_; }
    bool running() const { return pid_ > 0; }

    /// Kills the server (SIGKILL by default: as a crash) and waits for it to end.
    void stop(int sig = SIGKILL)
    {
        if (pid_ <= 0) return;
        ::kill(pid_, sig);
        int status = 0;
        ::waitpid(pid_, &status, 0);
        pid_ = -1;
    }

    /// Starts it again on the same port and socket.
    void start()
    {
        const std::string bin = redis_server_binary();
        if (bin.empty())
            throw std::runtime_error("redis-server not found (set VALVE_REDIS_SERVER or install the redis-server "
                                     "package: bash .ci/deps)");
        std::vector<std::string> args{bin,
                                      "--port", std::to_string(port_),
                                      "--bind", "127.0.0.1",
                                      "--unixsocket", socket_path(),
                                      "--unixsocketperm", "700",
                                      "--save", "",
                                      "--appendonly", "no",
                                      "--dir", dir_,
                                      "--daemonize", "no",
                                      "--enable-debug-command", "local",
                                      "--loglevel", "warning",
                                      "--logfile", dir_ + "/redis.log"};
        args.insert(args.end(), extra_.begin(), extra_.end());
        std::vector<char*> argv;
        for (auto& a : args) argv.push_back(a.data());
        argv.push_back(nullptr);
        pid_ = ::fork();
        if (pid_ == 0) {
            // The server dies with the test, even one that crashes: no server is left behind.
            ::prctl(PR_SET_PDEATHSIG, SIGKILL);
            ::execv(argv[0], argv.data());
            ::_exit(127);
        }
        if (pid_ < 0) throw std::runtime_error("cannot start " + bin);
        // Ready when the unix socket accepts a connection (it is made after the TCP listener).
        const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
        while (std::chrono::steady_clock::now() < until) {
            int status = 0;
            if (::waitpid(pid_, &status, WNOHANG) == pid_) {
                pid_ = -1;
                throw std::runtime_error("redis-server exited at start; see " + dir_ + "/redis.log");
            }
            if (accepts()) return;
            std::this_thread::sleep_for(std::chrono::milliseconds(5));
        }
        stop();
        throw std::runtime_error("redis-server did not accept connections within 10 s");
    }

private:
    bool accepts() const
    {
        const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
        sockaddr_un a{};
        a.sun_family = AF_UNIX;
        const std::string p = socket_path();
        p.copy(a.sun_path, sizeof a.sun_path - 1);
        const bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
        ::close(fd);
        return ok;
    }

    std::vector<std::string> extra_;
    std::string dir_;
    unsigned short port_ = 0;
    pid_t pid_ = -1;
};

} // namespace valve::test

#endif
