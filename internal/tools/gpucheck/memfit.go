package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/llorch/pool-managerd/internal/gpu"
)

// fitNote is the daemon's journal line where nothing tells free memory.
const fitNote = "GPU memory fit not checked"

// hostMemory reads GPU 0's memory as the daemon does before a start
// (gpu.MemoryUse) and holds it to nvidia-smi's figures; it returns the
// GPU's total.
func hostMemory(ctx context.Context, uuid string, w io.Writer) (uint64, error) {
	m, err := gpu.MemoryUse(nil, uuid, "/proc")
	if err != nil {
		return 0, fmt.Errorf("gpu.MemoryUse: %w", err)
	}
	fmt.Fprintf(w, "  NVML: %s free of %s\n", gpu.Bytes(m.Free), gpu.Bytes(m.Total))
	for _, h := range m.Holders {
		fmt.Fprintf(w, "  used by %s: %s\n", h.Holder, gpu.Bytes(h.Used))
	}
	out, err := exec.CommandContext(ctx, "nvidia-smi", "-i", uuid, "--query-gpu=memory.total,memory.free", "--format=csv,noheader,nounits").CombinedOutput()
	fmt.Fprintf(w, "  nvidia-smi (MiB): %s", indent(string(out)))
	if err != nil {
		return 0, fmt.Errorf("nvidia-smi: %w", err)
	}
	total, free, err := parseSMIMemory(string(out))
	if err != nil {
		return 0, err
	}
	return m.Total, memoryAgrees(m, total, free)
}

// parseSMIMemory reads nvidia-smi's "total, free" line in MiB.
func parseSMIMemory(out string) (total, free uint64, err error) {
	line, _, _ := strings.Cut(strings.TrimSpace(out), "\n")
	a, b, ok := strings.Cut(line, ",")
	if ok {
		total, err = strconv.ParseUint(strings.TrimSpace(a), 10, 64)
		if err == nil {
			free, err = strconv.ParseUint(strings.TrimSpace(b), 10, 64)
		}
	}
	if !ok || err != nil {
		return 0, 0, fmt.Errorf("nvidia-smi's memory is not \"total, free\" in MiB: %q", line)
	}
	return total << 20, free << 20, nil
}

// memoryAgrees holds NVML's figures to nvidia-smi's: the same total, and
// free memory within what other processes may take or give back between
// the two reads (2% of the GPU, at least 256 MiB).
func memoryAgrees(m gpu.DeviceMemory, smiTotal, smiFree uint64) error {
	if diff(m.Total, smiTotal) >= 1<<20 {
		return fmt.Errorf("NVML says GPU 0 has %s, nvidia-smi %s", gpu.Bytes(m.Total), gpu.Bytes(smiTotal))
	}
	if m.Free > m.Total {
		return fmt.Errorf("NVML says GPU 0 has %s free of %s", gpu.Bytes(m.Free), gpu.Bytes(m.Total))
	}
	if slack := max(m.Total/50, 256<<20); diff(m.Free, smiFree) > slack {
		return fmt.Errorf("NVML says GPU 0 has %s free, nvidia-smi %s", gpu.Bytes(m.Free), gpu.Bytes(smiFree))
	}
	return nil
}

func diff(a, b uint64) uint64 {
	if a > b {
		return a - b
	}
	return b - a
}

// fitDropIn asks for more memory than GPU 0 has: no start can fit.
func fitDropIn(total uint64) string {
	return fmt.Sprintf("[Pool]\nMemoryRequired=%d\n", total+1<<30)
}

// judgeFit says what is wrong with a Start answered after fitDropIn
// (busctl's output and error) and the pool's CrashCount then.
func judgeFit(out string, err error, uuid, crashes string) []string {
	var bad []string
	if err == nil {
		bad = append(bad, "a start that needs more memory than GPU 0 has was not refused")
	}
	if !strings.Contains(out, "of GPU memory (MemoryRequired=): GPU "+uuid+" has ") {
		bad = append(bad, fmt.Sprintf("the refusal does not say GPU 0's free memory: %q", out))
	}
	if crashes != "u 0" {
		bad = append(bad, "the refused start counted a crash: CrashCount "+crashes)
	}
	return bad
}

// insideFit checks the memory fit in the sandbox with the pool ready on
// GPU 0: there it fit (the model's size times 1.2). With NVML a start
// that needs more than the GPU has is refused with NoGPUMemory and no
// crash; with the static inventory the daemon said once that it skips
// the check.
func insideFit(p plan, work string, sh func(...string) (string, error), w io.Writer) []string {
	journal, _ := sh("journalctl", "-u", service, "--no-pager", "-o", "cat")
	notes := strings.Count(journal, fitNote)
	if p.MemoryTotal == 0 {
		fmt.Fprintf(w, "\n  memory fit: the static inventory cannot tell free memory; the daemon said so %d time(s)\n", notes)
		if notes != 1 {
			return []string{fmt.Sprintf("the daemon said %d times, not once, that it skips the memory fit", notes)}
		}
		return nil
	}
	if notes != 0 {
		return []string{"the daemon skipped the memory fit on an NVML host"}
	}
	const mgr = "org.llorch.PoolManager1.Manager"
	call := func(args ...string) (string, error) {
		return sh(append([]string{"busctl", "call", "org.llorch.PoolManager1", "/org/llorch/PoolManager1", mgr}, args...)...)
	}
	if out, err := call("Stop", "s", pool); err != nil {
		return []string{"Stop: " + out}
	}
	dir := filepath.Join(work, "etc", "pools.d", pool+".pool.d")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return []string{err.Error()}
	}
	if err := os.WriteFile(filepath.Join(dir, "90-memory-fit.conf"), []byte(fitDropIn(p.MemoryTotal)), 0o644); err != nil {
		return []string{err.Error()}
	}
	if out, err := call("ReloadConfig"); err != nil {
		return []string{"ReloadConfig: " + out}
	}
	fmt.Fprintf(w, "\n$ busctl call ... Start s %s   # MemoryRequired=%d, GPU 0 has %d\n", pool, p.MemoryTotal+1<<30, p.MemoryTotal)
	out, err := call("Start", "s", pool)
	fmt.Fprint(w, indent(out))
	crashes, _ := sh("busctl", "get-property", "org.llorch.PoolManager1", "/org/llorch/PoolManager1/pool/"+pool, "org.llorch.PoolManager1.Pool", "CrashCount")
	call("Stop", "s", pool)
	return judgeFit(out, err, p.UUID, crashes)
}
