package supervisor

import (
	"time"

	"github.com/llorch/pool-managerd/internal/journal"
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
}

func (s *Supervisor) writeRecord(r *run) {
	if s.cfg.Records.Path == "" {
		return
	}
	rec := Record{
		Pool: s.cfg.Pool, Unit: r.e.Unit, PID: r.e.PID, Model: s.snap.Model, StagedPath: r.staged.Path,
		Digest: r.staged.Digest, EngineVersion: s.snap.EngineVersion, DeviceMask: s.cfg.DeviceMask,
		URL: s.cfg.HealthURL, StartedAt: r.started,
	}
	if r.candidate || s.reload != nil {
		rec.Model = s.reload.ref
	}
	if err := s.cfg.Records.Save(s.cfg.Pool, rec); err != nil {
		s.log.Error("writing runtime record: "+err.Error(), journal.PoolID, s.cfg.Pool)
	}
}

func (s *Supervisor) removeRecord() {
	if s.cfg.Records.Path == "" {
		return
	}
	if err := s.cfg.Records.Remove(s.cfg.Pool); err != nil {
		s.log.Error("removing runtime record: "+err.Error(), journal.PoolID, s.cfg.Pool)
	}
}
