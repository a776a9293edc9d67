#ifndef VALVE_VALVE_HPP
#define VALVE_VALVE_HPP

// All of valve's public headers.

#include <valve/adaptive.hpp>
#include <valve/backoff.hpp>
#include <valve/bucket_core.hpp>
#include <valve/bucket_set.hpp>
#include <valve/error.hpp>
#include <valve/hedge.hpp>
#include <valve/limiter.hpp>
#include <valve/log.hpp>
#include <valve/manager.hpp>
#include <valve/metrics.hpp>
#include <valve/rate.hpp>
#include <valve/resource.hpp>
#include <valve/retry.hpp>
#include <valve/timeout.hpp>
#include <valve/token_bucket.hpp>

#endif
