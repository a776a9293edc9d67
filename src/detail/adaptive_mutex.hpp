#ifndef VALVE_DETAIL_ADAPTIVE_MUTEX_HPP
#define VALVE_DETAIL_ADAPTIVE_MUTEX_HPP

#include <mutex>

#if defined(__GLIBC__)
#include <pthread.h>
#endif

namespace valve::detail {

/// A mutex for critical sections of a few dozen instructions: a thread that finds it taken
/// spins briefly before it sleeps, so the holder usually hands it over without a futex wake.
/// (glibc's adaptive kind; elsewhere a std::mutex.) Meets Lockable, same size as std::mutex.
#if defined(__GLIBC__) && defined(PTHREAD_ADAPTIVE_MUTEX_INITIALIZER_NP)
class adaptive_mutex {
public:
    adaptive_mutex() noexcept = default;
    adaptive_mutex(const adaptive_mutex&) = delete;
    adaptive_mutex& operator=(const adaptive_mutex&) = delete;
    ~adaptive_mutex() { pthread_mutex_destroy(&m_); }

    void lock() noexcept { pthread_mutex_lock(&m_); }
    bool try_lock() noexcept { return pthread_mutex_trylock(&m_) == 0; }
    void unlock() noexcept { pthread_mutex_unlock(&m_); }

private:
    pthread_mutex_t m_ = PTHREAD_ADAPTIVE_MUTEX_INITIALIZER_NP;
};
#else
using adaptive_mutex = std::mutex;
#endif

} // namespace valve::detail

#endif
