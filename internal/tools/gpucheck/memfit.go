package main

import (
	"context"
	"fmt"
	"io"
	"os/exec"
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

// fitDropIn sets the pool's MemoryRequired=.
func fitDropIn(need uint64) string {
	return fmt.Sprintf("[Pool]\nMemoryRequired=%d\n", need)
}

// aboveFree is a need over GPU 0's free memory but within what the GPU
// has: only the free memory, not the GPU's size, can refuse it.
func aboveFree(m gpu.DeviceMemory) uint64 {
	return m.Free + max((m.Total-m.Free)/2, 1)
}

// judgeFit says what is wrong with a Start answered after a drop-in that
// needs more than GPU 0's free memory (busctl's output and error), the
// pool's CrashCount then and the CUDA holder's pid.
func judgeFit(out string, err error, uuid, crashes string, holder int) []string {
	var bad []string
	if err == nil {
		bad = append(bad, "a start that needs more memory than GPU 0 has free was not refused")
	}
	if !strings.Contains(out, "of GPU memory (MemoryRequired=): GPU "+uuid+" has ") {
		bad = append(bad, fmt.Sprintf("the refusal does not say GPU 0's free memory: %q", out))
	} else if !strings.Contains(out, fmt.Sprintf("pid %d (", holder)) {
		bad = append(bad, fmt.Sprintf("the refusal does not name the holder, pid %d: %q", holder, out))
	}
	if crashes != "u 0" {
		bad = append(bad, "the refused start counted a crash: CrashCount "+crashes)
	}
	return bad
}

// insideFit checks, with the pool ready on GPU 0, that its start had the
// memory fit (the model's size times 1.2) on an NVML host; with the
// static inventory the daemon said once that it skips the check. The
// refusals are tried with a CUDA holder on the GPU (heldStart).
func insideFit(p plan, sh func(...string) (string, error), w io.Writer) []string {
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
	fmt.Fprintf(w, "\n  memory fit: the pool's start fit GPU 0's free memory (no %q in the journal)\n", fitNote)
	return nil
}
