package metrics

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func textfileRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	m := New(reg)
	m.InitPool("p")
	m.PoolReady.WithLabelValues("p").Set(1)
	return reg
}

// A user who can write the textfile directory keeps replacing every
// temporary name in it by a symlink to a root-only file: the file's mode
// never changes, because no name in the directory is ever chmodded.
func TestTextfileSymlinkSwapsNeverChmodARootOnlyFile(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	reg := textfileRegistry()
	dir := filepath.Join(t.TempDir(), "textfile")
	require.NoError(t, os.Mkdir(dir, 0o755))
	// Sticky and world-writable, as a shared directory is: allowed.
	require.NoError(t, os.Chmod(dir, os.ModeSticky|0o777))
	secret := filepath.Join(t.TempDir(), "shadow")
	require.NoError(t, os.WriteFile(secret, []byte("root only\n"), 0o600))
	path := filepath.Join(dir, "pool-managerd.prom")

	stop := make(chan struct{})
	var wg sync.WaitGroup
	swaps := 0
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			d, err := os.Open(dir)
			if err != nil {
				continue
			}
			names, _ := d.Readdirnames(-1)
			d.Close()
			for _, n := range names {
				if n == filepath.Base(path) {
					continue
				}
				p := filepath.Join(dir, n)
				if fi, err := os.Lstat(p); err != nil || fi.Mode()&os.ModeSymlink != 0 {
					continue
				}
				if os.Remove(p) == nil && os.Symlink(secret, p) == nil {
					swaps++
				}
			}
		}
	})
	deadline := time.Now().Add(3 * time.Second)
	writes := 0
	for time.Now().Before(deadline) {
		_ = writeTextfile(path, reg)
		writes++
		fi, err := os.Stat(secret)
		require.NoError(t, err)
		if fi.Mode().Perm() != 0o600 {
			break
		}
	}
	close(stop)
	wg.Wait()
	fi, err := os.Stat(secret)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm(), "the root-only file was chmodded through a swapped symlink (%d writes, %d swaps)", writes, swaps)
	t.Logf("%d writes, %d swaps", writes, swaps)
	require.Positive(t, swaps, "the attacker never swapped a temporary file")
}

// A textfile directory owned by another user, not sticky, is refused:
// nothing is written, and the refusal is logged once with the error in
// its field however often the metrics change.
func TestTextfileInADirectoryAnotherUserOwnsIsRefused(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	reg := textfileRegistry()
	dir := filepath.Join(t.TempDir(), "textfile")
	require.NoError(t, os.Mkdir(dir, 0o755))
	require.NoError(t, os.Chown(dir, 65534, 65534))
	path := filepath.Join(dir, "pool-managerd.prom")

	err := writeTextfile(path, reg)
	require.ErrorContains(t, err, "owned by uid 65534")
	_, err = os.Lstat(path)
	assert.ErrorIs(t, err, os.ErrNotExist)

	m := New(prometheus.NewRegistry())
	logs := &syncBuffer{}
	log := slog.New(slog.NewTextHandler(logs, nil))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { m.Export(ctx, reg, path, time.Hour, "", log); close(done) }()
	for range 5 {
		m.Touch()
		time.Sleep(100 * time.Millisecond)
	}
	cancel()
	<-done
	assert.Equal(t, 1, strings.Count(logs.String(), "writing the metrics textfile failed"), logs.String())
	assert.Contains(t, logs.String(), "ERROR=\"textfile directory "+dir+" refused")
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	assert.Empty(t, entries)

	// Root's own directory that its group or anyone can write is
	// refused the same way; sticky, it is allowed.
	require.NoError(t, os.Chown(dir, 0, 65534))
	require.NoError(t, os.Chmod(dir, 0o775))
	require.ErrorContains(t, writeTextfile(path, reg), "writable by others")
	require.NoError(t, os.Chmod(dir, os.ModeSticky|0o775))
	require.NoError(t, writeTextfile(path, reg))
}

// A textfile directory that is a symlink is refused, and nothing is
// written where it points.
func TestTextfileDirectoryThatIsASymlinkIsRefused(t *testing.T) {
	reg := textfileRegistry()
	real := t.TempDir()
	link := filepath.Join(t.TempDir(), "textfile")
	require.NoError(t, os.Symlink(real, link))
	err := writeTextfile(filepath.Join(link, "pool-managerd.prom"), reg)
	require.ErrorContains(t, err, "a symlink is refused")
	entries, err := os.ReadDir(real)
	require.NoError(t, err)
	assert.Empty(t, entries)
}

// The textfile holds the gathered metrics in the text format, mode 0644
// whatever the umask, and no temporary file is left beside it.
func TestTextfileIsTheMetricsAndMode0644(t *testing.T) {
	reg := textfileRegistry()
	dir := t.TempDir()
	path := filepath.Join(dir, "pool-managerd.prom")
	old := syscall.Umask(0o077)
	defer syscall.Umask(old)
	for range 3 {
		require.NoError(t, writeTextfile(path, reg))
	}
	fi, err := os.Lstat(path)
	require.NoError(t, err)
	assert.True(t, fi.Mode().IsRegular())
	assert.Equal(t, os.FileMode(0o644), fi.Mode().Perm())
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(f)
	require.NoError(t, err)
	want, err := reg.Gather()
	require.NoError(t, err)
	assert.Len(t, fams, len(want))
	ready := fams["pool_managerd_pool_ready"]
	require.NotNil(t, ready)
	require.Len(t, ready.GetMetric(), 1)
	assert.Equal(t, 1.0, ready.GetMetric()[0].GetGauge().GetValue())
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	require.Len(t, entries, 1)
	assert.Equal(t, "pool-managerd.prom", entries[0].Name())
}
