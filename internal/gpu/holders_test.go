package gpu

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fakeProc is a /proc with the given processes: name -> file -> contents;
// a file "fd/N" whose contents start with "->" is a link to the rest.
func fakeProc(t *testing.T, procs map[int]map[string]string) string {
	t.Helper()
	root := t.TempDir()
	for pid, files := range procs {
		dir := filepath.Join(root, strconv.Itoa(pid))
		require.NoError(t, os.MkdirAll(filepath.Join(dir, "fd"), 0o755))
		for name, body := range files {
			p := filepath.Join(dir, name)
			if target, ok := strings.CutPrefix(body, "->"); ok {
				require.NoError(t, os.Symlink(target, p))
				continue
			}
			require.NoError(t, os.WriteFile(p, []byte(body), 0o644))
		}
	}
	return root
}

func TestCgroupUnitOfAProcess(t *testing.T) {
	tests := []struct {
		name, cgroup, want string
	}{
		{"cgroup v2 scope", "0::/system.slice/pool-engine-x.scope\n", "pool-engine-x.scope"},
		{"cgroup v2 service", "0::/system.slice/pool-managerd.service\n", "pool-managerd.service"},
		{"a sub-cgroup of a scope", "0::/pool.slice/pool-engine-x.scope/payload\n", "pool-engine-x.scope"},
		{"a user's delegated unit", "0::/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service\n", "foo.service"},
		{"hybrid: name=systemd where the unified path names none",
			"12:memory:/x\n1:name=systemd:/system.slice/pool-engine-y.scope\n0::/\n", "pool-engine-y.scope"},
		{"hybrid: the unified path first", "1:name=systemd:/system.slice/a.service\n0::/system.slice/b.scope\n", "b.scope"},
		{"the root cgroup", "0::/\n", ""},
		{"no unit", "0::/machine.slice/libpod-1\n", ""},
		{"garbage", "not a cgroup file\n:::\n", ""},
		{"empty", "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, cgroupUnit([]byte(tt.cgroup)))
		})
	}
}

func TestHolderCommandIsBoundedAndPrintable(t *testing.T) {
	long := strings.Repeat("x", 200)
	root := fakeProc(t, map[int]map[string]string{
		10: {"comm": "llama-server\n"},
		11: {"cmdline": "/usr/bin/python3\x00-m\x00vllm.entrypoints\x00"},
		12: {"comm": "evil\x1b[2J\n"},
		13: {"cmdline": long},
		14: {"comm": "\n", "cmdline": "/opt/engine\x00"},
	})
	for pid, want := range map[int]string{10: "llama-server", 11: "python3", 12: "evil?[2J", 13: long[:maxCommand], 14: "engine", 15: ""} {
		assert.Equal(t, want, holder(root, pid).Command, "PID %d", pid)
	}
}

// The static backend's check: processes that have a GPU's node open, by
// /proc/*/fd; exiting or closed-off processes are skipped, and the
// caller itself is never one.
func TestNodeHoldersFromAFakeProc(t *testing.T) {
	self := os.Getpid()
	root := fakeProc(t, map[int]map[string]string{
		100:  {"comm": "engine\n", "cgroup": "0::/system.slice/pool-engine-a.scope\n", "fd/0": "->/dev/null", "fd/7": "->/dev/nvidia3"},
		101:  {"comm": "other\n", "fd/4": "->/dev/nvidia4", "fd/5": "->/dev/nvidiactl"},
		102:  {"comm": "both\n", "fd/4": "->/dev/nvidia4", "fd/9": "->/dev/nvidia3"},
		self: {"comm": "pool-managerd\n", "fd/3": "->/dev/nvidia3"},
	})
	require.NoError(t, os.MkdirAll(filepath.Join(root, "103"), 0o755)) // exited: no fd
	require.NoError(t, os.MkdirAll(filepath.Join(root, "self"), 0o755))

	got, err := NodeHolders(root, []string{"/dev/nvidia3"})
	require.NoError(t, err)
	assert.Equal(t, []Holder{{PID: 100, Command: "engine", Unit: "pool-engine-a.scope"}, {PID: 102, Command: "both"}}, got)

	got, err = NodeHolders(root, []string{"/dev/nvidia4", "/dev/nvidia3"})
	require.NoError(t, err)
	assert.Len(t, got, 3)

	got, err = NodeHolders(root, []string{"/dev/nvidia5"})
	require.NoError(t, err)
	assert.Empty(t, got)

	got, err = NodeHolders(root, nil)
	require.NoError(t, err)
	assert.Empty(t, got)

	_, err = NodeHolders(filepath.Join(root, "missing"), []string{"/dev/nvidia3"})
	assert.ErrorContains(t, err, "processes holding /dev/nvidia3")
}

// A real process holding a stand-in for a device node open is found with
// its PID and command, through the node's path or a link to it; a
// process without it open is not.
func TestNodeHoldersFindsARealProcess(t *testing.T) {
	if _, err := os.Stat("/proc/self/fd"); err != nil {
		t.Skip("no /proc here")
	}
	dir := t.TempDir()
	node := filepath.Join(dir, "nvidia9")
	require.NoError(t, os.WriteFile(node, nil, 0o600))
	link := filepath.Join(dir, "by-id")
	require.NoError(t, os.Symlink(node, link))

	start := func(stdin *os.File) *exec.Cmd {
		cmd := exec.Command("sleep", "30")
		cmd.Stdin = stdin
		require.NoError(t, cmd.Start())
		t.Cleanup(func() {
			cmd.Process.Kill()
			cmd.Wait()
		})
		return cmd
	}
	f, err := os.Open(node)
	require.NoError(t, err)
	holding := start(f)
	require.NoError(t, f.Close()) // only the child holds it now
	idle := start(nil)

	for _, path := range []string{node, link} {
		got, err := NodeHolders("/proc", []string{path})
		require.NoError(t, err)
		require.Len(t, got, 1, "holders of %s", path)
		assert.Equal(t, holding.Process.Pid, got[0].PID)
		assert.Equal(t, "sleep", got[0].Command)
		assert.NotEqual(t, idle.Process.Pid, got[0].PID)
	}

	require.NoError(t, holding.Process.Kill())
	_ = holding.Wait()
	got, err := NodeHolders("/proc", []string{node})
	var unchecked *UncheckedError
	if !errors.As(err, &unchecked) { // other users' processes may run here
		require.NoError(t, err)
	}
	assert.Empty(t, got, "the node is free once its holder is gone")
}

// A driver that answers a MIG handle with the whole GPU's processes still
// gives only the instance's: NVML's instance ids sort them.
func TestComputeProcessesOfAMIGDeviceKeepOnlyItsInstance(t *testing.T) {
	f := newFake()
	mig := f.gpus[1].migs[0] // GPU instance 1, compute instance 0
	mig.procs = []GPUProcess{
		{PID: 7, GPUInstance: 1, ComputeInstance: 0},
		{PID: 8, GPUInstance: 2, ComputeInstance: 0},
		{PID: 9, GPUInstance: 1, ComputeInstance: 1},
		{PID: 10, GPUInstance: NoInstance, ComputeInstance: NoInstance},
		{PID: 7, GPUInstance: 1, ComputeInstance: 0},
	}
	got, err := ComputeProcesses(f, uuidMIG, t.TempDir())
	require.NoError(t, err)
	assert.Equal(t, []Holder{{PID: 7}, {PID: 10}}, got)
	assert.Zero(t, f.open)
}

// Pools that start together share scans of /proc, and each gets a scan
// that began after it asked: a process that opened the node after one
// scan began is seen by whoever asked after that.
func TestNodeScannerSharesScansButNeverAnOlderOne(t *testing.T) {
	root := fakeProc(t, map[int]map[string]string{
		100: {"comm": "engine\n", "fd/7": "->/dev/nvidia3"},
	})
	var scans atomic.Int32
	release := make(chan struct{})
	s := &NodeScanner{ProcRoot: root}
	s.scanned = func() {
		if scans.Add(1) == 1 {
			<-release
		}
	}
	first := make(chan *NodeOpens)
	go func() {
		o, err := s.Scan()
		assert.NoError(t, err)
		first <- o
	}()
	require.Eventually(t, func() bool { return scans.Load() == 1 }, 10*time.Second, time.Millisecond, "the first scan is done and held")

	// Opened after the first scan read /proc.
	require.NoError(t, os.MkdirAll(filepath.Join(root, "101", "fd"), 0o755))
	require.NoError(t, os.Symlink("/dev/nvidia3", filepath.Join(root, "101", "fd", "4")))
	const n = 64
	var wg sync.WaitGroup
	later := make([][]Holder, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			o, err := s.Scan()
			assert.NoError(t, err)
			later[i] = o.Holders([]string{"/dev/nvidia3"})
		}()
	}
	// Every caller is waiting before the first scan is let go.
	time.Sleep(50 * time.Millisecond)
	close(release)
	o := <-first
	wg.Wait()
	assert.Len(t, o.Holders([]string{"/dev/nvidia3"}), 1, "the first scan read /proc before 101 opened the node")
	for i := range n {
		require.Len(t, later[i], 2, "caller %d got a scan that began after it asked", i)
		assert.Equal(t, 101, later[i][1].PID)
	}
	assert.Equal(t, int32(2), scans.Load(), "%d callers, one scan after the first", n)
}

// With Fresh, a scan begun that recently serves a caller too.
func TestNodeScannerTakesAFreshEnoughScan(t *testing.T) {
	root := fakeProc(t, map[int]map[string]string{100: {"comm": "engine\n", "fd/7": "->/dev/nvidia3"}})
	var scans atomic.Int32
	s := &NodeScanner{ProcRoot: root, Fresh: time.Hour}
	s.scanned = func() { scans.Add(1) }
	for range 3 {
		o, err := s.Scan()
		require.NoError(t, err)
		assert.Len(t, o.Holders([]string{"/dev/nvidia3"}), 1)
	}
	assert.Equal(t, int32(1), scans.Load())
	s.Fresh = 0
	_, err := s.Scan()
	require.NoError(t, err)
	assert.Equal(t, int32(2), scans.Load(), "without Fresh every call has its own")
}

// noPtraceEnv runs a test again without CAP_SYS_PTRACE, as the daemon
// runs: another user's /proc/PID/fd can then be listed but not read.
const noPtraceEnv = "GPU_TEST_NO_PTRACE"

// A scan that cannot read another user's open files says how many such
// processes it could not check, instead of passing; a holder it can see
// is still named.
func TestANodeScanCountsWhatItCouldNotCheck(t *testing.T) {
	if os.Geteuid() == 0 && os.Getenv(noPtraceEnv) == "" {
		other := exec.Command("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "sleep", "30")
		require.NoError(t, other.Start())
		t.Cleanup(func() { other.Process.Kill(); other.Wait() })
		exe, err := os.Executable()
		require.NoError(t, err)
		cmd := exec.Command("setpriv", "--bounding-set=-sys_ptrace", "--inh-caps=-sys_ptrace", "--",
			exe, "-test.run=^"+t.Name()+"$", "-test.count=1", "-test.v")
		cmd.Env = append(os.Environ(), noPtraceEnv+"=1")
		out, err := cmd.CombinedOutput()
		t.Logf("without CAP_SYS_PTRACE:\n%s", out)
		require.NoError(t, err)
		require.Contains(t, string(out), "--- PASS: "+t.Name())
		return
	}
	// As a user, or as root without CAP_SYS_PTRACE: processes of other
	// users (root's own, or the one started above) cannot be checked.
	node := filepath.Join(t.TempDir(), "nvidia9")
	require.NoError(t, os.WriteFile(node, nil, 0o600))
	_, err := NodeHolders("/proc", []string{node})
	var unchecked *UncheckedError
	require.ErrorAs(t, err, &unchecked, "some process of another user runs here")
	assert.Positive(t, unchecked.N)
	assert.ErrorContains(t, err, fmt.Sprintf("could not check %d processes of other users", unchecked.N))

	f, err := os.Open(node)
	require.NoError(t, err)
	holding := exec.Command("sleep", "30")
	holding.Stdin = f
	require.NoError(t, holding.Start())
	f.Close()
	t.Cleanup(func() { holding.Process.Kill(); holding.Wait() })
	got, err := NodeHolders("/proc", []string{node})
	require.NoError(t, err, "a holder found decides")
	require.Len(t, got, 1)
	assert.Equal(t, holding.Process.Pid, got[0].PID)
}
