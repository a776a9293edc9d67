#include "protocol.hpp"

#include <valve/error.hpp>

#include <hiredis/hiredis.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <cstdio>
#include <initializer_list>
#include <new>

namespace valve::detail {

namespace {

// Appends `prefix` then `args`, formatted by hiredis, to `out`: no copy of the arguments.
void append_command(std::string& out, std::initializer_list<std::string_view> prefix,
                    const std::vector<std::string>& args)
{
    const std::size_t count = prefix.size() + args.size();
    constexpr std::size_t small = 32;
    const char* argv_small[small];
    std::size_t lens_small[small];
    std::vector<const char*> argv_big;
    std::vector<std::size_t> lens_big;
    const char** argv = argv_small;
    std::size_t* lens = lens_small;
    if (count > small) {
        argv_big.resize(count);
        lens_big.resize(count);
        argv = argv_big.data();
        lens = lens_big.data();
    }
    std::size_t i = 0;
    for (auto p : prefix) {
        argv[i] = p.data();
        lens[i++] = p.size();
    }
    for (const auto& a : args) {
        argv[i] = a.data();
        lens[i++] = a.size();
    }
    // The sds formatter writes the numbers with hiredis's own code; redisFormatCommandArgv
    // calls sprintf once per argument, a fifth of the client's time at 64 calls in flight.
    char* formatted = nullptr; // an sds: `char*` under the name every hiredis version gives it
    const int n = redisFormatSdsCommandArgv(&formatted, static_cast<int>(count), argv, lens);
    if (n < 0 || formatted == nullptr) throw std::bad_alloc();
    out.append(formatted, static_cast<std::size_t>(n));
    redisFreeSdsCommand(formatted);
}

} // namespace

std::string format_command(const std::vector<std::string>& args)
{
    std::string s;
    append_command(s, {}, args);
    return s;
}

resp_reader::resp_reader() : reader_(redisReaderCreate())
{
    if (reader_ == nullptr) throw std::bad_alloc();
}

resp_reader::~resp_reader() { redisReaderFree(reader_); }

void resp_reader::feed(std::string_view bytes)
{
    if (!bytes.empty() && redisReaderFeed(reader_, bytes.data(), bytes.size()) != REDIS_OK) throw std::bad_alloc();
}

namespace {

redis_reply convert(const redisReply& r)
{
    redis_reply out;
    switch (r.type) {
    case REDIS_REPLY_STRING:
        out.type = redis_reply::kind::string;
        out.str.assign(r.str, r.len);
        break;
    case REDIS_REPLY_STATUS:
        out.type = redis_reply::kind::status;
        out.str.assign(r.str, r.len);
        break;
    case REDIS_REPLY_ERROR:
        out.type = redis_reply::kind::error;
        out.str.assign(r.str, r.len);
        break;
    case REDIS_REPLY_INTEGER:
        out.type = redis_reply::kind::integer;
        out.integer = r.integer;
        break;
    case REDIS_REPLY_ARRAY:
        out.type = redis_reply::kind::array;
        out.elements.reserve(r.elements);
        for (std::size_t i = 0; i < r.elements; ++i) out.elements.push_back(convert(*r.element[i]));
        break;
    default:
        out.type = redis_reply::kind::nil;
    }
    return out;
}

} // namespace

std::optional<redis_reply> resp_reader::next(std::string& error)
{
    void* raw = nullptr;
    if (redisReaderGetReply(reader_, &raw) != REDIS_OK) {
        error = std::string("not a Redis reply: ") + reader_->errstr;
        return std::nullopt;
    }
    if (raw == nullptr) return std::nullopt;
    std::unique_ptr<redisReply, void (*)(void*)> reply(static_cast<redisReply*>(raw), freeReplyObject);
    return convert(*reply);
}

// SHA-1 (FIPS 180-4), only to name scripts as Redis does.
std::string sha1_hex(std::string_view data)
{
    std::array<std::uint32_t, 5> h{0x67452301u, 0xEFCDAB89u, 0x98BADCFEu, 0x10325476u, 0xC3D2E1F0u};
    std::string msg(data);
    const std::uint64_t bits = static_cast<std::uint64_t>(data.size()) * 8;
    msg.push_back(static_cast<char>(0x80));
    while (msg.size() % 64 != 56) msg.push_back('\0');
    for (int i = 7; i >= 0; --i) msg.push_back(static_cast<char>((bits >> (i * 8)) & 0xff));
    const auto rotl = [](std::uint32_t x, int c) { return (x << c) | (x >> (32 - c)); };
    for (std::size_t off = 0; off < msg.size(); off += 64) {
        std::array<std::uint32_t, 80> w{};
        for (std::size_t i = 0; i < 16; ++i) {
            const auto* p = reinterpret_cast<const unsigned char*>(msg.data() + off + i * 4);
            w[i] = (std::uint32_t{p[0]} << 24) | (std::uint32_t{p[1]} << 16) | (std::uint32_t{p[2]} << 8) | p[3];
        }
        for (std::size_t i = 16; i < 80; ++i) w[i] = rotl(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
        auto [a, b, c, d, e] = h;
        for (std::size_t i = 0; i < 80; ++i) {
            std::uint32_t f = 0;
            std::uint32_t k = 0;
            if (i < 20) {
                f = (b & c) | (~b & d);
                k = 0x5A827999u;
            } else if (i < 40) {
                f = b ^ c ^ d;
                k = 0x6ED9EBA1u;
            } else if (i < 60) {
                f = (b & c) | (b & d) | (c & d);
                k = 0x8F1BBCDCu;
            } else {
                f = b ^ c ^ d;
                k = 0xCA62C1D6u;
            }
            const std::uint32_t t = rotl(a, 5) + f + e + k + w[i];
            e = d;
            d = c;
            c = rotl(b, 30);
            b = a;
            a = t;
        }
        h[0] += a;
        h[1] += b;
        h[2] += c;
        h[3] += d;
        h[4] += e;
    }
    std::string out;
    char buf[9];
    for (auto v : h) {
        std::snprintf(buf, sizeof buf, "%08x", v);
        out += buf;
    }
    return out;
}

redis_script::redis_script(std::string t) : text(std::move(t)), sha1(sha1_hex(text)) {}

std::uint64_t redis_pipeline::push(std::vector<std::string> args)
{
    const std::uint64_t id = next_id_++;
    queued_.push_back(command{id, std::move(args), nullptr, 0});
    return id;
}

std::uint64_t redis_pipeline::push_script(const redis_script& script, std::vector<std::string> args)
{
    const std::uint64_t id = next_id_++;
    queued_.push_back(command{id, std::move(args), &script, 0});
    return id;
}

void redis_pipeline::format(const command& c, std::string& out) const
{
    if (c.script == nullptr) return append_command(out, {}, c.args);
    if (c.id == 0) return append_command(out, {"SCRIPT", "LOAD", c.script->text}, {});
    append_command(out, {"EVALSHA", c.script->sha1}, c.args);
}

std::string redis_pipeline::take_output()
{
    std::string out;
    while (!queued_.empty()) {
        format(queued_.front(), out);
        sent_.push_back(std::move(queued_.front()));
        queued_.pop_front();
    }
    return out;
}

bool redis_pipeline::feed(std::string_view bytes, std::vector<reply_event>& out, std::string& error)
{
    reader_->feed(bytes);
    for (;;) {
        auto reply = reader_->next(error);
        if (!reply) return error.empty();
        if (sent_.empty()) {
            error = "a reply came that no command waits for";
            return false;
        }
        command c = std::move(sent_.front());
        sent_.pop_front();
        if (c.id == 0) { // our own SCRIPT LOAD: the commands re-sent behind it follow
            loading_.erase(c.script);
            continue;
        }
        const bool noscript = c.script != nullptr && reply->type == redis_reply::kind::error &&
                              reply->str.starts_with("NOSCRIPT");
        if (noscript && c.resent < 2) {
            if (loading_.insert(c.script).second) {
                queued_.push_back(command{0, {}, c.script, 0});
                ++script_loads_;
            }
            ++c.resent;
            queued_.push_back(std::move(c));
            continue;
        }
        out.push_back(reply_event{c.id, std::move(*reply)});
    }
}

std::vector<std::uint64_t> redis_pipeline::drop()
{
    std::vector<std::uint64_t> ids;
    for (const auto& c : sent_)
        if (c.id != 0) ids.push_back(c.id);
    for (const auto& c : queued_)
        if (c.id != 0) ids.push_back(c.id);
    // A command re-sent after NOSCRIPT keeps its old id: oldest first.
    std::sort(ids.begin(), ids.end());
    sent_.clear();
    queued_.clear();
    loading_.clear();
    reader_ = std::make_unique<resp_reader>(); // the next connection starts on a reply boundary
    return ids;
}

namespace {

[[noreturn]] void bad_url(std::string_view shown, const std::string& what)
{
    throw_error(errc::invalid_argument, "valve: redis_connection(\"" + std::string(shown) + "\"): " + what);
}

std::string decode(std::string_view s, std::string_view shown)
{
    std::string out;
    for (std::size_t i = 0; i < s.size(); ++i) {
        if (s[i] != '%') {
            out.push_back(s[i]);
            continue;
        }
        unsigned v = 0;
        if (i + 2 >= s.size()) bad_url(shown, "a '%' escape is cut short; write %XX");
        const auto r = std::from_chars(s.data() + i + 1, s.data() + i + 3, v, 16);
        if (r.ec != std::errc{} || r.ptr != s.data() + i + 3)
            bad_url(shown, "'" + std::string(s.substr(i, 3)) + "' is not a %XX escape");
        out.push_back(static_cast<char>(v));
        i += 2;
    }
    return out;
}

long parse_db(std::string_view s, std::string_view shown)
{
    long db = 0;
    const auto r = std::from_chars(s.data(), s.data() + s.size(), db);
    if (s.empty() || r.ec != std::errc{} || r.ptr != s.data() + s.size() || db < 0)
        bad_url(shown, "database \"" + std::string(s) + "\" is not a number from 0; write e.g. /0");
    return db;
}

} // namespace

redis_url parse_redis_url(std::string_view url)
{
    redis_url u;
    std::string_view rest;
    if (url.starts_with("redis://")) {
        rest = url.substr(8);
    } else if (url.starts_with("unix://")) {
        u.unix_socket = true;
        rest = url.substr(7);
    } else {
        const std::string scheme(url.substr(0, url.find("://")));
        if (url.starts_with("rediss://"))
            bad_url(url, "TLS (rediss://) is not supported; use redis:// on a trusted network or a unix socket");
        bad_url(url, url.find("://") == std::string_view::npos
                         ? "no scheme; write redis://host:port/db or unix:///path/to/redis.sock"
                         : "unknown scheme \"" + scheme + "\"; use redis:// or unix://");
    }
    // Credentials: everything before the last '@' (a password may contain '@' escaped or not).
    std::string_view creds;
    if (const auto at = rest.rfind('@'); at != std::string_view::npos && !(u.unix_socket && rest.starts_with("/"))) {
        creds = rest.substr(0, at);
        rest = rest.substr(at + 1);
    }
    std::string shown = u.unix_socket ? "unix://" : "redis://";
    if (!creds.empty()) {
        const auto colon = creds.find(':');
        if (colon == std::string_view::npos) {
            // redis://password@host is how some clients spell it: take it as the password.
            u.password = decode(creds, url);
        } else {
            u.user = decode(creds.substr(0, colon), url);
            u.password = decode(creds.substr(colon + 1), url);
        }
        shown += (u.user.empty() ? "" : u.user) + ":***@";
    }
    if (u.unix_socket) {
        std::string_view path = rest;
        if (const auto q = rest.find('?'); q != std::string_view::npos) {
            path = rest.substr(0, q);
            const auto query = rest.substr(q + 1);
            if (!query.starts_with("db="))
                bad_url(shown + std::string(rest), "unknown query \"" + std::string(query) + "\"; only ?db=N is known");
            u.db = parse_db(query.substr(3), shown + std::string(rest));
        }
        if (path.empty() || path.front() != '/')
            bad_url(shown + std::string(rest), "the socket path must be absolute: unix:///path/to/redis.sock");
        if (path.size() >= 108) // sizeof(sockaddr_un::sun_path) on Linux
            bad_url(shown + std::string(rest), "the socket path is " + std::to_string(path.size()) +
                                                   " bytes; a unix socket path must be shorter than 108");
        u.path = std::string(path);
        u.shown = shown + std::string(rest);
        return u;
    }
    std::string_view hostport = rest;
    if (const auto slash = rest.find('/'); slash != std::string_view::npos) {
        hostport = rest.substr(0, slash);
        const auto db = rest.substr(slash + 1);
        if (!db.empty()) u.db = parse_db(db, shown + std::string(rest));
    }
    u.shown = shown + std::string(rest);
    if (hostport.starts_with("[")) { // [::1]:6379
        const auto close = hostport.find(']');
        if (close == std::string_view::npos) bad_url(u.shown, "an IPv6 address opened with '[' is not closed");
        u.host = std::string(hostport.substr(1, close - 1));
        hostport = hostport.substr(close + 1);
        if (!hostport.empty() && hostport.front() != ':') bad_url(u.shown, "expected ':port' after the IPv6 address");
        if (!hostport.empty()) u.port = std::string(hostport.substr(1));
    } else {
        const auto colon = hostport.rfind(':');
        u.host = std::string(hostport.substr(0, colon));
        if (colon != std::string_view::npos) u.port = std::string(hostport.substr(colon + 1));
    }
    if (u.host.empty()) bad_url(u.shown, "no host; write redis://127.0.0.1:6379");
    unsigned port = 0;
    const auto r = std::from_chars(u.port.data(), u.port.data() + u.port.size(), port);
    if (u.port.empty() || r.ec != std::errc{} || r.ptr != u.port.data() + u.port.size() || port == 0 || port > 65535)
        bad_url(u.shown, "port \"" + u.port + "\" is not a number from 1 to 65535");
    return u;
}

} // namespace valve::detail
