// The Go comparison for bench_limiter's throughput benchmark: a goroutine worker pool as
// govalve builds it (a bounded channel of tasks, a fixed number of worker goroutines), with the
// same load: 1,000,000 no-op tasks (each increments a counter) from 4 submitters, 2 workers,
// room for 10,000 queued tasks (a full channel makes the submitter wait, as
// queue_full_policy::wait does). Prints tasks per second for each of `-runs` runs.
//
//	go run bench/go_pool/main.go -runs 5
package main

import (
	"flag"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

func main() {
	runs := flag.Int("runs", 5, "runs")
	tasks := flag.Int("tasks", 1000000, "tasks per run")
	submitters := flag.Int("submitters", 4, "submitting goroutines")
	workers := flag.Int("workers", 2, "worker goroutines")
	capacity := flag.Int("capacity", 10000, "queued tasks at most")
	flag.Parse()

	for r := 0; r < *runs; r++ {
		queue := make(chan func(), *capacity)
		var done atomic.Int64
		var finished sync.WaitGroup
		finished.Add(*tasks)
		for w := 0; w < *workers; w++ {
			go func() {
				for task := range queue {
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
		fmt.Printf("go pool: %d tasks in %v: %.2f M tasks/s\n", *tasks, elapsed.Round(time.Millisecond),
			float64(*tasks)/elapsed.Seconds()/1e6)
	}
}
