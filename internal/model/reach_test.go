package model

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// asUser runs argv as uid:gid with no other group, as the kernel sees
// such a process, and reports whether it succeeded.
func asUser(t *testing.T, uid, gid uint32, argv ...string) (bool, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	args := append([]string{"--reuid=" + strconv.Itoa(int(uid)), "--regid=" + strconv.Itoa(int(gid)), "--clear-groups"}, argv...)
	out, err := exec.CommandContext(ctx, "setpriv", args...).CombinedOutput()
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		require.NoError(t, err, "setpriv %v", args)
	}
	return err == nil, string(out)
}

// needSetpriv skips a test that asks the kernel itself as another user.
func needSetpriv(t *testing.T) {
	t.Helper()
	needChown(t)
	if _, err := exec.LookPath("setpriv"); err != nil {
		t.Skip("needs setpriv (util-linux) to run a process as another user")
	}
}

// reach decides as the kernel does: for each path, whether the engine's
// user may open it for reading is what a process of that user finds.
func TestReachAgreesWithTheKernel(t *testing.T) {
	needSetpriv(t)
	root := tempDir(t)
	mk := func(rel string, mode os.FileMode, uid, gid int) string {
		p := filepath.Join(root, rel)
		require.NoError(t, os.Chown(p, uid, gid))
		require.NoError(t, os.Chmod(p, mode))
		return p
	}
	dir := func(rel string, mode os.FileMode, uid, gid int) string {
		require.NoError(t, os.MkdirAll(filepath.Join(root, rel), 0o755))
		return mk(rel, mode, uid, gid)
	}
	file := func(rel string, mode os.FileMode, uid, gid int) string {
		writeFile(t, filepath.Join(root, rel), "model")
		return mk(rel, mode, uid, gid)
	}
	link := func(target, rel string, uid int) string {
		p := filepath.Join(root, rel)
		require.NoError(t, os.Symlink(target, p))
		require.NoError(t, os.Lchown(p, uid, uid))
		return p
	}
	const other = 4343
	dir("open", 0o755, 0, 0)
	file("open/m.gguf", 0o644, 0, 0)
	dir("private", 0o700, 0, 0)
	file("private/m.gguf", 0o644, 0, 0)
	dir("search-only", 0o711, 0, 0)
	file("search-only/m.gguf", 0o644, 0, 0)
	dir("group", 0o750, 0, int(engineUser.GID))
	file("group/m.gguf", 0o644, 0, 0)
	dir("owner-no-x", 0o604, int(engineUser.UID), 0)
	file("owner-no-x/m.gguf", 0o644, 0, 0)
	file("open/private.gguf", 0o600, 0, 0)
	dir("open/sub", 0o750, 0, 0)
	dir("tmp", 0o1777, 0, 0)
	link("../open/m.gguf", "tmp/others.gguf", other)
	link("../open/m.gguf", "tmp/mine.gguf", int(engineUser.UID))
	link("../private/m.gguf", "open/to-private.gguf", 0)
	link(filepath.Join(root, "private"), "open/private-dir", 0)
	link("sub/../m.gguf", "open/dotdot.gguf", 0)
	link("loop-b", "open/loop-a", 0)
	link("loop-a", "open/loop-b", 0)

	for _, rel := range []string{
		"open/m.gguf", "private/m.gguf", "search-only/m.gguf", "group/m.gguf", "owner-no-x/m.gguf",
		"open/private.gguf", "tmp/others.gguf", "tmp/mine.gguf", "open/to-private.gguf",
		"open/private-dir/m.gguf", "open/dotdot.gguf", "open/loop-a", "open/missing.gguf",
		"open/m.gguf/x", "open", "open/sub", "private",
	} {
		t.Run(rel, func(t *testing.T) {
			p := filepath.Join(root, rel)
			kernel, out := asUser(t, engineUser.UID, engineUser.GID, "sh", "-c", `if [ -d "$1" ]; then ls "$1"; else head -c0 "$1"; fi`, "sh", p)
			_, err := reach(p, engineUser)
			assert.Equal(t, kernel, err == nil, "the kernel says %v (%s); reach says %v", kernel, strings.TrimSpace(out), err)
		})
	}
}

// A model in a directory the engine's user may not enter is refused,
// with nothing said of it: not its mode, owner or type, not whether it
// exists. Nothing is staged.
func TestRefInPrivateDirectoryIsRefused(t *testing.T) {
	needChown(t)
	e := newTrustEnv(t)
	private := filepath.Join(e.models, "private")
	writeFile(t, filepath.Join(private, "x.gguf"), "someone's model")
	require.NoError(t, syscall.Mkfifo(filepath.Join(private, "fifo.gguf"), 0o644))
	require.NoError(t, os.Chmod(private, 0o700))
	require.NoError(t, os.Symlink("private/x.gguf", filepath.Join(e.models, "alias.gguf")))
	e.s.SetPoolModels([]string{filepath.Join(private, "x.gguf")})

	var msgs []string
	for _, ref := range []string{
		"private/x.gguf", "private/fifo.gguf", "private/missing.gguf", "private/x.gguf/y",
		"alias.gguf", filepath.Join(private, "x.gguf"), "file://" + filepath.Join(private, "x.gguf"),
	} {
		t.Run(ref, func(t *testing.T) {
			for _, try := range []func() error{
				func() error { _, err := e.s.Resolve(ref, engineUser); return err },
				func() error { _, err := e.s.Stage(ref, "", engineUser); return err },
			} {
				err := try()
				var re *RefError
				require.ErrorAs(t, err, &re)
				assert.ErrorIs(t, err, os.ErrPermission)
				assert.Equal(t, "not found or not readable by the engine's user engine (uid 4242)", re.Reason)
				msgs = append(msgs, re.Reason)
				for _, leak := range []string{"0700", "0644", "mode", "owner", "pipe", "exist", "directory"} {
					assert.NotContains(t, re.Reason, leak)
				}
			}
			assert.NoDirExists(t, e.stage, "nothing staged")
		})
	}
	for _, m := range msgs {
		assert.Equal(t, msgs[0], m, "every ref in it is told alike")
	}

	// The operator opens the directory to the engines: now it stages.
	require.NoError(t, os.Chown(private, 0, int(engineUser.GID)))
	require.NoError(t, os.Chmod(private, 0o750))
	st, err := e.s.Stage("private/x.gguf", "", engineUser)
	require.NoError(t, err)
	requireStaged(t, st, "someone's model")
}

// A bus caller who is not root names only what it could read itself,
// even where the engine's user may read it; root's word stands.
func TestCallerMustReachTheModelToo(t *testing.T) {
	needChown(t)
	e := newTrustEnv(t)
	group := filepath.Join(e.models, "engines-only")
	writeFile(t, filepath.Join(group, "x.gguf"), "for the engines")
	require.NoError(t, os.Chown(group, 0, int(engineUser.GID)))
	require.NoError(t, os.Chmod(group, 0o750))
	admin := User{UID: 4545, GID: 4545, Groups: []uint32{4545, 4646}, Role: "the caller"}

	_, err := e.s.Resolve("engines-only/x.gguf", admin, engineUser)
	var re *RefError
	require.ErrorAs(t, err, &re)
	assert.Equal(t, "not found or not readable by the caller (uid 4545)", re.Reason)
	_, err = e.s.Resolve("engines-only/missing.gguf", admin, engineUser)
	require.ErrorAs(t, err, &re)
	assert.Equal(t, "not found or not readable by the caller (uid 4545)", re.Reason, "nor whether it exists")

	_, err = e.s.Resolve("engines-only/x.gguf", engineUser)
	require.NoError(t, err, "the engine's user alone may")
	require.NoError(t, os.Chown(group, 0, 4646))
	_, err = e.s.Resolve("engines-only/x.gguf", admin, engineUser)
	require.ErrorAs(t, err, &re)
	assert.Equal(t, "not found or not readable by the engine's user engine (uid 4242)", re.Reason,
		"the caller reaches it by a supplementary group; the engine no more")
}

// A directory model beneath a directory the engine may not enter, or
// reached through a symlink that leads into one, is refused; so is one
// holding a single file the engine cannot read.
func TestDirectoryModelUnreachableIsRefused(t *testing.T) {
	needChown(t)
	e := newTrustEnv(t)
	hfTree(t, filepath.Join(e.models, "private", "m"))
	require.NoError(t, os.Chmod(filepath.Join(e.models, "private"), 0o700))
	hfTree(t, filepath.Join(e.outside, "hidden", "m"))
	require.NoError(t, os.Chmod(filepath.Join(e.outside, "hidden"), 0o700))
	link := filepath.Join(e.outside, "m")
	require.NoError(t, os.Symlink(filepath.Join(e.outside, "hidden", "m"), link))
	e.s.SetPoolModels([]string{link})
	hfTree(t, filepath.Join(e.models, "one"))
	require.NoError(t, os.Chmod(filepath.Join(e.models, "one", "original", "params.json"), 0o600))

	for ref, want := range map[string]string{
		"private/m": "not found or not readable by the engine's user engine (uid 4242)",
		link:        "not found or not readable by the engine's user engine (uid 4242)",
		"one":       `contains "original/params.json", which is not readable by the engine's user engine (uid 4242)`,
	} {
		_, err := e.s.Stage(ref, "", engineUser)
		var re *RefError
		require.ErrorAs(t, err, &re, ref)
		assert.Equal(t, want, re.Reason, ref)
		assert.NoDirExists(t, e.stage, "nothing staged")
	}
}

// Staged models are the engines': a user outside the engines' group
// cannot enter the staging directory, so cannot read a staged model,
// though the source is world-readable where it lies; the engine can.
func TestStagedModelsAreForTheEnginesOnly(t *testing.T) {
	needSetpriv(t)
	pmtest, err := user.Lookup("pmtest")
	if err != nil {
		t.Skip("needs the unprivileged user pmtest")
	}
	uid, _ := strconv.Atoi(pmtest.Uid)
	gid, _ := strconv.Atoi(pmtest.Gid)
	for _, copied := range []bool{false, true} {
		t.Run(map[bool]string{false: "hard link", true: "copy"}[copied], func(t *testing.T) {
			s, models, stage := newTestStager(t)
			if copied {
				s.link = func(string, string) error { return syscall.EXDEV }
			}
			writeFile(t, filepath.Join(models, "m.gguf"), "model")
			hfTree(t, filepath.Join(models, "tree"))
			st, err := s.Stage("m.gguf", "", engineUser)
			require.NoError(t, err)
			tree, err := s.Stage("tree", "", engineUser)
			require.NoError(t, err)

			for _, p := range []string{st.Path, filepath.Join(tree.Path, "config.json"), stage} {
				ok, out := asUser(t, uint32(uid), uint32(gid), "sh", "-c", `if [ -d "$1" ]; then ls "$1"; else cat "$1"; fi`, "sh", p)
				assert.False(t, ok, "%s is open to pmtest: %s", p, out)
				assert.Contains(t, out, "Permission denied")
			}
			ok, out := asUser(t, uint32(uid), uint32(gid), "cat", filepath.Join(models, "m.gguf"))
			assert.True(t, ok, "the source itself is open to all: %s", out)
			for _, p := range []string{st.Path, filepath.Join(tree.Path, "config.json")} {
				ok, out := asUser(t, engineUser.UID, engineUser.GID, "cat", p)
				assert.True(t, ok, "the engine reads %s: %s", p, out)
			}
			ok, out = asUser(t, engineUser.UID, engineUser.GID, "ls", tree.Path)
			assert.True(t, ok, "the engine lists its staged tree: %s", out)
		})
	}
}

// An existing staging directory open to everyone (an older installation's
// 0755) is set right on start, through its descriptor, and by Stage.
func TestWorldEnterableStagingDirectoryIsFixed(t *testing.T) {
	needSetpriv(t)
	for _, how := range []string{"on start", "by Stage"} {
		t.Run(how, func(t *testing.T) {
			s, models, stage := newTestStager(t)
			writeFile(t, filepath.Join(models, "m.gguf"), "model")
			old := New(models, stage, WithEngineGroup(0))
			st, err := old.Stage("m.gguf", "", User{Name: "root"})
			require.NoError(t, err)
			require.NoError(t, os.Chmod(stage, 0o755))
			ok, _ := asUser(t, 4747, 4747, "cat", st.Path)
			require.True(t, ok, "as an older installation left it, anyone reads staged models")

			if how == "on start" {
				require.NoError(t, s.PrepareStageDir())
			} else {
				_, err := s.Stage("m.gguf", "", engineUser)
				require.NoError(t, err)
			}
			got := lstat(t, stage)
			assert.Equal(t, uint32(0o710), got.Mode&0o7777)
			assert.Equal(t, [2]uint32{0, engineUser.GID}, [2]uint32{got.Uid, got.Gid})
			ok, out := asUser(t, 4747, 4747, "cat", st.Path)
			assert.False(t, ok, "no more: %s", out)
			ok, out = asUser(t, engineUser.UID, engineUser.GID, "cat", st.Path)
			assert.True(t, ok, "the engine still reads it: %s", out)
		})
	}
}

// An engine's user outside the engines' group cannot reach what is
// staged for it: Stage says so, and how to fix it, rather than the
// engine failing to open its model.
func TestStageForAUserOutsideTheEnginesGroupFails(t *testing.T) {
	needChown(t)
	s, models, _ := newTestStager(t)
	writeFile(t, filepath.Join(models, "m.gguf"), "model")
	outsider := User{Name: "llama", UID: 4848, GID: 4848, Role: "the engine's user"}
	_, err := s.Stage("m.gguf", "", outsider)
	require.Error(t, err)
	var re *RefError
	assert.False(t, errors.As(err, &re), "the ref is not at fault")
	assert.Contains(t, err.Error(), "the engine's user llama (uid 4848) cannot reach the staged model")
	assert.Contains(t, err.Error(), "make the user a member of that group")
}

// A staging directory is made through a descriptor: one that is not a
// directory is refused by name, not followed.
func TestPrepareStageDirRefusesAFile(t *testing.T) {
	needChown(t)
	s, _, stage := newTestStager(t)
	require.NoError(t, os.WriteFile(stage, nil, 0o644))
	assert.ErrorContains(t, s.PrepareStageDir(), stage+" exists and is not a directory")
	require.NoError(t, os.Remove(stage))
	require.NoError(t, os.Symlink(t.TempDir(), stage))
	assert.ErrorContains(t, s.PrepareStageDir(), stage+" is a symbolic link")
}
