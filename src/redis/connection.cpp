#include "connection.hpp"

#include "gcra.hpp"

#include <valve/error.hpp>
#include <valve/log.hpp>
#include <valve/detail/saturate.hpp>
#include <valve/metrics.hpp>

#include <boost/asio/append.hpp>
#include <boost/asio/connect.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/write.hpp>

#include <spdlog/spdlog.h>

namespace valve {

namespace asio = boost::asio;
using boost::system::error_code;

namespace detail {

namespace {

std::chrono::milliseconds whole_ms(std::chrono::nanoseconds d)
{
    return std::chrono::duration_cast<std::chrono::milliseconds>(d);
}

} // namespace

redis_connection_impl::redis_connection_impl(const asio::any_io_executor& ex, redis_url url, redis_options options)
    : executor_(ex),
      strand_(asio::make_strand(ex)),
      url_(std::move(url)),
      options_(options),
      backoff_(options.reconnect),
      socket_(strand_),
      resolver_(strand_),
      timer_(strand_),
      retry_timer_(strand_)
{
}

redis_connection_impl::~redis_connection_impl() = default;

void redis_connection_impl::start()
{
    asio::post(strand_, [self = shared_from_this()] { self->connect(); });
}

void redis_connection_impl::close()
{
    asio::post(strand_, [self = shared_from_this()] {
        if (self->state_ == state::closed) return;
        self->fail(self->gen_, asio::error::operation_aborted, {});
        self->state_ = state::closed;
        self->retry_timer_.cancel();
    });
}

void redis_connection_impl::set_error(std::string e)
{
    std::lock_guard lock{error_mutex_};
    last_error_ = std::move(e);
}

std::string redis_connection_impl::last_error() const
{
    std::lock_guard lock{error_mutex_};
    return last_error_;
}

redis_connection_stats redis_connection_impl::stats() const noexcept
{
    return {up(), commands_.load(), failures_.load(), recoveries_.load(), script_loads_.load()};
}

void redis_connection_impl::connect()
{
    if (state_ == state::closed) return;
    state_ = state::connecting;
    const std::uint64_t gen = ++gen_;
    attempt_deadline_ = reply_due();
    arm_timer();
    auto on_connect = [self = shared_from_this(), gen](const error_code& ec) {
        if (gen != self->gen_) return;
        if (ec)
            return self->fail(gen, ec,
                              "cannot connect to " + self->url_.shown + ": " + ec.message() +
                                  "; check that Redis runs there and that the URL is right");
        self->on_connected(gen);
    };
    if (url_.unix_socket) {
        socket_.async_connect(asio::generic::stream_protocol::endpoint(asio::local::stream_protocol::endpoint(url_.path)),
                              std::move(on_connect));
        return;
    }
    resolver_.async_resolve(
        url_.host, url_.port,
        [self = shared_from_this(), gen, on_connect = std::move(on_connect)](
            const error_code& ec, const asio::ip::tcp::resolver::results_type& found) mutable {
            if (gen != self->gen_) return;
            if (ec)
                return self->fail(gen, ec,
                                  "cannot resolve \"" + self->url_.host + "\" of " + self->url_.shown + ": " +
                                      ec.message() + "; check the host name");
            std::vector<asio::generic::stream_protocol::endpoint> eps;
            for (const auto& e : found) eps.emplace_back(e.endpoint());
            asio::async_connect(self->socket_, eps,
                                [on_connect = std::move(on_connect)](const error_code& e2, const auto&) mutable {
                                    on_connect(e2);
                                });
        });
}

void redis_connection_impl::on_connected(std::uint64_t gen)
{
    if (!url_.unix_socket) {
        error_code ignored;
        socket_.set_option(asio::ip::tcp::no_delay(true), ignored);
    }
    state_ = state::handshaking;
    read_buffer_ = std::make_shared<std::array<char, 16 * 1024>>();
    handshake_ids_.clear();
    if (!url_.password.empty()) {
        std::vector<std::string> auth{"AUTH"};
        if (!url_.user.empty()) auth.push_back(url_.user);
        auth.push_back(url_.password);
        handshake_ids_.emplace(pipe_.push(std::move(auth)), "AUTH");
    }
    if (url_.db != 0) handshake_ids_.emplace(pipe_.push({"SELECT", std::to_string(url_.db)}), "SELECT");
    // Loaded now, so that the first EVALSHA after a (re)connection finds it.
    handshake_ids_.emplace(pipe_.push({"SCRIPT", "LOAD", gcra_script().text}), "SCRIPT LOAD");
    start_read(gen);
    flush(gen);
}

void redis_connection_impl::became_up()
{
    state_ = state::up;
    up_.store(true, std::memory_order_release);
    failing_.store(false, std::memory_order_release);
    attempt_deadline_.reset();
    const bool recovered = retries_.has_value() && ever_up_;
    const auto down_for = clock::now() - down_since_;
    retries_.reset();
    ever_up_ = true;
    if (recovered) {
        recoveries_.fetch_add(1, std::memory_order_relaxed);
        if (auto l = logger(); l->should_log(spdlog::level::warn))
            l->warn("valve: redis {} is back after {} ms; limits are held there again", url_.shown,
                    whole_ms(down_for).count());
    }
    logged_down_ = false;
    finish_connect_waiters({});
    auto parked = std::move(held_);
    held_.clear();
    const auto due = reply_due(); // their wait for a reply starts now
    for (auto& h : parked) {
        h.p.deadline = due;
        const std::uint64_t id = h.script ? pipe_.push_script(*h.script, std::move(h.args)) : pipe_.push(std::move(h.args));
        pending_.emplace(id, std::move(h.p));
    }
    flush(gen_);
    arm_timer();
}

void redis_connection_impl::exec(std::vector<std::string> args, const redis_script* script, redis_exec_handler h,
                                 bool direct)
{
    pending p{std::move(h), {}, direct}; // its deadline counts from when it is queued on the strand
    asio::post(strand_, [self = shared_from_this(), args = std::move(args), script, p = std::move(p)]() mutable {
        self->enqueue(std::move(args), script, std::move(p));
    });
}

redis_connection_impl::clock::time_point redis_connection_impl::reply_due() const
{
    return detail::saturating_add(clock::now(), options_.reply_timeout);
}

void redis_connection_impl::enqueue(std::vector<std::string> args, const redis_script* script, pending p)
{
    // Set here, on the strand, deadlines grow with ids: the oldest command is the first due.
    p.deadline = reply_due();
    switch (state_) {
    case state::up: {
        const std::uint64_t id = script ? pipe_.push_script(*script, std::move(args)) : pipe_.push(std::move(args));
        pending_.emplace(id, std::move(p));
        flush(gen_);
        arm_timer();
        return;
    }
    case state::idle:
    case state::connecting:
    case state::handshaking:
        held_.push_back(held{std::move(args), script, std::move(p)});
        return;
    case state::down:
        return complete(std::move(p), errc::store_unavailable, {});
    case state::closed:
        return complete(std::move(p), asio::error::operation_aborted, {});
    }
}

void redis_connection_impl::wait_connected(redis_connect_handler h)
{
    asio::post(strand_, [self = shared_from_this(), h = std::move(h)]() mutable {
        switch (self->state_) {
        case state::up:
            return (void)asio::post(self->executor_, asio::append(std::move(h), error_code{}));
        case state::down:
            return (void)asio::post(self->executor_, asio::append(std::move(h), self->last_ec_));
        case state::closed:
            return (void)asio::post(self->executor_, asio::append(std::move(h), error_code{asio::error::operation_aborted}));
        default:
            self->connect_waiters_.push_back(std::move(h));
        }
    });
}

void redis_connection_impl::finish_connect_waiters(error_code ec)
{
    auto waiters = std::move(connect_waiters_);
    connect_waiters_.clear();
    for (auto& h : waiters) asio::post(executor_, asio::append(std::move(h), ec));
}

void redis_connection_impl::complete(pending p, error_code ec, redis_reply reply)
{
    if (p.direct) return std::move(p.handler)(ec, std::move(reply));
    asio::post(executor_, asio::append(std::move(p.handler), ec, std::move(reply)));
}

void redis_connection_impl::flush(std::uint64_t gen)
{
    if (gen != gen_ || writing_ || !pipe_.has_output()) return;
    if (state_ != state::up && state_ != state::handshaking) return;
    auto out = std::make_shared<std::string>(pipe_.take_output());
    writing_ = true;
    asio::async_write(socket_, asio::buffer(*out), [self = shared_from_this(), gen, out](const error_code& ec, std::size_t) {
        if (gen != self->gen_) return;
        self->writing_ = false;
        if (ec) return self->fail(gen, ec, "writing to " + self->url_.shown + " failed: " + ec.message());
        self->flush(gen);
    });
}

void redis_connection_impl::start_read(std::uint64_t gen)
{
    auto buf = read_buffer_;
    socket_.async_read_some(asio::buffer(*buf), [self = shared_from_this(), gen, buf](const error_code& ec,
                                                                                        std::size_t n) {
        if (gen != self->gen_) return;
        if (ec)
            return self->fail(gen, ec,
                              ec == asio::error::eof ? "Redis at " + self->url_.shown + " closed the connection"
                                                     : "reading from " + self->url_.shown + " failed: " + ec.message());
        std::vector<redis_pipeline::reply_event> events;
        std::string error;
        const bool ok = self->pipe_.feed({buf->data(), n}, events, error);
        self->script_loads_.store(self->pipe_.script_loads(), std::memory_order_relaxed);
        for (auto& e : events) {
            if (gen != self->gen_) return;
            self->on_reply(gen, e.id, std::move(e.reply));
        }
        if (gen != self->gen_) return;
        if (!ok) return self->fail(gen, errc::store_error, "the reply of " + self->url_.shown + " is not RESP: " + error);
        self->flush(gen);
        self->arm_timer();
        self->start_read(gen);
    });
}

void redis_connection_impl::on_reply(std::uint64_t gen, std::uint64_t id, redis_reply reply)
{
    if (const auto hs = handshake_ids_.find(id); hs != handshake_ids_.end()) {
        const std::string what = hs->second;
        handshake_ids_.erase(hs);
        if (reply.type == redis_reply::kind::error) {
            std::string fix = "check the URL";
            if (what == "AUTH") fix = "check the user and password in the URL";
            if (what == "SELECT") fix = "check the database number in the URL";
            if (what == "SCRIPT LOAD") fix = "valve needs Lua scripting (EVALSHA, SCRIPT LOAD)";
            if (reply.str.starts_with("NOAUTH")) fix = "this Redis needs a password: give it in the URL (redis://:password@host)";
            return fail(gen, errc::store_error,
                        "Redis at " + url_.shown + " refused " + what + ": " + reply.str + "; " + fix);
        }
        if (what == "SCRIPT LOAD" && reply.str != gcra_script().sha1)
            return fail(gen, errc::store_error,
                        "Redis at " + url_.shown + " named valve's script " + reply.str + ", not " +
                            gcra_script().sha1 + "; this is not a Redis valve can use");
        if (handshake_ids_.empty()) became_up();
        return;
    }
    const auto it = pending_.find(id);
    if (it == pending_.end()) return;
    pending p = std::move(it->second);
    pending_.erase(it);
    commands_.fetch_add(1, std::memory_order_relaxed);
    complete(std::move(p), {}, std::move(reply));
}

void redis_connection_impl::arm_timer()
{
    std::optional<clock::time_point> at = attempt_deadline_;
    if (!pending_.empty()) {
        const auto oldest = pending_.begin()->second.deadline;
        if (!at || oldest < *at) at = oldest;
    }
    if (!at) return;
    if (timer_at_ && *timer_at_ <= *at) return; // an earlier check is armed: it re-arms
    timer_at_ = at;
    timer_.expires_at(*at);
    timer_.async_wait([self = shared_from_this(), gen = gen_](const error_code& ec) {
        if (ec) return;
        self->on_timer(gen);
    });
}

void redis_connection_impl::on_timer(std::uint64_t gen)
{
    timer_at_.reset();
    if (gen != gen_) return arm_timer();
    const auto now = clock::now();
    const auto ms = std::to_string(options_.reply_timeout.count());
    if (attempt_deadline_ && now >= *attempt_deadline_)
        return fail(gen, errc::store_unavailable,
                    "no connection to " + url_.shown + " within " + ms +
                        " ms (reply_timeout); check that Redis runs there and is not overloaded");
    if (!pending_.empty() && pending_.begin()->second.deadline <= now)
        return fail(gen, errc::store_unavailable,
                    "Redis at " + url_.shown + " did not answer within " + ms +
                        " ms (reply_timeout); check its load and latency, or raise the timeout");
    arm_timer();
}

void redis_connection_impl::fail(std::uint64_t gen, error_code ec, const std::string& why)
{
    if (gen != gen_ || state_ == state::down || state_ == state::closed) return;
    const bool aborting = ec == asio::error::operation_aborted;
    ++gen_;
    error_code ignored;
    socket_.close(ignored);
    resolver_.cancel();
    timer_.cancel();
    timer_at_.reset();
    attempt_deadline_.reset();
    writing_ = false;
    handshake_ids_.clear();
    const bool was_up = state_ == state::up;
    state_ = state::down;
    up_.store(false, std::memory_order_release);
    if (!aborting) {
        failing_.store(true, std::memory_order_release);
        failures_.fetch_add(1, std::memory_order_relaxed);
        last_ec_ = ec;
        set_error(why);
        if (!logged_down_) {
            logged_down_ = true;
            if (auto l = logger(); l->should_log(spdlog::level::warn))
                l->warn("valve: redis {} {}: {}; limits held there follow their store_failure policy until it is "
                        "back",
                        url_.shown, was_up ? "is unavailable" : "cannot be used", why);
        }
    }
    // Commands whose fate is unknown fail: the limits they took stay taken.
    const error_code to_commands = aborting ? ec : error_code{errc::store_unavailable};
    for (const std::uint64_t id : pipe_.drop()) {
        const auto it = pending_.find(id);
        if (it == pending_.end()) continue;
        complete(std::move(it->second), to_commands, {});
        pending_.erase(it);
    }
    for (auto& [id, p] : pending_) complete(std::move(p), to_commands, {});
    pending_.clear();
    auto parked = std::move(held_);
    held_.clear();
    for (auto& h : parked) complete(std::move(h.p), to_commands, {});
    finish_connect_waiters(ec);
    if (!aborting) schedule_reconnect();
}

void redis_connection_impl::schedule_reconnect()
{
    const auto now = clock::now();
    if (!retries_) {
        retries_ = backoff_.schedule();
        down_since_ = now;
    }
    const auto delay = retries_->next(now - down_since_).value_or(options_.reconnect.max_interval);
    retry_timer_.expires_after(delay);
    retry_timer_.async_wait([self = shared_from_this()](const error_code& ec) {
        if (ec || self->state_ != state::down) return;
        self->connect();
    });
}

void redis_exec(redis_connection_impl& c, std::vector<std::string> command, redis_exec_handler h)
{
    c.exec(std::move(command), nullptr, std::move(h));
}

void redis_wait_connected(redis_connection_impl& c, redis_connect_handler h) { c.wait_connected(std::move(h)); }

} // namespace detail

redis_connection::redis_connection(const executor_type& ex, std::string_view url, redis_options options)
{
    if (options.reply_timeout.count() <= 0)
        detail::throw_error(errc::invalid_argument,
                            "valve: redis_connection: reply_timeout is " + std::to_string(options.reply_timeout.count()) +
                                " ms; give a positive timeout");
    impl_ = std::make_shared<detail::redis_connection_impl>(ex, detail::parse_redis_url(url), options);
    impl_->start();
}

redis_connection::~redis_connection() { impl_->close(); }

void redis_connection::close() { impl_->close(); }

redis_connection::executor_type redis_connection::get_executor() const noexcept { return impl_->executor(); }

bool redis_connection::is_up() const noexcept { return impl_->up(); }

std::string redis_connection::last_error() const { return impl_->last_error(); }

redis_connection_stats redis_connection::stats() const noexcept { return impl_->stats(); }

std::string redis_connection::where() const { return impl_->where(); }

stored_in_option stored_in(redis_connection& redis) { return {redis.impl_}; }

prometheus_writer& add_metrics(prometheus_writer& w, const redis_connection_stats& s, const metric_labels& labels)
{
    return w.gauge("redis_up", "1 while the connection to Redis is up", s.up ? 1 : 0, labels)
        .counter("redis_commands_total", "Redis commands answered", static_cast<double>(s.commands), labels)
        .counter("redis_failures_total", "times the connection to Redis failed (timeout, socket error, refused)",
                 static_cast<double>(s.failures), labels)
        .counter("redis_recoveries_total", "times the connection to Redis came back after a failure",
                 static_cast<double>(s.recoveries), labels)
        .counter("redis_script_loads_total", "scripts loaded again after a NOSCRIPT reply",
                 static_cast<double>(s.script_loads), labels);
}

prometheus_writer& add_metrics(prometheus_writer& w, const redis_bucket_stats& s, const metric_labels& labels)
{
    return w.counter("redis_calls_total", "script calls made for limits held in Redis", static_cast<double>(s.calls),
                     labels)
        .counter("redis_granted_total", "acquisitions granted through Redis", static_cast<double>(s.granted), labels)
        .counter("redis_given_back_total", "tokens given back to Redis by cancelled waiters",
                 static_cast<double>(s.given_back), labels)
        .counter("redis_store_failures_total", "acquisitions settled by the failure policy while Redis failed",
                 static_cast<double>(s.store_failures), labels)
        .counter("redis_stocked_total", "tokens taken from Redis ahead of need for try_acquire",
                 static_cast<double>(s.stocked), labels)
        .counter("redis_try_granted_total", "try_acquire calls answered yes from tokens taken ahead",
                 static_cast<double>(s.try_granted), labels);
}

} // namespace valve
