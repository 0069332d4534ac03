package model

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// trustEnv is a models directory, a further allowed directory, a directory
// outside both and a staging directory, all under one temporary root.
type trustEnv struct {
	s                             *Stager
	models, extra, outside, stage string
}

func newTrustEnv(t *testing.T) trustEnv {
	t.Helper()
	root := tempDir(t)
	e := trustEnv{
		models:  filepath.Join(root, "models"),
		extra:   filepath.Join(root, "extra"),
		outside: filepath.Join(root, "outside"),
		stage:   filepath.Join(root, "stage"),
	}
	for _, d := range []string{e.models, e.extra, e.outside} {
		require.NoError(t, os.Mkdir(d, 0o755))
	}
	e.s = newStager(t, e.models, e.stage, WithModelDirs(e.extra))
	return e
}

// A ref from the bus may not name just any file the daemon (root) can
// read: only files beneath the allowed directories, or a pool file's own
// Model=.
func TestRefOutsideModelDirsIsRefused(t *testing.T) {
	e := newTrustEnv(t)
	secret := filepath.Join(e.outside, "id_rsa")
	writeFile(t, secret, "-----BEGIN OPENSSH PRIVATE KEY-----")
	require.NoError(t, os.Mkdir(e.models+"-evil", 0o755))
	writeFile(t, filepath.Join(e.models+"-evil", "m.gguf"), "lookalike directory")

	for _, ref := range []string{
		secret,
		"file://" + secret,
		e.models + "/../outside/id_rsa",
		e.extra + "/../outside/id_rsa",
		e.models + "-evil/m.gguf",
		e.models,
		"/etc/passwd",
	} {
		t.Run(ref, func(t *testing.T) {
			_, err := e.s.Resolve(ref, engineUser)
			var re *RefError
			require.ErrorAs(t, err, &re)
			assert.Equal(t, ref, re.Ref)
			assert.Contains(t, err.Error(), "not beneath an allowed model directory ("+e.models+", "+e.extra+") and not a pool file's Model=")
			_, err = e.s.Stage(ref, "", engineUser)
			require.ErrorAs(t, err, &re)
			assert.NoDirExists(t, e.stage, "nothing staged, nothing created")
		})
	}

	// A pool file naming it makes it a model (in any spelling of the same
	// path); a configuration without that pool makes it a secret again.
	e.s.SetPoolModels([]string{"file://" + secret})
	for _, ref := range []string{secret, "file://" + secret} {
		_, err := e.s.Stage(ref, "", engineUser)
		require.NoError(t, err, ref)
	}
	_, err := e.s.Resolve(e.outside+"/./id_rsa", engineUser)
	assert.ErrorContains(t, err, "not beneath an allowed model directory", "only the pool file's exact path")
	e.s.SetPoolModels(nil)
	_, err = e.s.Resolve(secret, engineUser)
	assert.ErrorContains(t, err, "not beneath an allowed model directory")
}

// Beneath an allowed directory, no symlink may lead out of it.
func TestSymlinkEscapeIsRefused(t *testing.T) {
	e := newTrustEnv(t)
	secret := filepath.Join(e.outside, "secret.gguf")
	writeFile(t, secret, "secret")
	require.NoError(t, os.Symlink("../outside/secret.gguf", filepath.Join(e.models, "rel.gguf")))
	require.NoError(t, os.Symlink(secret, filepath.Join(e.extra, "abs.gguf")))
	require.NoError(t, os.Symlink("../outside", filepath.Join(e.extra, "dir")))
	require.NoError(t, os.Symlink("/proc/self/root"+secret, filepath.Join(e.models, "magic.gguf")))

	tests := []struct{ ref, dir string }{
		{"rel.gguf", e.models},
		{filepath.Join(e.models, "rel.gguf"), e.models},
		{"file://" + filepath.Join(e.models, "rel.gguf"), e.models},
		{filepath.Join(e.extra, "abs.gguf"), e.extra},
		{filepath.Join(e.extra, "dir", "secret.gguf"), e.extra},
		{filepath.Join(e.models, "magic.gguf"), e.models},
	}
	for _, tt := range tests {
		t.Run(tt.ref, func(t *testing.T) {
			_, err := e.s.Stage(tt.ref, "", engineUser)
			var re *RefError
			require.ErrorAs(t, err, &re)
			assert.Contains(t, err.Error(), "escapes the model directory "+tt.dir)
			assert.NoDirExists(t, e.stage)
		})
	}
}

// Staging leaves the operator's file exactly as it was, by link or copy.
func TestOperatorFileModeIsUnchanged(t *testing.T) {
	needChown(t)
	for _, copied := range []bool{false, true} {
		t.Run(map[bool]string{false: "hard link", true: "copy"}[copied], func(t *testing.T) {
			e := newTrustEnv(t)
			path := filepath.Join(e.models, "m.gguf")
			writeFile(t, path, "operator's model")
			require.NoError(t, os.Chown(path, int(engineUser.UID), 1234))
			require.NoError(t, os.Chmod(path, 0o640))
			old := time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC)
			require.NoError(t, os.Chtimes(path, old, old))
			if copied {
				e.s.link = func(string, string) error { return syscall.EXDEV }
			}
			before := lstat(t, path)

			st, err := e.s.Stage("m.gguf", "", engineUser)
			require.NoError(t, err)
			requireStaged(t, st, "operator's model")
			after := lstat(t, path)
			assert.Equal(t, before.Mode, after.Mode, "mode")
			assert.Equal(t, [2]uint32{before.Uid, before.Gid}, [2]uint32{after.Uid, after.Gid}, "owner")
			assert.Equal(t, before.Mtim, after.Mtim, "never rewritten")
			data, err := os.ReadFile(path)
			require.NoError(t, err)
			assert.Equal(t, "operator's model", string(data))
			assert.Equal(t, !copied, after.Ino == lstat(t, st.Path).Ino)
		})
	}
}

// A copy (the staging directory on another filesystem, a real tmpfs) has
// the source's owner and group and only its read bits.
func TestCopyIsNoMoreReadableThanSource(t *testing.T) {
	needChown(t)
	tests := []struct {
		name     string
		mode     uint32
		uid, gid int
		want     uint32
	}{
		{"owner only", 0o600, int(engineUser.UID), 0, 0o400},
		{"group", 0o640, 0, int(engineUser.GID), 0o440},
		{"everyone, executable", 0o755, 0, 0, 0o444},
		{"other but not group", 0o604, 0, 0, 0o404},
		{"setuid and sticky dropped", 0o7755, 0, 0, 0o444},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newTrustEnv(t)
			mountTmpfs(t, e.stage)
			path := filepath.Join(e.models, "m.gguf")
			writeFile(t, path, "model")
			require.NoError(t, os.Chown(path, tt.uid, tt.gid))
			require.NoError(t, os.Chmod(path, os.FileMode(tt.mode&0o777)|unixModeBits(tt.mode)))

			st, err := e.s.Stage("m.gguf", "", engineUser)
			require.NoError(t, err)
			got := lstat(t, st.Path)
			assert.NotEqual(t, lstat(t, path).Ino, got.Ino, "a copy")
			assert.Equal(t, tt.want, got.Mode&0o7777)
			assert.Equal(t, [2]uint32{uint32(tt.uid), uint32(tt.gid)}, [2]uint32{got.Uid, got.Gid})
			assert.Equal(t, tt.mode, lstat(t, path).Mode&0o7777, "the source is left alone")
		})
	}
}

func unixModeBits(mode uint32) os.FileMode {
	var m os.FileMode
	if mode&unix.S_ISUID != 0 {
		m |= os.ModeSetuid
	}
	if mode&unix.S_ISGID != 0 {
		m |= os.ModeSetgid
	}
	if mode&unix.S_ISVTX != 0 {
		m |= os.ModeSticky
	}
	return m
}

// Opening /dev/watchdog for reading arms a host reset; opening a FIFO
// blocks or wakes its writer. A model ref naming such a node is refused
// from an O_PATH descriptor: inotify sees no open at all.
func TestDeviceNodeIsNeverOpenedForReading(t *testing.T) {
	e := newTrustEnv(t)
	dev := filepath.Join(e.models, "watchdog")
	if err := unix.Mknod(dev, unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))); err != nil {
		t.Skipf("cannot make a device node here: %v", err)
	}
	fifo := filepath.Join(e.extra, "fifo")
	require.NoError(t, unix.Mkfifo(fifo, 0o666))
	require.NoError(t, os.Symlink("watchdog", filepath.Join(e.models, "model.gguf")))
	e.s.SetPoolModels([]string{dev, fifo})

	in, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	require.NoError(t, err)
	defer unix.Close(in)
	for _, p := range []string{dev, fifo} {
		_, err := unix.InotifyAddWatch(in, p, unix.IN_OPEN|unix.IN_ACCESS)
		require.NoError(t, err)
	}
	opens := func() int {
		var buf [4096]byte
		n, err := unix.Read(in, buf[:])
		if errors.Is(err, unix.EAGAIN) {
			return 0
		}
		require.NoError(t, err)
		return n / unix.SizeofInotifyEvent
	}

	for ref, want := range map[string]string{
		"watchdog":       "is not a regular file or a directory (it is a character device)",
		"model.gguf":     "is not a regular file or a directory (it is a character device)",
		dev:              "is not a regular file or a directory (it is a character device)",
		fifo:             "is not a regular file or a directory (it is a named pipe)",
		"file://" + fifo: "is not a regular file or a directory (it is a named pipe)",
	} {
		_, err := e.s.Resolve(ref, engineUser)
		assert.ErrorContains(t, err, want, ref)
		_, err = e.s.Stage(ref, "", engineUser)
		assert.ErrorContains(t, err, want, ref)
		assert.Zero(t, opens(), "%s was opened", ref)
	}

	// The watch does see an open for reading.
	f, err := os.OpenFile(dev, os.O_RDONLY, 0)
	require.NoError(t, err)
	f.Close()
	assert.Positive(t, opens())
}

// The engine's user must be able to read the file by its mode bits: the
// daemon (root) does not read or link for it what it could not read itself.
func TestRefUnreadableByEngineUserIsRefused(t *testing.T) {
	needChown(t)
	withGroup := User{Name: "engine-g", UID: 4343, GID: 4343, Groups: []uint32{5000, engineUser.GID}, Role: "the engine's user"}
	tests := []struct {
		name     string
		mode     os.FileMode
		uid, gid int
		user     User
		readable bool
	}{
		{"root's private file", 0o600, 0, 0, engineUser, false},
		{"root's group file", 0o640, 0, 0, engineUser, false},
		{"world-readable", 0o644, 0, 0, engineUser, true},
		{"other bits alone", 0o004, 0, 0, engineUser, true},
		{"primary group", 0o640, 0, int(engineUser.GID), engineUser, true},
		{"supplementary group", 0o640, 0, 5000, withGroup, true},
		{"supplementary group without read", 0o604, 0, 5000, withGroup, false},
		{"owner", 0o400, int(engineUser.UID), 0, engineUser, true},
		{"owner bits win over other bits", 0o044, int(engineUser.UID), 0, engineUser, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newTrustEnv(t)
			path := filepath.Join(e.models, "m.gguf")
			writeFile(t, path, "model")
			require.NoError(t, os.Chown(path, tt.uid, tt.gid))
			require.NoError(t, os.Chmod(path, tt.mode))
			e.s.SetPoolModels([]string{path})

			for _, ref := range []string{"m.gguf", path} {
				_, err := e.s.Stage(ref, "", tt.user)
				if tt.readable {
					require.NoError(t, err, ref)
					continue
				}
				var re *RefError
				require.ErrorAs(t, err, &re, ref)
				assert.ErrorIs(t, err, os.ErrPermission)
				assert.Contains(t, err.Error(), fmt.Sprintf("not found or not readable by the engine's user %s (uid %d)", tt.user.Name, tt.user.UID))
				assert.NoDirExists(t, e.stage)
			}
		})
	}

	t.Run("a real user from NSS", func(t *testing.T) {
		e := newTrustEnv(t)
		path := filepath.Join(e.models, "m.gguf")
		writeFile(t, path, "model")
		require.NoError(t, os.Chmod(path, 0o600))
		nobody, err := LookupUser("nobody")
		require.NoError(t, err)
		_, err = e.s.Stage("m.gguf", "", nobody)
		assert.ErrorContains(t, err, "not found or not readable by the engine's user nobody (uid 65534)")
	})
	t.Run("a user of a pool's own, in no database", func(t *testing.T) {
		e := newTrustEnv(t)
		path := filepath.Join(e.models, "m.gguf")
		writeFile(t, path, "model")
		require.NoError(t, os.Chown(path, 0, 5000))
		require.NoError(t, os.Chmod(path, 0o640))
		own := User{Name: "pool-engine-x", UID: 65536, GID: 65536, Groups: []uint32{engineUser.GID}, Role: "the engine's user"}
		_, err := e.s.Stage("m.gguf", "", own)
		assert.ErrorContains(t, err, "not found or not readable by the engine's user pool-engine-x (uid 65536)")
		own.Groups = append(own.Groups, 5000)
		_, err = e.s.Stage("m.gguf", "", own)
		assert.NoError(t, err, "a model shared with the engines' group")
	})
}

func TestLookupUnknownUser(t *testing.T) {
	_, err := LookupUser("no-such-user-pmd")
	assert.EqualError(t, err, `the engine's user "no-such-user-pmd": user: unknown user no-such-user-pmd`)
}

// A source rewritten in place, size and mtime put back, is a new version:
// its ctime says so. The hard-linked staged file changed with it, so the
// next Stage hashes it again and stages it under its new digest; a pinned
// digest then fails. An unchanged source costs no hash and no read.
func TestSourceRewrittenInPlaceIsHashedAgain(t *testing.T) {
	for _, copied := range []bool{false, true} {
		t.Run(map[bool]string{false: "hard link", true: "copy"}[copied], func(t *testing.T) {
			e := newTrustEnv(t)
			path := filepath.Join(e.models, "m.gguf")
			writeFile(t, path, "version 1")
			if copied {
				e.s.link = func(string, string) error { return syscall.EXDEV }
			}
			hashes := countHashes(e.s)
			reads := countReads(e.s)
			v1, err := e.s.Stage("m.gguf", "", engineUser)
			require.NoError(t, err)
			require.Equal(t, sha("version 1"), v1.Digest)

			for range 3 {
				again, err := e.s.Stage("m.gguf", sha("version 1"), engineUser)
				require.NoError(t, err)
				assert.Equal(t, v1.Path, again.Path)
			}
			assert.EqualValues(t, map[bool]int32{false: 1, true: 2}[copied], hashes.Load(), "unchanged: no hash")
			assert.EqualValues(t, map[bool]int32{false: 1, true: 2}[copied], reads.Load(), "unchanged: no read")

			st := lstat(t, path)
			require.NoError(t, os.WriteFile(path, []byte("version 2"), 0o644))
			mtime := time.Unix(st.Mtim.Sec, st.Mtim.Nsec)
			require.NoError(t, os.Chtimes(path, mtime, mtime))
			require.Equal(t, st.Size, lstat(t, path).Size)
			require.Equal(t, st.Mtim, lstat(t, path).Mtim)

			_, err = e.s.Stage("m.gguf", sha("version 1"), engineUser)
			assert.ErrorIs(t, err, ErrDigestMismatch)
			assert.ErrorContains(t, err, "digest mismatch: want "+sha("version 1")+", the file has "+sha("version 2"))

			v2, err := e.s.Stage("m.gguf", "", engineUser)
			require.NoError(t, err)
			assert.Equal(t, sha("version 2"), v2.Digest)
			assert.NotEqual(t, v1.Path, v2.Path)
			requireStaged(t, v2, "version 2")
		})
	}
}

// countReads makes s count the files it opens for reading.
func countReads(s *Stager) *atomic.Int32 {
	var n atomic.Int32
	open := s.openFile
	s.openFile = func(dirfd int, name string, flags int, resolve uint64) (int, error) {
		if flags&unix.O_PATH == 0 {
			n.Add(1)
		}
		return open(dirfd, name, flags, resolve)
	}
	return &n
}

// digests.json from before ctime was recorded is read without complaint;
// its entries cannot vouch for a file version, so it is hashed once more and
// the file rewritten with ctimes.
func TestDigestCacheWithoutCtimeIsReadGracefully(t *testing.T) {
	e := newTrustEnv(t)
	path := filepath.Join(e.models, "m.gguf")
	writeFile(t, path, "content")
	st := lstat(t, path)
	other := `{"dev": 1, "ino": 2, "size": 3, "mtime_ns": 4, "digest": "` + sha("other") + `"}`
	old := `{"version": 1, "entries": [{"dev": ` + jsonNum(st.Dev) + `, "ino": ` + jsonNum(st.Ino) + `, "size": 7, "mtime_ns": ` +
		jsonNum(st.Mtim.Nano()) + `, "digest": "` + sha("stale") + `"}, ` + other + `]}`
	require.NoError(t, os.MkdirAll(e.stage, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(e.stage, cacheFileName), []byte(old), 0o644))

	hashes := countHashes(e.s)
	staged, err := e.s.Stage("m.gguf", "", engineUser)
	require.NoError(t, err)
	assert.Equal(t, sha("content"), staged.Digest, "not the old entry's word")
	assert.EqualValues(t, 1, hashes.Load())

	var cf cacheFile
	data, err := os.ReadFile(filepath.Join(e.stage, cacheFileName))
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(data, &cf))
	assert.Equal(t, cacheVersion, cf.Version)
	require.Len(t, cf.Entries, 1)
	assert.NotZero(t, cf.Entries[0].CtimeNs)

	s2 := newStager(t, e.models, e.stage, WithModelDirs(e.extra))
	hashes = countHashes(s2)
	_, err = s2.Stage("m.gguf", "", engineUser)
	require.NoError(t, err)
	assert.Zero(t, hashes.Load(), "known after a restart")
}

func jsonNum[T int64 | uint64](n T) string {
	b, _ := json.Marshal(n)
	return string(b)
}

// Prune deletes only what it staged, through descriptors, following no
// symlink: not the staging directory's, not an entry's.
func TestPruneNeverFollowsSymlinks(t *testing.T) {
	hex := strings.Repeat("ab", 32)

	t.Run("staging directory is a symlink", func(t *testing.T) {
		e := newTrustEnv(t)
		victim := filepath.Join(e.outside, stagePrefix+hex, "m.gguf")
		writeFile(t, victim, "not staged")
		require.NoError(t, os.Symlink(e.outside, e.stage))
		err := e.s.Prune(nil)
		assert.ErrorContains(t, err, "prune staged models: "+e.stage)
		assert.FileExists(t, victim)
	})

	t.Run("entries that are symlinks", func(t *testing.T) {
		e := newTrustEnv(t)
		writeFile(t, filepath.Join(e.models, "m.gguf"), "model")
		st, err := e.s.Stage("m.gguf", "", engineUser)
		require.NoError(t, err)
		victim := filepath.Join(e.outside, "victim.gguf")
		writeFile(t, victim, "victim")
		victimDir := filepath.Join(e.outside, "dir")
		writeFile(t, filepath.Join(victimDir, "m.gguf"), "in a directory")
		link := filepath.Join(filepath.Dir(st.Path), "link.gguf")
		require.NoError(t, os.Symlink(victim, link))
		require.NoError(t, os.Symlink(victimDir, filepath.Join(e.stage, stagePrefix+hex)))
		sub := filepath.Join(filepath.Dir(st.Path), "sub")
		writeFile(t, filepath.Join(sub, "x"), "not ours")

		require.NoError(t, e.s.Prune(nil))
		assert.NoFileExists(t, st.Path)
		_, err = os.Lstat(link)
		assert.ErrorIs(t, err, os.ErrNotExist, "the link is gone")
		assert.FileExists(t, victim, "its target is not")
		assert.FileExists(t, filepath.Join(victimDir, "m.gguf"))
		assert.FileExists(t, filepath.Join(sub, "x"), "what Prune does not know stays")
		assert.FileExists(t, filepath.Join(e.models, "m.gguf"))
	})
}

// Pruning one of two staged names of a source changes the source's ctime
// (one link fewer): the name still in use must not be hashed again for it.
func TestPruningALinkCostsNoRehash(t *testing.T) {
	e := newTrustEnv(t)
	writeFile(t, filepath.Join(e.models, "m.gguf"), "model")
	require.NoError(t, os.Symlink("m.gguf", filepath.Join(e.models, "current.gguf")))
	a, err := e.s.Stage("m.gguf", "", engineUser)
	require.NoError(t, err)
	b, err := e.s.Stage("current.gguf", "", engineUser)
	require.NoError(t, err)
	require.Equal(t, filepath.Dir(a.Path), filepath.Dir(b.Path))
	require.NotEqual(t, a.Path, b.Path)

	hashes := countHashes(e.s)
	require.NoError(t, e.s.Prune([]string{b.Path}))
	assert.NoFileExists(t, a.Path)
	again, err := e.s.Stage("current.gguf", "", engineUser)
	require.NoError(t, err)
	assert.Equal(t, b.Path, again.Path)
	assert.Zero(t, hashes.Load())
}

// Staging needs CAP_DAC_READ_SEARCH (reading models the daemon does not
// own) and CAP_CHOWN (a copy keeps the source's owner), not CAP_FOWNER nor
// CAP_DAC_OVERRIDE: without them another user's file cannot be hard-linked
// (fs.protected_hardlinks) and is copied instead; root's own file still is.
func TestStagingNeedsNeitherFownerNorDacOverride(t *testing.T) {
	needChown(t)
	if data, err := os.ReadFile("/proc/sys/fs/protected_hardlinks"); err != nil || strings.TrimSpace(string(data)) != "1" {
		t.Skip("fs.protected_hardlinks is not 1 here")
	}
	e := newTrustEnv(t)
	theirs := filepath.Join(e.models, "theirs.gguf")
	writeFile(t, theirs, "another user's model")
	require.NoError(t, os.Chown(theirs, int(engineUser.UID), int(engineUser.GID)))
	require.NoError(t, os.Chmod(theirs, 0o640))
	ours := filepath.Join(e.models, "ours.gguf")
	writeFile(t, ours, "root's model")

	var theirsSt, oursSt Staged
	var errTheirs, errOurs, errNoChown error
	withoutCaps(t, []uintptr{unix.CAP_FOWNER, unix.CAP_DAC_OVERRIDE}, func() {
		theirsSt, errTheirs = e.s.Stage("theirs.gguf", "", engineUser)
		oursSt, errOurs = e.s.Stage("ours.gguf", "", engineUser)
	})
	require.NoError(t, errTheirs)
	require.NoError(t, errOurs)
	assert.NotEqual(t, lstat(t, theirs).Ino, lstat(t, theirsSt.Path).Ino, "another user's file: a copy")
	requireStaged(t, theirsSt, "another user's model")
	assert.Equal(t, lstat(t, ours).Ino, lstat(t, oursSt.Path).Ino, "root's file: a hard link")

	require.NoError(t, e.s.Prune(nil))
	withoutCaps(t, []uintptr{unix.CAP_FOWNER, unix.CAP_DAC_OVERRIDE, unix.CAP_CHOWN}, func() {
		_, errNoChown = e.s.Stage("theirs.gguf", "", engineUser)
	})
	assert.ErrorContains(t, errNoChown, "needs CAP_CHOWN")
}

// withoutCaps runs f on a thread whose effective capabilities lack drop;
// the thread is thrown away afterwards.
func withoutCaps(t *testing.T, drop []uintptr, f func()) {
	t.Helper()
	done := make(chan error)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
		var data [2]unix.CapUserData
		if err := unix.Capget(&hdr, &data[0]); err != nil {
			done <- err
			return
		}
		for _, c := range drop {
			data[c/32].Effective &^= 1 << (c % 32)
		}
		if err := unix.Capset(&hdr, &data[0]); err != nil {
			done <- err
			return
		}
		f()
		done <- nil
	}()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(30 * time.Second):
		t.Fatal("staging without capabilities did not finish")
	}
}

// mountTmpfs mounts a fresh tmpfs at dir (another filesystem: links fail
// with EXDEV) for the test.
func mountTmpfs(t *testing.T, dir string) {
	t.Helper()
	require.NoError(t, os.MkdirAll(dir, 0o755))
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=0755,size=16m"); err != nil {
		t.Skipf("cannot mount a tmpfs: %v", err)
	}
	t.Cleanup(func() { assert.NoError(t, unix.Unmount(dir, unix.MNT_DETACH)) })
}

func lstat(t *testing.T, path string) unix.Stat_t {
	t.Helper()
	var st unix.Stat_t
	require.NoError(t, unix.Lstat(path, &st))
	return st
}

// Staging does not write through a symlink where the staging directory
// should be either.
func TestStageRefusesASymlinkedStagingDirectory(t *testing.T) {
	e := newTrustEnv(t)
	writeFile(t, filepath.Join(e.models, "m.gguf"), "model")
	require.NoError(t, os.Symlink(e.outside, e.stage))
	_, err := e.s.Stage("m.gguf", "", engineUser)
	assert.ErrorContains(t, err, e.stage+" is a symbolic link")
	entries, err := os.ReadDir(e.outside)
	require.NoError(t, err)
	assert.Empty(t, entries)
}

// Two pools on one model stage it at once: one's hard link changes the
// source's ctime under the other, which is no change of content.
func TestOneSourceStagedForManyPoolsAtOnce(t *testing.T) {
	for round := range 5 {
		e := newTrustEnv(t)
		path := filepath.Join(e.models, "shared.gguf")
		writeFile(t, path, "one model, many pools")
		var wg sync.WaitGroup
		errs := make([]error, 8)
		paths := make([]string, 8)
		for i := range errs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				st, err := e.s.Stage("shared.gguf", "", engineUser)
				errs[i], paths[i] = err, st.Path
			}()
		}
		wg.Wait()
		for i, err := range errs {
			require.NoError(t, err, "round %d, pool %d", round, i)
			assert.Equal(t, paths[0], paths[i])
		}
	}
}

// An account is asked of NSS once per userTTL (nss-systemd asks systemd,
// which a restart storm keeps busy); an older answer is asked again, and
// a failed lookup is not kept.
func TestAnEngineUserIsAskedOncePerTTL(t *testing.T) {
	users.mu.Lock()
	users.m = map[string]cachedUser{"root": {u: User{Name: "root", UID: 4242}, at: time.Now()}}
	users.mu.Unlock()
	t.Cleanup(func() {
		users.mu.Lock()
		users.m = nil
		users.mu.Unlock()
	})
	u, err := LookupUser("root")
	require.NoError(t, err)
	assert.Equal(t, uint32(4242), u.UID, "served from the cache")

	users.mu.Lock()
	users.m["root"] = cachedUser{u: User{Name: "root", UID: 4242}, at: time.Now().Add(-userTTL)}
	users.mu.Unlock()
	u, err = LookupUser("root")
	require.NoError(t, err)
	assert.Equal(t, uint32(0), u.UID, "asked again")

	_, err = LookupUser("no-such-user-pmd")
	require.Error(t, err)
	users.mu.Lock()
	_, kept := users.m["no-such-user-pmd"]
	users.mu.Unlock()
	assert.False(t, kept)
}
