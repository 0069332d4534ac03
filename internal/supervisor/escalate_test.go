package supervisor_test

import (
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/llorch/pool-managerd/internal/crash"
	. "github.com/llorch/pool-managerd/internal/supervisor"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

// An engine that fails its probes and ignores SIGTERM (as llama-server does
// with a request in flight) is stopped by systemd's SIGKILL of the whole
// scope, shim included: the crash is the failed probes, and no shim is
// said lost.
func TestAHealthStopEscalatedToSIGKILLIsAHealthCheckCrash(t *testing.T) {
	e := testpool.New(t, nil)
	s := e.Pool("deaf", "0", "", "")
	waitFor(t, s, "ready", ready(1))
	for _, f := range []string{"ignore-term", "hang-health"} {
		if err := s.Fault(f); err != nil {
			t.Fatal(err)
		}
	}
	crashed := waitFor(t, s, "the crash", func(s Snapshot) bool { return s.Policy.CrashCount == 1 })
	assert.Equal(t, crash.HealthCheck, crashed.LastReason)
	assert.Contains(t, crashed.LastError, "health check failed 3 times")
	assert.Contains(t, crashed.LastError, "killed with SIGKILL")
	assert.NotContains(t, crashed.LastError, "shim")
	waitFor(t, s, "ready again", ready(2))
	assert.Equal(t, uint64(1), s.Snapshot().Policy.CrashCount, "counted once")
}
