package engine_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/engine"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/model"
)

func owner(t *testing.T, path string) (uid, gid uint32, mode os.FileMode) {
	t.Helper()
	fi, err := os.Lstat(path)
	require.NoError(t, err)
	st := fi.Sys().(*syscall.Stat_t)
	return st.Uid, st.Gid, fi.Mode()
}

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("changes owners: needs root")
	}
}

func TestEnsureCacheDirMakesIt(t *testing.T) {
	needRoot(t)
	root := filepath.Join(t.TempDir(), "cache")
	dir := filepath.Join(root, "p")
	require.NoError(t, engine.EnsureCacheDir(dir, 4242, 4343))
	uid, gid, mode := owner(t, root)
	assert.Equal(t, [2]uint32{0, 0}, [2]uint32{uid, gid}, "the root is root's")
	assert.Equal(t, os.ModeDir|0o755, mode)
	uid, gid, mode = owner(t, dir)
	assert.Equal(t, [2]uint32{4242, 4343}, [2]uint32{uid, gid})
	assert.Equal(t, os.ModeDir|0o700, mode)
}

// A directory already right is left as it is, contents and mode alike.
func TestEnsureCacheDirKeepsIt(t *testing.T) {
	needRoot(t)
	dir := filepath.Join(t.TempDir(), "p")
	require.NoError(t, engine.EnsureCacheDir(dir, 4242, 4343))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "weights.bin"), []byte("cached"), 0o600))
	require.NoError(t, os.Chmod(dir, 0o750))
	require.NoError(t, engine.EnsureCacheDir(dir, 4242, 4343))
	data, err := os.ReadFile(filepath.Join(dir, "weights.bin"))
	require.NoError(t, err)
	assert.Equal(t, "cached", string(data))
	_, _, mode := owner(t, dir)
	assert.Equal(t, os.ModeDir|0o750, mode, "the owner's own choice")
}

// A pool whose user changed (User=, or a user of its own where all pools
// shared one): the directory goes to the new user, mode 0700, and with it
// what the old user made inside, so the engine can write its caches; of
// another owner's files, a file with a second link (it may be a file
// elsewhere) and what a symbolic link points to, nothing changes.
func TestEnsureCacheDirFixesTheOwner(t *testing.T) {
	needRoot(t)
	top := t.TempDir()
	dir := filepath.Join(top, "p")
	require.NoError(t, os.Mkdir(dir, 0o777))
	require.NoError(t, os.Chmod(dir, 0o2777))
	require.NoError(t, os.Chown(dir, 5151, 5151))
	mk := func(rel string, uid, gid int) string {
		p := filepath.Join(dir, rel)
		require.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
		require.NoError(t, os.WriteFile(p, nil, 0o644))
		require.NoError(t, os.Chown(p, uid, gid))
		return p
	}
	old := mk("old", 5151, 5151)
	deep := mk(".cache/huggingface/hub/blob", 5151, 7777)
	require.NoError(t, os.Chown(filepath.Join(dir, ".cache"), 5151, 5151))
	require.NoError(t, os.Chown(filepath.Join(dir, ".cache/huggingface"), 5151, 5151))
	require.NoError(t, os.Chown(filepath.Join(dir, ".cache/huggingface/hub"), 5151, 5151))
	rootsDir := mk("roots/inside", 5151, 5151)
	require.NoError(t, os.Chmod(filepath.Join(dir, ".cache/huggingface"), 0o700))
	theirs := mk("theirs", 6161, 6161)
	elsewhere := filepath.Join(top, "elsewhere")
	require.NoError(t, os.WriteFile(elsewhere, nil, 0o644))
	require.NoError(t, os.Chown(elsewhere, 5151, 5151))
	require.NoError(t, os.Link(elsewhere, filepath.Join(dir, "linked")))
	target := filepath.Join(top, "target")
	require.NoError(t, os.WriteFile(target, nil, 0o644))
	require.NoError(t, os.Symlink(target, filepath.Join(dir, "link")))
	require.NoError(t, os.Lchown(filepath.Join(dir, "link"), 5151, 5151))

	require.NoError(t, engine.EnsureCacheDir(dir, 4242, 4343))
	uid, gid, mode := owner(t, dir)
	assert.Equal(t, [2]uint32{4242, 4343}, [2]uint32{uid, gid})
	assert.Equal(t, os.ModeDir|0o700, mode)
	for _, c := range []struct {
		path     string
		uid, gid uint32
		why      string
	}{
		{old, 4242, 4343, "the old user's file"},
		{filepath.Join(dir, ".cache/huggingface"), 4242, 4343, "a directory only its owner may enter"},
		{deep, 4242, 7777, "deep inside; a group not the old user's stays"},
		{theirs, 6161, 6161, "another owner's file"},
		{rootsDir, 5151, 5151, "nor what lies in another owner's directory"},
		{elsewhere, 5151, 5151, "a file with another link"},
		{filepath.Join(dir, "link"), 4242, 4343, "the link itself"},
		{target, 0, 0, "never what a link points to"},
	} {
		u, g, _ := owner(t, c.path)
		assert.Equal(t, [2]uint32{c.uid, c.gid}, [2]uint32{u, g}, c.why)
	}
	// Only the group differs: fixed too.
	require.NoError(t, os.Chown(dir, 4242, 0))
	require.NoError(t, engine.EnsureCacheDir(dir, 4242, 4343))
	uid, gid, _ = owner(t, dir)
	assert.Equal(t, [2]uint32{4242, 4343}, [2]uint32{uid, gid})
}

// What root made in a directory that was root's is never given away.
func TestEnsureCacheDirGivesNothingOfRoots(t *testing.T) {
	needRoot(t)
	dir := filepath.Join(t.TempDir(), "p")
	require.NoError(t, os.Mkdir(dir, 0o755))
	inside := filepath.Join(dir, "roots")
	require.NoError(t, os.WriteFile(inside, nil, 0o600))
	require.NoError(t, engine.EnsureCacheDir(dir, 4242, 4343))
	uid, _, _ := owner(t, inside)
	assert.Zero(t, uid)
}

// What the engine user may have planted where its directory was is
// refused, never followed: neither a symbolic link's target nor a file
// changes owner.
func TestEnsureCacheDirRefusesWhatIsNoDirectory(t *testing.T) {
	needRoot(t)
	root := t.TempDir()
	target := filepath.Join(root, "etc-shadow")
	require.NoError(t, os.Mkdir(target, 0o755))
	for name, plant := range map[string]func(string) error{
		"symlink to a directory": func(p string) error { return os.Symlink(target, p) },
		"symlink to nothing":     func(p string) error { return os.Symlink(filepath.Join(root, "nowhere"), p) },
		"file":                   func(p string) error { return os.WriteFile(p, nil, 0o644) },
	} {
		t.Run(name, func(t *testing.T) {
			dir := filepath.Join(root, strings.ReplaceAll(name, " ", "-"))
			require.NoError(t, plant(dir))
			err := engine.EnsureCacheDir(dir, 4242, 4343)
			require.Error(t, err)
			assert.Contains(t, err.Error(), "cache directory "+dir+" is not a directory")
			uid, gid, mode := owner(t, target)
			assert.Equal(t, [2]uint32{0, 0}, [2]uint32{uid, gid})
			assert.Equal(t, os.ModeDir|0o755, mode)
			_, err = os.Lstat(filepath.Join(root, "nowhere"))
			assert.True(t, os.IsNotExist(err), "a dangling link is not made a directory")
			uid, _, _ = owner(t, dir)
			assert.Zero(t, uid)
		})
	}
}

// The pool's Environment= wins over every cache variable.
func TestCacheEnv(t *testing.T) {
	assert.Equal(t, []string{
		"XDG_CACHE_HOME=/c/p/.cache",
		"HF_HOME=/c/p/.cache/huggingface",
		"VLLM_CACHE_ROOT=/c/p/.cache/vllm",
		"TRITON_CACHE_DIR=/c/p/.triton/cache",
	}, engine.CacheEnv("/c/p", []string{"CUDA_VISIBLE_DEVICES=0"}))
	assert.Equal(t, []string{"XDG_CACHE_HOME=/c/p/.cache", "TRITON_CACHE_DIR=/c/p/.triton/cache"},
		engine.CacheEnv("/c/p", []string{"HF_HOME=/models/hf", "VLLM_CACHE_ROOT=/scratch/vllm", "HF_HOME_X=1"}))
}

// The engine runs with HOME and its caches in its pool's cache directory,
// which it can write, unless Environment= says otherwise.
func TestEngineCacheDir(t *testing.T) {
	rt, ctx := runtime(t)
	top, err := os.MkdirTemp("", "cache-test-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(top) })
	require.NoError(t, os.Chmod(top, 0o755), "the engine user passes through")
	dir := filepath.Join(top, "cache", "cached")
	script := `echo "home=$HOME xdg=$XDG_CACHE_HOME hf=$HF_HOME vllm=$VLLM_CACHE_ROOT triton=$TRITON_CACHE_DIR"; ` +
		`mkdir -p "$HF_HOME" "$TRITON_CACHE_DIR" && echo hi > "$HF_HOME/probe" && echo wrote; ` +
		// journald names a line's unit from its writer's cgroup, which an
		// exited writer no longer has.
		`sleep 1; exit 0`
	start := func(env ...string) {
		e, err := rt.Start(ctx, engine.Spec{Pool: "cached", Argv: []string{"/bin/sh", "-c", script}, Env: env,
			User: "pool-engine", StopTimeout: 2 * time.Second, CacheDir: dir})
		require.NoError(t, err)
		var exit *lifecycle.Exit
		for ev := range e.Events() {
			if ev.Exit != nil {
				exit = ev.Exit
			}
		}
		require.NotNil(t, exit)
		assert.Equal(t, 0, exit.Status.ExitStatus())
	}
	start()
	out := journal(t, engine.UnitName("cached"), "wrote")
	var u []byte
	assert.Contains(t, out, "home="+dir+" xdg="+dir+"/.cache hf="+dir+"/.cache/huggingface vllm="+dir+"/.cache/vllm triton="+dir+"/.triton/cache")
	u, err = exec.Command("id", "-u", "pool-engine").Output()
	require.NoError(t, err)
	uid, _, mode := owner(t, dir)
	assert.Equal(t, strings.TrimSpace(string(u)), strconv.Itoa(int(uid)))
	assert.Equal(t, os.ModeDir|0o700, mode)
	uid, _, _ = owner(t, filepath.Join(dir, ".cache/huggingface/probe"))
	assert.Equal(t, strings.TrimSpace(string(u)), strconv.Itoa(int(uid)), "written by the engine")

	// Kept across starts; Environment= wins.
	start("HOME=/nonexistent", "HF_HOME="+dir+"/hf")
	out = journal(t, engine.UnitName("cached"), "home=/nonexistent")
	assert.Contains(t, out, "home=/nonexistent xdg="+dir+"/.cache hf="+dir+"/hf vllm=")
	_, err = os.Stat(filepath.Join(dir, ".cache/huggingface/probe"))
	assert.NoError(t, err)
	_, err = os.Stat(filepath.Join(dir, "hf/probe"))
	assert.NoError(t, err)
}

// An engine given a credential (a user of its pool's own, which no user
// database names) runs as it, is told its name, and its cache directory
// follows it when the uid changes.
func TestCacheDirFollowsTheEnginesOwnUID(t *testing.T) {
	rt, ctx := runtime(t)
	top, err := os.MkdirTemp("", "cache-own-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(top) })
	require.NoError(t, os.Chmod(top, 0o755))
	dir := filepath.Join(top, "own")
	start := func(uid uint32) {
		t.Helper()
		account := func() (model.User, error) {
			return model.User{Name: "pool-engine-own", UID: uid, GID: uid, Groups: []uint32{uid + 1}}, nil
		}
		e, err := rt.Start(ctx, engine.Spec{Pool: "own", Argv: []string{"/bin/sh", "-c",
			`mkdir -p "$HOME/.cache/sub" && echo "who $(id -u):$(id -g):$(id -G) $USER $LOGNAME" > "$HOME/.cache/sub/who"`},
			User: "ignored-when-an-account-is-given", Account: account, StopTimeout: 2 * time.Second, CacheDir: dir})
		require.NoError(t, err)
		var exit *lifecycle.Exit
		for ev := range e.Events() {
			if ev.Exit != nil {
				exit = ev.Exit
			}
		}
		require.NotNil(t, exit)
		require.Equal(t, 0, exit.Status.ExitStatus(), "the engine writes its caches, those of the uid before it too")
		who, err := os.ReadFile(filepath.Join(dir, ".cache/sub/who"))
		require.NoError(t, err)
		assert.Equal(t, fmt.Sprintf("who %d:%d:%d %d pool-engine-own pool-engine-own\n", uid, uid, uid, uid+1), string(who))
		u, g, mode := owner(t, dir)
		assert.Equal(t, [2]uint32{uid, uid}, [2]uint32{u, g})
		assert.Equal(t, os.ModeDir|0o700, mode)
	}
	start(70001)
	start(70003)
}
