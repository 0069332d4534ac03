package bus_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/bus"
)

// groupSwaps reads pool_managerd_group_swaps_total{group="chat"} off the
// metrics textfile (-1: not there).
func groupSwaps(t *testing.T, dir string) float64 {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "metrics", "pool-managerd.prom"))
	if err != nil {
		return -1
	}
	m := regexp.MustCompile(`(?m)^pool_managerd_group_swaps_total\{group="chat"\} (\S+)$`).FindSubmatch(b)
	if m == nil {
		return -1
	}
	v, err := strconv.ParseFloat(string(m[1]), 64)
	require.NoError(t, err)
	return v
}

// ensureReady calls EnsureReady in the background; the call's error comes
// on the channel.
func ensureReady(pool string) chan error {
	ch := make(chan error, 1)
	go func() {
		out, err := call("EnsureReady", "st", pool, "30000")
		if err != nil {
			err = fmt.Errorf("%w: %s", err, out)
		}
		ch <- err
	}()
	return ch
}

// Two simulator pools of one group on one GPU, through the real daemon and
// bus: at start only the first starts, the other is parked; EnsureReady of
// the parked one drains the awake one (a held lease honoured until it is
// released, or until GroupDrainSec= revokes it), parks it (idle, reason
// group, no crash) and answers once its own pool is ready; a daemon
// restart keeps the awake one; and back.
func TestGroupSwapWithAHeldLease(t *testing.T) {
	dir, _ := configure(t)
	file := filepath.Join(dir, "pools.d", "llama-8b.pool")
	src, err := os.ReadFile(file)
	require.NoError(t, err)
	group := "[Pool]\nGroup=chat\nGroupDrainSec=4\n"
	require.NoError(t, os.WriteFile(file, append(src, group...), 0o644))
	port := regexp.MustCompile(`Port=(\d+)`).FindSubmatch(src)
	p, _ := strconv.Atoi(string(port[1]))
	other := strings.Replace(string(src), "Port="+string(port[1]), "Port="+strconv.Itoa(p+1), 1)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pools.d", "mistral.pool"), []byte(other+group), 0o644))
	t.Cleanup(func() { exec.Command("systemctl", "stop", "pool-engine-mistral.scope").Run() })
	start(t, dir)

	waitProp(t, "llama-8b", "Ready", "b true")
	waitProp(t, "mistral", "State", `s "idle"`)
	assert.Equal(t, "b false", getProp(t, "mistral", "Live"), "only the first member starts")
	out := sh(t, "journalctl", "-u", "pool-managerd.service", "--no-pager", "-o", "verbose", "POOL_ID=mistral", "REASON=group")
	assert.Contains(t, out, "pool parked")

	router, err := dbus.ConnectSystemBus()
	require.NoError(t, err)
	defer router.Close()
	obj := router.Object(bus.Name, mgr)
	var lease string
	require.NoError(t, obj.Call(bus.ManagerIface+".AcquireLease", 0, "llama-8b").Store(&lease))

	done := ensureReady("mistral")
	waitProp(t, "llama-8b", "State", `s "draining"`)
	time.Sleep(time.Second)
	assert.Equal(t, "u 1", getProp(t, "llama-8b", "ActiveLeases"), "the lease is honoured")
	assert.Equal(t, `s "idle"`, getProp(t, "mistral", "State"), "mistral waits for llama-8b's drain")
	select {
	case err := <-done:
		t.Fatalf("EnsureReady answered during the drain: %v", err)
	default:
	}
	released := time.Now()
	require.NoError(t, obj.Call(bus.ManagerIface+".ReleaseLease", 0, lease).Err)
	require.NoError(t, <-done)
	assert.Less(t, time.Since(released), 4*time.Second, "the swap goes on as the lease goes, not at the deadline")
	assert.Equal(t, "b true", getProp(t, "mistral", "Ready"))
	waitProp(t, "llama-8b", "State", `s "idle"`)
	assert.Equal(t, "u 0", getProp(t, "llama-8b", "CrashCount"))
	assert.Equal(t, "b false", getProp(t, "llama-8b", "Live"))
	out = sh(t, "journalctl", "-u", "pool-managerd.service", "--no-pager", "-o", "verbose", "POOL_ID=llama-8b",
		"MESSAGE=pool parked: its GPUs go to another pool of its group")
	assert.Contains(t, out, "REASON=group")
	require.Eventually(t, func() bool { return groupSwaps(t, dir) == 1 }, 10*time.Second, 50*time.Millisecond)

	// A daemon restart keeps the awake member (adopted) and the other
	// parked: llama-8b, first by name, does not start over mistral.
	pid := getProp(t, "mistral", "MainPID")
	sh(t, "systemctl", "restart", "pool-managerd.service")
	waitProp(t, "mistral", "Ready", "b true")
	assert.Equal(t, pid, getProp(t, "mistral", "MainPID"), "adopted, not started again")
	waitProp(t, "llama-8b", "State", `s "idle"`)
	time.Sleep(500 * time.Millisecond)
	assert.Equal(t, "b false", getProp(t, "llama-8b", "Live"))

	// And back, with mistral's lease held past GroupDrainSec=: revoked.
	require.NoError(t, obj.Call(bus.ManagerIface+".AcquireLease", 0, "mistral").Store(&lease))
	begin := time.Now()
	out, err = call("EnsureReady", "st", "llama-8b", "30000")
	require.NoError(t, err, out)
	assert.GreaterOrEqual(t, time.Since(begin), 4*time.Second, "the lease was honoured for GroupDrainSec=")
	assert.Equal(t, "b true", getProp(t, "llama-8b", "Ready"))
	waitProp(t, "mistral", "State", `s "idle"`)
	assert.Equal(t, "u 0", getProp(t, "mistral", "ActiveLeases"))
	assert.Equal(t, "u 0", getProp(t, "mistral", "CrashCount"))
	err = obj.Call(bus.ManagerIface+".ReleaseLease", 0, lease).Err
	assert.Error(t, err, "the revoked lease is gone")
	// Counted by the restarted daemon, from 0.
	require.Eventually(t, func() bool { return groupSwaps(t, dir) == 1 }, 10*time.Second, 50*time.Millisecond)
}
