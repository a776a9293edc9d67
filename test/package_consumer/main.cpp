// A consumer of valve: builds against the package and checks that it works.
#include <valve/valve.hpp>

#include <boost/asio/io_context.hpp>

#include <cstdio>

int main()
{
    boost::asio::io_context ioc;
    valve::token_bucket bucket{ioc, valve::rate::per_second(100), 2};
    int granted = 0;
    bucket.async_acquire(2, [&](boost::system::error_code ec) { granted += !ec; });
    const bool refused = !bucket.try_acquire();
    ioc.run();
    std::printf("granted=%d refused=%d category=%s\n", granted, refused,
                make_error_code(valve::errc::queue_full).category().name());
    return granted == 1 && refused ? 0 : 1;
}
