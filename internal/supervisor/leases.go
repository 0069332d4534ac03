package supervisor

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/llorch/pool-managerd/internal/journal"
)

// Refusals a caller can match with errors.Is.
var (
	ErrNotReady    = errors.New("not ready")
	ErrDraining    = errors.New("draining")
	ErrNoCapacity  = errors.New("no capacity")
	ErrNoSuchLease = errors.New("no such lease")
	ErrBusy        = errors.New("busy")
	ErrNotOwner    = errors.New("lease held by another owner")
)

// LeasePool returns the pool a lease id belongs to: ids are
// "<pool>/<random>", and pool ids cannot contain a slash.
func LeasePool(id string) (string, bool) {
	pool, _, ok := strings.Cut(id, "/")
	return pool, ok && pool != ""
}

// AcquireLease takes a lease on a ready pool for owner (the next layer
// ties owners to bus connections).
func (s *Supervisor) AcquireLease(owner string) (string, error) {
	var id string
	err := s.call(func() error {
		switch {
		case s.drain != nil:
			return fmt.Errorf("pool %s is draining: %w", s.cfg.Pool, ErrDraining)
		case !s.snap.Ready:
			return fmt.Errorf("pool %s is %s: %w", s.cfg.Pool, s.snap.State, ErrNotReady)
		case s.cfg.Slots > 0 && uint32(len(s.leases)) >= s.cfg.Slots:
			return fmt.Errorf("pool %s has all %d slots leased: %w", s.cfg.Pool, s.cfg.Slots, ErrNoCapacity)
		}
		b := make([]byte, 16)
		rand.Read(b)
		id = s.cfg.Pool + "/" + hex.EncodeToString(b)
		s.leases[id] = owner
		s.update(func(*Snapshot) {})
		s.leasesChanged()
		return nil
	})
	return id, err
}

// ReleaseLease gives a lease back. A lease that is not held (never was,
// already released, revoked) is ErrNoSuchLease and changes nothing.
func (s *Supervisor) ReleaseLease(id string) error {
	return s.call(func() error {
		if _, ok := s.leases[id]; !ok {
			return fmt.Errorf("lease %q: %w", id, ErrNoSuchLease)
		}
		delete(s.leases, id)
		s.update(func(*Snapshot) {})
		s.leasesChanged()
		s.leaseReleased()
		return nil
	})
}

// recordEvery bounds how often lease changes rewrite a pool's runtime
// record: a router taking thousands of leases a second must not pay a file
// write for each, and a daemon killed loses at most this much of them.
const recordEvery = 10 * time.Millisecond

// leasesChanged marks the runtime record's leases stale; the loop writes
// the record once it has nothing else queued (see Run), after the lease
// call's reply, and at most every recordEvery.
func (s *Supervisor) leasesChanged() { s.recordDirty = true }

// leasesIdle is called by the loop when it has nothing queued and the
// leases changed.
func (s *Supervisor) leasesIdle() {
	if s.recordAt != nil {
		return
	}
	if wait := time.Until(s.recordLast.Add(recordEvery)); wait > 0 {
		s.recordAt = time.AfterFunc(wait, func() {
			s.post(func() {
				s.recordAt = nil
				if s.recordDirty {
					s.flushLeases()
				}
			})
		})
		return
	}
	s.flushLeases()
}

// flushLeases writes the record the leases changed, if there is one to
// write.
func (s *Supervisor) flushLeases() {
	s.recordDirty = false
	s.recordLast = time.Now()
	if s.run != nil && s.run.healthy && s.drain == nil && !s.run.candidate {
		s.writeRecord(s.run)
	}
}

// Flush writes what leasesChanged has pending, before the daemon exits.
func (s *Supervisor) Flush() {
	s.call(func() error {
		if s.recordAt != nil {
			s.recordAt.Stop()
			s.recordAt = nil
		}
		if s.recordDirty {
			s.flushLeases()
		}
		return nil
	})
}

// ReleaseLeaseAs gives back a lease owner holds; another owner's lease is
// refused and stays.
func (s *Supervisor) ReleaseLeaseAs(id, owner string) error {
	return s.call(func() error {
		o, ok := s.leases[id]
		switch {
		case !ok:
			return fmt.Errorf("lease %q: %w", id, ErrNoSuchLease)
		case o != owner:
			return fmt.Errorf("lease %q: %w", id, ErrNotOwner)
		}
		delete(s.leases, id)
		s.update(func(*Snapshot) {})
		s.leasesChanged()
		s.leaseReleased()
		return nil
	})
}

// ReleaseOwner releases every lease of owner and returns how many.
func (s *Supervisor) ReleaseOwner(owner string) int {
	n := 0
	s.call(func() error {
		for id, o := range s.leases {
			if o == owner {
				delete(s.leases, id)
				n++
			}
		}
		if n > 0 {
			s.update(func(*Snapshot) {})
			s.leasesChanged()
			s.leaseReleased()
		}
		return nil
	})
	return n
}

// revokeLeases drops every lease (the engine is gone or a drain's
// deadline passed).
func (s *Supervisor) revokeLeases(why string) {
	n := len(s.leases)
	if n == 0 {
		return
	}
	clear(s.leases)
	if s.drain != nil {
		s.drain.res.Revoked += n
		s.drain.res.Outcome = Forced
	}
	s.log.Warn(fmt.Sprintf("%d lease(s) revoked: %s", n, why), journal.PoolID, s.cfg.Pool, journal.ActiveLeases, n)
	s.update(func(*Snapshot) {})
}
