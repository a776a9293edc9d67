#include "detail/threads.hpp"

#include "detail/elastic_pool.hpp"

#include <boost/asio/detail/thread_context.hpp>
#include <boost/asio/execution/outstanding_work.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/prefer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/thread_pool.hpp>

#include <condition_variable>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace asio = boost::asio;

namespace valve::detail {

namespace {

// `Plain` (an io_context's or a thread_pool's executor type), tracking work or not, or a strand
// of either: whether `ex` is one, and this thread runs it.
template <class Plain>
bool runs(const asio::any_io_executor& ex, bool& known) noexcept
{
    using tracked = std::decay_t<decltype(asio::prefer(std::declval<Plain>(), asio::execution::outstanding_work.tracked))>;
    known = true;
    if (const auto* e = ex.target<Plain>()) return e->running_in_this_thread();
    if (const auto* e = ex.target<tracked>()) return e->running_in_this_thread();
    if (const auto* s = ex.target<asio::strand<Plain>>()) return s->get_inner_executor().running_in_this_thread();
    if (const auto* s = ex.target<asio::strand<tracked>>()) return s->get_inner_executor().running_in_this_thread();
    known = false;
    return false;
}

// One thread, made on first need, that drops the references handed to it; joined when the
// program ends (a static's destructor).
class reaper {
public:
    void add(std::shared_ptr<void> last)
    {
        {
            std::lock_guard lock{mutex_};
            queue_.push_back(std::move(last));
            if (!thread_.joinable()) thread_ = std::thread([this] { loop(); });
        }
        wake_.notify_one();
    }

    ~reaper()
    {
        {
            std::lock_guard lock{mutex_};
            ending_ = true;
        }
        wake_.notify_one();
        if (thread_.joinable()) thread_.join();
    }

private:
    void loop()
    {
        std::unique_lock lock{mutex_};
        for (;;) {
            wake_.wait(lock, [&] { return ending_ || !queue_.empty(); });
            if (queue_.empty()) return;
            std::vector<std::shared_ptr<void>> batch = std::exchange(queue_, {});
            lock.unlock();
            batch.clear(); // a thread pool's destructor joins its threads here
            lock.lock();
        }
    }

    std::mutex mutex_;
    std::condition_variable wake_;
    std::vector<std::shared_ptr<void>> queue_;
    bool ending_ = false;
    std::thread thread_;
};

} // namespace

bool running_in_this_thread(const asio::any_io_executor& ex) noexcept
{
    bool known = false;
    const bool here = runs<asio::io_context::executor_type>(ex, known);
    if (known) return here;
    const bool pool = runs<asio::thread_pool::executor_type>(ex, known);
    if (known) return pool;
    // A manager's profile pool (its executor is one type, tracking work or not).
    if (const auto* e = ex.target<elastic_pool::executor_type>()) return e->running_in_this_thread();
    if (const auto* s = ex.target<asio::strand<elastic_pool::executor_type>>())
        return s->get_inner_executor().running_in_this_thread();
    return false;
}

bool inside_event_loop() noexcept { return asio::detail::thread_context::top_of_thread_call_stack() != nullptr; }

void release_elsewhere(std::shared_ptr<void> last)
{
    static reaper the_reaper;
    the_reaper.add(std::move(last));
}

} // namespace valve::detail
