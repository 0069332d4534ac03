package config

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"unicode"
	"unicode/utf8"

	"golang.org/x/sys/unix"
)

// The drop-ins the daemon writes for the operator (Enable, Disable, a
// reloaded model), named the way systemctl set-property names its own:
// 50-<Key>.conf, so a drop-in of the operator's that sorts later still
// wins.
const (
	AutoStartDropIn = "50-AutoStart.conf"
	ModelDropIn     = "50-Model.conf"
)

// DropInSuffix ends a pool's drop-in directory's name: <id>.pool.d.
const DropInSuffix = PoolSuffix + ".d"

// readDropIns reads pool id's drop-ins, the *.conf files of
// BASE/<id>.pool.d for each base, sorted by file name; a file in a later
// base replaces one of the same name in an earlier base (the runtime one
// under /run overrides the persistent one under /etc). A drop-in that is
// a link to /dev/null is masked: read as empty.
func readDropIns(id string, bases []string) ([]DropIn, Errors) {
	var errs Errors
	byName := map[string]string{}
	for _, b := range bases {
		dir := filepath.Join(b, id+DropInSuffix)
		if e := checkDir(b); e != nil {
			errs = append(errs, e)
			continue
		}
		if e := checkDir(dir); e != nil {
			errs = append(errs, e)
			continue
		}
		ents, err := os.ReadDir(dir)
		if err != nil {
			if !errors.Is(err, fs.ErrNotExist) {
				errs = append(errs, &Error{File: dir, Msg: err.Error()})
			}
			continue
		}
		for _, e := range ents {
			if strings.HasSuffix(e.Name(), ".conf") && !strings.HasPrefix(e.Name(), ".") {
				byName[e.Name()] = filepath.Join(dir, e.Name())
			}
		}
	}
	names := make([]string, 0, len(byName))
	for n := range byName {
		names = append(names, n)
	}
	sort.Strings(names)
	var out []DropIn
	for _, n := range names {
		f := byName[n]
		if t, err := filepath.EvalSymlinks(f); err == nil && t == os.DevNull {
			continue
		}
		data, err := readTrusted(f)
		if err != nil {
			errs = append(errs, &Error{File: f, Msg: err.Error()})
			continue
		}
		out = append(out, DropIn{File: f, Data: data})
	}
	return out, errs
}

// PoolDropInDirs are where pool id's persistent and runtime drop-ins live
// for the configuration directory dir and the runtime directory run.
func PoolDropInDirs(dir, run, id string) (persistent, runtime string) {
	return filepath.Join(dir, PoolsDir, id+DropInSuffix), filepath.Join(run, PoolsDir, id+DropInSuffix)
}

// DropInText is a drop-in that sets [section] key=value, or an error
// saying why value cannot be written as one (it would not read back as
// itself: a control character, a newline that would start another key,
// surrounding blanks, a trailing backslash).
func DropInText(section, key, value, why string) ([]byte, error) {
	switch {
	case value == "":
		return nil, fmt.Errorf("%s=: empty value", key)
	case !utf8.ValidString(value):
		return nil, fmt.Errorf("%s=: not valid UTF-8", key)
	case strings.IndexFunc(value, unicode.IsControl) >= 0:
		return nil, fmt.Errorf("%s=: a control character (a newline, a tab) cannot be written in a unit file", key)
	case strings.TrimSpace(value) != value:
		return nil, fmt.Errorf("%s=: leading or trailing blanks would be lost in a unit file", key)
	case strings.HasSuffix(value, `\`):
		return nil, fmt.Errorf(`%s=: a trailing backslash would join the next line in a unit file`, key)
	}
	text := []byte(fmt.Sprintf("# %s\n[%s]\n%s=%s\n", why, section, key, value))
	// What is written must read back as exactly that one key.
	opts, errs := readUnit("drop-in", text)
	if len(errs) > 0 || len(opts) != 1 || opts[0].section != section || opts[0].key != key || opts[0].value != value {
		return nil, fmt.Errorf("%s=%q does not read back as itself in a unit file", key, value)
	}
	return text, nil
}

// WriteDropIn replaces the drop-in dir/name with data, atomically and
// durably, through descriptors: dir's parent must exist and be root's
// (never a link), dir is made (0755) if missing, and the file is written
// as a temporary file (0644), synced and renamed into place.
func WriteDropIn(dir, name string, data []byte) error {
	if err := checkDropInName(name); err != nil {
		return err
	}
	dfd, err := openDropInDir(dir, true)
	if err != nil {
		return err
	}
	defer unix.Close(dfd)
	var rnd [8]byte
	if _, err := unix.Getrandom(rnd[:], 0); err != nil {
		return err
	}
	tmp := fmt.Sprintf(".%s.tmp-%x", name, rnd)
	fd, err := unix.Openat(dfd, tmp, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o644)
	if err != nil {
		return fmt.Errorf("%s: %w", filepath.Join(dir, tmp), err)
	}
	f := os.NewFile(uintptr(fd), filepath.Join(dir, tmp))
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(0o644)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = unix.Renameat(dfd, tmp, dfd, name)
	}
	if err != nil {
		unix.Unlinkat(dfd, tmp, 0)
		return fmt.Errorf("writing %s: %w", filepath.Join(dir, name), err)
	}
	return unix.Fsync(dfd)
}

// RemoveDropIn removes the drop-in dir/name; a missing one is no error.
func RemoveDropIn(dir, name string) error {
	if err := checkDropInName(name); err != nil {
		return err
	}
	dfd, err := openDropInDir(dir, false)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer unix.Close(dfd)
	if err := unix.Unlinkat(dfd, name, 0); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil
		}
		return fmt.Errorf("removing %s: %w", filepath.Join(dir, name), err)
	}
	return unix.Fsync(dfd)
}

func checkDropInName(name string) error {
	if name == "" || strings.ContainsRune(name, '/') || strings.HasPrefix(name, ".") || !strings.HasSuffix(name, ".conf") {
		return fmt.Errorf("drop-in name %q: one file name ending in .conf", name)
	}
	return nil
}

// openDropInDir opens dir (<id>.pool.d) beneath its parent without
// following a link at either step, making dir when create is set (and the
// parent, pools.d, when its own parent is there: under /run it is not
// made at boot). Either one writable by others than root is refused.
func openDropInDir(dir string, create bool) (int, error) {
	parent, base := filepath.Dir(dir), filepath.Base(dir)
	if create {
		if err := unix.Mkdir(parent, 0o755); err == nil {
			if fd, err := unix.Open(parent, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0); err == nil {
				unix.Fchmod(fd, 0o755) // whatever the umask
				unix.Close(fd)
			}
		} else if !errors.Is(err, unix.EEXIST) {
			return -1, fmt.Errorf("making %s: %w", parent, err)
		}
	}
	pfd, err := unix.Open(parent, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("%s: %w", parent, err)
	}
	defer unix.Close(pfd)
	if err := trustedDir(pfd, parent); err != nil {
		return -1, err
	}
	if create {
		if err := unix.Mkdirat(pfd, base, 0o755); err == nil {
			if fd, err := unix.Openat(pfd, base, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0); err == nil {
				unix.Fchmod(fd, 0o755) // whatever the umask
				unix.Close(fd)
			}
		} else if !errors.Is(err, unix.EEXIST) {
			return -1, fmt.Errorf("making %s: %w", dir, err)
		}
	}
	fd, err := unix.Openat(pfd, base, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("%s: %w", dir, err)
	}
	if err := trustedDir(fd, dir); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

// trustedDir refuses a directory others than root could write in: what
// the daemon writes there decides what root runs.
func trustedDir(fd int, name string) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	if why := untrustedOwner(st.Uid, os.FileMode(st.Mode&0o777), true); why != "" {
		return &Error{File: name, Msg: why}
	}
	return nil
}
