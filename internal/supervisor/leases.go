package supervisor

import (
	"crypto/rand"
	"encoding/hex"
	"strings"
	"time"

	"github.com/llorch/pool-managerd/internal/lifecycle"
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
	b := make([]byte, 16)
	rand.Read(b)
	id := s.cfg.Pool + "/" + hex.EncodeToString(b)
	s.mayHold(owner)
	rep := <-s.request(func(req lifecycle.ReqID) lifecycle.Event {
		return lifecycle.LeaseRequested{Req: req, ID: id, Owner: owner}
	})
	return rep.Lease, rep.Err
}

// mayHold notes that owner may hold or wait for a lease on the pool
// before the loop hears of it: a departure told after this reaches the
// loop. An owner stays noted until it leaves the bus; an AcquireLease
// under way when it left notes it again, and the bus undoes that lease.
func (s *Supervisor) mayHold(owner string) {
	s.ownersMu.Lock()
	s.owners[owner] = struct{}{}
	s.ownersMu.Unlock()
}

// ReleaseLease gives a lease back. A lease that is not held (never was,
// already released, revoked) is ErrNoSuchLease and changes nothing.
func (s *Supervisor) ReleaseLease(id string) error {
	rep := <-s.request(func(req lifecycle.ReqID) lifecycle.Event { return lifecycle.LeaseReleased{Req: req, ID: id} })
	return rep.Err
}

// ReleaseLeaseAs gives back a lease owner holds; another owner's lease is
// refused and stays.
func (s *Supervisor) ReleaseLeaseAs(id, owner string) error {
	rep := <-s.request(func(req lifecycle.ReqID) lifecycle.Event {
		return lifecycle.LeaseReleased{Req: req, ID: id, Owner: owner, CheckOwner: true}
	})
	return rep.Err
}

// ReleaseOwner releases every lease of owner and returns how many. An
// owner that never asked the pool for a lease is not the loop's business:
// every connection that leaves the bus is told to every pool, and on a
// busy host (systemctl, busctl, systemd-run) that would wake each loop.
func (s *Supervisor) ReleaseOwner(owner string) int {
	s.ownersMu.Lock()
	_, known := s.owners[owner]
	delete(s.owners, owner)
	s.ownersMu.Unlock()
	if !known {
		return 0
	}
	rep := <-s.request(func(req lifecycle.ReqID) lifecycle.Event { return lifecycle.OwnerGone{Req: req, Owner: owner} })
	return rep.N
}

// recordEvery bounds how often lease changes rewrite a pool's runtime
// record: a router taking thousands of leases a second must not pay a file
// write for each, and a daemon killed loses at most this much of them.
const recordEvery = 10 * time.Millisecond

// leasesIdle is called by the loop when it has nothing queued and the
// leases changed: the record is written after the lease call's reply, and
// at most every recordEvery.
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
	if w, ok := s.m.RecordWritable(); ok {
		if r := s.runs[w.Run]; r != nil {
			s.writeRecord(r, w)
		}
	}
}

// Flush writes what the leases have pending, before the daemon exits.
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
