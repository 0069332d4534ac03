package model

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// maxSymlinks is the kernel's bound on symlinks followed in one lookup.
const maxSymlinks = 40

// errUnreachable is the cause of a RefError for a path a user cannot
// reach: nothing more is said of it, not even whether it exists.
var errUnreachable = fmt.Errorf("not found or not readable: %w", unix.EACCES)

// reach resolves the absolute path as the kernel would for u, from "/"
// down, one component at a time through descriptors (each opened
// O_PATH|O_NOFOLLOW relative to the directory checked before it), and
// checks u's rights at each step: the search bit of every directory
// passed through, the sticky-directory rule for symlinks
// (fs.protected_symlinks), and at the end the read bit of a file, or
// read and search of a directory. It returns what it reached. An error
// wrapping errUnreachable means u may not go there; another is what u
// would be told itself (the name does not exist, a loop of symlinks).
func reach(path string, u User) (unix.Stat_t, error) {
	var none unix.Stat_t
	if !strings.HasPrefix(path, "/") {
		return none, fmt.Errorf("%q is not an absolute path", path)
	}
	root, err := unix.Open("/", pathFlags|unix.O_DIRECTORY, 0)
	if err != nil {
		return none, err
	}
	defer unix.Close(root)
	// dir is where the walk is; -1 stands for root.
	dir := -1
	defer func() {
		if dir >= 0 {
			unix.Close(dir)
		}
	}()
	at := func() int {
		if dir < 0 {
			return root
		}
		return dir
	}
	var dirSt unix.Stat_t
	if err := unix.Fstat(root, &dirSt); err != nil {
		return none, err
	}
	todo := strings.Split(path, "/")
	links := 0
	for len(todo) > 0 {
		name := todo[0]
		todo = todo[1:]
		if name == "" || name == "." {
			continue
		}
		if dirSt.Mode&unix.S_IFMT != unix.S_IFDIR {
			return none, unix.ENOTDIR
		}
		if !u.canSearch(dirSt.Mode, dirSt.Uid, dirSt.Gid) {
			return none, errUnreachable
		}
		fd, err := unix.Openat(at(), name, pathFlags|unix.O_NOFOLLOW, 0)
		if err != nil {
			return none, err
		}
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			unix.Close(fd)
			return none, err
		}
		if st.Mode&unix.S_IFMT != unix.S_IFLNK {
			if dir >= 0 {
				unix.Close(dir)
			}
			dir, dirSt = fd, st
			continue
		}
		target, err := readlinkFd(fd)
		unix.Close(fd)
		if err != nil {
			return none, err
		}
		if links++; links > maxSymlinks {
			return none, unix.ELOOP
		}
		// fs.protected_symlinks: in a sticky world-writable directory,
		// only the link's owner and the directory's follow it (root too).
		if dirSt.Mode&(unix.S_ISVTX|0o002) == unix.S_ISVTX|0o002 && u.UID != st.Uid && dirSt.Uid != st.Uid {
			return none, errUnreachable
		}
		todo = append(strings.Split(target, "/"), todo...)
		if strings.HasPrefix(target, "/") {
			if dir >= 0 {
				unix.Close(dir)
				dir = -1
			}
			if err := unix.Fstat(root, &dirSt); err != nil {
				return none, err
			}
		}
	}
	if dirSt.Mode&unix.S_IFMT == unix.S_IFDIR {
		if !u.canList(dirSt.Mode, dirSt.Uid, dirSt.Gid) {
			return none, errUnreachable
		}
	} else if !u.canRead(dirSt.Mode, dirSt.Uid, dirSt.Gid) {
		return none, errUnreachable
	}
	return dirSt, nil
}

func readlinkFd(fd int) (string, error) {
	for size := 256; size <= 1<<16; size *= 4 {
		buf := make([]byte, size)
		n, err := unix.Readlinkat(fd, "", buf)
		if err != nil {
			return "", err
		}
		if n < size {
			return string(buf[:n]), nil
		}
	}
	return "", unix.ENAMETOOLONG
}

// checkReach makes sure each of users could reach the file fd names by
// path themselves: the same inode, found along a way they may take. A
// user who could not is told "not found or not readable", and nothing
// else of the path.
func checkReach(ref, path string, fd int, users []User) error {
	if len(users) == 0 {
		return errors.New("no user given to check the model against")
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return refErr(ref, path, err, "cannot be examined: %v", err)
	}
	for _, u := range users {
		got, err := reach(path, u)
		switch {
		case errors.Is(err, errUnreachable):
			return unreachable(ref, path, u)
		case err != nil:
			// What the user would be told: they may search every
			// directory on the way.
			return openErr(ref, path, err)
		case got.Dev != st.Dev || got.Ino != st.Ino:
			// Another file by that name now, or another view of the
			// filesystem: the one opened is not one the user reaches.
			return refErr(ref, path, errChanged, "%s; it changed while it was checked", unreachable(ref, path, u).Reason)
		}
	}
	return nil
}

func unreachable(ref, path string, u User) *RefError {
	return refErr(ref, path, errUnreachable, "not found or not readable by %s", u.describe())
}

// describe names u in messages.
func (u User) describe() string {
	who := strings.TrimSpace(u.Role + " " + u.Name)
	if who == "" {
		return fmt.Sprintf("uid %d", u.UID)
	}
	return fmt.Sprintf("%s (uid %d)", who, u.UID)
}

// canSearch reports whether u may pass through a directory of this mode,
// owner and group (its search bit), as the kernel decides.
func (u User) canSearch(mode, uid, gid uint32) bool {
	switch {
	case u.UID == 0:
		return true
	case uid == u.UID:
		return mode&0o100 != 0
	case u.inGroup(gid):
		return mode&0o010 != 0
	}
	return mode&0o001 != 0
}

func (u User) inGroup(gid uint32) bool {
	return gid == u.GID || slices.Contains(u.Groups, gid)
}

type callerKey struct{}

// WithCaller returns ctx carrying the user a request comes from (a bus
// caller that is not root): a model it names must be one that user could
// read itself, as well as the engine's user.
func WithCaller(ctx context.Context, u User) context.Context {
	return context.WithValue(ctx, callerKey{}, u)
}

// CallerOf returns the users WithCaller put in ctx: none for the daemon's
// own requests and root's.
func CallerOf(ctx context.Context) []User {
	if u, ok := ctx.Value(callerKey{}).(User); ok {
		return []User{u}
	}
	return nil
}
