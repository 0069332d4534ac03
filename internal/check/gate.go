package check

import (
	"sync"
	"sync/atomic"
)

// Gate lets a request the engine must generate for (the canary) reach it
// only while the pool serves (Ready): never while the engine is asked to
// sleep, sleeps, wakes or is stopped for idleness. vLLM refuses such a
// request asleep, and one in flight when its sleep is asked would race
// the weights' move off the GPU. The zero Gate is shut; a nil one is
// always open (no pool state to follow).
type Gate struct {
	open atomic.Bool
	// inFlight is held (read) by each request let through: ShutAndWait
	// waits for them.
	inFlight sync.RWMutex
}

// Open lets requests through: the pool serves.
func (g *Gate) Open() { g.open.Store(true) }

// Shut lets no more requests through; one in flight goes on. It never
// waits: the pool's loop calls it.
func (g *Gate) Shut() { g.open.Store(false) }

// ShutAndWait shuts the gate and returns once no request let through is
// in flight any more (each bounded by its own timeout): the sleep asked
// next finds the engine idle.
func (g *Gate) ShutAndWait() {
	if g == nil {
		return
	}
	g.open.Store(false)
	// Taken once every request let through has returned.
	g.inFlight.Lock()
	g.inFlight.Unlock()
}

// Through runs f if the gate is open, and says whether it did; ShutAndWait
// waits for f to return.
func (g *Gate) Through(f func()) bool {
	if g == nil {
		f()
		return true
	}
	g.inFlight.RLock()
	defer g.inFlight.RUnlock()
	if !g.open.Load() {
		return false
	}
	f()
	return true
}
