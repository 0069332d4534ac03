package gpu

import (
	"context"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The driver's lines as they read in the kernel log, with and without a
// process, and lines that only look like one.
func TestParseKernelXID(t *testing.T) {
	for _, c := range []struct {
		line string
		want KernelXID
		ok   bool
	}{
		{"NVRM: Xid (PCI:0000:3b:00): 31, pid=1234, name=python3, Ch 00000008, intr 10000000. MMU Fault: ENGINE GRAPHICS",
			KernelXID{PCI: "0000:3b:00.0", XID: 31, PID: 1234}, true},
		{"NVRM: Xid (PCI:0000:AF:00): 13, pid=2519, name=cuda_app, Graphics SM Warp Exception on (GPC 0, TPC 0, SM 0)",
			KernelXID{PCI: "0000:af:00.0", XID: 13, PID: 2519}, true},
		{"NVRM: Xid (PCI:0000:3b:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.",
			KernelXID{PCI: "0000:3b:00.0", XID: 79}, true},
		{"NVRM: Xid (PCI:0000:3b:00): 48, An uncorrectable double bit error (DBE) has been detected on GPU in the framebuffer at partition 6.",
			KernelXID{PCI: "0000:3b:00.0", XID: 48}, true},
		{"[  123.456789] NVRM: Xid (PCI:0001:02:00.1): 43, pid=77, name=x, Ch 00000010",
			KernelXID{PCI: "0001:02:00.1", XID: 43, PID: 77}, true},
		// A pid past the kernel's limit names no process.
		{"NVRM: Xid (PCI:0000:3b:00): 31, pid=99999999, name=x, Ch 1", KernelXID{PCI: "0000:3b:00.0", XID: 31}, true},
		{"NVRM: Xid (PCI:0000:3b:00): 31, pid=0, name=x, Ch 1", KernelXID{PCI: "0000:3b:00.0", XID: 31}, true},
		{"NVRM: Xid (PCI:0000:3b:00): 31", KernelXID{}, false},
		{"NVRM: Xid (PCI:zz:3b:00): 31, pid=1, name=x,", KernelXID{}, false},
		{"NVRM: Xid (PCI:0000:3b:00): 1234567, pid=1, name=x,", KernelXID{}, false},
		{"NVRM: GPU at PCI:0000:3b:00: GPU-8f2c1a70", KernelXID{}, false},
	} {
		got, ok := ParseKernelXID(c.line)
		assert.Equal(t, c.ok, ok, c.line)
		assert.Equal(t, c.want, got, c.line)
	}
}

// Only records the kernel wrote are read: a line a process wrote to
// /dev/kmsg (facility user, or any but the kernel's) names nothing.
func TestKmsgRecordsOfTheKernelOnly(t *testing.T) {
	msg, ok := kmsgRecord([]byte("3,1024,5000000,-;NVRM: Xid (PCI:0000:3b:00): 31, pid=1, name=x, Ch 1"))
	assert.True(t, ok)
	assert.Contains(t, msg, "NVRM: Xid")
	for _, rec := range []string{
		"12,1024,5000000,-;NVRM: Xid (PCI:0000:3b:00): 31, pid=1, name=x, Ch 1", // user.warning
		"8,1,1,-;NVRM: Xid (PCI:0000:3b:00): 31, pid=1, name=x, Ch 1",
		"NVRM: Xid (PCI:0000:3b:00): 31, pid=1, name=x, Ch 1",
		"-1,1,1,-;x", "x,1,1,-;x",
	} {
		_, ok := kmsgRecord([]byte(rec))
		assert.False(t, ok, rec)
	}
}

// The watch reads records as they come, skips dictionary lines and what
// is no XID, and ends with its context.
func TestWatchKernelXIDsReadsRecordsUntilCancelled(t *testing.T) {
	fifo := filepath.Join(t.TempDir(), "kmsg")
	require.NoError(t, syscall.Mkfifo(fifo, 0o600))
	// Held open for writing (and reading, so the open does not wait).
	w, err := os.OpenFile(fifo, os.O_RDWR, 0)
	require.NoError(t, err)
	defer w.Close()
	got := make(chan KernelXID, 4)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- WatchKernelXIDs(ctx, fifo, func(k KernelXID) { got <- k }) }()
	_, err = w.WriteString("4,1,1,-;NVRM: Xid (PCI:0000:3b:00): 31, pid=42, name=a, Ch 1\n SUBSYSTEM=pci\n" +
		"6,2,2,-;eth0: link up\n" +
		"12,3,3,-;NVRM: Xid (PCI:0000:3b:00): 31, pid=43, name=forged, Ch 1\n" +
		"4,4,4,-;NVRM: Xid (PCI:0000:3c:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.\n")
	require.NoError(t, err)
	for _, want := range []KernelXID{{PCI: "0000:3b:00.0", XID: 31, PID: 42}, {PCI: "0000:3c:00.0", XID: 79}} {
		select {
		case k := <-got:
			assert.Equal(t, want, k)
		case <-time.After(5 * time.Second):
			require.FailNow(t, "no XID read")
		}
	}
	cancel()
	select {
	case err := <-done:
		assert.NoError(t, err)
	case <-time.After(5 * time.Second):
		require.FailNow(t, "the watch did not end with its context")
	}
	assert.Empty(t, got, "nothing but the kernel's XID lines")
}

// XIDs 31 and 13, which any CUDA user can raise with a faulting kernel,
// are tied to their process; what concerns the device is not.
func TestWhichXIDsAreTiedToTheirProcess(t *testing.T) {
	for _, x := range wantXIDActions[XIDRestart] {
		assert.Equal(t, x != 94, ClassifyXID(x).ProcessTied, "XID %d", x)
	}
	for _, x := range []uint64{43, 45} {
		assert.True(t, ClassifyXID(x).ProcessTied, "XID %d", x)
	}
	for _, x := range []uint64{48, 74, 79, 95, 119, 120, 144, 154, 200, 63, 92} {
		assert.False(t, ClassifyXID(x).ProcessTied, "XID %d", x)
	}
}
