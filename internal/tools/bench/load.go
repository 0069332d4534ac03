package main

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
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
}

// cpuTimes are /proc/stat's first line: total, idle (with iowait) and
// steal ticks, host-wide (the sandbox shares the host's /proc/stat).
type cpuTimes struct{ total, idle, steal uint64 }

func readCPUTimes() (cpuTimes, error) {
	f, err := os.Open("/proc/stat")
	if err != nil {
		return cpuTimes{}, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	if !sc.Scan() {
		return cpuTimes{}, fmt.Errorf("/proc/stat is empty")
	}
	fields := strings.Fields(sc.Text())
	if len(fields) < 9 || fields[0] != "cpu" {
		return cpuTimes{}, fmt.Errorf("/proc/stat: unexpected first line %q", sc.Text())
	}
	var t cpuTimes
	for i, s := range fields[1:] {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return cpuTimes{}, fmt.Errorf("/proc/stat: %q: %v", s, err)
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

// hostDuring fills what the host said between two readings.
func hostDuring(load int, a, b cpuTimes) Host {
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

// startLoad runs n CPU-bound processes where a host's engines live (the
// engines' slice), each in its own transient service of the sandbox's
// systemd, for the whole run: ours and the references share the same
// contended CPUs. It returns how to stop them.
func startLoad(n int) (stop func(), err error) {
	var units []string
	stop = func() {
		if len(units) > 0 {
			exec.Command("systemctl", append([]string{"stop"}, units...)...).Run()
		}
	}
	for i := range n {
		unit := fmt.Sprintf("bench-load-%d.service", i)
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
