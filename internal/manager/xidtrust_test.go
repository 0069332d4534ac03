//go:build linux && cgo

package manager_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/engine"
	"github.com/llorch/pool-managerd/internal/gpu"
	"github.com/llorch/pool-managerd/internal/gpu/nvmlmock"
	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/manager"
	"github.com/llorch/pool-managerd/internal/supervisor"
	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
)

const resetScript = "GPUResetCommand=$DIR/reset-gpu %g\n"

// An XID pool-managerd does not know fails closed: the GPU's pools are
// held, not restarted, and nothing is reset, until NVML says the GPU is
// usable.
func TestAnUnknownXIDHoldsThePoolUntilNVMLSaysTheGPUIsUsable(t *testing.T) {
	h, nv := nvmlHost(t, resetScript, map[string]string{"a": "0"}, func(o *manager.Options) {
		o.GPUFirstCheck = 300 * time.Millisecond
	})
	h.script("reset-gpu", `echo "$@" >> `+h.dir+"/resets\n")
	a := h.pool("a")
	uuid := nv.GPU(0).UUID

	nv.SetHealth(0, nvmlmock.Health{RecoveryAction: nvml.GPU_RECOVERY_ACTION_GPU_RESET})
	h.m.RouteXID(uuid, 200)
	require.Len(t, a.gpuCalls(), 1)
	assert.Contains(t, a.gpuCalls()[0], "unhealthy "+uuid+": GPU "+uuid+" is held until NVML reports it usable: Xid 200")
	assert.Equal(t, 1.0, testutil.ToFloat64(h.opts.Metrics.GPUUnhealthy.WithLabelValues(uuid, "hold")))
	assert.Never(t, func() bool { return len(a.gpuCalls()) > 1 }, 500*time.Millisecond, 10*time.Millisecond,
		"held while NVML says the GPU needs a reset")
	nv.SetHealth(0, nvmlmock.Health{})
	require.Eventually(t, func() bool { return len(a.gpuCalls()) == 2 }, 2*time.Second, 10*time.Millisecond)
	assert.Equal(t, "usable "+uuid, a.gpuCalls()[1])
	assert.Empty(t, h.read("resets"), "nothing says a reset helps")
}

// 154 names the driver's recovery action: a reboot of the host holds the
// pools and runs no GPUResetCommand; a GPU reset runs it.
func TestXID154FollowsTheDriversRecoveryAction(t *testing.T) {
	h, nv := nvmlHost(t, resetScript, map[string]string{"a": "0", "b": "1", "c": "2"}, nil)
	h.script("reset-gpu", `echo "$@" >> `+h.dir+"/resets\n")
	a, b, c := h.pool("a"), h.pool("b"), h.pool("c")
	for _, p := range []*fakePool{a, b, c} {
		p.set(func(s *supervisor.Snapshot) { s.State, s.Live = lifecycle.Failed, false })
	}

	nv.SetHealth(0, nvmlmock.Health{RecoveryAction: nvml.GPU_RECOVERY_ACTION_NODE_REBOOT})
	h.m.RouteXID(nv.GPU(0).UUID, 154)
	require.Len(t, a.gpuCalls(), 1)
	assert.Contains(t, a.gpuCalls()[0], "is lost: Xid 154")
	assert.Contains(t, a.gpuCalls()[0], "the driver asks for a reboot of the host")
	assert.Equal(t, 1.0, testutil.ToFloat64(h.opts.Metrics.GPUUnhealthy.WithLabelValues(nv.GPU(0).UUID, "lost")))

	nv.SetHealth(1, nvmlmock.Health{RecoveryAction: nvml.GPU_RECOVERY_ACTION_GPU_RESET})
	h.m.RouteXID(nv.GPU(1).UUID, 154)
	require.Len(t, b.gpuCalls(), 1)
	assert.Contains(t, b.gpuCalls()[0], "needs a reset: Xid 154")
	require.Eventually(t, func() bool { return h.read("resets") != "" }, 2*time.Second, 10*time.Millisecond)
	assert.Never(t, func() bool { return h.read("resets") != nv.GPU(1).UUID+"\n" }, 300*time.Millisecond, 10*time.Millisecond,
		"GPU 1 is reset, GPU 0 (a reboot) is not")

	// No recovery action: the NVLink error's sub-code was one to ignore.
	h.m.RouteXID(nv.GPU(2).UUID, 145)
	assert.Empty(t, c.gpuCalls())
	assert.Contains(t, h.logs.String(), "GPU XID 145 on "+nv.GPU(2).UUID)
}

// 61 is a warning in the journal, not a reset; 159, 167 and 169 reset.
func TestXID61WarnsAnd159167169Reset(t *testing.T) {
	h, nv := nvmlHost(t, "", map[string]string{"a": "0", "b": "1", "c": "2", "d": "3"}, nil)
	a := h.pool("a")
	h.m.RouteXID(nv.GPU(0).UUID, 61)
	assert.Empty(t, a.gpuCalls(), "neither held nor restarted")
	assert.Regexp(t, `level=WARN msg="GPU XID 61 on `+nv.GPU(0).UUID, h.logs.String())
	for i, x := range []uint64{159, 167, 169} {
		p := h.pool(string(rune('b' + i)))
		uuid := nv.GPU(i + 1).UUID
		nv.SetHealth(i+1, nvmlmock.Health{RemapPending: true})
		h.m.RouteXID(uuid, x)
		require.Len(t, p.gpuCalls(), 1, "XID %d", x)
		assert.True(t, strings.HasPrefix(p.gpuCalls()[0], "unhealthy "+uuid+": GPU "+uuid+" needs a reset"), p.gpuCalls()[0])
	}
}

// inScope runs sleep in a transient scope named unit in slice, as
// systemd makes a pool's (in pool-managerd-engines.slice), and returns
// its pid and a stop that waits until the scope is gone.
func inScope(t *testing.T, unit, slice string) (int, func()) {
	t.Helper()
	cmd := exec.Command("systemd-run", "--scope", "--quiet", "--unit="+unit, "--slice="+slice, "sleep", "300")
	require.NoError(t, cmd.Start())
	stop := func() {
		exec.Command("systemctl", "stop", unit).Run()
		cmd.Process.Kill()
		cmd.Wait()
	}
	t.Cleanup(stop)
	require.Eventually(t, func() bool {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", cmd.Process.Pid))
		return strings.Contains(string(b), "/"+unit+"\n")
	}, 10*time.Second, 10*time.Millisecond, "the process is in its scope")
	return cmd.Process.Pid, stop
}

func kernelLine(t *testing.T, pci string, xid uint64, pid int) gpu.KernelXID {
	t.Helper()
	k, ok := gpu.ParseKernelXID(fmt.Sprintf("NVRM: Xid (PCI:%s): %d, pid=%d, name=sleep, Ch 00000008, intr 10000000", pci, xid, pid))
	require.True(t, ok)
	return k
}

// Anyone with a CUDA context on a pool's GPU can raise XID 31 (a
// faulting kernel). It acts only on the pool whose scope holds the
// process the kernel names: another user's process, one in a cgroup that
// only looks like a pool's scope, or one that is gone restarts nothing
// and is journaled and counted for the GPU; NVML's event, which names no
// process, restarts nothing either.
func TestAProcessTiedXIDActsOnlyOnThePoolOfItsProcess(t *testing.T) {
	sandbox.Need(t)
	h, nv := nvmlHost(t, "", map[string]string{"a": "0", "b": "1"}, nil)
	a, b := h.pool("a"), h.pool("b")
	uuid := nv.GPU(0).UUID
	count := func(tied string) float64 {
		return testutil.ToFloat64(h.opts.Metrics.GPUXIDs.WithLabelValues(uuid, "31", tied))
	}

	// NVML's event alone.
	h.m.RouteXID(uuid, 31)
	assert.Empty(t, a.gpuCalls())
	assert.Empty(t, b.gpuCalls())
	assert.Contains(t, h.logs.String(), "GPU XID 31 on "+uuid)

	foreign := exec.Command("sleep", "300")
	require.NoError(t, foreign.Start())
	t.Cleanup(func() { foreign.Process.Kill(); foreign.Wait() })
	h.m.RouteKernelXID(kernelLine(t, "0000:00:00", 31, foreign.Process.Pid))
	// A scope of the pool's unit name in another slice, as a user's own
	// manager would make one under user.slice.
	forged, stop := inScope(t, "pool-engine-a.scope", "evil")
	h.m.RouteKernelXID(kernelLine(t, "0000:00:00", 31, forged))
	stop()
	gone := exec.Command("true")
	require.NoError(t, gone.Run())
	h.m.RouteKernelXID(kernelLine(t, "0000:00:00", 31, gone.Process.Pid))
	assert.Empty(t, a.gpuCalls(), "no pool's process")
	assert.Empty(t, b.gpuCalls())
	assert.Equal(t, 3.0, count("none"))
	assert.Contains(t, h.logs.String(), fmt.Sprintf(`msg="GPU XID of a process in no pool's scope: no pool acts" XID=31 GPU=%s PID=%d`, uuid, foreign.Process.Pid))

	engineA, _ := inScope(t, "pool-engine-a.scope", "pool-managerd-engines")
	b2, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", engineA))
	assert.Contains(t, string(b2), "0::"+engine.ScopeCgroup("a")+"\n", "systemd makes the scope where pool-managerd looks for it")
	h.m.RouteKernelXID(kernelLine(t, "0000:00:00", 31, engineA))
	assert.Equal(t, []string{"xid 31 " + uuid}, a.gpuCalls(), "a's engine faulted")
	assert.Empty(t, b.gpuCalls())
	assert.Equal(t, 1.0, count("pool"))

	// a's process on a GPU a does not use ties it to no pool there.
	h.m.RouteKernelXID(kernelLine(t, "0000:01:00", 31, engineA))
	assert.Empty(t, b.gpuCalls())
	assert.Len(t, a.gpuCalls(), 1)
	assert.Equal(t, 1.0, testutil.ToFloat64(h.opts.Metrics.GPUXIDs.WithLabelValues(nv.GPU(1).UUID, "31", "none")))
}

// A device-level XID acts on the pools of its GPU from NVML's event,
// whoever's work met it; the kernel's line of it acts on nothing more.
func TestADeviceLevelXIDActsOnEveryPoolOfItsGPU(t *testing.T) {
	h, nv := nvmlHost(t, "", map[string]string{"a": "0 1", "c": "2"}, nil)
	a, c := h.pool("a"), h.pool("c")
	uuid := nv.GPU(1).UUID
	h.m.RouteKernelXID(kernelLine(t, "0000:01:00", 94, 1))
	assert.Empty(t, a.gpuCalls(), "NVML's event carries it")
	h.m.RouteXID(uuid, 94)
	assert.Equal(t, []string{"xid 94 " + uuid}, a.gpuCalls(), "whoever's work met it")
	assert.Empty(t, c.gpuCalls())
	nv.SetHealth(1, nvmlmock.Health{RemapPending: true})
	h.m.RouteXID(uuid, 48)
	require.Len(t, a.gpuCalls(), 2)
	assert.Contains(t, a.gpuCalls()[1], "unhealthy "+uuid)
	assert.Empty(t, c.gpuCalls())
	assert.Equal(t, 1.0, testutil.ToFloat64(h.opts.Metrics.GPUXIDs.WithLabelValues(uuid, "94", "device")))
	assert.Equal(t, 1.0, testutil.ToFloat64(h.opts.Metrics.GPUXIDs.WithLabelValues(uuid, "48", "device")))
}

// A flood of XIDs from another user's process is counted in full and
// journaled within the rate limit.
func TestForeignXIDsAreRateLimitedInTheJournal(t *testing.T) {
	h, nv := nvmlHost(t, "", map[string]string{"a": "0"}, nil)
	uuid := nv.GPU(0).UUID
	for range 200 {
		h.m.RouteKernelXID(kernelLine(t, "0000:00:00", 13, 0))
	}
	assert.Empty(t, h.pool("a").gpuCalls())
	assert.Equal(t, 200.0, testutil.ToFloat64(h.opts.Metrics.GPUXIDs.WithLabelValues(uuid, "13", "none")))
	assert.Equal(t, journal.LimitBurst, strings.Count(h.logs.String(), "GPU XID of a process in no pool's scope"))
}

// inJournal waits until every marker is in a journal entry's message.
func inJournal(t *testing.T, markers ...string) {
	t.Helper()
	if missing := inJournalWithin(30*time.Second, markers...); missing != nil {
		t.Fatalf("%v not in the journal within 30 s", missing)
	}
}

// inJournalWithin waits up to d for every marker and returns those
// still missing (nil: all there).
func inJournalWithin(d time.Duration, markers ...string) []string {
	// Since a minute ago, not the last lines: the kernel's ring, which
	// other tests on the host write to, fills the journal too.
	since := fmt.Sprintf("--since=@%d", time.Now().Add(-time.Minute).Unix())
	deadline := time.Now().Add(d)
	for {
		out, _ := exec.Command("journalctl", "--boot", "--no-pager", "--output=cat", since).Output()
		var missing []string
		for _, m := range markers {
			if !strings.Contains(string(out), m) {
				missing = append(missing, m)
			}
		}
		if len(missing) == 0 || time.Now().After(deadline) {
			return missing
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// The kernel's XID lines are read from its journal entries: an XID line
// any process can log (logger, a service's output) or root can write to
// /dev/kmsg (journald marks that kernel, with the user facility) acts on
// nothing; the same line the kernel printed restarts the pool whose
// process it names.
func TestKernelXIDsAreReadFromTheKernelsJournalEntriesOnly(t *testing.T) {
	sandbox.Need(t)
	h, nv := nvmlHost(t, "", map[string]string{"a": "0"}, nil)
	a := h.pool("a")
	uuid := nv.GPU(0).UUID
	engineA, _ := inScope(t, "pool-engine-a.scope", "pool-managerd-engines")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { h.m.WatchKernelXIDs(ctx); close(done) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("the watch did not end with its context")
		}
	})
	readable := func() float64 { return testutil.ToFloat64(h.opts.Metrics.KernelLogReadable.WithLabelValues()) }
	require.Eventually(t, func() bool { return readable() == 1 }, 10*time.Second, 20*time.Millisecond, "reading the journal")

	line := func(name string) string {
		return fmt.Sprintf("NVRM: Xid (PCI:0000:00:00): 31, pid=%d, name=%s, Ch 00000008", engineA, name)
	}
	out, err := exec.Command("logger", line("forged-syslog")).CombinedOutput()
	require.NoError(t, err, "%s", out)
	cat := exec.Command("systemd-cat", "--identifier=cuda")
	cat.Stdin = strings.NewReader(line("forged-stdout") + "\n")
	out, err = cat.CombinedOutput()
	require.NoError(t, err, "%s", out)
	// journald takes "NVRM:" for the identifier of a record that is not
	// the kernel's: the message it stores begins "NVRM: Xid". The ring is
	// the host's and small (128 KiB here): other tests' OOM reports can
	// overrun it before the sandbox's journald reads the line, which is
	// then lost; it is written again until it is in the journal (each
	// copy, read, would act as much as one).
	for try := 0; ; try++ {
		kmsg, err := os.OpenFile("/dev/kmsg", os.O_WRONLY, 0)
		require.NoError(t, err)
		_, err = kmsg.WriteString("<4>NVRM: " + line("forged-kmsg"))
		kmsg.Close()
		require.NoError(t, err)
		if inJournalWithin(3*time.Second, "name=forged-kmsg") == nil || try == 9 {
			break
		}
	}
	inJournal(t, "name=forged-syslog", "name=forged-stdout", "name=forged-kmsg")

	sandbox.KernelPrints(t, fmt.Sprintf("NVRM: Xid (PCI:0000:00:00): 31, pid=%d, name=kernel, ", engineA))
	require.Eventually(t, func() bool { return len(a.gpuCalls()) > 0 }, 10*time.Second, 20*time.Millisecond, "the kernel's line acts")
	// The forged lines name pool a's engine: read, each would have acted
	// on it. (The count of lines tied to no pool is not looked at: the
	// kernel's ring is the host's, and a test of another package running
	// now may make the kernel print its own XID line.)
	assert.Equal(t, []string{"xid 31 " + uuid}, a.gpuCalls(), "the kernel's line only")
	assert.Equal(t, 1.0, testutil.ToFloat64(h.opts.Metrics.GPUXIDs.WithLabelValues(uuid, "31", "pool")), "the kernel's line only")
}

// A journal journalctl cannot read (here: run as a user outside the
// journal's groups) is said once, with journalctl's words, however often
// it is tried again, and in pool_managerd_kernel_log_readable.
func TestAnUnreadableKernelJournalIsSaidOnce(t *testing.T) {
	sandbox.Need(t)
	h, _ := nvmlHost(t, "", map[string]string{"a": "0"}, func(o *manager.Options) {
		o.Journalctl = []string{"setpriv", "--reuid=pmtest", "--regid=pmtest", "--clear-groups", "journalctl"}
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { h.m.WatchKernelXIDs(ctx); close(done) }()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	const warning = `msg="not reading XIDs from the kernel's journal entries: process-tied XIDs restart no pool (trying again)" ERROR="journalctl: exit status 1: No journal files were opened due to insufficient permissions."`
	require.Eventually(t, func() bool { return strings.Contains(h.logs.String(), warning) }, 10*time.Second, 20*time.Millisecond, h.logs.String())
	assert.Equal(t, 0.0, testutil.ToFloat64(h.opts.Metrics.KernelLogReadable.WithLabelValues()))
	// Tried again after 1 s and 2 s.
	assert.Never(t, func() bool { return strings.Count(h.logs.String(), "not reading XIDs") > 1 }, 3500*time.Millisecond, 50*time.Millisecond)
	assert.Equal(t, 0.0, testutil.ToFloat64(h.opts.Metrics.KernelLogReadable.WithLabelValues()))
}
