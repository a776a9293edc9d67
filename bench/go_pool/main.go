// The Go comparison for bench_limiter's throughput benchmark: a goroutine worker pool as
// govalve builds it (a bounded channel of tasks, a fixed number of worker goroutines), with the
// same load: 1,000,000 no-op tasks (each increments a counter) from 4 submitters, 2 workers,
// room for 10,000 queued tasks (a full channel makes the submitter wait, as
// queue_full_policy::wait does). Prints tasks per second for each of `-runs` runs.
//
// With -limiter (the shape govalve has), each worker calls x/time/rate's Wait on one shared
// rate.Limiter before each task, at an unlimited rate: the cost of asking a limiter, as valve's
// shared limiter with an unlimited resource pays it. It builds in GOPATH mode, offline, against
// Debian's golang-golang-x-time-dev (bench/compare_go.sh runs it beside bench_limiter):
//
//	GOPATH=/usr/share/gocode GO111MODULE=off go run bench/go_pool/main.go -runs 5
//	GOPATH=/usr/share/gocode GO111MODULE=off go run bench/go_pool/main.go -limiter -runs 5
package main

import (
	"context"
	"flag"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
)

func main() {
	runs := flag.Int("runs", 5, "runs")
	tasks := flag.Int("tasks", 1000000, "tasks per run")
	submitters := flag.Int("submitters", 4, "submitting goroutines")
	workers := flag.Int("workers", 2, "worker goroutines")
	capacity := flag.Int("capacity", 10000, "queued tasks at most")
	limited := flag.Bool("limiter", false, "each worker waits on a shared x/time/rate limiter (unlimited rate) before each task")
	flag.Parse()
	name := "go pool"
	if *limited {
		name = "go pool with x/time/rate"
	}

	for r := 0; r < *runs; r++ {
		queue := make(chan func(), *capacity)
		lim := rate.NewLimiter(rate.Inf, 0)
		ctx := context.Background()
		var done atomic.Int64
		var finished sync.WaitGroup
		finished.Add(*tasks)
		for w := 0; w < *workers; w++ {
			go func() {
				for task := range queue {
					if *limited {
						if err := lim.Wait(ctx); err != nil {
							panic(err)
						}
					}
					task()
					finished.Done()
				}
			}()
		}
		start := time.Now()
		var submitted sync.WaitGroup
		for s := 0; s < *submitters; s++ {
			submitted.Add(1)
			go func() {
				defer submitted.Done()
				for i := 0; i < *tasks / *submitters; i++ {
					queue <- func() { done.Add(1) }
				}
			}()
		}
		submitted.Wait()
		finished.Wait()
		elapsed := time.Since(start)
		close(queue)
		if done.Load() != int64(*tasks) {
			panic("lost tasks")
		}
		fmt.Printf("%s: %d tasks in %v: %.2f M tasks/s\n", name, *tasks, elapsed.Round(time.Millisecond),
			float64(*tasks)/elapsed.Seconds()/1e6)
	}
}
