// Command gpucheck is make gpu-check: pool-managerd on this host's real
// NVIDIA GPU. On the host it prints the NVML inventory and nvidia-smi's
// view, arms an XID watch on GPU 0 for a few seconds, reads GPU 0's free
// memory as a start does and runs the CUDA program below once; then, in a
// private systemd (the project's sandbox, with the host's /dev/nvidia*
// nodes), it runs the daemon with Backend=nvml and one simulator pool on
// GPU 0 and prints the scope's DeviceAllow, what the engine may open and
// what the daemon's XID watch says. With a CUDA process of no pool on GPU 0 (cuda-engine.py --hold), a
// start needing more than the free memory is refused (NoGPUMemory), one
// that fits is held (GPUBusy), and the pool starts by itself once the
// process ends, with no crash counted. Last, the pool runs a real CUDA
// engine (cuda-engine.py: python3 and the driver's libcuda.so.1) in its
// scope, and the same program where no GPU node is allowed must fail in
// CUDA. It writes only under -work and tears the sandbox down on exit,
// failure or signal. internal/tools/gpucheck/gpu-check.sh runs it.
//
// Exit status: 0 all checks passed, 1 a check failed, 2 no GPU or not
// root.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/gpu"
	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

// NoGPU is the first line when the host has no NVIDIA GPU to check.
const NoGPU = "no NVIDIA GPU: nvidia-smi/libnvidia-ml not found"

const (
	pool    = "gpucheck"
	service = "pool-managerd.service"
	scope   = "pool-engine-" + pool + ".scope"
	// xidWarning is the daemon's log line when its XID watch fails.
	xidWarning = "not watching for GPU XID events"
)

// plan is what the host side found, for the side in the sandbox.
type plan struct {
	Bin, Work string
	// Inventory is the daemon's [Inventory] section.
	Inventory string
	UUID      string // GPU 0's
	Node      string // GPU 0's node, from its NVML minor
	Other     string // a node the pool must not open ("" if none)
	// Control are the control nodes every engine is given.
	Control []string
	// MemoryTotal is GPU 0's memory as NVML says (0: not known, as with
	// the static inventory).
	MemoryTotal uint64
	Port        int
	// CUDALib is the libcuda.so.1 the CUDA engine loads ("": the
	// driver's, where the loader finds it).
	CUDALib string
}

// exitError carries an exit status.
type exitError struct {
	code int
	err  error
}

func (e exitError) Error() string { return e.err.Error() }

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("gpu-check", flag.ContinueOnError)
	fs.SetOutput(stderr)
	work := fs.String("work", "", "the check's own directory (required): configuration, state and the sandbox live there")
	bin := fs.String("bin", "", "directory with pool-managerd, pool-managerd-shim and pool-engine-sim (default: -work/bin)")
	watch := fs.Duration("xid-watch", 3*time.Second, "how long each XID watch runs")
	holderCmd := fs.String("holder", "", "a shell command that runs compute work on GPU 0 for a while: NVML and /proc must see it hold the GPU, and see it go once killed")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	var err error
	if sandbox.Inside() {
		err = inside(*work, *watch, stdout)
	} else {
		err = outside(*work, *bin, *holderCmd, *watch, stdout, stderr)
	}
	if err == nil {
		return 0
	}
	fmt.Fprintln(stderr, "gpu-check:", err)
	var ee exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	return 1
}

func section(w io.Writer, title string) { fmt.Fprintf(w, "\n== %s\n", title) }

func outside(work, bin, holderCmd string, watch time.Duration, stdout, stderr io.Writer) error {
	start := time.Now()
	inv, err := gpu.Load(config.Inventory{Backend: config.BackendNVML}, nil, "")
	if errors.Is(err, gpu.ErrNoLibrary) {
		return exitError{2, errors.New(NoGPU)}
	}
	if err != nil {
		return exitError{2, fmt.Errorf("no NVIDIA GPU: %w", err)}
	}
	if len(inv.GPUs) == 0 {
		return exitError{2, errors.New("no NVIDIA GPU: NVML reports none")}
	}
	if _, err := exec.LookPath("nvidia-smi"); err != nil {
		return exitError{2, errors.New(NoGPU)}
	}
	if os.Geteuid() != 0 {
		return exitError{2, errors.New("needs root: it boots a private systemd in a namespace")}
	}
	if work == "" {
		return exitError{2, errors.New("-work is required")}
	}
	if bin == "" {
		bin = filepath.Join(work, "bin")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	section(stdout, "NVML inventory (Backend=nvml)")
	for _, g := range inv.GPUs {
		if g.Parent != "" {
			fmt.Fprintf(stdout, "  %d  %s  MIG on %s  %s  %d MiB\n", g.Index, g.UUID, g.Parent, g.Name, g.MemoryBytes>>20)
			continue
		}
		fmt.Fprintf(stdout, "  %d  %s  minor %d  %s  %s  %d MiB\n", g.Index, g.UUID, g.Minor, g.Node, g.Name, g.MemoryBytes>>20)
	}
	fmt.Fprintf(stdout, "  control nodes: %s\n", strings.Join(inv.Control, " "))
	g0, err := inv.Resolve([]string{"0"})
	if err != nil {
		return err
	}
	p := plan{Bin: bin, Work: work, Inventory: "Backend=nvml\n", UUID: g0[0].UUID, Node: g0[0].Node, Control: inv.Control}

	section(stdout, "nvidia-smi")
	out, err := exec.CommandContext(ctx, "nvidia-smi", "--query-gpu=index,uuid,name,memory.total,pci.bus_id", "--format=csv,noheader").CombinedOutput()
	fmt.Fprint(stdout, indent(string(out)))
	if err != nil {
		return fmt.Errorf("nvidia-smi: %w", err)
	}
	if !strings.Contains(string(out), p.UUID) {
		return fmt.Errorf("nvidia-smi does not list GPU 0's NVML UUID %s", p.UUID)
	}

	section(stdout, fmt.Sprintf("XID watch on GPU 0 for %s (host)", watch))
	if err := watchXID(ctx, p.UUID, watch, stdout); err != nil {
		return err
	}

	section(stdout, "GPU 0: free memory, as a start reads it (host)")
	if p.MemoryTotal, err = hostMemory(ctx, p.UUID, stdout); err != nil {
		return err
	}

	section(stdout, "GPU 0: usable, and who holds it (host)")
	if err := health(ctx, p, holderCmd, stdout); err != nil {
		return err
	}

	// Told here, the sandbox's CUDA failures have a cause or not.
	section(stdout, "CUDA from python3 through libcuda.so.1 (host)")
	hostCUDA(ctx, findPython(), work, p.UUID, "", stdout)

	nodes, err := deviceNodes()
	if err != nil {
		return err
	}
	section(stdout, "pool-managerd with Backend=nvml in a private systemd")
	if err := sandboxCheck(ctx, p, nodes, watch, stdout, stderr); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "\ngpu-check: OK in %.1f s\n", time.Since(start).Seconds())
	return nil
}

// sandboxCheck boots a sandbox with nodes and runs this program's inside
// part there, on a pool of GPU 0.
func sandboxCheck(ctx context.Context, p plan, nodes []sandbox.Node, watch time.Duration, stdout, stderr io.Writer) error {
	for _, n := range nodes {
		if minorRe(n.Path) && n.Path != p.Node {
			p.Other = n.Path
			break
		}
	}
	var err error
	if p.Port, err = freePort(); err != nil {
		return err
	}
	if err := prepare(p); err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	binds := []string{p.Work}
	// The driver's libraries may be a mount of their own, which the
	// sandbox's view of the root does not show.
	if st, err := os.Stat("/usr/local/nvidia"); err == nil && st.IsDir() {
		binds = append(binds, "/usr/local/nvidia")
	}
	for _, d := range []string{p.Bin, filepath.Dir(self)} {
		if !strings.HasPrefix(d+"/", p.Work+"/") {
			binds = append(binds, d)
		}
	}
	fmt.Fprintf(stdout, "  device nodes given to it: %s\n", nodeList(nodes))
	s, err := sandbox.Boot(ctx, sandbox.Options{Nodes: nodes, Binds: binds,
		Prepare: [][]string{{"useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "pool-engine"}}})
	if err != nil {
		return err
	}
	defer s.Close()
	// Should this process be killed outright, the script removes the
	// sandbox's cgroups by this name.
	if err := os.WriteFile(filepath.Join(p.Work, "sandbox-tag"), []byte(s.Tag+"\n"), 0o644); err != nil {
		return err
	}
	cmd := s.Command(ctx, "env", sandbox.InsideEnv+"=1", self, "-work", p.Work, "-xid-watch", watch.String())
	cmd.Stdout, cmd.Stderr = stdout, stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("the check in the sandbox failed: %w", err)
	}
	return nil
}

// watchXID watches for XID events as the daemon does (gpu.WatchXID) until
// d has passed.
func watchXID(ctx context.Context, uuid string, d time.Duration, w io.Writer) error {
	wctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	seen := 0
	err := gpu.WatchXID(wctx, nil, []string{uuid}, func(u string, xid uint64) {
		seen++
		fmt.Fprintf(w, "  XID %d on %s\n", xid, u)
	})
	if err != nil {
		return err
	}
	if seen == 0 {
		fmt.Fprintf(w, "  no XID event in %s\n", d)
	}
	return ctx.Err()
}

func minorRe(p string) bool {
	var n int
	_, err := fmt.Sscanf(p, "/dev/nvidia%d", &n)
	return err == nil && p == fmt.Sprintf("/dev/nvidia%d", n)
}

// deviceNodes are the host's NVIDIA character devices with their real
// numbers (nvidia-uvm's major is dynamic). nvidia-caps (MIG) is left out.
func deviceNodes() ([]sandbox.Node, error) {
	paths, err := filepath.Glob("/dev/nvidia*")
	if err != nil {
		return nil, err
	}
	var out []sandbox.Node
	for _, p := range paths {
		var st unix.Stat_t
		if err := unix.Stat(p, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFCHR {
			continue
		}
		out = append(out, sandbox.Node{Path: p, Major: unix.Major(uint64(st.Rdev)), Minor: unix.Minor(uint64(st.Rdev))})
	}
	if len(out) == 0 {
		return nil, exitError{2, errors.New("no NVIDIA GPU: no /dev/nvidia* device nodes")}
	}
	return out, nil
}

func nodeList(nodes []sandbox.Node) string {
	var s []string
	for _, n := range nodes {
		s = append(s, fmt.Sprintf("%s (%d:%d)", n.Path, n.Major, n.Minor))
	}
	return strings.Join(s, " ")
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// prepare writes the daemon's configuration, the pool, a model, the unit
// and bus policy the packages install, and the plan, all under p.Work.
func prepare(p plan) error {
	etc := filepath.Join(p.Work, "etc")
	root := filepath.Join(p.Work, "root")
	for _, d := range []string{filepath.Join(etc, "pools.d"), filepath.Join(root, "systemd"), filepath.Join(root, "dbus")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	for _, f := range []string{"systemd/pool-managerd.service", "systemd/pool-managerd-engines.slice", "dbus/org.llorch.PoolManager1.conf"} {
		b, err := os.ReadFile(f)
		if err != nil {
			return fmt.Errorf("run from the repository root: %w", err)
		}
		if err := os.WriteFile(filepath.Join(root, f), b, 0o644); err != nil {
			return err
		}
	}
	model := filepath.Join(p.Work, "model.gguf")
	files := map[string][]byte{
		model: []byte("GGUF\x03\x00\x00\x00 gpu-check"),
		filepath.Join(etc, "pool-managerd.conf"): []byte(fmt.Sprintf(`[Manager]
StateDir=%[1]s/state
RuntimeDir=%[1]s/run
CacheDir=%[1]s/cache
ModelsDir=%[1]s/models
MetricsTextfile=
[Inventory]
%[2]s`, p.Work, p.Inventory)),
		filepath.Join(etc, "pools.d", pool+".pool"): testpool.SimPoolFile(filepath.Join(p.Bin, "pool-engine-sim"), "0", model, p.Port,
			"[Health]\nIntervalSec=0.5\nTimeoutSec=0.5\n"),
	}
	// The probe says what the engine may open: its GPU's node, not
	// another's.
	pf := string(files[filepath.Join(etc, "pools.d", pool+".pool")])
	probe := p.Node
	if p.Other != "" {
		probe += "," + p.Other
	}
	files[filepath.Join(etc, "pools.d", pool+".pool")] = []byte(strings.Replace(pf, "--port %p", "--port %p --probe-devices "+probe, 1))
	files[filepath.Join(p.Work, "cuda-engine.py")] = cudaEngineScript
	pj, err := json.Marshal(p)
	if err != nil {
		return err
	}
	files[filepath.Join(p.Work, "plan.json")] = pj
	for name, b := range files {
		if err := os.WriteFile(name, b, 0o644); err != nil {
			return err
		}
	}
	return nil
}

func indent(s string) string {
	s = strings.TrimRight(s, "\n")
	if s == "" {
		return ""
	}
	return "  " + strings.ReplaceAll(s, "\n", "\n  ") + "\n"
}

// inside runs in the sandbox: the daemon as the packages install it, one
// pool on GPU 0, and what an operator would look at.
func inside(work string, watch time.Duration, w io.Writer) error {
	b, err := os.ReadFile(filepath.Join(work, "plan.json"))
	if err != nil {
		return err
	}
	var p plan
	if err := json.Unmarshal(b, &p); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), insideLimit)
	defer cancel()
	x := &box{ctx: ctx, w: w, p: p, work: work}
	// The sandbox's end takes everything with it; this is the orderly way.
	defer func() {
		c, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		exec.CommandContext(c, "systemctl", "stop", service, scope, holderUnit).Run()
	}()

	if err := testpool.InstallDaemon(filepath.Join(work, "root"), filepath.Join(p.Bin, "pool-managerd"), filepath.Join(work, "etc")); err != nil {
		return err
	}
	if _, err := x.waitReady(startLimit); err != nil {
		journal, _ := x.sh("journalctl", "-u", service, "--no-pager", "-o", "cat", "-n", "30")
		return fmt.Errorf("pool %s not ready (%v; state %s, last error %s); the daemon's journal:\n%s", pool, err, x.prop("State"), x.prop("LastError"), journal)
	}
	fmt.Fprintf(w, "  pool %s ready on GPU 0\n", pool)

	out, err := x.show("systemctl", "show", "-p", "DevicePolicy", "-p", "DeviceAllow", scope)
	x.check(err == nil && strings.Contains(out, "DevicePolicy=closed"), "the scope's DevicePolicy is not closed")
	x.check(strings.Contains(out, "DeviceAllow="+p.Node+" rw"), "the scope does not allow GPU 0's node %s (from its NVML minor)", p.Node)
	if p.Other != "" {
		x.check(!strings.Contains(out, p.Other+" "), "the scope allows %s, another GPU's node", p.Other)
	}

	pid := x.mainPID()
	env, _ := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	fmt.Fprintf(w, "\n$ tr '\\0' '\\n' < /proc/%d/environ | grep VISIBLE_DEVICES\n", pid)
	var visible string
	for _, kv := range strings.Split(string(env), "\x00") {
		if strings.Contains(kv, "VISIBLE_DEVICES=") {
			fmt.Fprintf(w, "  %s\n", kv)
		}
		if v, ok := strings.CutPrefix(kv, "CUDA_VISIBLE_DEVICES="); ok {
			visible = v
		}
	}
	x.check(visible == p.UUID, "the engine's CUDA_VISIBLE_DEVICES is %q, not GPU 0's UUID %s", visible, p.UUID)

	fmt.Fprintf(w, "\n$ curl http://127.0.0.1:%d/sim/devices   # what the engine may open\n", p.Port)
	opened, err := probe(ctx, p.Port)
	if err != nil {
		x.check(false, "asking the engine what it may open: %v", err)
	}
	for n, r := range opened {
		fmt.Fprintf(w, "  %s: %s\n", n, r)
	}
	// EPERM is the device cgroup's refusal; a fake node without a driver
	// answers ENXIO once let through.
	own := opened[p.Node]
	x.check(own != "" && own != "EPERM", "the engine may not open its GPU's node %s: %s", p.Node, own)
	if p.Other != "" {
		x.check(opened[p.Other] == "EPERM", "the engine opens another GPU's node %s: %s, not EPERM", p.Other, opened[p.Other])
	}

	x.show("nvidia-smi")

	fmt.Fprintf(w, "\n  the daemon's XID watch runs %s...\n", watch)
	select {
	case <-time.After(watch):
	case <-ctx.Done():
	}
	journal, _ := x.sh("journalctl", "-u", service, "--no-pager", "-o", "cat")
	if i := strings.Index(journal, xidWarning); i >= 0 {
		line, _, _ := strings.Cut(journal[i:], "\n")
		x.check(false, "the daemon's XID watch failed: %s", line)
	} else {
		fmt.Fprintf(w, "  armed: no NVML error from the daemon's watch in %s\n", watch)
	}
	for _, f := range insideFit(p, x.sh, w) {
		x.check(false, "%s", f)
	}

	section(w, "a CUDA process outside the pool holds GPU 0")
	if py := findPython(); py == "" {
		x.check(false, noPython)
	} else {
		x.heldStart(py)
		section(w, "a CUDA engine in the pool's scope")
		x.cudaEngine(py)
	}
	x.show("journalctl", "-u", service, "--no-pager", "-o", "cat", "-n", "12")

	if len(x.failed) > 0 {
		return fmt.Errorf("%d check(s) failed:\n  %s", len(x.failed), strings.Join(x.failed, "\n  "))
	}
	return nil
}

func probe(ctx context.Context, port int) (map[string]string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d/sim/devices", port), nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	out := map[string]string{}
	return out, json.NewDecoder(io.LimitReader(resp.Body, 1<<16)).Decode(&out)
}

// health asks what the daemon asks before it restarts a held pool
// (gpu.Usable) and before every launch (who runs compute work on the GPU,
// who has its node open). With a holder command, it must see the holder
// come and go as NVML and /proc report it.
func health(ctx context.Context, p plan, holderCmd string, w io.Writer) error {
	ok, why, err := gpu.Usable(nil, p.UUID)
	if err != nil {
		return fmt.Errorf("gpu.Usable: %w", err)
	}
	if !ok {
		return fmt.Errorf("GPU 0 is not usable: %s", why)
	}
	fmt.Fprintf(w, "  usable: answers by UUID, no reset pending (recovery action, row remaps, retired pages)\n")
	holders := func() ([]gpu.Holder, []gpu.Holder, error) {
		cp, err := gpu.ComputeProcesses(nil, p.UUID, "/proc")
		if err != nil {
			return nil, nil, err
		}
		nh, err := gpu.NodeHolders("/proc", []string{p.Node})
		var unchecked *gpu.UncheckedError
		if errors.As(err, &unchecked) {
			// Shown, not fatal: the daemon says the same in LastError.
			fmt.Fprintf(w, "  %s\n", err)
			err = nil
		}
		return cp, nh, err
	}
	cp, nh, err := holders()
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "  compute processes (NVML): %s\n  %s open (/proc): %s\n", holderList(cp), p.Node, holderList(nh))
	if holderCmd == "" {
		return nil
	}
	cmd := exec.CommandContext(ctx, "sh", "-c", holderCmd)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("holder: %w", err)
	}
	pid := cmd.Process.Pid
	exited := make(chan struct{})
	var waitErr error
	go func() {
		waitErr = cmd.Wait()
		close(exited)
	}()
	defer func() {
		syscall.Kill(-pid, syscall.SIGKILL)
		<-exited
	}()
	fmt.Fprintf(w, "  holder started: PID %d: %s\n", pid, holderCmd)
	start := time.Now()
	in := func(hs []gpu.Holder) bool {
		for _, h := range hs {
			if descends(h.PID, pid) {
				return true
			}
		}
		return false
	}
	for {
		cp, nh, err = holders()
		if err != nil {
			return err
		}
		if in(cp) && in(nh) {
			break
		}
		select {
		case <-exited:
			return fmt.Errorf("the holder ended (%v) before NVML and /proc both saw it: compute %s, node %s", waitErr, holderList(cp), holderList(nh))
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		if time.Since(start) > 60*time.Second {
			return fmt.Errorf("the holder did not show on GPU 0 in 60 s: compute %s, node %s", holderList(cp), holderList(nh))
		}
	}
	fmt.Fprintf(w, "  after %.1f s: compute processes %s; %s open by %s\n", time.Since(start).Seconds(), holderList(cp), p.Node, holderList(nh))
	syscall.Kill(-pid, syscall.SIGKILL)
	killed := time.Now()
	<-exited
	for {
		cp, nh, err = holders()
		if err != nil {
			return err
		}
		if !in(cp) && !in(nh) {
			break
		}
		if time.Since(killed) > 10*time.Second {
			return fmt.Errorf("GPU 0 still held 10 s after the holder was killed: compute %s, node %s", holderList(cp), holderList(nh))
		}
		time.Sleep(20 * time.Millisecond)
	}
	fmt.Fprintf(w, "  killed: gone from NVML and /proc %.0f ms later\n", float64(time.Since(killed).Microseconds())/1000)
	return nil
}

// descends says whether pid is root or one of its descendants.
func descends(pid, root int) bool {
	for i := 0; i < 64 && pid > 1; i++ {
		if pid == root {
			return true
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return false
		}
		// The command may hold spaces and parentheses: the fields follow
		// the last ')'.
		end := bytes.LastIndexByte(b, ')')
		if end < 0 {
			return false
		}
		var state string
		if _, err := fmt.Sscan(string(b[end+1:]), &state, &pid); err != nil {
			return false
		}
	}
	return pid == root
}

func holderList(hs []gpu.Holder) string {
	if len(hs) == 0 {
		return "none"
	}
	var s []string
	for _, h := range hs {
		s = append(s, h.String())
	}
	return strings.Join(s, ", ")
}
