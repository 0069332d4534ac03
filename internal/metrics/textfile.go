package metrics

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"
	"golang.org/x/sys/unix"
)

// writeTextfile writes g's metrics to path atomically, acting only on
// file descriptors: the directory is opened once (never through a
// symlink) and the temporary file is created, filled, chmodded and synced
// through its own descriptor, then renamed within the directory. Whoever
// can write the directory may swap names, but no name of theirs is ever
// followed (prometheus.WriteToTextfile chmods its temporary file by name,
// which a swapped-in symlink turns into a chmod of any file).
//
// A directory that is a symlink, or one another user could rename our
// files in (owned by another user, or writable by group or others, and
// not sticky), is refused.
func writeTextfile(path string, g prometheus.Gatherer) error {
	dir, name := filepath.Dir(path), filepath.Base(path)
	dfd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ELOOP) || errors.Is(err, unix.ENOTDIR) {
			return fmt.Errorf("textfile directory %s is not a directory (a symlink is refused): %w", dir, err)
		}
		return fmt.Errorf("opening textfile directory %s: %w", dir, err)
	}
	defer unix.Close(dfd)
	var st unix.Stat_t
	if err := unix.Fstat(dfd, &st); err != nil {
		return fmt.Errorf("textfile directory %s: %w", dir, err)
	}
	if err := checkTextfileDir(&st); err != nil {
		return fmt.Errorf("textfile directory %s refused: %w", dir, err)
	}

	var tmp string
	fd := -1
	for range 10 {
		var b [8]byte
		_, _ = rand.Read(b[:])
		tmp = "." + name + "." + hex.EncodeToString(b[:]) + ".tmp"
		fd, err = unix.Openat(dfd, tmp, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
		if !errors.Is(err, unix.EEXIST) {
			break
		}
	}
	if err != nil {
		return fmt.Errorf("creating a temporary file in %s: %w", dir, err)
	}
	f := os.NewFile(uintptr(fd), filepath.Join(dir, tmp))
	if err := fillTextfile(f, g); err != nil {
		f.Close()
		_ = unix.Unlinkat(dfd, tmp, 0)
		return err
	}
	if err := f.Close(); err != nil {
		_ = unix.Unlinkat(dfd, tmp, 0)
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := unix.Renameat(dfd, tmp, dfd, name); err != nil {
		_ = unix.Unlinkat(dfd, tmp, 0)
		return fmt.Errorf("renaming the textfile into %s: %w", path, err)
	}
	// The rename is durable with the directory.
	_ = unix.Fsync(dfd)
	return nil
}

// checkTextfileDir refuses a directory where another user could swap our
// names for their own: one they own, or one their group or anyone can
// write, unless it is sticky (then only we may rename or remove our
// files).
func checkTextfileDir(st *unix.Stat_t) error {
	if st.Mode&unix.S_ISVTX != 0 {
		return nil
	}
	if st.Uid != uint32(os.Geteuid()) {
		return fmt.Errorf("owned by uid %d, not by us, and not sticky", st.Uid)
	}
	if st.Mode&0o002 != 0 || st.Mode&0o020 != 0 && st.Gid != 0 {
		return fmt.Errorf("writable by others (mode %04o, gid %d) and not sticky", st.Mode&0o7777, st.Gid)
	}
	return nil
}

// fillTextfile writes g's metrics into f and makes them durable, 0644 for
// node_exporter, through f's descriptor.
func fillTextfile(f *os.File, g prometheus.Gatherer) error {
	mfs, err := g.Gather()
	if err != nil {
		return fmt.Errorf("gathering metrics: %w", err)
	}
	w := bufio.NewWriter(f)
	for _, mf := range mfs {
		if _, err := expfmt.MetricFamilyToText(w, mf); err != nil {
			return fmt.Errorf("writing metrics: %w", err)
		}
	}
	if err := w.Flush(); err != nil {
		return fmt.Errorf("writing metrics: %w", err)
	}
	if err := f.Chmod(0o644); err != nil {
		return fmt.Errorf("chmod of the textfile: %w", err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("syncing the textfile: %w", err)
	}
	return nil
}
