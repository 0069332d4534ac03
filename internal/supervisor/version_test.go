package supervisor_test

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"

	. "github.com/llorch/pool-managerd/internal/supervisor"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

// VersionCommand= is engine code: it runs beside the engine, as the
// engine's user, in the engine's scope, with no new privileges; never as
// the root daemon in its own cgroup.
func TestVersionCommandRunsAsTheEngineInItsScope(t *testing.T) {
	e := testpool.New(t, nil)
	s := e.Start(testpool.Spec{ID: "ver", Devices: "0", Engine: `VersionCommand=/bin/sh -c "echo version: uid=$(id -u) $(grep NoNewPrivs /proc/self/status | tr -d '[:space:]') cg=$(tail -n1 /proc/self/cgroup)"` + "\nStopTimeoutSec=2\n"})
	snap := waitFor(t, s, "the version", func(s Snapshot) bool { return s.Ready && s.EngineVersion != "" })
	uid := poolUID(t, e, "ver")
	assert.Contains(t, snap.EngineVersion, "uid="+uid+" ")
	assert.Contains(t, snap.EngineVersion, "NoNewPrivs:1")
	assert.True(t, strings.HasSuffix(snap.EngineVersion, "/pool-engine-ver.scope"), "in the engine's scope: %q", snap.EngineVersion)
}

// A version command that fails or prints nothing leaves the version
// unknown and the pool serving.
func TestAFailingVersionCommandLeavesThePoolServing(t *testing.T) {
	e := testpool.New(t, nil)
	s := e.Start(testpool.Spec{ID: "nover", Devices: "1", Engine: "VersionCommand=/bin/false\nStopTimeoutSec=2\n"})
	snap := waitFor(t, s, "ready", ready(1))
	assert.Empty(t, snap.EngineVersion)
}
