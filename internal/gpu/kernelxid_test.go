package gpu

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
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
		{"NVRM: Xid (PCI:0001:02:00.1): 43, pid=77, name=x, Ch 00000010",
			KernelXID{PCI: "0001:02:00.1", XID: 43, PID: 77}, true},
		// Only a message the line begins: an audit record quoting a
		// user's text, or dmesg's time stamp, is not the driver's.
		{"[  123.456789] NVRM: Xid (PCI:0001:02:00.1): 43, pid=77, name=x, Ch 00000010", KernelXID{}, false},
		{"audit: type=1107 audit(1.2:3): pid=1 uid=0 msg='NVRM: Xid (PCI:0000:3b:00): 31, pid=1234, name=x, Ch 1'", KernelXID{}, false},
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

// Lines of journalctl --output=json as journald writes them (taken from
// a real journal): only an entry of the kernel transport with the
// kernel's facility is the kernel's.
const (
	// What the kernel printed itself (here a packet log whose prefix
	// root chose).
	journalKernel = `{"__MONOTONIC_TIMESTAMP":"1480384514","_TRANSPORT":"kernel","MESSAGE":"NVRM: Xid (PCI:0000:00:00): 31, pid=4242, name=x, IN= OUT=lo SRC=127.0.0.1 DST=127.0.0.1 LEN=31 ","__REALTIME_TIMESTAMP":"1796659723082914","_BOOT_ID":"09576eec203847fe94a0d2924d912909","SYSLOG_FACILITY":"0","__CURSOR":"s=05d6e1b74f3c49e5ae73537c58507211;i=63f;b=09576eec203847fe94a0d2924d912909;m=583ce002;t=6620d70939ca2;x=70fafaefee7e7345"}`
	// Root wrote "NVRM: NVRM: Xid ..." to /dev/kmsg: journald marks it
	// kernel, with the user facility the kernel gave it.
	journalKmsgByRoot = `{"PRIORITY":"4","MESSAGE":"NVRM: Xid (PCI:0000:01:00): 31, pid=42, name=x, Ch 1","SYSLOG_IDENTIFIER":"NVRM","_BOOT_ID":"09576eec203847fe94a0d2924d912909","__CURSOR":"s=9d642dc5e5c54002aafebeb4b0c56cb0;i=57f;b=09576eec203847fe94a0d2924d912909;m=5248a3e7;t=6620d6a9f6086;x=3bcbc1f1d981e010","SYSLOG_FACILITY":"1","_TRANSPORT":"kernel"}`
	// logger(1) and systemd-cat(1).
	journalSyslog = `{"_BOOT_ID":"09576eec203847fe94a0d2924d912909","MESSAGE":"NVRM: Xid (PCI:0000:01:00): 31, pid=43, name=y, Ch 1","_TRANSPORT":"syslog","SYSLOG_IDENTIFIER":"root","SYSLOG_FACILITY":"1","PRIORITY":"5"}`
	journalStdout = `{"PRIORITY":"6","MESSAGE":"NVRM: Xid (PCI:0000:01:00): 31, pid=44, name=z, Ch 1","_TRANSPORT":"stdout"}`
	// journald's own notices come as kernel entries in a container, with
	// the syslog facility.
	journalDriver = `{"_TRANSPORT":"kernel","MESSAGE":"NVRM: Xid (PCI:0000:01:00): 31, pid=45, name=z, Ch 1","SYSLOG_FACILITY":"5"}`
)

func TestKernelMessagesOfTheKernelOnly(t *testing.T) {
	msg, cursor, ok := kernelMessage([]byte(journalKernel))
	assert.True(t, ok)
	assert.True(t, strings.HasPrefix(msg, "NVRM: Xid (PCI:0000:00:00): 31, pid=4242,"), msg)
	assert.Equal(t, "s=05d6e1b74f3c49e5ae73537c58507211;i=63f;b=09576eec203847fe94a0d2924d912909;m=583ce002;t=6620d70939ca2;x=70fafaefee7e7345", cursor)
	for _, line := range []string{
		journalKmsgByRoot, journalSyslog, journalStdout, journalDriver,
		// A field twice is an array; a message that is not UTF-8 an
		// array of bytes; one over 4 KiB is null.
		`{"_TRANSPORT":["kernel","kernel"],"SYSLOG_FACILITY":"0","MESSAGE":"NVRM: Xid (PCI:0000:01:00): 31, pid=1, name=z,"}`,
		`{"_TRANSPORT":"kernel","SYSLOG_FACILITY":["0","1"],"MESSAGE":"NVRM: Xid (PCI:0000:01:00): 31, pid=1, name=z,"}`,
		`{"_TRANSPORT":"kernel","SYSLOG_FACILITY":"0","MESSAGE":[78,86,82,77]}`,
		`{"_TRANSPORT":"kernel","SYSLOG_FACILITY":"0","MESSAGE":null}`,
		`{"_TRANSPORT":"kernel","SYSLOG_FACILITY":0,"MESSAGE":"NVRM: Xid (PCI:0000:01:00): 31, pid=1, name=z,"}`,
		`{"SYSLOG_FACILITY":"0","MESSAGE":"NVRM: Xid (PCI:0000:01:00): 31, pid=1, name=z,"}`,
		`not json`, ``,
	} {
		_, _, ok := kernelMessage([]byte(line))
		assert.False(t, ok, line)
	}
}

// The reader acts on the kernel's XID lines only, skips a line too long
// to be journalctl's and goes on, and keeps the last sane cursor.
func TestKernelJournalReadsTheKernelsXIDLines(t *testing.T) {
	var j KernelJournal
	var got []KernelXID
	seen := 0
	in := strings.Join([]string{
		journalSyslog, journalKmsgByRoot,
		`{"_TRANSPORT":"kernel","SYSLOG_FACILITY":"0","MESSAGE":"NVRM: Xid (PCI:0000:02:00): 13, pid=7, name=a, ` + strings.Repeat("x", 2*maxJournalLine) + `"}`,
		journalKernel,
		`{"_TRANSPORT":"kernel","SYSLOG_FACILITY":"0","MESSAGE":"eth0: link up","__CURSOR":"` + strings.Repeat("c", maxCursor+1) + `"}`,
		journalDriver,
		`{"_TRANSPORT":"kernel","SYSLOG_FACILITY":"0","MESSAGE":"NVRM: Xid (PCI:0000:3c:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus."}`,
		`{"_TRANSPORT":"kernel","SYSLOG_FACILITY":"0","MESSAGE":"NVRM: Xid (PCI:0000:3d:00): 13, pid=9, name=a, unfinished`,
	}, "\n")
	err := j.read(strings.NewReader(in), func() { seen++ }, func(k KernelXID) { got = append(got, k) })
	assert.ErrorIs(t, err, io.EOF)
	assert.Equal(t, []KernelXID{{PCI: "0000:00:00.0", XID: 31, PID: 4242}, {PCI: "0000:3c:00.0", XID: 79}}, got)
	assert.Equal(t, 6, seen, "every whole line but the one too long")
	assert.Contains(t, j.cursor, "i=63f;", "the kernel entry's cursor; the over-long one is not kept")
}

// journalctl's arguments: from now on, then after the last entry read;
// what it says when it exits is the error.
func TestKernelJournalFollowRunsJournalctl(t *testing.T) {
	dir := t.TempDir()
	args := filepath.Join(dir, "args")
	// A stand-in for journalctl that records its arguments, prints one
	// kernel XID entry, complains and exits.
	j := KernelJournal{Command: []string{"sh", "-c", `printf '%s\n' "$@" > ` + args + `; echo '` + journalKernel + `'; echo 'Failed to iterate through journal: Bad message' >&2; exit 1`, "sh"}}
	var got []KernelXID
	readable := 0
	err := j.Follow(context.Background(), func() { readable++ }, func(k KernelXID) { got = append(got, k) })
	require.Error(t, err)
	assert.Equal(t, "journalctl: exit status 1: Failed to iterate through journal: Bad message", err.Error())
	assert.Equal(t, []KernelXID{{PCI: "0000:00:00.0", XID: 31, PID: 4242}}, got)
	assert.Equal(t, 1, readable)
	b, err := os.ReadFile(args)
	require.NoError(t, err)
	assert.Equal(t, "--dmesg\n--follow\n--no-pager\n--output=json\n--output-fields=MESSAGE,_TRANSPORT,SYSLOG_FACILITY\n--lines=0\n", string(b))

	j.Command = []string{"sh", "-c", `printf '%s\n' "$@" > ` + args + `; exit 0`, "sh"}
	readable = 0
	err = j.Follow(context.Background(), func() { readable++ }, func(KernelXID) {})
	assert.EqualError(t, err, "journalctl ended")
	assert.Zero(t, readable, "ended before it settled")
	b, err = os.ReadFile(args)
	require.NoError(t, err)
	assert.Contains(t, string(b), "--no-tail\n--after-cursor=s=05d6e1b74f3c49e5ae73537c58507211;i=63f;")
	assert.NotContains(t, string(b), "--lines=0")

	j.Command = []string{filepath.Join(dir, "journalctl")}
	err = j.Follow(context.Background(), func() { t.Error("readable") }, func(KernelXID) {})
	assert.ErrorIs(t, err, os.ErrNotExist)
}

// One that runs is readable once it settled, and ends with its context.
func TestKernelJournalFollowEndsWithItsContext(t *testing.T) {
	j := KernelJournal{Command: []string{"sh", "-c", "exec sleep 60", "sh"}}
	ctx, cancel := context.WithCancel(context.Background())
	readable := make(chan struct{})
	done := make(chan error, 1)
	go func() { done <- j.Follow(ctx, func() { close(readable) }, func(KernelXID) {}) }()
	select {
	case <-readable:
	case <-time.After(10 * time.Second):
		require.FailNow(t, "not readable after it settled")
	}
	cancel()
	select {
	case err := <-done:
		assert.NoError(t, err)
	case <-time.After(10 * time.Second):
		require.FailNow(t, "Follow did not end with its context")
	}
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
