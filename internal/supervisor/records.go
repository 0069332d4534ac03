package supervisor

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/model"
)

// Record is the runtime record of a running, healthy engine:
// RuntimeDir/pools/<id>.json.
type Record struct {
	Pool          string    `json:"pool"`
	Unit          string    `json:"unit"`
	PID           int       `json:"pid"`
	Model         string    `json:"model"`
	StagedPath    string    `json:"staged_path"`
	Digest        string    `json:"digest"`
	EngineVersion string    `json:"engine_version"`
	DeviceMask    string    `json:"device_mask"`
	URL           string    `json:"url"`
	StartedAt     time.Time `json:"started_at"`
	// Leases are the leases on the engine, id -> owner, for a restarted
	// daemon to keep those whose owners are still connected.
	Leases map[string]string `json:"leases,omitempty"`
	// Asleep, when set, says the engine was left asleep (Sleep=vllm): a
	// restarted daemon adopts it sleeping instead of waking it. Without
	// it (an older daemon's record) an adopted engine is woken.
	Asleep *AsleepRecord `json:"asleep,omitempty"`
}

// AsleepRecord is what a runtime record says of an engine left asleep.
type AsleepRecord struct {
	Since time.Time `json:"since"`
	// Parked: asleep for another pool of its group.
	Parked bool `json:"parked,omitempty"`
}

func (s *Supervisor) writeRecord(r *run, w lifecycle.WriteRecord) {
	if s.cfg.Records.Path == "" {
		return
	}
	rec := Record{
		Pool: s.cfg.Pool, Unit: r.e.Unit, PID: r.e.PID, Model: w.Model, StagedPath: r.staged.Path,
		Digest: r.staged.Digest, EngineVersion: s.m.View(time.Now()).EngineVersion, DeviceMask: s.cfg.DeviceMask,
		URL: s.cfg.HealthURL, StartedAt: r.started, Leases: s.m.Leases(),
	}
	if w.Asleep {
		rec.Asleep = &AsleepRecord{Since: w.AsleepSince.UTC(), Parked: w.Parked}
	}
	if err := s.cfg.Records.Save(s.cfg.Pool, rec); err != nil {
		s.log.Error("cannot write the runtime record", journal.PoolID, s.cfg.Pool, journal.Error, err.Error())
	}
}

// startNote is what the shim keeps for a restarted daemon about an engine
// being started: an engine has a runtime record only once it is healthy,
// and one still loading its model must not be killed and loaded again
// because the daemon restarted (a package upgrade, a crash).
type startNote struct {
	Model      string    `json:"model"`
	Digest     string    `json:"digest"`
	StagedPath string    `json:"staged_path"`
	Candidate  bool      `json:"candidate,omitempty"`
	StartedAt  time.Time `json:"started_at"`
}

// Adopt takes over the engine a previous daemon left running: it reattaches
// to its shim, restores its leases whose owners keep says are still there,
// and watches it like any engine (it is ready again at its first good
// health probe). An engine that was still starting has no record: it is
// adopted from what its shim kept (and must be healthy within
// StartTimeoutSec of its start), unless it was a reload's candidate, which
// is stopped: the pool starts on its configured model. It reports false
// when there is no engine to adopt.
func (s *Supervisor) Adopt(ctx context.Context, keep func(owner string) bool) (bool, error) {
	var rec Record
	found, err := s.cfg.Records.Load(s.cfg.Pool, &rec)
	// The shim is the truth, the record a cache: an unreadable record
	// (set aside by Load) must not cost a healthy engine its life.
	corrupt := err != nil
	if corrupt {
		s.log.Error("runtime record unreadable: adopting the engine from its shim, its leases are lost",
			journal.PoolID, s.cfg.Pool, journal.Error, err.Error())
		found, rec = false, Record{}
	}
	spec := s.cfg.Build(rec.StagedPath)
	e, err := s.rt.Attach(ctx, s.cfg.Pool, spec.Socket)
	if err != nil {
		if found {
			s.removeRecord()
		}
		return false, nil
	}
	if !found {
		var n startNote
		if json.Unmarshal(e.Note, &n) != nil || n.Candidate || n.StagedPath == "" {
			go func() {
				for range e.Events() {
				}
			}()
			if err := s.rt.Stop(ctx, s.cfg.Pool); err != nil {
				return false, err
			}
			s.log.Info(fmt.Sprintf("stopped the engine (pid %d) a reload was starting when the daemon went away", e.PID), journal.PoolID, s.cfg.Pool)
			return false, nil
		}
		rec = Record{Model: n.Model, Digest: n.Digest, StagedPath: n.StagedPath, StartedAt: n.StartedAt, EngineVersion: s.Snapshot().EngineVersion}
	}
	staged := model.Staged{Digest: rec.Digest, Path: rec.StagedPath}
	staged.Ref = rec.Model
	var startBy time.Time
	switch {
	case corrupt:
		// Maybe long healthy, maybe still loading: it has a full
		// StartTimeoutSec from now to answer.
		startBy = time.Now().Add(s.cfg.Health.StartTimeout)
	case !found:
		startBy = rec.StartedAt.Add(s.cfg.Health.StartTimeout)
	}
	kept := map[string]string{}
	for id, owner := range rec.Leases {
		if keep(owner) {
			kept[id] = owner
			s.mayHold(owner)
		}
	}
	// Left asleep, by a record of this engine: else it may be asleep
	// all the same, and is woken before it serves.
	var asleep AsleepRecord
	left := found && rec.Asleep != nil && rec.PID == e.PID && len(rec.Leases) == 0
	if left {
		asleep = *rec.Asleep
	}
	var r *run
	rep := <-s.request(func(id lifecycle.ReqID) lifecycle.Event {
		ctx, cancel := context.WithCancel(context.Background())
		r = &run{id: s.m.NewRun(), e: e, ctx: ctx, cancel: cancel, started: rec.StartedAt, staged: staged, exited: make(chan struct{})}
		s.adoptHandle(r)
		return lifecycle.Adopted{Req: id, Run: r.id, PID: e.PID, Started: rec.StartedAt, Staged: staged,
			EngineVersion: rec.EngineVersion, Leases: kept, RecordHeld: len(rec.Leases), Starting: !found, StartBy: startBy,
			Invocation: e.Invocation, Asleep: left, AsleepSince: asleep.Since, Parked: asleep.Parked}
	})
	err = rep.Err
	if err != nil {
		s.post(func() {
			if s.runs[r.id] == r {
				delete(s.runs, r.id)
				r.cancel()
			}
		})
	}
	return err == nil, err
}

func (s *Supervisor) removeRecord() {
	if s.cfg.Records.Path == "" {
		return
	}
	if err := s.cfg.Records.Remove(s.cfg.Pool); err != nil {
		s.log.Error("cannot remove the runtime record", journal.PoolID, s.cfg.Pool, journal.Error, err.Error())
	}
}
