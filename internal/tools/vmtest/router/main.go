// Command router holds a lease the way a request router does, for make
// vm-test: it brings the pool up if it is idle (EnsureReady: a ready pool
// answers at once, an idle one is started and answered once Ready), takes
// a lease on one connection to the system bus, prints the lease id, and
// releases it on that same connection when a line "release" arrives on
// stdin (a lease belongs to the connection that took it). EOF ends it,
// dropping the connection and with it any lease still held.
package main

import (
	"bufio"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/godbus/dbus/v5"
)

const (
	dest  = "org.llorch.PoolManager1"
	path  = "/org/llorch/PoolManager1"
	iface = "org.llorch.PoolManager1.Manager"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: router POOL")
		os.Exit(2)
	}
	conn, err := dbus.ConnectSystemBus()
	if err != nil {
		fmt.Fprintln(os.Stderr, "router:", err)
		os.Exit(1)
	}
	defer conn.Close()
	obj := conn.Object(dest, path)
	// A pool stopped for want of use starts here, within its own
	// StartTimeoutSec= (timeout_ms 0); a cold start is worth the wait.
	if err := callWithin(startWait, obj, "EnsureReady", os.Args[1], uint64(0)).Err; err != nil {
		fmt.Fprintln(os.Stderr, "router: EnsureReady:", err)
		os.Exit(1)
	}
	var id string
	if err := call(obj, "AcquireLease", os.Args[1]).Store(&id); err != nil {
		fmt.Fprintln(os.Stderr, "router: AcquireLease:", err)
		os.Exit(1)
	}
	fmt.Println("lease", id)
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		if strings.TrimSpace(in.Text()) != "release" {
			continue
		}
		if err := call(obj, "ReleaseLease", id).Err; err != nil {
			fmt.Println("release failed:", err)
			continue
		}
		fmt.Println("released")
	}
}

// startWait bounds the wait for a start on demand: the daemon answers
// within the pool's StartTimeoutSec= (at most an hour).
const startWait = time.Hour + 30*time.Second

func call(obj dbus.BusObject, method string, args ...any) *dbus.Call {
	return callWithin(30*time.Second, obj, method, args...)
}

func callWithin(d time.Duration, obj dbus.BusObject, method string, args ...any) *dbus.Call {
	c := obj.Go(iface+"."+method, 0, make(chan *dbus.Call, 1), args...)
	select {
	case <-c.Done:
		return c
	case <-time.After(d):
		return &dbus.Call{Err: fmt.Errorf("%s: no answer in %s", method, d)}
	}
}
