package model

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

func TestResolveRejects(t *testing.T) {
	tests := []struct {
		name  string
		ref   func(models, outside string) string
		setup func(t *testing.T, models, outside string)
		want  string
	}{
		{name: "empty", ref: lit(""), want: `model "": ref is empty`},
		{name: "NUL", ref: lit("a\x00b.gguf"), want: `model "a\x00b.gguf": ref contains a NUL byte`},
		{name: "http", ref: lit("http://example.com/x.gguf"), want: `unsupported URL scheme "http"`},
		{name: "s3", ref: lit("s3://bucket/x.gguf"), want: `unsupported URL scheme "s3"`},
		{name: "file URL with host", ref: lit("file://host/x.gguf"), want: `file URL has a host part "host"`},
		{name: "file URL relative", ref: lit("file://relative"), want: `file URL has no absolute path ("relative" is read as a host name)`},
		{name: "file URL opaque", ref: lit("file:relative.gguf"), want: "file URL has a relative path"},
		{name: "file URL no path", ref: lit("file://"), want: "file URL has no path"},
		{name: "file URL query", ref: lit("file:///x.gguf?v=1"), want: "file URL has a query or fragment"},
		{name: "file URL NUL", ref: lit("file:///x%00.gguf"), want: "NUL byte"},
		{name: "dotdot", ref: lit("../x.gguf"), want: `name contains a ".." element`},
		{name: "inner dotdot", ref: lit("a/../../x.gguf"), want: `name contains a ".." element`},
		{
			name: "symlink escaping",
			ref:  lit("out.gguf"),
			setup: func(t *testing.T, models, outside string) {
				writeFile(t, filepath.Join(outside, "secret.gguf"), "secret")
				require.NoError(t, os.Symlink("../outside/secret.gguf", filepath.Join(models, "out.gguf")))
			},
			want: "escapes the model directory",
		},
		{
			name: "absolute symlink",
			ref:  lit("abs.gguf"),
			setup: func(t *testing.T, models, outside string) {
				writeFile(t, filepath.Join(outside, "secret.gguf"), "secret")
				require.NoError(t, os.Symlink(filepath.Join(outside, "secret.gguf"), filepath.Join(models, "abs.gguf")))
			},
			want: "escapes the model directory",
		},
		{
			name: "symlinked directory escaping",
			ref:  lit("dir/secret.gguf"),
			setup: func(t *testing.T, models, outside string) {
				writeFile(t, filepath.Join(outside, "secret.gguf"), "secret")
				require.NoError(t, os.Symlink("../outside", filepath.Join(models, "dir")))
			},
			want: "escapes the model directory",
		},
		{name: "missing name", ref: lit("missing.gguf"), want: "missing.gguf): does not exist"},
		{name: "missing absolute", ref: func(m, _ string) string { return m + "/missing.gguf" }, want: "missing.gguf\": does not exist"},
		{name: "missing file URL", ref: func(m, _ string) string { return "file://" + m + "/missing.gguf" }, want: "missing.gguf): does not exist"},
		{
			name:  "path through a file",
			ref:   lit("f.gguf/x"),
			setup: func(t *testing.T, models, _ string) { writeFile(t, filepath.Join(models, "f.gguf"), "x") },
			want:  "does not exist (a component of the path is not a directory)",
		},
		{
			name: "empty directory",
			ref:  lit("sub"),
			setup: func(t *testing.T, models, _ string) {
				require.NoError(t, os.Mkdir(filepath.Join(models, "sub"), 0o755))
			},
			want: "holds no files",
		},
		{name: "models dir itself", ref: lit("."), want: "names the models directory itself"},
		{
			name: "fifo",
			ref:  lit("fifo"),
			setup: func(t *testing.T, models, _ string) {
				require.NoError(t, unix.Mkfifo(filepath.Join(models, "fifo"), 0o644))
			},
			want: "is not a regular file or a directory (it is a named pipe)",
		},
		{
			name: "socket",
			ref:  lit("sock"),
			setup: func(t *testing.T, models, _ string) {
				l, err := net.Listen("unix", filepath.Join(models, "sock"))
				require.NoError(t, err)
				t.Cleanup(func() { l.Close() })
			},
			want: "is not a regular file or a directory (it is a socket)",
		},
		{name: "device outside", ref: lit("/dev/null"), want: `model "/dev/null": not beneath an allowed model directory`},
		{
			name:  "empty file",
			ref:   lit("empty.gguf"),
			setup: func(t *testing.T, models, _ string) { writeFile(t, filepath.Join(models, "empty.gguf"), "") },
			want:  "empty.gguf): is empty",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, models, stage := newTestStager(t)
			outside := filepath.Join(filepath.Dir(models), "outside")
			require.NoError(t, os.Mkdir(outside, 0o755))
			if tt.setup != nil {
				tt.setup(t, models, outside)
			}
			ref := tt.ref(models, outside)

			_, err := s.Resolve(ref, engineUser)
			var re *RefError
			require.ErrorAs(t, err, &re)
			assert.Equal(t, ref, re.Ref)
			assert.Contains(t, err.Error(), tt.want)
			assert.True(t, strings.HasPrefix(err.Error(), "model "), err.Error())

			// Stage validates the same way, before creating anything.
			_, err = s.Stage(ref, "", engineUser)
			require.ErrorAs(t, err, &re)
			assert.Contains(t, err.Error(), tt.want)
			assert.NoDirExists(t, stage)
		})
	}
}

func lit(ref string) func(string, string) string { return func(string, string) string { return ref } }

func TestResolveAccepts(t *testing.T) {
	root := tempDir(t)
	models, extra, outside := filepath.Join(root, "models"), filepath.Join(root, "extra"), filepath.Join(root, "outside")
	s := newStager(t, models, filepath.Join(root, "stage"), WithModelDirs(extra))
	writeFile(t, filepath.Join(models, "plain.gguf"), "plain")
	writeFile(t, filepath.Join(models, "llama", "8b-q4.gguf"), "nested")
	writeFile(t, filepath.Join(models, "with space.gguf"), "space")
	writeFile(t, filepath.Join(extra, "x", "big.gguf"), "extra")
	writeFile(t, filepath.Join(outside, "abs.gguf"), "absolute")
	require.NoError(t, os.Symlink("llama/8b-q4.gguf", filepath.Join(models, "current.gguf")))
	require.NoError(t, os.Symlink("../llama", filepath.Join(models, "llama", "alias")))
	require.NoError(t, os.Symlink("x/big.gguf", filepath.Join(extra, "big.gguf")))
	// A pool file's own Model= is the operator's word: its symlinks are
	// followed, wherever it is.
	require.NoError(t, os.Symlink(filepath.Join(outside, "abs.gguf"), filepath.Join(outside, "abs-link.gguf")))
	s.SetPoolModels([]string{
		filepath.Join(outside, "abs.gguf"), "file://" + filepath.Join(outside, "abs-link.gguf"), "plain.gguf",
	})

	tests := []struct {
		ref, path, content string
	}{
		{"plain.gguf", filepath.Join(models, "plain.gguf"), "plain"},
		{"./plain.gguf", filepath.Join(models, "plain.gguf"), "plain"},
		{"llama/8b-q4.gguf", filepath.Join(models, "llama/8b-q4.gguf"), "nested"},
		{"current.gguf", filepath.Join(models, "current.gguf"), "nested"},
		{"llama/alias/8b-q4.gguf", filepath.Join(models, "llama/alias/8b-q4.gguf"), "nested"},
		{filepath.Join(models, "plain.gguf"), filepath.Join(models, "plain.gguf"), "plain"},
		{models + "//llama/./8b-q4.gguf", models + "//llama/./8b-q4.gguf", "nested"},
		{filepath.Join(models, "current.gguf"), filepath.Join(models, "current.gguf"), "nested"},
		{filepath.Join(extra, "x", "big.gguf"), filepath.Join(extra, "x", "big.gguf"), "extra"},
		{filepath.Join(extra, "big.gguf"), filepath.Join(extra, "big.gguf"), "extra"},
		{"file://" + filepath.Join(extra, "big.gguf"), filepath.Join(extra, "big.gguf"), "extra"},
		{filepath.Join(outside, "abs.gguf"), filepath.Join(outside, "abs.gguf"), "absolute"},
		{filepath.Join(outside, "abs-link.gguf"), filepath.Join(outside, "abs-link.gguf"), "absolute"},
		{"file://" + filepath.Join(outside, "abs.gguf"), filepath.Join(outside, "abs.gguf"), "absolute"},
		{"file:" + filepath.Join(outside, "abs.gguf"), filepath.Join(outside, "abs.gguf"), "absolute"},
		{"FILE://" + filepath.Join(outside, "abs.gguf"), filepath.Join(outside, "abs.gguf"), "absolute"},
		{"file://" + filepath.Join(models, "with%20space.gguf"), filepath.Join(models, "with space.gguf"), "space"},
	}
	for _, tt := range tests {
		t.Run(tt.ref, func(t *testing.T) {
			src, err := s.Resolve(tt.ref, engineUser)
			require.NoError(t, err)
			st, err := os.Stat(tt.path)
			require.NoError(t, err)
			sys := st.Sys().(*syscall.Stat_t)
			assert.Equal(t, Source{
				Ref: tt.ref, Path: filepath.Clean(tt.path), Size: int64(len(tt.content)),
				Dev: sys.Dev, Ino: sys.Ino, ModTime: st.ModTime(),
				ChangeTime: time.Unix(sys.Ctim.Sec, sys.Ctim.Nsec), Mode: 0o644, UID: sys.Uid, GID: sys.Gid,
			}, src)
		})
	}
}

// The tests run as root, who can open any file for reading, so an
// unreadable file is simulated through the open hook.
func TestResolveUnreadable(t *testing.T) {
	s, models, _ := newTestStager(t)
	writeFile(t, filepath.Join(models, "locked.gguf"), "x")
	open := s.openFile
	s.openFile = func(dirfd int, name string, flags int, resolve uint64) (int, error) {
		if strings.HasSuffix(name, "locked.gguf") {
			return -1, unix.EACCES
		}
		return open(dirfd, name, flags, resolve)
	}
	for _, ref := range []string{"locked.gguf", filepath.Join(models, "locked.gguf")} {
		_, err := s.Resolve(ref, engineUser)
		var re *RefError
		require.ErrorAs(t, err, &re)
		assert.Contains(t, err.Error(), "is not readable: permission denied")
		assert.ErrorIs(t, err, os.ErrPermission)
	}
}

// Without openat2 the manual check must give the same answers.
func TestResolveWithoutOpenat2(t *testing.T) {
	s, models, _ := newTestStager(t)
	outside := filepath.Join(filepath.Dir(models), "outside")
	writeFile(t, filepath.Join(outside, "secret.gguf"), "secret")
	writeFile(t, filepath.Join(models, "llama", "8b.gguf"), "nested")
	require.NoError(t, os.Symlink("llama/8b.gguf", filepath.Join(models, "in.gguf")))
	require.NoError(t, os.Symlink("../outside/secret.gguf", filepath.Join(models, "out.gguf")))
	require.NoError(t, os.Symlink("../outside", filepath.Join(models, "outdir")))
	open := s.openFile
	s.openFile = func(dirfd int, name string, flags int, resolve uint64) (int, error) {
		if resolve != 0 {
			return -1, unix.ENOSYS
		}
		return open(dirfd, name, flags, resolve)
	}

	for _, ref := range []string{"llama/8b.gguf", "in.gguf"} {
		src, err := s.Resolve(ref, engineUser)
		require.NoError(t, err, ref)
		assert.Equal(t, filepath.Join(models, ref), src.Path)
		assert.Equal(t, int64(len("nested")), src.Size)
	}
	for ref, want := range map[string]string{
		"out.gguf":           "escapes the model directory",
		"outdir/secret.gguf": "escapes the model directory",
		"missing.gguf":       "does not exist",
		"../x.gguf":          `".." element`,
	} {
		_, err := s.Resolve(ref, engineUser)
		var re *RefError
		require.ErrorAs(t, err, &re, ref)
		assert.Contains(t, err.Error(), want, ref)
	}
}

func TestResolveRelativeModelsDir(t *testing.T) {
	s := newStager(t, "models", t.TempDir())
	_, err := s.Resolve("x.gguf", engineUser)
	var re *RefError
	require.ErrorAs(t, err, &re)
	assert.Contains(t, err.Error(), `the models directory "models" is not an absolute path`)
}

func TestRefErrorMessage(t *testing.T) {
	err := error(&RefError{Ref: "x.gguf", Path: "/m/x.gguf", Reason: "does not exist", Err: unix.ENOENT})
	assert.Equal(t, `model "x.gguf" (/m/x.gguf): does not exist`, err.Error())
	assert.True(t, errors.Is(err, os.ErrNotExist))
	err = &RefError{Ref: "/m/x.gguf", Path: "/m/x.gguf", Reason: "is empty"}
	assert.Equal(t, `model "/m/x.gguf": is empty`, err.Error())
}

// RESOLVE_BENEATH refuses every absolute symlink, even one that points
// inside the models directory: such links must be made relative.
func TestResolveAbsoluteSymlinkInside(t *testing.T) {
	if _, err := unix.Openat2(unix.AT_FDCWD, "/", &unix.OpenHow{Flags: unix.O_PATH | unix.O_CLOEXEC}); errors.Is(err, unix.ENOSYS) {
		t.Skip("no openat2 on this kernel")
	}
	s, models, _ := newTestStager(t)
	writeFile(t, filepath.Join(models, "real.gguf"), "x")
	require.NoError(t, os.Symlink(filepath.Join(models, "real.gguf"), filepath.Join(models, "abs.gguf")))
	_, err := s.Resolve("abs.gguf", engineUser)
	var re *RefError
	require.ErrorAs(t, err, &re)
	assert.Contains(t, err.Error(), "escapes the model directory")
}
