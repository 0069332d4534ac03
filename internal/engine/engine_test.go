package engine_test

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/engine"
	"github.com/llorch/pool-managerd/internal/sandbox"
	"github.com/llorch/pool-managerd/internal/shim"
)

func TestMain(m *testing.M) {
	if shim.Is() {
		os.Exit(shim.Main())
	}
	os.Exit(sandbox.Main(m, sandbox.Options{
		Nodes:   sandbox.FakeGPUs,
		Prepare: [][]string{{"useradd", "--system", "--no-create-home", "pool-engine"}},
	}, nil))
}

func runtime(t *testing.T) (*engine.Runtime, context.Context) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	exe, err := os.Executable()
	require.NoError(t, err)
	rt, err := engine.New(ctx, []string{exe})
	require.NoError(t, err)
	t.Cleanup(rt.Close)
	return rt, ctx
}

func journal(t *testing.T, unit string, want string) string {
	var out []byte
	require.Eventually(t, func() bool {
		out, _ = exec.Command("journalctl", "-u", unit, "--no-pager", "-o", "cat").CombinedOutput()
		return strings.Contains(string(out), want)
	}, 20*time.Second, 50*time.Millisecond, "journalctl -u %s shows %q", unit, want)
	return string(out)
}

// The very first thing the engine does already happens inside its scope,
// as its user, without new privileges: there is no window outside.
func TestEngineStartsInsideItsScope(t *testing.T) {
	rt, ctx := runtime(t)
	e, err := rt.Start(ctx, engine.Spec{
		Pool:        "first-light",
		Argv:        []string{"/bin/sh", "-c", `echo "cgroup $(cat /proc/self/cgroup | tail -n 1)"; echo "uid $(id -u) $(grep NoNewPrivs /proc/self/status)"; echo "env $GREETING $CUDA_VISIBLE_DEVICES"; exit 7`},
		Env:         []string{"GREETING=hello", "CUDA_VISIBLE_DEVICES=GPU-x"},
		User:        "pool-engine",
		DeviceNodes: []string{"/dev/nvidia0"},
		StopTimeout: 2 * time.Second,
	})
	require.NoError(t, err)
	assert.Equal(t, "pool-engine-first\\x2dlight.scope", e.Unit, "unit names are escaped the systemd way")
	var exit *engine.Exit
	for ev := range e.Events() {
		if ev.Exit != nil {
			exit = ev.Exit
		}
	}
	require.NotNil(t, exit)
	assert.True(t, exit.Status.Exited())
	assert.Equal(t, 7, exit.Status.ExitStatus())
	out := journal(t, e.Unit, "env hello")
	assert.Contains(t, out, "/pool-managerd-engines.slice/pool-engine-first\\x2dlight.scope")
	uid, err := exec.Command("id", "-u", "pool-engine").Output()
	require.NoError(t, err)
	assert.Contains(t, out, "uid "+strings.TrimSpace(string(uid))+" NoNewPrivs:\t1")
	assert.Contains(t, out, "env hello GPU-x")
	require.NoError(t, rt.Stop(ctx, "first-light"))
}

func TestBadUserFailsCleanly(t *testing.T) {
	rt, ctx := runtime(t)
	_, err := rt.Start(ctx, engine.Spec{Pool: "nobody-here", Argv: []string{"/bin/true"}, User: "no-such-user", StopTimeout: time.Second})
	require.Error(t, err)
	assert.Contains(t, err.Error(), `user "no-such-user"`)
	out, _ := exec.Command("systemctl", "is-active", "pool-engine-nobody\\x2dhere.scope").CombinedOutput()
	assert.NotEqual(t, "active", strings.TrimSpace(string(out)), "nothing is left running")
}
