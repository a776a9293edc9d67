#ifndef VALVE_SRC_REDIS_PROTOCOL_HPP
#define VALVE_SRC_REDIS_PROTOCOL_HPP

// Internal: the protocol side of a Redis connection, with no I/O. hiredis (0.14) is the RESP
// codec: its reader parses replies and its formatter writes commands; everything else here
// is plain code, tested by feeding bytes (test/redis_protocol.cpp).

#include <valve/redis.hpp>

#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

struct redisReader;

namespace valve::detail {

/// A command in RESP, formatted by hiredis.
std::string format_command(const std::vector<std::string>& args);

/// hiredis's reader: bytes in, replies out.
class resp_reader {
public:
    resp_reader();
    ~resp_reader();
    resp_reader(const resp_reader&) = delete;
    resp_reader& operator=(const resp_reader&) = delete;

    void feed(std::string_view bytes);
    /// The next complete reply, if there is one. Sets `error` (and returns nothing) when the
    /// bytes are not RESP: the connection cannot be used further.
    std::optional<redis_reply> next(std::string& error);

private:
    redisReader* reader_;
};

/// A Lua script known by its SHA-1, sent with EVALSHA.
struct redis_script {
    explicit redis_script(std::string text);
    std::string text;
    std::string sha1; // lowercase hex
};

/// SHA-1 of `data` in lowercase hex (as Redis names scripts).
std::string sha1_hex(std::string_view data);

/// Commands in flight on one connection, matched to replies in order.
///
/// `push` queues a command under an id; `take_output` hands every queued command to the
/// writer at once (pipelining); `feed` matches replies to what was sent, in order. An EVALSHA
/// answered NOSCRIPT is not completed: one SCRIPT LOAD is queued (not two, while one is on its
/// way) and the command is sent again behind it, at most twice; so a `SCRIPT FLUSH` or a
/// restarted Redis fails no command. `drop` ends the connection's life: every command not
/// answered is returned, to be failed.
class redis_pipeline {
public:
    struct reply_event {
        std::uint64_t id;
        redis_reply reply;
    };

    /// Queues a command; returns its id (ids grow from 1).
    std::uint64_t push(std::vector<std::string> args);
    /// Queues `EVALSHA <sha> <args...>` of `script` (which must outlive the pipeline).
    std::uint64_t push_script(const redis_script& script, std::vector<std::string> args);

    bool has_output() const noexcept { return !queued_.empty(); }
    /// Every queued command, formatted, now in flight.
    std::string take_output();

    /// Feeds bytes read; appends the replies of commands that are done to `out`. Returns false
    /// (with `error` set) for bytes that are not RESP or a reply nobody waits for.
    bool feed(std::string_view bytes, std::vector<reply_event>& out, std::string& error);

    /// Ids of every command queued or in flight, oldest first; the pipeline is empty after.
    std::vector<std::uint64_t> drop();

    std::size_t in_flight() const noexcept { return sent_.size(); }
    std::size_t queued() const noexcept { return queued_.size(); }
    /// SCRIPT LOADs queued after NOSCRIPT replies, since the pipeline was made.
    std::uint64_t script_loads() const noexcept { return script_loads_; }

private:
    struct command {
        std::uint64_t id = 0;                // 0: the pipeline's own SCRIPT LOAD
        std::vector<std::string> args;       // for a script: the arguments after its SHA
        const redis_script* script = nullptr; // EVALSHA of this script, or the script loaded (id 0)
        int resent = 0;
    };
    void format(const command& c, std::string& out) const;

    std::deque<command> queued_;
    std::deque<command> sent_;
    std::set<const redis_script*> loading_;
    std::unique_ptr<resp_reader> reader_ = std::make_unique<resp_reader>();
    std::uint64_t next_id_ = 1;
    std::uint64_t script_loads_ = 0;
};

/// Where and how to connect, from a `redis://` or `unix://` URL.
struct redis_url {
    bool unix_socket = false;
    std::string host;
    std::string port = "6379";
    std::string path; // unix socket
    std::string user;
    std::string password;
    long db = 0;
    /// The URL with the password hidden.
    std::string shown;
};

/// Parses `url`; throws `valve::error` (`errc::invalid_argument`) saying what is wrong.
redis_url parse_redis_url(std::string_view url);

} // namespace valve::detail

#endif
