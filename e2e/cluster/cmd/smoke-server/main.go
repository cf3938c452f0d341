// Command smoke-server is the tiny static HTTP server of e2e/cluster/smoke:
// "/" answers "hello from <hostname>", "/metrics" is Prometheus text format.
// `smoke-server alloc MIB` touches MIB MiB of memory and sleeps (to provoke an OOM kill).
// `smoke-server get URL` is the client side: GET URL (retrying for up to 30s, so a
// fresh pod's DNS and Service are given time), print the body, exit 0 on HTTP 200.
package main

import (
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"strconv"
	"sync/atomic"
	"time"
)

func get(url string) {
	c := &http.Client{Timeout: 3 * time.Second}
	var last error
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(time.Second) {
		resp, err := c.Get(url)
		if err != nil {
			last = err
			continue
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			fmt.Printf("%s", body)
			os.Exit(0)
		}
		last = fmt.Errorf("HTTP %d", resp.StatusCode)
	}
	fmt.Fprintf(os.Stderr, "GET %s: %v\n", url, last)
	os.Exit(1)
}

func main() {
	if len(os.Args) == 3 && os.Args[1] == "get" {
		get(os.Args[2])
	}
	if len(os.Args) == 3 && os.Args[1] == "alloc" {
		mib, _ := strconv.Atoi(os.Args[2])
		var keep [][]byte
		for i := 0; i < mib; i++ {
			b := make([]byte, 1<<20)
			for j := range b {
				b[j] = byte(j)
			}
			keep = append(keep, b)
		}
		fmt.Printf("allocated %d MiB\n", len(keep))
		select {}
	}
	addr := ":8080"
	if a := os.Getenv("LISTEN"); a != "" {
		addr = a
	}
	host, _ := os.Hostname()
	var requests atomic.Int64
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		fmt.Fprintf(w, "hello from %s\n", host)
	})
	http.HandleFunc("/metrics", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4")
		fmt.Fprintf(w, "# HELP smoke_requests_total Requests served on /.\n# TYPE smoke_requests_total counter\nsmoke_requests_total %d\n", requests.Load())
		fmt.Fprintf(w, "# HELP smoke_up Always 1.\n# TYPE smoke_up gauge\nsmoke_up 1\n")
	})
	log.Printf("listening on %s", addr)
	log.Fatal(http.ListenAndServe(addr, nil))
}
