#ifndef VALVE_SRC_REDIS_CONNECTION_HPP
#define VALVE_SRC_REDIS_CONNECTION_HPP

// Internal: the I/O side of a Redis connection. The protocol (what is in flight, NOSCRIPT)
// is `redis_pipeline`'s; this drives a socket with it on a strand.

#include "protocol.hpp"

#include <valve/backoff.hpp>
#include <valve/redis.hpp>
#include <valve/store.hpp>

#include <boost/asio/generic/stream_protocol.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>

#include <array>
#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace valve::detail {

class redis_connection_impl final : public store, public std::enable_shared_from_this<redis_connection_impl> {
public:
    using clock = std::chrono::steady_clock;

    redis_connection_impl(const boost::asio::any_io_executor& ex, redis_url url, redis_options options);
    ~redis_connection_impl() override;

    /// Starts the first connection (after construction: needs shared_from_this).
    void start();
    /// Fails what waits with operation_aborted and stops reconnecting.
    void close();

    /// Sends `args` (or EVALSHA of `script` with `args`); `h` completes through its executor,
    /// or, when `direct` (valve's own callbacks, which only take a short lock and post), is
    /// called on the connection's strand: one hop less per call.
    void exec(std::vector<std::string> args, const redis_script* script, redis_exec_handler h, bool direct = false);
    void wait_connected(redis_connect_handler h);

    bool up() const noexcept { return up_.load(std::memory_order_acquire); }
    /// Failed, and failing fast until a reconnection succeeds (not merely connecting).
    bool failing() const noexcept { return failing_.load(std::memory_order_acquire); }
    std::string last_error() const;
    redis_connection_stats stats() const noexcept;
    const std::string& where() const noexcept { return url_.shown; }
    const boost::asio::any_io_executor& executor() const noexcept { return executor_; }

    std::shared_ptr<resource> make_resource(const store_request& request) override;
    void check(const store_request& request) const override;

private:
    enum class state { idle, connecting, handshaking, up, down, closed };
    struct pending {
        redis_exec_handler handler;
        clock::time_point deadline;
        bool direct = false;
    };
    struct held {
        std::vector<std::string> args;
        const redis_script* script;
        pending p;
    };

    void connect();
    void on_connected(std::uint64_t gen);
    void became_up();
    void on_reply(std::uint64_t gen, std::uint64_t id, redis_reply reply);
    void start_read(std::uint64_t gen);
    void flush(std::uint64_t gen);
    void enqueue(std::vector<std::string> args, const redis_script* script, pending p);
    void arm_timer();
    // When a command sent now is overdue: now + reply_timeout, the clock's end at the most.
    clock::time_point reply_due() const;
    void on_timer(std::uint64_t gen);
    void fail(std::uint64_t gen, boost::system::error_code ec, const std::string& why);
    void schedule_reconnect();
    void complete(pending p, boost::system::error_code ec, redis_reply reply);
    void finish_connect_waiters(boost::system::error_code ec);
    void set_error(std::string e);

    boost::asio::any_io_executor executor_;
    boost::asio::strand<boost::asio::any_io_executor> strand_;
    redis_url url_;
    redis_options options_;
    backoff_policy backoff_;
    std::optional<backoff_schedule> retries_;
    clock::time_point down_since_{};

    boost::asio::generic::stream_protocol::socket socket_;
    boost::asio::ip::tcp::resolver resolver_;
    boost::asio::steady_timer timer_;       // reply and connect timeout
    boost::asio::steady_timer retry_timer_; // next reconnection
    std::optional<clock::time_point> timer_at_;
    std::optional<clock::time_point> attempt_deadline_; // while connecting and handshaking
    std::shared_ptr<std::array<char, 16 * 1024>> read_buffer_; // one per connection: a stale read may hold it

    state state_ = state::idle;
    std::uint64_t gen_ = 0; // the connection attempt that socket callbacks belong to
    bool writing_ = false;
    bool ever_up_ = false;
    bool logged_down_ = false; // the switch is logged once, the recovery once
    boost::system::error_code last_ec_;
    redis_pipeline pipe_;
    std::map<std::uint64_t, pending> pending_; // by pipeline id: oldest first
    std::map<std::uint64_t, std::string> handshake_ids_; // AUTH, SELECT, SCRIPT LOAD
    std::vector<held> held_;                   // issued while connecting
    std::vector<redis_connect_handler> connect_waiters_;

    std::atomic<bool> up_{false};
    std::atomic<bool> failing_{false};
    std::atomic<std::uint64_t> commands_{0}, failures_{0}, recoveries_{0}, script_loads_{0};
    mutable std::mutex error_mutex_;
    std::string last_error_;
};

} // namespace valve::detail

#endif
