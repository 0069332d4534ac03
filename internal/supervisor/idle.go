package supervisor

import (
	"errors"
	"io"
	"io/fs"
	"os"
	"time"

	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/state"
)

// markIdle keeps the idle mark in step with the state: written when the
// pool goes idle (with since when), removed when it leaves idle.
func (s *Supervisor) markIdle(snap Snapshot, wasIdle bool) {
	if s.cfg.IdleMark == "" {
		return
	}
	switch {
	case snap.State == lifecycle.Idle && !wasIdle:
		since := snap.IdleSince.UTC().Format(time.RFC3339Nano) + "\n"
		if err := state.WriteFile(s.cfg.IdleMark, []byte(since), 0o644); err != nil {
			s.log.Error("cannot keep the pool idle across a daemon restart", journal.PoolID, s.cfg.Pool, journal.Error, err.Error())
		}
	case snap.State != lifecycle.Idle && wasIdle:
		if err := os.Remove(s.cfg.IdleMark); err != nil && !errors.Is(err, fs.ErrNotExist) {
			s.log.Error("cannot remove the pool's idle mark", journal.PoolID, s.cfg.Pool, journal.Error, err.Error())
		}
	}
}

// RestoreIdle makes the pool idle again if it was idle when the daemon
// last stopped (its mark is there, and it still has IdleStopSec=), and says
// whether it is: then it is not started, as its first use starts it. A
// mark that cannot be read as a time still holds, idle since now.
func (s *Supervisor) RestoreIdle() bool {
	if s.cfg.IdleMark == "" {
		return false
	}
	f, err := os.Open(s.cfg.IdleMark)
	if err != nil {
		return false
	}
	if s.cfg.IdleStop <= 0 {
		// Pinned, or no IdleStopSec= any more: the mark is stale.
		f.Close()
		os.Remove(s.cfg.IdleMark)
		return false
	}
	b, _ := io.ReadAll(io.LimitReader(f, 128))
	f.Close()
	since, _ := time.Parse(time.RFC3339Nano, string(trimNewline(b)))
	if !s.KeepIdle(since) {
		os.Remove(s.cfg.IdleMark)
		return false
	}
	return true
}

// KeepIdle makes a stopped pool with IdleStopSec= idle, idle since since
// (zero: now), and says whether it is: a configuration reload that
// replaced an idle pool keeps it idle, its change applied at its next
// start.
func (s *Supervisor) KeepIdle(since time.Time) bool {
	if s.cfg.IdleStop <= 0 {
		return false
	}
	idle := make(chan bool, 1)
	s.post(func() {
		s.step(lifecycle.IdleRestored{Since: since})
		idle <- s.m.State() == lifecycle.Idle
	})
	return <-idle
}

func trimNewline(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == '\r') {
		b = b[:len(b)-1]
	}
	return b
}
