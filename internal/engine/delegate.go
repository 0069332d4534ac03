package engine

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/llorch/pool-managerd/internal/sockdiag"
)

// delegated says whether the pool's [Scope] asks for Delegate=yes.
func delegated(s Spec) bool {
	d := false
	for _, p := range s.Scope {
		if p.Name == "Delegate" {
			d, _ = p.Value.(bool)
		}
	}
	return d
}

// delegatedFiles are what a delegated cgroup's owner writes to make and
// fill cgroups beneath it, as systemd gives them to a service's User=.
// The scope's own limits (memory.max, ...) stay root's.
var delegatedFiles = []string{"cgroup.procs", "cgroup.threads", "cgroup.subtree_control"}

// delegate gives the scope's cgroup, found from the shim that waits in
// it, to the engine's user: systemd makes a delegated scope but chowns it
// to nobody (a scope has no User=). The cgroup is opened without following
// a symbolic link and changed through that descriptor only.
func delegate(shimPID int, uid, gid uint32) error {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(shimPID) + "/cgroup")
	if err != nil {
		return fmt.Errorf("Delegate=yes: the scope's cgroup: %w", err)
	}
	var cg string
	for line := range bytes.Lines(b) {
		if p, ok := bytes.CutPrefix(bytes.TrimRight(line, "\n"), []byte("0::")); ok {
			cg = string(p)
		}
	}
	if cg == "" {
		return fmt.Errorf("Delegate=yes: the shim (pid %d) is in no cgroup v2 cgroup: %w", shimPID, sockdiag.ErrNoCgroup2)
	}
	dir, err := sockdiag.CgroupDir(cg)
	if err != nil {
		return fmt.Errorf("Delegate=yes: the scope's cgroup %s: %w", cg, err)
	}
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("Delegate=yes: open %s: %w", dir, err)
	}
	defer unix.Close(fd)
	chown := func(name string, err error) error {
		if errors.Is(err, unix.EROFS) {
			return fmt.Errorf("Delegate=yes: chown %s/%s: %w (pool-managerd.service has ProtectControlGroups=yes: a delegated scope needs a drop-in with ProtectControlGroups=no)", dir, name, err)
		}
		return fmt.Errorf("Delegate=yes: chown %s/%s: %w", dir, name, err)
	}
	if err := unix.Fchown(fd, int(uid), int(gid)); err != nil {
		return chown("", err)
	}
	for _, f := range delegatedFiles {
		if err := unix.Fchownat(fd, f, int(uid), int(gid), unix.AT_SYMLINK_NOFOLLOW); err != nil && !errors.Is(err, unix.ENOENT) {
			return chown(f, err)
		}
	}
	return nil
}
