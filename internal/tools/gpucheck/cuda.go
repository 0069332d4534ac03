package main

import (
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/llorch/pool-managerd/internal/gpu"
)

// cudaEngineScript is the CUDA engine and holder: python3 and the
// driver's libcuda.so.1, nothing else.
//
//go:embed cuda-engine.py
var cudaEngineScript []byte

const (
	// holderUnit runs the CUDA holder in the sandbox, outside every pool.
	holderUnit = "gpucheck-holder.service"
	// noGPUUnit runs the engine where no GPU node is allowed.
	noGPUUnit = "gpucheck-nogpu.scope"
	// insideLimit bounds the part in the sandbox (gpu-check.sh's
	// timeout is above the whole).
	insideLimit = 300 * time.Second
	startLimit  = 45 * time.Second // the simulator pool's first start
	holdLimit   = 30 * time.Second // the holder's context and memory on GPU 0
	// heldLimit: a start held by another process is looked at again every
	// 10 s (lifecycle.GPURetry).
	heldLimit = 45 * time.Second
	cudaLimit = 90 * time.Second // the CUDA engine's start
	holderMiB = 1024
	engineMiB = 256
)

// cudaFailed is the engine's word that CUDA failed it: a call's error, or
// no device to be seen.
var cudaFailed = regexp.MustCompile(`cuda-engine: (cu[A-Za-z_0-9]+ failed: \d+ |cuDeviceGetCount counts no device)`)

// box is the check in the sandbox: the daemon's bus, the pool, and the
// checks that failed so far.
type box struct {
	ctx    context.Context
	w      io.Writer
	p      plan
	work   string
	failed []string
}

func (x *box) sh(args ...string) (string, error) {
	out, err := exec.CommandContext(x.ctx, args[0], args[1:]...).CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// show runs a command as the operator would, with its output.
func (x *box) show(args ...string) (string, error) {
	fmt.Fprintf(x.w, "\n$ %s\n", strings.Join(args, " "))
	out, err := x.sh(args...)
	fmt.Fprint(x.w, indent(out))
	return out, err
}

func (x *box) check(ok bool, format string, a ...any) {
	if !ok {
		x.failed = append(x.failed, fmt.Sprintf(format, a...))
		fmt.Fprintf(x.w, "  FAIL: "+format+"\n", a...)
	}
}

// prop is a property of the pool as busctl prints it (`s "ready"`, `u 0`).
func (x *box) prop(name string) string {
	out, _ := x.sh("busctl", "get-property", "org.llorch.PoolManager1", "/org/llorch/PoolManager1/pool/"+pool, "org.llorch.PoolManager1.Pool", name)
	return out
}

// call calls a method of the daemon's Manager.
func (x *box) call(args ...string) (string, error) {
	return x.sh(append([]string{"busctl", "call", "org.llorch.PoolManager1", "/org/llorch/PoolManager1", "org.llorch.PoolManager1.Manager"}, args...)...)
}

func (x *box) mainPID() int {
	var pid int
	fmt.Sscanf(x.prop("MainPID"), "u %d", &pid)
	return pid
}

// waitReady waits until the pool is Ready, at most limit.
func (x *box) waitReady(limit time.Duration) (time.Duration, error) {
	start := time.Now()
	for x.prop("Ready") != "b true" {
		if x.ctx.Err() != nil {
			return time.Since(start), x.ctx.Err()
		}
		if time.Since(start) > limit {
			return time.Since(start), fmt.Errorf("not ready within %s", limit)
		}
		time.Sleep(100 * time.Millisecond)
	}
	return time.Since(start), nil
}

// dropIn replaces the check's drop-in of the pool (none for "") and
// reloads the daemon's configuration.
func (x *box) dropIn(content string) error {
	dir := filepath.Join(x.work, "etc", "pools.d", pool+".pool.d")
	f := filepath.Join(dir, "90-gpu-check.conf")
	if content == "" {
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	} else {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(f, []byte(content), 0o644); err != nil {
			return err
		}
	}
	if out, err := x.call("ReloadConfig"); err != nil {
		return fmt.Errorf("ReloadConfig: %s", out)
	}
	return nil
}

func (x *box) nvml() bool { return strings.HasPrefix(x.p.Inventory, "Backend=nvml") }

// engineArgs is the CUDA program's command line.
func (x *box) engineArgs(py string, args ...string) []string {
	a := append([]string{py, filepath.Join(x.work, "cuda-engine.py")}, args...)
	if x.p.CUDALib != "" {
		a = append(a, "--libcuda", x.p.CUDALib)
	}
	return a
}

// gpuHolders are the processes on GPU 0: NVML's compute processes, as
// the daemon reads them before a start, or with the static inventory
// those that hold GPU 0's node open (by its device number: the daemon
// and its engines see their own mounts).
func (x *box) gpuHolders() (string, []gpu.Holder, error) {
	if x.nvml() {
		hs, err := gpu.ComputeProcesses(nil, x.p.UUID, "/proc")
		return "NVML's compute processes", hs, err
	}
	hs, err := nodeOpeners("/proc", x.p.Node)
	return x.p.Node + " open (/proc)", hs, err
}

// nodeOpeners are the processes with an open file on node's device.
func nodeOpeners(procRoot, node string) ([]gpu.Holder, error) {
	var want unix.Stat_t
	if err := unix.Stat(node, &want); err != nil {
		return nil, err
	}
	fds, err := filepath.Glob(filepath.Join(procRoot, "[0-9]*", "fd", "*"))
	if err != nil {
		return nil, err
	}
	var out []gpu.Holder
	seen := map[int]bool{}
	for _, fd := range fds {
		pid, err := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(fd))))
		if err != nil || seen[pid] {
			continue
		}
		var st unix.Stat_t
		if unix.Stat(fd, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFCHR || st.Rdev != want.Rdev {
			continue
		}
		seen[pid] = true
		comm, _ := os.ReadFile(filepath.Join(procRoot, strconv.Itoa(pid), "comm"))
		out = append(out, gpu.Holder{PID: pid, Command: strings.TrimSpace(string(comm))})
	}
	return out, nil
}

// holds says whether one of hs is pid or its descendant.
func holds(hs []gpu.Holder, pid int) bool {
	for _, h := range hs {
		if pid > 0 && descends(h.PID, pid) {
			return true
		}
	}
	return false
}

func unitPID(sh func(...string) (string, error), unit string) int {
	out, _ := sh("systemctl", "show", "-p", "MainPID", "--value", unit)
	pid, _ := strconv.Atoi(out)
	return pid
}

// startHolder runs the CUDA holder as a service of its own, outside every
// pool's scope, and waits until the GPU shows it held.
func (x *box) startHolder(py string) (int, error) {
	args := []string{"systemd-run", "--quiet", "--unit=" + holderUnit, "--service-type=exec", "--setenv=CUDA_VISIBLE_DEVICES=" + x.p.UUID}
	if !x.nvml() {
		// The static inventory's check reads which node a process has
		// open in /proc: the daemon may read a root process's open files
		// only if it has no capability the daemon lacks, and in the
		// sandbox (a chroot) the path is the node's own only within the
		// daemon's mount namespace.
		args = append(args, "nsenter", "-t", strconv.Itoa(unitPID(x.sh, service)), "-m", "-r", "--",
			"setpriv", "--bounding-set=-all", "--inh-caps=-all", "--")
	}
	args = append(args, x.engineArgs(py, "--hold", "--mib", strconv.Itoa(holderMiB))...)
	if out, err := x.show(args...); err != nil {
		return 0, fmt.Errorf("the holder did not start: %s", out)
	}
	deadline := time.Now().Add(holdLimit)
	for {
		pid := unitPID(x.sh, holderUnit)
		what, hs, err := x.gpuHolders()
		if err == nil && holds(hs, pid) {
			fmt.Fprintf(x.w, "  holder pid %d seen on GPU 0 (%s: %s)\n", pid, what, holderList(hs))
			return pid, nil
		}
		if pid == 0 {
			log, _ := x.sh("journalctl", "-u", holderUnit, "--no-pager", "-o", "cat")
			return 0, fmt.Errorf("the holder ended before it held GPU 0: %s", log)
		}
		if time.Now().After(deadline) || x.ctx.Err() != nil {
			return 0, fmt.Errorf("the holder, pid %d, did not show on GPU 0 within %s (%s: %s, %v)", pid, holdLimit, what, holderList(hs), err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// judgeHeld says what is wrong with a Start answered while the holder
// holds GPU 0 (busctl's output and error) and the pool's State, LastError
// and CrashCount then.
func judgeHeld(out string, err error, state, lastError, crashes string, holder int) []string {
	var bad []string
	who := fmt.Sprintf("pid %d (", holder)
	if err == nil {
		bad = append(bad, "a start with another CUDA process on GPU 0 was not refused")
	}
	if !strings.Contains(out, "in use by "+who) {
		bad = append(bad, fmt.Sprintf("the refusal does not name the holder, pid %d: %q", holder, out))
	}
	if state != `s "failed"` {
		bad = append(bad, "the held pool's State is "+state+", not failed")
	}
	if !strings.Contains(lastError, who) {
		bad = append(bad, fmt.Sprintf("LastError does not name the holder, pid %d: %s", holder, lastError))
	}
	if crashes != "u 0" {
		bad = append(bad, "the held start counted a crash: CrashCount "+crashes)
	}
	return bad
}

// heldStart: with a CUDA process of no pool on GPU 0, a start that needs
// more than the free memory is refused (NoGPUMemory, naming it), one that
// fits is held (GPUBusy, naming it), and the pool starts by itself once
// the process ends, with no crash counted.
func (x *box) heldStart(py string) {
	defer x.sh("systemctl", "stop", holderUnit)
	holder, err := x.startHolder(py)
	if err != nil {
		x.check(false, "%v", err)
		return
	}
	if out, err := x.call("Stop", "s", pool); err != nil {
		x.check(false, "Stop: %s", out)
		return
	}
	defer x.dropIn("")
	if x.nvml() {
		m, err := gpu.MemoryUse(nil, x.p.UUID, "/proc")
		if err != nil {
			x.check(false, "GPU 0's memory, read as a start does: %v", err)
			return
		}
		fmt.Fprintf(x.w, "\n  GPU 0, read as a start reads it: %s free of %s\n", gpu.Bytes(m.Free), gpu.Bytes(m.Total))
		for _, h := range m.Holders {
			fmt.Fprintf(x.w, "  used by %s: %s\n", h.Holder, gpu.Bytes(h.Used))
		}
		need := aboveFree(m)
		if err := x.dropIn(fitDropIn(need)); err != nil {
			x.check(false, "%v", err)
			return
		}
		fmt.Fprintf(x.w, "\n$ busctl call ... Start s %s   # MemoryRequired=%d, %s over the free memory\n", pool, need, gpu.Bytes(need-m.Free))
		out, err := x.call("Start", "s", pool)
		fmt.Fprint(x.w, indent(out))
		for _, f := range judgeFit(out, err, x.p.UUID, x.prop("CrashCount"), holder) {
			x.check(false, "%s", f)
		}
		x.call("Stop", "s", pool)
		if err := x.dropIn(fitDropIn(m.Free / 2)); err != nil {
			x.check(false, "%v", err)
			return
		}
		fmt.Fprintf(x.w, "\n  MemoryRequired=%d: half the free memory, so that only the holder stands in the way\n", m.Free/2)
	}
	fmt.Fprintf(x.w, "\n$ busctl call ... Start s %s   # the holder, pid %d, on GPU 0\n", pool, holder)
	out, err := x.call("Start", "s", pool)
	fmt.Fprint(x.w, indent(out))
	state, lastError, crashes := x.prop("State"), x.prop("LastError"), x.prop("CrashCount")
	fmt.Fprintf(x.w, "  State %s, CrashCount %s\n  LastError %s\n", state, crashes, lastError)
	for _, f := range judgeHeld(out, err, state, lastError, crashes, holder) {
		x.check(false, "%s", f)
	}
	x.show("systemctl", "stop", holderUnit)
	if err == nil {
		// Not held: there is nothing to wait out.
		x.call("Stop", "s", pool)
		return
	}
	took, err := x.waitReady(heldLimit)
	if err != nil {
		x.check(false, "the pool did not start by itself once the holder ended (%v): State %s, LastError %s", err, x.prop("State"), x.prop("LastError"))
		return
	}
	fmt.Fprintf(x.w, "  the pool started by itself: Ready %.1f s after the holder ended\n", took.Seconds())
	crashes, streak := x.prop("CrashCount"), x.prop("FailureStreak")
	fmt.Fprintf(x.w, "  CrashCount %s, FailureStreak %s\n", crashes, streak)
	x.check(crashes == "u 0" && streak == "u 0", "the held start counted: CrashCount %s, FailureStreak %s", crashes, streak)
	x.call("Stop", "s", pool)
}

// cudaInfo is the CUDA engine's /cuda.
type cudaInfo struct {
	PID     int    `json:"pid"`
	Device  string `json:"device"`
	MiB     int    `json:"mib"`
	Visible string `json:"visible"`
}

func getCUDA(ctx context.Context, port int) (cudaInfo, error) {
	var info cudaInfo
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d/cuda", port), nil)
	if err != nil {
		return info, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return info, err
	}
	defer resp.Body.Close()
	return info, json.NewDecoder(io.LimitReader(resp.Body, 1<<16)).Decode(&info)
}

// inCgroupOf says whether /proc/PID/cgroup's text puts the process in
// unit.
func inCgroupOf(cgroup, unit string) bool {
	for _, l := range strings.Split(strings.TrimSpace(cgroup), "\n") {
		if strings.HasSuffix(l, "/"+unit) {
			return true
		}
	}
	return false
}

// cudaEngine: the pool runs the CUDA engine in its scope (DevicePolicy=
// closed, GPU 0's node and the control nodes allowed), which reaches Ready
// holding memory on GPU 0; the same program where no GPU node is allowed
// fails in CUDA.
func (x *box) cudaEngine(py string) {
	cmd := strings.Join(x.engineArgs(py, "--port", "%p", "--mib", strconv.Itoa(engineMiB)), " ")
	if err := x.dropIn("[Engine]\nExecStart=" + cmd + "\n"); err != nil {
		x.check(false, "%v", err)
		return
	}
	defer x.dropIn("")
	defer x.call("Stop", "s", pool)
	fmt.Fprintf(x.w, "  ExecStart=%s\n", cmd)
	if out, err := x.call("Start", "s", pool); err != nil {
		x.check(false, "the CUDA engine's start: %s", out)
		return
	}
	took, err := x.waitReady(cudaLimit)
	if err != nil {
		x.check(false, "the CUDA engine (%v): State %s, LastError %s", err, x.prop("State"), x.prop("LastError"))
		x.show("journalctl", "-u", scope, "--no-pager", "-o", "cat", "-n", "20")
		return
	}
	pid := x.mainPID()
	fmt.Fprintf(x.w, "  ready in %.1f s: pid %d\n", took.Seconds(), pid)
	out, err := x.show("systemctl", "show", "-p", "DevicePolicy", "-p", "DeviceAllow", scope)
	x.check(err == nil && strings.Contains(out, "DevicePolicy=closed"), "the CUDA engine's scope's DevicePolicy is not closed")
	cg, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	fmt.Fprintf(x.w, "\n$ cat /proc/%d/cgroup\n%s", pid, indent(string(cg)))
	x.check(err == nil && inCgroupOf(string(cg), scope), "the CUDA engine, pid %d, is not in %s", pid, scope)
	what, hs, err := x.gpuHolders()
	fmt.Fprintf(x.w, "  %s: %s\n", what, holderList(hs))
	x.check(err == nil && holds(hs, pid), "%s do not show the CUDA engine, pid %d (%v)", what, pid, err)
	info, err := getCUDA(x.ctx, x.p.Port)
	fmt.Fprintf(x.w, "  the engine says: %+v\n", info)
	x.check(err == nil && info.MiB == engineMiB && info.Visible == x.p.UUID,
		"the engine does not hold %d MiB of GPU 0 (%s): %+v %v", engineMiB, x.p.UUID, info, err)

	// The same program in a scope that allows the control nodes but no
	// GPU's: the device cgroup, not the environment, keeps it off GPU 0.
	args := []string{"systemd-run", "--scope", "--quiet", "--unit=" + noGPUUnit, "-p", "DevicePolicy=closed"}
	for _, n := range x.p.Control {
		if _, err := os.Stat(n); err == nil {
			args = append(args, "-p", "DeviceAllow="+n+" rw")
		}
	}
	args = append(append(args, "env", "CUDA_VISIBLE_DEVICES="+x.p.UUID), x.engineArgs(py, "--probe", "--mib", "16")...)
	fmt.Fprintf(x.w, "\n  where no GPU node is allowed:")
	out, err = x.show(args...)
	x.check(err != nil && cudaFailed.MatchString(out), "the CUDA program did not fail in CUDA without GPU 0's node: %v", err)
}

// noPython fails the CUDA checks on a host without python3: a failed
// prerequisite, not a pass.
const noPython = "no python3: the CUDA holder and CUDA engine checks cannot run (a failed prerequisite: install python3)"

// pythons are where a python3 every user may run is looked for before
// $PATH.
var pythons = []string{"/usr/bin/python3", "/usr/local/bin/python3", "/opt/conda/bin/python3"}

// hostCUDA says whether the CUDA program works on GPU uuid outside the
// sandbox; the checks in it judge.
func hostCUDA(ctx context.Context, py, work, uuid, lib string, w io.Writer) {
	if py == "" {
		fmt.Fprintf(w, "  %s\n", noPython)
		return
	}
	script := filepath.Join(work, "cuda-engine.py")
	if err := os.WriteFile(script, cudaEngineScript, 0o644); err != nil {
		fmt.Fprintf(w, "  %v\n", err)
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	args := []string{script, "--probe", "--mib", "16"}
	if lib != "" {
		args = append(args, "--libcuda", lib)
	}
	cmd := exec.CommandContext(ctx, py, args...)
	cmd.Env = append(os.Environ(), "CUDA_VISIBLE_DEVICES="+uuid)
	fmt.Fprintf(w, "\n$ CUDA_VISIBLE_DEVICES=%s %s %s\n", uuid, py, strings.Join(args, " "))
	start := time.Now()
	out, err := cmd.CombinedOutput()
	fmt.Fprint(w, indent(string(out)))
	if err != nil {
		fmt.Fprintf(w, "  it failed (%v): the CUDA checks in the sandbox will too\n", err)
		return
	}
	fmt.Fprintf(w, "  in %.1f s\n", time.Since(start).Seconds())
}

// findPython is a python3 every engine user may run ("": none).
func findPython() string {
	cands := append([]string(nil), pythons...)
	if p, err := exec.LookPath("python3"); err == nil {
		cands = append(cands, p)
	}
	for _, c := range cands {
		r, err := filepath.EvalSymlinks(c)
		if err != nil {
			continue
		}
		if othersMayRun(r) {
			return c
		}
	}
	return ""
}

// othersMayRun says whether any user may run the file at path: it and
// every directory above it let others in.
func othersMayRun(path string) bool {
	st, err := os.Stat(path)
	if err != nil || !st.Mode().IsRegular() || st.Mode()&0o001 == 0 {
		return false
	}
	for d := filepath.Dir(path); ; d = filepath.Dir(d) {
		st, err := os.Stat(d)
		if err != nil || st.Mode()&0o001 == 0 {
			return false
		}
		if d == "/" {
			return true
		}
	}
}
