package model

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// hfTree writes a model directory in Hugging Face layout under models and
// returns its files' contents by relative path.
func hfTree(t *testing.T, dir string) map[string]string {
	t.Helper()
	files := map[string]string{
		"config.json":                        `{"architectures": ["LlamaForCausalLM"]}`,
		"model-00001-of-00002.safetensors":   strings.Repeat("shard one ", 300_000),
		"model-00002-of-00002.safetensors":   strings.Repeat("shard two ", 200_000),
		"model.safetensors.index.json":       `{"weight_map": {}}`,
		"tokenizer.json":                     `{"version": "1.0"}`,
		"original/params.json":               `{"dim": 4096}`,
		"original/tokenizer/tokenizer.model": "sentencepiece",
		".gitattributes":                     "",
		"a.txt":                              "sorted before a/ in byte order",
		"a/b":                                "inside a",
	}
	for rel, content := range files {
		writeFile(t, filepath.Join(dir, rel), content)
	}
	return files
}

// manifestBySha256sum is how an operator reproduces a directory's
// digest with coreutils alone.
const manifestBySha256sum = `cd "$1" && find . -type f -printf '%P\n' | LC_ALL=C sort |
while IFS= read -r f; do
	printf '%s %s %s\n' "$(sha256sum < "$f" | cut -c1-64)" "$(stat -c %s -- "$f")" "$f"
done | sha256sum | cut -c1-64`

func TestStageDirectory(t *testing.T) {
	for _, copied := range []bool{false, true} {
		t.Run(map[bool]string{false: "hard links", true: "copies"}[copied], func(t *testing.T) {
			s, models, stage := newTestStager(t)
			dir := filepath.Join(models, "llama-3-8b")
			files := hfTree(t, dir)
			if copied {
				s.link = func(string, string) error { return syscall.EXDEV }
			}
			hashes := countHashes(s)

			src, err := s.Resolve("llama-3-8b", engineUser)
			require.NoError(t, err)
			assert.True(t, src.IsDir())
			require.Len(t, src.Files, len(files))
			var total int64
			for i, f := range src.Files {
				total += int64(len(files[f.Rel]))
				if i > 0 {
					assert.Less(t, src.Files[i-1].Rel, f.Rel, "sorted in byte order")
				}
			}
			assert.Equal(t, total, src.Size)
			assert.Equal(t, "a.txt", src.Files[1].Rel, "after .gitattributes, before a/b")

			digest, err := s.Digest(src)
			require.NoError(t, err)
			assert.EqualValues(t, len(files)-1, hashes.Load(), "every file but the empty one, once")

			st, err := s.Stage("llama-3-8b", "", engineUser)
			require.NoError(t, err)
			assert.Equal(t, digest, st.Digest)
			hexd := strings.TrimPrefix(digest, "sha256:")
			assert.Equal(t, filepath.Join(stage, stagePrefix+hexd, "llama-3-8b"), st.Path, "the directory's own name, for the engine")
			for rel, content := range files {
				p := filepath.Join(st.Path, rel)
				data, err := os.ReadFile(p)
				require.NoError(t, err, rel)
				assert.Equal(t, content, string(data), rel)
				linked := inode(t, p) == inode(t, filepath.Join(dir, rel))
				assert.Equal(t, !copied, linked, rel)
				if copied {
					assert.Equal(t, uint32(0o444), lstat(t, p).Mode&0o7777, "a copy: the source's read bits only")
				}
			}
			for _, d := range []string{st.Path, filepath.Join(st.Path, "original", "tokenizer")} {
				assert.Equal(t, uint32(0o755), lstat(t, d).Mode&0o7777, d)
			}
			entries, err := os.ReadDir(filepath.Dir(st.Path))
			require.NoError(t, err)
			assert.Len(t, entries, 1, "no temporary tree left")

			// The manifest, beside the staging directory, is what the
			// digest is the sha256 of; sha256sum says so, and rebuilds it
			// from the source tree.
			man := filepath.Join(stage, stagePrefix+hexd+manifestSuffix)
			out, err := exec.Command("sha256sum", man).Output()
			require.NoError(t, err)
			assert.Equal(t, hexd, strings.Fields(string(out))[0])
			out, err = exec.Command("bash", "-c", manifestBySha256sum, "-", dir).Output()
			require.NoError(t, err)
			assert.Equal(t, hexd, strings.TrimSpace(string(out)))
			data, err := os.ReadFile(man)
			require.NoError(t, err)
			assert.Contains(t, string(data), fmt.Sprintf("%s %d config.json\n", sha(files["config.json"])[7:], len(files["config.json"])))
			assert.Contains(t, string(data), emptyDigest[7:]+" 0 .gitattributes\n")

			// Staged again: nothing hashed, the same tree.
			before := hashes.Load()
			again, err := s.Stage("llama-3-8b", digest, engineUser)
			require.NoError(t, err)
			assert.Equal(t, st.Path, again.Path)
			assert.Equal(t, before, hashes.Load())

			// A pinned digest it does not have is refused, before anything
			// is staged.
			other := sha("another model")
			_, err = s.Stage("llama-3-8b", other, engineUser)
			var re *RefError
			require.ErrorAs(t, err, &re)
			assert.ErrorIs(t, err, ErrDigestMismatch)
			assert.ErrorContains(t, err, "digest mismatch: want "+other+", the directory has "+digest)
			assert.NoDirExists(t, filepath.Join(stage, stagePrefix+strings.TrimPrefix(other, "sha256:")))

			// The same tree by absolute path and file URL.
			for _, ref := range []string{dir, "file://" + dir + "/"} {
				st2, err := s.Stage(ref, digest, engineUser)
				require.NoError(t, err, ref)
				assert.Equal(t, st.Path, st2.Path, ref)
			}
		})
	}
}

// A staged tree that was tampered with or left half made is made again.
func TestStageDirectoryRecreates(t *testing.T) {
	s, models, _ := newTestStager(t)
	hfTree(t, filepath.Join(models, "m"))
	st, err := s.Stage("m", "", engineUser)
	require.NoError(t, err)

	require.NoError(t, os.Remove(filepath.Join(st.Path, "config.json")))
	writeFile(t, filepath.Join(st.Path, "extra.bin"), "not in the model")
	again, err := s.Stage("m", st.Digest, engineUser)
	require.NoError(t, err)
	assert.Equal(t, st.Path, again.Path)
	assert.FileExists(t, filepath.Join(st.Path, "config.json"))
	assert.NoFileExists(t, filepath.Join(st.Path, "extra.bin"))
	entries, err := os.ReadDir(filepath.Dir(st.Path))
	require.NoError(t, err)
	assert.Len(t, entries, 1, "the old tree is gone")
}

// A directory model holds regular files and directories only, all of
// them readable by the engine's user, within bounds; anything else is
// refused by Resolve and Stage alike, before anything is staged.
func TestDirectoryRefusals(t *testing.T) {
	tests := []struct {
		name  string
		setup func(t *testing.T, dir, outside string)
		want  string
		perm  bool
	}{
		{
			name: "symlink leading out",
			setup: func(t *testing.T, dir, outside string) {
				writeFile(t, filepath.Join(outside, "secret"), "secret")
				require.NoError(t, os.Symlink(filepath.Join(outside, "secret"), filepath.Join(dir, "model.safetensors")))
			},
			want: `contains "model.safetensors", which is a symbolic link`,
		},
		{
			name: "relative symlink leading out",
			setup: func(t *testing.T, dir, outside string) {
				writeFile(t, filepath.Join(outside, "secret"), "secret")
				require.NoError(t, os.Symlink("../../outside/secret", filepath.Join(dir, "sub", "x")))
			},
			want: `contains "sub/x", which is a symbolic link`,
		},
		{
			name: "symlink staying inside",
			setup: func(t *testing.T, dir, _ string) {
				require.NoError(t, os.Symlink("config.json", filepath.Join(dir, "alias.json")))
			},
			want: `contains "alias.json", which is a symbolic link: a model directory may hold only regular files and directories`,
		},
		{
			name: "symlinked directory",
			setup: func(t *testing.T, dir, outside string) {
				writeFile(t, filepath.Join(outside, "d", "secret"), "secret")
				require.NoError(t, os.Symlink(filepath.Join(outside, "d"), filepath.Join(dir, "d")))
			},
			want: `contains "d", which is a symbolic link`,
		},
		{
			name: "socket",
			setup: func(t *testing.T, dir, _ string) {
				l, err := net.Listen("unix", filepath.Join(dir, "sock"))
				require.NoError(t, err)
				t.Cleanup(func() { l.Close() })
			},
			want: `contains "sock", which is not a regular file or a directory (it is a socket)`,
		},
		{
			name: "file the engine cannot read",
			setup: func(t *testing.T, dir, _ string) {
				p := filepath.Join(dir, "sub", "weights.bin")
				writeFile(t, p, "private")
				require.NoError(t, os.Chmod(p, 0o600))
			},
			want: `contains "sub/weights.bin", which is not readable by the engine's user engine (uid 4242)`,
			perm: true,
		},
		{
			name: "directory the engine cannot list",
			setup: func(t *testing.T, dir, _ string) {
				require.NoError(t, os.Chmod(filepath.Join(dir, "sub"), 0o711))
			},
			want: `contains "sub", which is a directory the engine's user engine (uid 4242) cannot list`,
			perm: true,
		},
		{
			name: "top the engine cannot list",
			setup: func(t *testing.T, dir, _ string) {
				require.NoError(t, os.Chmod(dir, 0o750))
			},
			want: `not found or not readable by the engine's user engine (uid 4242)`,
			perm: true,
		},
		{
			name: "newline in a name",
			setup: func(t *testing.T, dir, _ string) {
				writeFile(t, filepath.Join(dir, "a\nb"), "x")
			},
			want: `contains "a\nb", which has a newline in its name`,
		},
		{
			name: "too many entries",
			setup: func(t *testing.T, dir, _ string) {
				for i := range maxTreeEntries {
					require.NoError(t, os.WriteFile(filepath.Join(dir, "sub", fmt.Sprint(i)), nil, 0o644))
				}
			},
			want: "holds more than 1024 entries (files and directories): too many for a model directory",
		},
		{
			name: "too deep",
			setup: func(t *testing.T, dir, _ string) {
				deep := dir
				for range maxTreeDepth + 1 {
					deep = filepath.Join(deep, "d")
				}
				writeFile(t, filepath.Join(deep, "f"), "deep")
			},
			want: "which is more than 16 directories deep",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newTrustEnv(t)
			dir := filepath.Join(e.models, "m")
			writeFile(t, filepath.Join(dir, "config.json"), "{}")
			require.NoError(t, os.Mkdir(filepath.Join(dir, "sub"), 0o755))
			tt.setup(t, dir, e.outside)
			for _, ref := range []string{"m", dir} {
				_, err := e.s.Resolve(ref, engineUser)
				var re *RefError
				require.ErrorAs(t, err, &re, ref)
				assert.Equal(t, ref, re.Ref)
				assert.Contains(t, err.Error(), tt.want)
				assert.Equal(t, tt.perm, errors.Is(err, os.ErrPermission), err.Error())
				_, err = e.s.Stage(ref, "", engineUser)
				require.ErrorAs(t, err, &re, ref)
				assert.Contains(t, err.Error(), tt.want)
				assert.NoDirExists(t, e.stage, "nothing staged, nothing created")
			}
		})
	}

	t.Run("empty directory", func(t *testing.T) {
		e := newTrustEnv(t)
		require.NoError(t, os.MkdirAll(filepath.Join(e.models, "m", "sub"), 0o755))
		_, err := e.s.Stage("m", "", engineUser)
		assert.ErrorContains(t, err, "is a directory that holds no files")
	})
	t.Run("the root directory", func(t *testing.T) {
		e := newTrustEnv(t)
		e.s.SetPoolModels([]string{"/"})
		_, err := e.s.Resolve("/", engineUser)
		assert.ErrorContains(t, err, "is the root directory, not a model directory")
	})
}

// A FIFO (or device node) inside a model directory is refused from its
// O_PATH descriptor: never opened, so nothing blocks and no writer wakes.
func TestDirectoryWithAFIFOIsRefusedWithoutBlocking(t *testing.T) {
	e := newTrustEnv(t)
	dir := filepath.Join(e.models, "m")
	writeFile(t, filepath.Join(dir, "config.json"), "{}")
	fifo := filepath.Join(dir, "sub", "model.safetensors")
	require.NoError(t, os.MkdirAll(filepath.Dir(fifo), 0o755))
	require.NoError(t, unix.Mkfifo(fifo, 0o666))
	dev := filepath.Join(dir, "0-watchdog") // listed first
	haveDev := unix.Mknod(dev, unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))) == nil

	in, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	require.NoError(t, err)
	defer unix.Close(in)
	_, err = unix.InotifyAddWatch(in, fifo, unix.IN_OPEN|unix.IN_ACCESS)
	require.NoError(t, err)
	if haveDev {
		_, err = unix.InotifyAddWatch(in, dev, unix.IN_OPEN|unix.IN_ACCESS)
		require.NoError(t, err)
	}

	stage := func(want string) {
		t.Helper()
		done := make(chan error, 1)
		go func() {
			_, err := e.s.Stage("m", "", engineUser)
			done <- err
		}()
		select {
		case err := <-done:
			assert.ErrorContains(t, err, want)
		case <-time.After(10 * time.Second):
			t.Fatal("staging blocked")
		}
		var buf [4096]byte
		n, _ := unix.Read(in, buf[:])
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			assert.Zero(t, ev.Mask&(unix.IN_OPEN|unix.IN_ACCESS), "the FIFO or device was opened")
			off += unix.SizeofInotifyEvent + int(ev.Len)
		}
		assert.NoDirExists(t, e.stage)
	}
	if haveDev {
		stage(`contains "0-watchdog", which is not a regular file or a directory (it is a character device)`)
		require.NoError(t, os.Remove(dev))
	}
	stage(`contains "sub/model.safetensors", which is not a regular file or a directory (it is a named pipe)`)
}

// A bus ref naming a directory stays under the same rules as a file: it
// must lie beneath an allowed model directory, and cannot be one.
func TestDirectoryRefOutsideModelDirsIsRefused(t *testing.T) {
	e := newTrustEnv(t)
	hfTree(t, filepath.Join(e.outside, "m"))
	require.NoError(t, os.Symlink("../outside/m", filepath.Join(e.models, "link")))
	for ref, want := range map[string]string{
		filepath.Join(e.outside, "m"): "not beneath an allowed model directory",
		e.models:                      "not beneath an allowed model directory",
		e.models + "/.":               "not beneath an allowed model directory",
		".":                           "names the models directory itself",
		"link":                        "escapes the model directory",
	} {
		_, err := e.s.Stage(ref, "", engineUser)
		assert.ErrorContains(t, err, want, ref)
	}
	assert.NoDirExists(t, e.stage)
}

// Only a file that changed (inode, size, mtime or ctime) is hashed again;
// the others are answered from the digest cache, persisted or not.
func TestDirectoryChangedFileIsHashedAgain(t *testing.T) {
	e := newTrustEnv(t)
	dir := filepath.Join(e.models, "m")
	files := hfTree(t, dir)
	hashes := countHashes(e.s)
	v1, err := e.s.Stage("m", "", engineUser)
	require.NoError(t, err)
	n := hashes.Load()

	// Rewritten in place, size and mtime put back: its ctime tells.
	p := filepath.Join(dir, "config.json")
	st := lstat(t, p)
	require.NoError(t, os.WriteFile(p, []byte(strings.ToUpper(files["config.json"])), 0o644))
	mtime := time.Unix(st.Mtim.Sec, st.Mtim.Nsec)
	require.NoError(t, os.Chtimes(p, mtime, mtime))
	_, err = e.s.Stage("m", v1.Digest, engineUser)
	assert.ErrorIs(t, err, ErrDigestMismatch)
	v2, err := e.s.Stage("m", "", engineUser)
	require.NoError(t, err)
	assert.NotEqual(t, v1.Digest, v2.Digest)
	assert.EqualValues(t, n+1, hashes.Load(), "one file hashed again")

	// Replaced by a new inode; a file added: each hashed once.
	replaceFile(t, filepath.Join(dir, "tokenizer.json"), `{"version": "2.0"}`)
	writeFile(t, filepath.Join(dir, "generation_config.json"), "{}")
	v3, err := e.s.Stage("m", "", engineUser)
	require.NoError(t, err)
	assert.EqualValues(t, n+3, hashes.Load())
	data, err := os.ReadFile(filepath.Join(v3.Path, "generation_config.json"))
	require.NoError(t, err)
	assert.Equal(t, "{}", string(data))

	// A new Stager reads the cache from disk: nothing to hash.
	s2 := newStager(t, e.models, e.stage, WithModelDirs(e.extra))
	hashes2 := countHashes(s2)
	reads2 := countReads(s2)
	v3again, err := s2.Stage("m", v3.Digest, engineUser)
	require.NoError(t, err)
	assert.Equal(t, v3.Path, v3again.Path)
	assert.Zero(t, hashes2.Load())
	assert.Zero(t, reads2.Load(), "an unchanged directory costs no read")

	// A file to hash that changed between Resolve and Digest is refused
	// as changed; so is a file added meanwhile.
	writeFile(t, filepath.Join(dir, "late.json"), "late")
	src, err := e.s.Resolve("m", engineUser)
	require.NoError(t, err)
	replaceFile(t, filepath.Join(dir, "late.json"), "later")
	_, err = e.s.Digest(src)
	assert.ErrorIs(t, err, errChanged)
	assert.ErrorContains(t, err, `changed since it was resolved: "late.json" is another version`)
	src, err = e.s.Resolve("m", engineUser)
	require.NoError(t, err)
	replaceFile(t, filepath.Join(dir, "late.json"), "latest")
	writeFile(t, filepath.Join(dir, "added.json"), "added")
	_, err = e.s.Digest(src)
	assert.ErrorContains(t, err, `changed since it was resolved: "added.json" is new`)
}

// Pruning removes staged trees not kept, with their manifests, through
// descriptors: a symlink planted in a staged tree is removed, its target
// left alone; the sources are never touched, nor hashed again for it.
func TestPruneDirectory(t *testing.T) {
	e := newTrustEnv(t)
	hfTree(t, filepath.Join(e.models, "a"))
	writeFile(t, filepath.Join(e.models, "b", "config.json"), "b")
	writeFile(t, filepath.Join(e.models, "b", "sub", "w.bin"), "weights of b")
	writeFile(t, filepath.Join(e.models, "f.gguf"), "a file model")
	hashes := countHashes(e.s)
	a, err := e.s.Stage("a", "", engineUser)
	require.NoError(t, err)
	b, err := e.s.Stage("b", "", engineUser)
	require.NoError(t, err)
	f, err := e.s.Stage("f.gguf", "", engineUser)
	require.NoError(t, err)
	manifest := func(st Staged) string { return filepath.Dir(st.Path) + manifestSuffix }
	require.FileExists(t, manifest(a))
	require.FileExists(t, manifest(b))

	victim := filepath.Join(e.outside, "victim")
	writeFile(t, filepath.Join(victim, "keep.bin"), "victim")
	require.NoError(t, os.Symlink(victim, filepath.Join(b.Path, "sub", "planted")))
	stale := filepath.Join(filepath.Dir(a.Path), tmpPrefix+"0123456789abcdef")
	writeFile(t, filepath.Join(stale, "half", "made"), "interrupted")
	unknown := filepath.Join(filepath.Dir(f.Path), "sub")
	writeFile(t, filepath.Join(unknown, "x"), "not ours")

	require.NoError(t, e.s.Prune([]string{a.Path, f.Path}))
	assert.DirExists(t, a.Path)
	assert.FileExists(t, manifest(a))
	assert.NoDirExists(t, stale, "an interrupted tree is removed")
	assert.NoDirExists(t, filepath.Dir(b.Path))
	assert.NoFileExists(t, manifest(b))
	assert.FileExists(t, filepath.Join(victim, "keep.bin"), "a planted symlink is not followed")
	assert.FileExists(t, filepath.Join(e.models, "b", "sub", "w.bin"), "sources are never touched")
	assert.FileExists(t, filepath.Join(unknown, "x"), "a file model's staging directory keeps what Prune does not know")

	n := hashes.Load()
	_, err = e.s.Stage("b", b.Digest, engineUser)
	require.NoError(t, err)
	assert.Equal(t, n, hashes.Load(), "pruning a link costs its source no hash")

	require.NoError(t, e.s.Prune(nil))
	entries, err := os.ReadDir(e.stage)
	require.NoError(t, err)
	var left []string
	for _, en := range entries {
		left = append(left, en.Name())
	}
	assert.ElementsMatch(t, []string{cacheFileName, filepath.Base(filepath.Dir(f.Path))}, left)
}

// gatedHash holds every write until the test lets it through, and says
// when it is done.
type gatedHash struct {
	hash.Hash
	gate chan struct{}
	done func()
}

func (g gatedHash) Write(p []byte) (int, error) {
	<-g.gate
	return g.Hash.Write(p)
}

func (g gatedHash) Sum(b []byte) []byte {
	g.done()
	return g.Hash.Sum(b)
}

// Hashing reports a directory's progress over its total size, counting
// the files already hashed as done, while the others are hashed in
// parallel.
func TestDirectoryHashingProgress(t *testing.T) {
	s, models, _ := newTestStager(t)
	dir := filepath.Join(models, "m")
	for i := range 4 {
		writeFile(t, filepath.Join(dir, fmt.Sprintf("model-%d.safetensors", i)), strings.Repeat(fmt.Sprint(i), 2*bufSize+100))
	}
	_, err := s.Stage("m", "", engineUser)
	require.NoError(t, err)
	cached := int64(2*bufSize + 100)
	replaceFile(t, filepath.Join(dir, "model-0.safetensors"), strings.Repeat("x", 3*bufSize))
	replaceFile(t, filepath.Join(dir, "model-1.safetensors"), strings.Repeat("y", 3*bufSize))
	replaceFile(t, filepath.Join(dir, "model-2.safetensors"), strings.Repeat("z", 3*bufSize))
	total := 9*int64(bufSize) + cached

	gate := make(chan struct{})
	var mu sync.Mutex
	hashing, most := 0, 0
	s.newHash = func() hash.Hash {
		mu.Lock()
		hashing++
		most = max(most, hashing)
		mu.Unlock()
		return gatedHash{sha256.New(), gate, func() {
			mu.Lock()
			hashing--
			mu.Unlock()
		}}
	}
	src, err := s.Resolve("m", engineUser)
	require.NoError(t, err)
	assert.Equal(t, total, src.Size)
	done := make(chan error, 1)
	go func() {
		_, err := s.Digest(src)
		done <- err
	}()

	var last int64
	deadline := time.After(20 * time.Second)
	for {
		read, size, ok := s.Hashing("m")
		if ok {
			assert.Equal(t, total, size)
			assert.GreaterOrEqual(t, read, last, "never backwards")
			assert.GreaterOrEqual(t, read, cached, "the cached file counts as done")
			assert.LessOrEqual(t, read, size)
			last = read
		}
		select {
		case err := <-done:
			require.NoError(t, err)
			_, _, ok := s.Hashing("m")
			assert.False(t, ok, "no progress once done")
			assert.Positive(t, last)
			mu.Lock()
			assert.Equal(t, min(3, runtime.GOMAXPROCS(0)), most, "the changed files hashed at once, at most GOMAXPROCS")
			mu.Unlock()
			return
		case gate <- struct{}{}:
		case <-deadline:
			t.Fatal("the digest did not finish")
		}
	}
}

// The tree's digest is the one Manifest and sha256 give.
func TestManifestDigest(t *testing.T) {
	files := []TreeFile{{Rel: "a b", Size: 3}, {Rel: "c/d", Size: 0}}
	digests := []string{sha("abc"), emptyDigest}
	man := Manifest(files, digests)
	assert.Equal(t, sha("abc")[7:]+" 3 a b\n"+emptyDigest[7:]+" 0 c/d\n", string(man))
	sum := sha256.Sum256(man)
	assert.Equal(t, "sha256:"+hex.EncodeToString(sum[:]), manifestDigest(man))
}

// The staged tree's directories are 0755 and its manifest 0644 whatever
// the daemon's umask: the engine's user must get through them.
func TestStageDirectoryUmask(t *testing.T) {
	s, models, stage := newTestStager(t)
	hfTree(t, filepath.Join(models, "m"))
	old := unix.Umask(0o077)
	defer unix.Umask(old)
	st, err := s.Stage("m", "", engineUser)
	require.NoError(t, err)
	assert.Equal(t, uint32(0o710), lstat(t, stage).Mode&0o7777, stage)
	for _, d := range []string{filepath.Dir(st.Path), st.Path, filepath.Join(st.Path, "original"), filepath.Join(st.Path, "original", "tokenizer")} {
		assert.Equal(t, uint32(0o755), lstat(t, d).Mode&0o7777, d)
	}
	assert.Equal(t, uint32(0o644), lstat(t, filepath.Dir(st.Path)+manifestSuffix).Mode&0o7777)
}

// Two names of one inode in a model directory (deduplicated files) stage
// as two links: linking the first changes the ctime the second is checked
// by, which is no change of content.
func TestStageDirectoryWithHardLinkedFiles(t *testing.T) {
	for _, copied := range []bool{false, true} {
		t.Run(map[bool]string{false: "hard links", true: "copies"}[copied], func(t *testing.T) {
			s, models, _ := newTestStager(t)
			dir := filepath.Join(models, "m")
			writeFile(t, filepath.Join(dir, "tokenizer.json"), "same tokenizer")
			require.NoError(t, os.MkdirAll(filepath.Join(dir, "original"), 0o755))
			require.NoError(t, os.Link(filepath.Join(dir, "tokenizer.json"), filepath.Join(dir, "original", "tokenizer.json")))
			if copied {
				s.link = func(string, string) error { return syscall.EXDEV }
			}
			hashes := countHashes(s)
			st, err := s.Stage("m", "", engineUser)
			require.NoError(t, err)
			for _, rel := range []string{"tokenizer.json", "original/tokenizer.json"} {
				data, err := os.ReadFile(filepath.Join(st.Path, rel))
				require.NoError(t, err)
				assert.Equal(t, "same tokenizer", string(data))
			}
			n := hashes.Load()
			again, err := s.Stage("m", st.Digest, engineUser)
			require.NoError(t, err)
			assert.Equal(t, st.Path, again.Path)
			assert.Equal(t, n, hashes.Load(), "staged once, then answered from the cache")
		})
	}
}

// Pools staging one directory at once, by different refs, all get the one
// staged tree, and share their hashes (a link made by one pool may change
// a ctime under another's read: that one hashes again).
func TestStageDirectoryConcurrent(t *testing.T) {
	s, models, _ := newTestStager(t)
	dir := filepath.Join(models, "m")
	files := hfTree(t, dir)
	hashes := countHashes(s)
	refs := []string{"m", dir, "file://" + dir, "m", dir, "m"}
	staged := make([]Staged, len(refs))
	errs := make([]error, len(refs))
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i, ref := range refs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			staged[i], errs[i] = s.Stage(ref, "", engineUser)
		}()
	}
	close(start)
	wg.Wait()
	for i := range refs {
		require.NoError(t, errs[i], refs[i])
		assert.Equal(t, staged[0].Path, staged[i].Path)
	}
	assert.LessOrEqual(t, int(hashes.Load()), 2*(len(files)-1), "no file hashed by every pool")
	for rel, content := range files {
		data, err := os.ReadFile(filepath.Join(staged[0].Path, rel))
		require.NoError(t, err)
		assert.Equal(t, content, string(data))
	}
}

// A directory must be listable (read and search bits) by the class of
// the engine's user the kernel picks: owner, then group, then other.
func TestCanList(t *testing.T) {
	u := User{Name: "e", UID: 10, GID: 20, Groups: []uint32{30}}
	tests := []struct {
		mode, uid, gid uint32
		want           bool
	}{
		{0o755, 0, 0, true},
		{0o751, 0, 0, false}, // search without read: no listing
		{0o754, 0, 0, false}, // read without search
		{0o750, 0, 20, true},
		{0o750, 0, 30, true},
		{0o705, 0, 30, false}, // the group's bits, not other's
		{0o500, 10, 0, true},
		{0o055, 10, 0, false}, // the owner's bits, not the group's
		{0o700, 0, 0, false},
	}
	for _, tt := range tests {
		assert.Equal(t, tt.want, u.canList(tt.mode, tt.uid, tt.gid), "mode %#o owner %d group %d", tt.mode, tt.uid, tt.gid)
	}
	assert.True(t, User{}.canList(0, 1, 1), "root")
}
