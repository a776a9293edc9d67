#include "elastic_pool.hpp"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <list>
#include <mutex>
#include <system_error>
#include <thread>

namespace valve::detail {

static_assert(boost::asio::execution::is_executor<elastic_pool::executor_type>::value);

// What the threads and executors share with the pool: they keep it alive, so a pool destroyed
// on one of its own threads, or outlived by an executor, leaves them something to finish with.
struct elastic_pool::state : std::enable_shared_from_this<state> {
    state(std::size_t max, std::chrono::nanoseconds rest) : max_threads(max), idle_time(rest)
    {
    }

    ~state()
    {
        // Only functions nobody ran (no thread could start for them): freed, not run.
        while (op* o = pop()) o->destroy();
    }

    // Destroyed last, after the queued functions that may use its services.
    boost::asio::execution_context context;
    const std::size_t max_threads;
    const std::chrono::nanoseconds idle_time;

    // Queued and running functions and executors tracking work: `join` waits for zero.
    std::atomic<std::size_t> work{0};

    mutable std::mutex mutex;
    std::condition_variable wake;    // idle threads wait for work here
    std::condition_variable settled; // `join` waits here for no work, then no threads
    op* head = nullptr;
    op* tail = nullptr;
    std::list<std::thread> running; // started and not ended
    std::list<std::thread> ended;   // ended, to be joined by the next post or `join`
    std::size_t idle = 0;           // threads waiting for work
    std::size_t wakeups = 0;        // of them, those told to wake and not yet awake
    bool stopping = false;          // idle threads end at once (`join` and an orphaned pool)
    bool orphaned = false;          // the pool is destroyed: threads are detached

    op* pop() noexcept
    {
        op* o = head;
        if (o) {
            head = o->next;
            if (!head) tail = nullptr;
        }
        return o;
    }
};

namespace {
// The pool whose thread this is, if any.
thread_local const void* current_pool_state = nullptr;
} // namespace

elastic_pool::elastic_pool(std::size_t max_threads, std::chrono::nanoseconds idle_time)
    : state_(std::make_shared<state>(std::max<std::size_t>(max_threads, 1), idle_time))
{
}

elastic_pool::~elastic_pool()
{
    join(); // at once on one of its own threads
    // What remains belongs to the executors and threads still holding the state: threads that
    // start or are still running now are detached and end as soon as their work runs out.
    std::lock_guard lock{state_->mutex};
    state_->orphaned = true;
    state_->stopping = true;
    for (auto& t : state_->running)
        if (t.joinable()) t.detach();
    for (auto& t : state_->ended)
        if (t.joinable()) t.detach();
    state_->wake.notify_all();
}

elastic_pool::executor_type elastic_pool::get_executor() noexcept { return executor_type{state_, false}; }

boost::asio::execution_context& elastic_pool::context() noexcept { return state_->context; }

void elastic_pool::join()
{
    if (running_in_this_thread()) return; // it cannot wait for itself
    state& s = *state_;
    std::list<std::thread> done;
    {
        std::unique_lock lock{s.mutex};
        while (s.work.load(std::memory_order_acquire) != 0) {
            // Work queued with no thread to run it (none could start): start one, retrying.
            if (s.head && s.running.empty() && !start_thread(s))
                s.settled.wait_for(lock, std::chrono::milliseconds(10));
            else
                s.settled.wait(lock);
        }
        s.stopping = true;
        s.wake.notify_all();
        s.settled.wait(lock, [&] { return s.running.empty(); });
        s.stopping = false;
        done.swap(s.ended);
    }
    for (auto& t : done) // each has left its loop; this waits for it to exit
        if (t.joinable()) t.join();
}

std::size_t elastic_pool::threads() const noexcept
{
    std::lock_guard lock{state_->mutex};
    return state_->running.size();
}

std::size_t elastic_pool::max_threads() const noexcept { return state_->max_threads; }

bool elastic_pool::running_in_this_thread() const noexcept { return current_pool_state == state_.get(); }

void elastic_pool::post(state& s, op* o) noexcept
{
    work_started(s);
    std::list<std::thread> done; // joined outside the lock
    {
        std::lock_guard lock{s.mutex};
        done.swap(s.ended);
        o->next = nullptr;
        if (s.tail)
            s.tail->next = o;
        else
            s.head = o;
        s.tail = o;
        if (s.idle > s.wakeups) {
            ++s.wakeups;
            s.wake.notify_one();
        } else if (s.running.size() < s.max_threads) {
            // If none can start, the work stays queued for a running thread, or for the thread
            // the next post or `join` starts (woken here to try).
            if (!start_thread(s) && s.running.empty()) s.settled.notify_all();
        }
    }
    for (auto& t : done)
        if (t.joinable()) t.join();
}

bool elastic_pool::start_thread(state& s) noexcept
{
    try {
        auto self = s.running.emplace(s.running.end());
        try {
            for (std::size_t n = fail_thread_starts_for_testing.load(); n > 0;)
                if (fail_thread_starts_for_testing.compare_exchange_weak(n, n - 1))
                    throw std::system_error(std::make_error_code(std::errc::resource_unavailable_try_again));
            *self = std::thread(run_thread, s.shared_from_this(), &*self);
        } catch (...) {
            s.running.erase(self);
            throw;
        }
        if (s.orphaned) self->detach();
        return true;
    } catch (...) {
        return false;
    }
}

void elastic_pool::work_started(state& s) noexcept { s.work.fetch_add(1, std::memory_order_relaxed); }

void elastic_pool::work_finished(state& s) noexcept
{
    if (s.work.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        // Under the lock, so that `join` cannot miss it between its test and its wait.
        std::lock_guard lock{s.mutex};
        s.settled.notify_all();
    }
}

void elastic_pool::run_thread(std::shared_ptr<state> sp, const void* self_ptr) noexcept
{
    state& s = *sp;
    current_pool_state = &s;
    std::unique_lock lock{s.mutex};
    for (;;) {
        if (op* o = s.pop()) {
            lock.unlock();
            o->run();
            work_finished(s);
            lock.lock();
            continue;
        }
        if (s.stopping) break;
        ++s.idle;
        const bool woken = s.wake.wait_for(lock, s.idle_time, [&] { return s.wakeups > 0 || s.stopping; });
        --s.idle;
        if (s.wakeups > 0) {
            --s.wakeups;
            continue;
        }
        if (!woken) break; // rested long enough: end
    }
    auto self = std::find_if(s.running.begin(), s.running.end(), [&](const std::thread& t) { return &t == self_ptr; });
    if (s.stopping) {
        // Leave the running list for the ended one, where `join` joins it.
        s.ended.splice(s.ended.end(), s.running, self);
    } else {
        // Rested long enough: nobody may ever post or join again (a pool never destroyed, such
        // as valve's own release pool), so the thread ends on its own rather than wait to be
        // joined; what it still uses of the state, its share keeps.
        self->detach();
        s.running.erase(self);
    }
    if (s.running.empty()) s.settled.notify_all();
    current_pool_state = nullptr;
}

boost::asio::execution_context& elastic_pool::executor_type::query(boost::asio::execution::context_t) const noexcept
{
    return state_->context;
}

bool elastic_pool::executor_type::running_in_this_thread() const noexcept { return current_pool_state == state_.get(); }

} // namespace valve::detail
