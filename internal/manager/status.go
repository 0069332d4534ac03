package manager

import (
	"context"
	"fmt"
	"runtime/debug"
	"time"

	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/supervisor"
)

// Status is the one-line state of the pools that systemctl status shows.
func (m *Manager) Status() string {
	pools := m.Pools()
	count := map[lifecycle.State]int{}
	for _, p := range pools {
		count[p.Snapshot().State]++
	}
	out := fmt.Sprintf("%d/%d pools ready", count[lifecycle.Ready], len(pools))
	for _, st := range []lifecycle.State{lifecycle.Starting, lifecycle.Warming, lifecycle.Backoff, lifecycle.Failed, lifecycle.Draining, lifecycle.Stopped, lifecycle.Idle, lifecycle.Sleeping, lifecycle.Waking} {
		if n := count[st]; n > 0 {
			out += fmt.Sprintf(", %d %s", n, st)
		}
	}
	return out
}

// settleQuiet is how long every pool must have stayed settled (ready,
// stopped, failed, idle or sleeping) after a change of state before the daemon gives the
// memory of the burst back.
var settleQuiet = 2 * time.Second

// Settled reports whether no pool is on its way somewhere: none starting,
// warming, waking, in backoff or draining (an idle or sleeping pool has
// arrived).
func (m *Manager) Settled() bool {
	for _, p := range m.Pools() {
		switch p.Snapshot().State {
		case lifecycle.Ready, lifecycle.Stopped, lifecycle.Failed, lifecycle.Idle, lifecycle.Sleeping:
		default:
			return false
		}
	}
	return true
}

// KeepStatus tells notify the Status whenever it changes, until ctx ends.
// It also gives memory back to the system once the pools have settled
// after a burst of changes (the start, a restart storm, a reload): the
// burst grew the goroutines' stacks and the heap, the daemon then idles
// for hours on a fraction of that, and the runtime on its own shrinks
// stacks only at a GC, by half each, and returns free heap slowly, while
// idle GCs are a minute or more apart. One forced GC and scavenge costs
// milliseconds, once per burst.
func (m *Manager) KeepStatus(ctx context.Context, notify func(status string)) {
	release := time.NewTimer(settleQuiet)
	release.Stop()
	defer release.Stop()
	wake := make(chan struct{}, 1)
	poke := func() {
		select {
		case wake <- struct{}{}:
		default:
		}
	}
	watch := func(ctx context.Context, p Pool, last lifecycle.State) {
		for {
			snap, err := p.Wait(ctx, func(s supervisor.Snapshot) bool { return s.State != last })
			if err != nil {
				return
			}
			last = snap.State
			poke()
		}
	}
	for {
		wctx, cancel := context.WithCancel(ctx)
		// Each pool's first look is taken here: a change after it wakes
		// its watcher, one before it is seen by this poke.
		for _, p := range m.Pools() {
			go watch(wctx, p, p.Snapshot().State)
		}
		poke()
		last := ""
	loop:
		for {
			select {
			case <-ctx.Done():
				cancel()
				return
			case <-m.changed:
				poke()
				break loop
			case <-wake:
				if st := m.Status(); st != last {
					notify(st)
					last = st
				}
				if m.Settled() {
					release.Reset(settleQuiet)
				} else {
					release.Stop()
				}
			case <-release.C:
				debug.FreeOSMemory()
			}
		}
		cancel()
	}
}

// Watchdog calls pet every period, but only after every pool's loop has
// answered within it, until ctx ends: a hung loop stops the petting (and
// systemd restarts the daemon).
func (m *Manager) Watchdog(ctx context.Context, period time.Duration, pet func()) {
	every(ctx, period, func() {
		pctx, cancel := context.WithTimeout(ctx, period)
		defer cancel()
		for _, p := range m.Pools() {
			if err := p.Ping(pctx); err != nil {
				m.o.Log.Error("watchdog: a pool's loop does not answer", journal.Error, err.Error())
				return
			}
		}
		pet()
	})
}

// every calls f every period until ctx ends.
func every(ctx context.Context, period time.Duration, f func()) {
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			f()
		}
	}
}

// pruneEvery is how often staged models no pool uses are removed.
const pruneEvery = 10 * time.Minute

// KeepPruning removes staged models no pool uses, now and then, until ctx
// ends: a reload leaves the old model staged (a rollback may want it
// back) and disks of model stores fill.
func (m *Manager) KeepPruning(ctx context.Context) { every(ctx, pruneEvery, m.Prune) }

// Prune removes staged models that no pool's engine runs on. A pool that
// is starting (or preparing a restart) may have staged a file it does not
// report yet: the prune waits for the next turn rather than take it from
// under the engine's start (which would fail and count a crash).
func (m *Manager) Prune() {
	var keep []string
	for _, p := range m.Pools() {
		snap := p.Snapshot()
		if snap.State == lifecycle.Backoff || snap.State == lifecycle.Starting && !snap.Live ||
			snap.Operation == "staging" || snap.Operation == "starting" {
			m.o.Log.Debug("prune of staged models put off: a pool is starting", journal.PoolID, snap.ID)
			return
		}
		if path := snap.StagedPath; path != "" {
			keep = append(keep, path)
		}
	}
	if err := m.o.Stager.Prune(keep); err != nil {
		m.o.Log.Warn("pruning staged models", journal.Error, err.Error())
	}
}
