package gpu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
)

// KernelXID is an XID as the driver writes it to the kernel log:
// "NVRM: Xid (PCI:0000:3b:00): 31, pid=1234, name=python3, ...". Only
// this line names the process whose channel raised it: NVML's event data
// (go-nvml's EventData) carries the device, the XID and the MIG instance,
// not a process.
type KernelXID struct {
	PCI string // domain:bus:device.function, as NVML takes it
	XID uint64
	PID int // 0: the line names no process (pid='<unknown>', or an older driver)
}

// maxPID is the kernel's largest pid_max (PID_MAX_LIMIT on 64-bit).
const maxPID = 1 << 22

var kernelXIDLine = regexp.MustCompile(`NVRM: Xid \(PCI:([0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2})(?:\.([0-7]))?\): ([0-9]{1,6})(?:, pid=([0-9]{1,8}|'?<unknown>'?))?[,.]`)

// ParseKernelXID reads one kernel log message (without the /dev/kmsg
// record's prefix); false if it is no XID line.
func ParseKernelXID(msg string) (KernelXID, bool) {
	m := kernelXIDLine.FindStringSubmatch(msg)
	if m == nil {
		return KernelXID{}, false
	}
	fn := m[2]
	if fn == "" {
		fn = "0"
	}
	xid, err := strconv.ParseUint(m[3], 10, 64)
	if err != nil {
		return KernelXID{}, false
	}
	k := KernelXID{PCI: strings.ToLower(m[1]) + "." + fn, XID: xid}
	if pid, err := strconv.Atoi(m[4]); err == nil && pid > 0 && pid <= maxPID {
		k.PID = pid
	}
	return k, true
}

// kmsgRecord is one /dev/kmsg record's message, if the kernel wrote it:
// "PRI,SEQ,USEC,FLAGS[,...];MESSAGE". A record written to /dev/kmsg by a
// process has a facility other than the kernel's (0), and is not an XID.
func kmsgRecord(rec []byte) (string, bool) {
	head, msg, ok := bytes.Cut(rec, []byte{';'})
	if !ok {
		return "", false
	}
	pri, _, _ := bytes.Cut(head, []byte{','})
	p, err := strconv.Atoi(string(pri))
	if err != nil || p < 0 || p>>3 != 0 {
		return "", false
	}
	msg, _, _ = bytes.Cut(msg, []byte{'\n'})
	return string(msg), true
}

// WatchKernelXIDs reads the kernel log at path (/dev/kmsg) from its end
// and calls fn for each XID line the kernel writes, until ctx ends (then
// it returns nil) or the log cannot be read.
func WatchKernelXIDs(ctx context.Context, path string, fn func(KernelXID)) error {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return fmt.Errorf("kernel log: %w", err)
	}
	// Only what comes from now on: older XIDs were acted on before, or
	// concern engines long gone. A FIFO (in tests) cannot seek.
	f.Seek(0, io.SeekEnd)
	stop := context.AfterFunc(ctx, func() { f.Close() })
	defer func() {
		if stop() {
			f.Close()
		}
	}()
	buf := make([]byte, 16<<10)
	var rest []byte
	for {
		n, err := f.Read(buf)
		if ctx.Err() != nil {
			return nil
		}
		switch {
		case errors.Is(err, syscall.EPIPE):
			// Records were overwritten before they were read: go on
			// with the oldest one left.
			continue
		case err == io.EOF && n == 0:
			return fmt.Errorf("kernel log %s: %w", filepath.Base(path), io.ErrUnexpectedEOF)
		case err != nil && n == 0:
			return fmt.Errorf("kernel log: %w", err)
		}
		// /dev/kmsg returns one record a read; a FIFO any number of
		// lines. A record's dictionary lines begin with a space.
		rest = append(rest, buf[:n]...)
		for {
			line, more, ok := bytes.Cut(rest, []byte{'\n'})
			if !ok {
				break
			}
			rest = more
			if msg, ok := kmsgRecord(line); ok {
				if k, ok := ParseKernelXID(msg); ok {
					fn(k)
				}
			}
		}
		if len(rest) > len(buf) {
			rest = nil // a line no record can be
		}
	}
}

// CgroupOf is the cgroup v2 path of process pid, from procRoot/PID/cgroup
// ("0::" line); "" with an error if the process is gone or has none.
func CgroupOf(procRoot string, pid int) (string, error) {
	if pid <= 0 {
		return "", fmt.Errorf("pid %d", pid)
	}
	b, err := readSmall(filepath.Join(procRoot, strconv.Itoa(pid), "cgroup"))
	if err != nil {
		return "", err
	}
	for line := range bytes.Lines(b) {
		if p, ok := bytes.CutPrefix(bytes.TrimRight(line, "\n"), []byte("0::")); ok && len(p) > 0 && p[0] == '/' {
			return string(p), nil
		}
	}
	return "", fmt.Errorf("pid %d: no cgroup v2 path", pid)
}

// UUIDByPCI is the UUID of the GPU at PCI bus id busID, as NVML names it.
// Init and Shutdown are its own; a nil n is the host's NVML.
func UUIDByPCI(n NVML, busID string) (string, error) {
	if n == nil {
		n = NewNVML()
	}
	if err := n.Init(); err != nil {
		return "", err
	}
	defer n.Shutdown()
	d, err := n.DeviceByPCI(busID)
	if err != nil {
		return "", err
	}
	return d.UUID()
}
