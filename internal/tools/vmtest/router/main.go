// Command router holds a lease the way a request router does, for make
// vm-test: it takes a lease on one connection to the system bus, prints the
// lease id, and releases it on that same connection when a line "release"
// arrives on stdin (a lease belongs to the connection that took it). EOF
// ends it, dropping the connection and with it any lease still held.
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

func call(obj dbus.BusObject, method string, args ...any) *dbus.Call {
	c := obj.Go(iface+"."+method, 0, make(chan *dbus.Call, 1), args...)
	select {
	case <-c.Done:
		return c
	case <-time.After(30 * time.Second):
		return &dbus.Call{Err: fmt.Errorf("%s: no answer in 30 s", method)}
	}
}
