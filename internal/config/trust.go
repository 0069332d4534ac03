package config

import (
	"fmt"
	"io"
	"os"
	"os/user"
	"syscall"
)

// trustedOwner says whether uid may own a configuration file or directory.
// The daemon runs as root, so on a host this is root alone; the daemon's own
// uid is allowed too so that an unprivileged --check-config, and tests run as
// a normal user on files they wrote, read what that user could have written
// anyway.
func trustedOwner(uid uint32) bool {
	return uid == 0 || uid == uint32(os.Geteuid())
}

// untrusted says why fi, a configuration file or directory, could have been
// written by someone other than root (or the daemon's uid): a pool file runs
// commands as root's choice of user, so whoever can write one owns the host.
// It returns "" when it could not have been.
func untrusted(fi os.FileInfo) string {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return ""
	}
	return untrustedOwner(st.Uid, fi.Mode().Perm(), fi.IsDir())
}

func untrustedOwner(uid uint32, mode os.FileMode, dir bool) string {
	if trustedOwner(uid) && mode&0o022 == 0 {
		return ""
	}
	owner := fmt.Sprint(uid)
	if u, err := user.LookupId(owner); err == nil {
		owner = u.Username
	}
	what := "file"
	if dir {
		what = "directory"
	}
	return fmt.Sprintf("%s is writable by others than root (owner %s, mode %04o): refused, since whoever can write it chooses what root runs; "+
		"make root its owner and drop group and world write (chown root; chmod go-w)", what, owner, mode)
}

// readTrusted reads a configuration file, checking the file it opened (not
// the name, which could be swapped in between) for untrusted writers.
func readTrusted(name string) ([]byte, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("not a regular file")
	}
	if why := untrusted(fi); why != "" {
		return nil, fmt.Errorf("%s", why)
	}
	return io.ReadAll(f)
}

// checkDir refuses a directory of configuration files that others than root
// may write: they could add a pool file of their own. A missing one is fine.
func checkDir(dir string) *Error {
	fi, err := os.Stat(dir)
	if err != nil {
		return nil
	}
	if why := untrusted(fi); why != "" {
		return &Error{File: dir, Msg: why}
	}
	return nil
}
