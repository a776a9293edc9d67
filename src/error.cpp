#include <valve/error.hpp>

namespace valve {

namespace {

class category final : public boost::system::error_category {
public:
    // A fixed identifier keeps the category unique even if the library is loaded twice.
    constexpr category() noexcept : boost::system::error_category(0x76616c7665u) {}

    const char* name() const noexcept override { return "valve"; }

    std::string message(int ev) const override
    {
        switch (static_cast<errc>(ev)) {
        case errc::invalid_argument:
            return "invalid argument: check the rate, burst or option passed to this call";
        case errc::exceeds_burst:
            return "more tokens requested at once than the bucket's burst can hold: "
                   "raise the burst or ask for fewer tokens";
        case errc::would_exceed_deadline:
            return "the tokens would not be available before the deadline: "
                   "retry later or give a later deadline";
        case errc::queue_full:
            return "the queue is full and the work was refused: retry later or raise the queue capacity";
        case errc::shutting_down:
            return "shutting down: no new work is accepted";
        case errc::unknown_profile:
            return "no profile of that name is registered: register it first";
        case errc::duplicate_profile:
            return "a profile of that name is already registered: choose another name";
        case errc::timed_out:
            return "the operation did not complete in the time allowed";
        case errc::overloaded:
            return "the upstream is overloaded: slow down and retry later";
        case errc::store_unavailable:
            return "the store holding the shared limit (Redis) is unreachable or did not answer in time: "
                   "check that it runs and that the URL is right";
        case errc::store_error:
            return "the store holding the shared limit (Redis) refused the command: "
                   "check the password, database and permissions in the URL";
        }
        return "unknown valve error";
    }
};

const category instance;

} // namespace

const boost::system::error_category& error_category() noexcept { return instance; }

error::error(errc e, const std::string& what_arg) : system_error(make_error_code(e)), message_(what_arg) {}

error::error(errc e) : system_error(make_error_code(e)), message_(make_error_code(e).message()) {}

const char* error::what() const noexcept { return message_.what(); }

namespace detail {
void throw_error(errc e, const std::string& what) { throw error(e, what); }
} // namespace detail

} // namespace valve
