package model

import (
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// BenchmarkTreeDigest hashes a directory of 4 files (64 MiB each, or
// MODEL_TREE_BENCH_MB) with an empty digest cache, and sha256sum over the
// same files in the same run, page cache warm for both. x-sha256sum is
// sha256sum's time over the tree's: above 1 the tree is faster.
func BenchmarkTreeDigest(b *testing.B) {
	mb := 64
	if v := os.Getenv("MODEL_TREE_BENCH_MB"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			b.Fatalf("MODEL_TREE_BENCH_MB=%q: want a positive number", v)
		}
		mb = n
	}
	if _, err := exec.LookPath("sha256sum"); err != nil {
		b.Skip("no sha256sum")
	}
	root := b.TempDir()
	for _, d := range []string{filepath.Dir(root), root} { // the engine passes through
		if err := os.Chmod(d, 0o755); err != nil {
			b.Fatal(err)
		}
	}
	models := filepath.Join(root, "models")
	var paths []string
	chunk := make([]byte, 1<<20)
	rng := rand.NewChaCha8([32]byte{1})
	for i := range 4 {
		p := filepath.Join(models, "m", fmt.Sprintf("model-%05d-of-00004.safetensors", i+1))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			b.Fatal(err)
		}
		f, err := os.Create(p)
		if err != nil {
			b.Fatal(err)
		}
		for range mb {
			rng.Read(chunk)
			if _, err := f.Write(chunk); err != nil {
				b.Fatal(err)
			}
		}
		if err := f.Close(); err != nil {
			b.Fatal(err)
		}
		paths = append(paths, p)
	}
	sha256sum := func() time.Duration {
		start := time.Now()
		if out, err := exec.Command("sha256sum", paths...).CombinedOutput(); err != nil {
			b.Fatalf("sha256sum: %v: %s", err, out)
		}
		return time.Since(start)
	}
	sha256sum() // the page cache warm for both

	var tree, sum time.Duration
	b.SetBytes(4 * int64(mb) << 20)
	b.ResetTimer()
	for i := range b.N {
		s := newStager(b, models, filepath.Join(root, "stage"+strconv.Itoa(i))) // an empty cache
		start := time.Now()
		src, err := s.Resolve("m", engineUser)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := s.Digest(src); err != nil {
			b.Fatal(err)
		}
		tree += time.Since(start)
		b.StopTimer()
		sum += sha256sum()
		b.StartTimer()
	}
	b.ReportMetric(float64(sum)/float64(tree), "x-sha256sum")
	b.ReportMetric(float64(4*int64(mb)<<20)*float64(b.N)/sum.Seconds()/1e6, "sha256sum-MB/s")
}
