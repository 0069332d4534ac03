//go:build race

package main

// Under go test -race the simulator the tests start is race-built too, so
// its own goroutines (engine, faults, handlers) are checked.
func init() { buildFlags = append(buildFlags, "-race") }
