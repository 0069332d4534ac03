// Package load is what the bench and the soak share to run under a busy
// host's load: CPU-bound processes in the engines' slice, and what the
// host said about its CPUs meanwhile.
package load

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// Host is the machine's state during the run: what load the run added,
// and what the host itself said about its CPUs.
type Host struct {
	Load     int        `json:"load"`
	CPUs     int        `json:"cpus"`
	LoadAvg  [3]float64 `json:"loadavg_at_end"`
	BusyPct  float64    `json:"busy_pct"`
	StealPct float64    `json:"steal_pct"`
	// Weights are the CPU weights the kernel holds for the daemon and
	// the engines' slice, as found in their cgroups (cpu.weight, or v1's
	// cpu.shares): whether systemd could apply CPUWeight= at all.
	Weights string `json:"cpu_weights,omitempty"`
}

// CPUWeights says what CPU weight the kernel gives the daemon and the
// engines' slice, where the cpu controller is: cgroup v2's cpu.weight, or
// a v1 hierarchy's cpu.shares (1024 is weight 100). In a v1 hierarchy
// systemd makes a unit's own cgroup only where something needs it: the
// daemon then shares the weight of the deepest cgroup above it there.
func CPUWeights(pid int) string {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return "daemon's cgroup unreadable: " + err.Error()
	}
	var unit, root, file string
	top := ""
	for _, l := range strings.Split(strings.TrimSpace(string(raw)), "\n") {
		f := strings.SplitN(l, ":", 3)
		if len(f) != 3 {
			continue
		}
		switch {
		case f[0] == "0" && f[1] == "":
			unit = f[2]
			for _, r := range []string{"/sys/fs/cgroup", "/sys/fs/cgroup/unified"} {
				if _, err := os.Stat(r + f[2] + "/cpu.weight"); err == nil {
					root, file = r, "cpu.weight"
				}
			}
		case f[1] == "name=systemd" && unit == "":
			unit = f[2]
		case slices.Contains(strings.Split(f[1], ","), "cpu") && file == "":
			root, file = "/sys/fs/cgroup/"+f[1], "cpu.shares"
			if _, err := os.Stat(root); err != nil {
				root = "/sys/fs/cgroup/cpu"
			}
		}
	}
	if root == "" || unit == "" {
		return "no cpu controller holds the daemon's cgroup: CPUWeight= is not applied"
	}
	// The daemon is system.slice/pool-managerd.service below systemd's
	// root.
	top = filepath.Dir(filepath.Dir(unit))
	// Where a unit's weight is: its own cgroup, or the deepest one above
	// it that the hierarchy has; and the top one's, which competes with
	// the other's top one (system.slice against pool.slice).
	weight := func(cg string) string {
		at := cg
		for at != "/" && at != "." {
			if _, err := os.Stat(filepath.Join(root, at, file)); err == nil {
				break
			}
			at = filepath.Dir(at)
		}
		rel := strings.Split(strings.TrimPrefix(cg, top+"/"), "/")
		read := func(d string) string {
			b, err := os.ReadFile(filepath.Join(root, d, file))
			if err != nil {
				return "none"
			}
			return strings.TrimSpace(string(b))
		}
		return fmt.Sprintf("%s in %s (top: %s %s)", read(at), strings.TrimPrefix(at, top+"/"), rel[0], read(filepath.Join(top, rel[0])))
	}
	out, err := exec.Command("systemctl", "show", "-P", "ControlGroup", "pool-managerd-engines.slice").Output()
	engines := "not running"
	if cg := strings.TrimSpace(string(out)); err == nil && cg != "" {
		engines = weight(cg)
	}
	return fmt.Sprintf("%s: daemon %s; engines' slice %s", file, weight(unit), engines)
}

// CPUTimes are /proc/stat's first line: total, idle (with iowait) and
// steal ticks, host-wide (the sandbox shares the host's /proc/stat).
type CPUTimes struct{ total, idle, steal uint64 }

func ReadCPUTimes() (CPUTimes, error) {
	f, err := os.Open("/proc/stat")
	if err != nil {
		return CPUTimes{}, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	if !sc.Scan() {
		return CPUTimes{}, fmt.Errorf("/proc/stat is empty")
	}
	fields := strings.Fields(sc.Text())
	if len(fields) < 9 || fields[0] != "cpu" {
		return CPUTimes{}, fmt.Errorf("/proc/stat: unexpected first line %q", sc.Text())
	}
	var t CPUTimes
	for i, s := range fields[1:] {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return CPUTimes{}, fmt.Errorf("/proc/stat: %q: %v", s, err)
		}
		// user nice system idle iowait irq softirq steal guest guest_nice;
		// guest time is already counted in user.
		if i >= 8 {
			break
		}
		t.total += v
		switch i {
		case 3, 4:
			t.idle += v
		case 7:
			t.steal += v
		}
	}
	return t, nil
}

// During fills what the host said between two readings.
func During(load int, a, b CPUTimes) Host {
	h := Host{Load: load, CPUs: cpuCount()}
	if d := float64(b.total - a.total); d > 0 {
		h.BusyPct = 100 * float64((b.total-a.total)-(b.idle-a.idle)) / d
		h.StealPct = 100 * float64(b.steal-a.steal) / d
	}
	if raw, err := os.ReadFile("/proc/loadavg"); err == nil {
		fmt.Sscanf(string(raw), "%f %f %f", &h.LoadAvg[0], &h.LoadAvg[1], &h.LoadAvg[2])
	}
	return h
}

// Describe is one line for a table or a report: the load the run added
// (each of its processes there for what during says) and the host's
// CPUs over the run.
func (h Host) Describe(during string) string {
	load := "quiet (no added load)"
	if h.Load > 0 {
		load = fmt.Sprintf("load=%d: %d CPU-bound processes in the engines' slice, %s", h.Load, h.Load, during)
	}
	return fmt.Sprintf("%s; host during the run: %d CPUs, %.0f %% busy, %.1f %% steal, load average %.2f %.2f %.2f at the end",
		load, h.CPUs, h.BusyPct, h.StealPct, h.LoadAvg[0], h.LoadAvg[1], h.LoadAvg[2])
}

// Max bounds load=N: more processes than that measure the host, not the
// daemon.
const Max = 64

// Parse reads the N of load=N: 0 to Max processes.
func Parse(v string) (int, error) {
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 || n > Max {
		return 0, fmt.Errorf("load: want 0 to %d processes, got %q", Max, v)
	}
	return n, nil
}

func cpuCount() int {
	raw, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	n := 0
	for _, l := range strings.Split(string(raw), "\n") {
		if strings.HasPrefix(l, "cpu") && len(l) > 3 && l[3] >= '0' && l[3] <= '9' {
			n++
		}
	}
	return n
}

// Start runs n CPU-bound processes where a host's engines live (the
// engines' slice), each in its own transient service of the sandbox's
// systemd, for the whole run: ours and the references share the same
// contended CPUs. It returns how to stop them.
func Start(n int) (stop func(), err error) {
	var units []string
	stop = func() {
		if len(units) > 0 {
			exec.Command("systemctl", append([]string{"stop"}, units...)...).Run()
		}
	}
	for i := range n {
		unit := fmt.Sprintf("pool-load-%d.service", i)
		out, err := exec.Command("systemd-run", "--quiet", "--unit="+unit, "--slice=pool-managerd-engines.slice",
			"--property=CPUWeight=100", "/bin/sh", "-c", "while :; do :; done").CombinedOutput()
		if err != nil {
			stop()
			return nil, fmt.Errorf("starting the load %s: %v: %s", unit, err, out)
		}
		units = append(units, unit)
	}
	return stop, nil
}
