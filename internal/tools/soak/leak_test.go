package main

import (
	"bytes"
	"os"
	"runtime/pprof"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// series is a count at the soak's checkpoints, 500 to 1000 faults.
func series(key string, counts ...float64) []Point {
	var ps []Point
	for i, c := range counts {
		ps = append(ps, Point{Faults: 500 + 100*i, Counts: map[string]float64{key: c, "steady": 30}})
	}
	return ps
}

func TestLeakDetectorTellsGrowthFromNoise(t *testing.T) {
	for _, tc := range []struct {
		name   string
		counts []float64
		leak   bool
	}{
		{"a stack growing by one every 100 faults is a leak", []float64{40, 41, 42, 43, 44, 45}, true},
		{"a leak that started before the window is still one", []float64{90, 91, 92, 93, 94, 95}, true},
		{"a stack growing by two every 100 faults is a leak", []float64{10, 12, 14, 16, 18, 20}, true},
		{"a leak seen through ±1 of noise is still one", []float64{41, 41, 43, 43, 45, 45}, true},
		{"a stack varying by ±1 is not a leak", []float64{40, 41, 39, 41, 39, 41}, false},
		{"the worst ±1 wander (low half, then high half) is not a leak", []float64{39, 39, 39, 41, 41, 41}, false},
		{"one more at the end than at the start is not a leak", []float64{45, 45, 45, 45, 45, 46}, false},
		{"a stack that appears once and stays is not a leak", []float64{0, 1, 1, 1, 1, 1}, false},
		{"a stack that shrinks is not a leak", []float64{45, 44, 43, 42, 41, 40}, false},
		{"a rise that falls back by the end is not a leak", []float64{40, 42, 44, 46, 48, 40}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rises, err := Rising(series("main.leaky", tc.counts...), 3)
			require.NoError(t, err)
			if tc.leak {
				require.Len(t, rises, 1)
				assert.Equal(t, "main.leaky", rises[0].Key)
				assert.Equal(t, tc.counts[0], rises[0].First)
				assert.Equal(t, tc.counts[len(tc.counts)-1], rises[0].Last)
			} else {
				assert.Empty(t, rises)
			}
		})
	}
}

func TestLeakDetectorNamesEveryGrowingStackSteepestFirst(t *testing.T) {
	var ps []Point
	for i := range 6 {
		ps = append(ps, Point{Faults: 500 + 100*i, Counts: map[string]float64{
			"slow":   float64(10 + i),
			"fast":   float64(10 + 3*i),
			"steady": 7,
			"noisy":  float64(7 + i%2),
		}})
	}
	rises, err := Rising(ps, 3)
	require.NoError(t, err)
	require.Len(t, rises, 2)
	assert.Equal(t, "fast", rises[0].Key)
	assert.InDelta(t, 15, rises[0].Fitted, 1e-9)
	assert.Equal(t, "slow", rises[1].Key)
	assert.InDelta(t, 5, rises[1].Fitted, 1e-9)
}

func TestLeakDetectorRefusesPointsOutOfOrder(t *testing.T) {
	for _, tc := range []struct {
		name   string
		points []Point
	}{
		{"no point", nil},
		{"one point", []Point{{Faults: 500}}},
		{"the same fault count twice", []Point{{Faults: 500}, {Faults: 500}}},
		{"faults going back", []Point{{Faults: 600}, {Faults: 500}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Rising(tc.points, 3)
			assert.Error(t, err)
		})
	}
}

func TestLeastKeepsWhatIsInEverySample(t *testing.T) {
	got := Least([]map[string]float64{
		{"ticker": 1, "probe": 1, "conn": 3},
		{"ticker": 1, "conn": 4},
		{"ticker": 1, "probe": 2, "conn": 3},
	})
	assert.Equal(t, map[string]float64{"ticker": 1, "conn": 3}, got)
}

func parkedHere(c chan struct{}) { <-c }

func startParked(c chan struct{}) {
	for range 7 {
		go parkedHere(c)
	}
}

func TestGoroutinesAreGroupedByFunctionAndCreatorFromARealDump(t *testing.T) {
	c := make(chan struct{})
	defer close(c)
	startParked(c)
	const id = "github.com/llorch/pool-managerd/internal/tools/soak.parkedHere\ncreated by github.com/llorch/pool-managerd/internal/tools/soak.startParked"
	var counts map[string]float64
	var where map[string]string
	require.Eventually(t, func() bool {
		var buf bytes.Buffer
		require.NoError(t, pprof.Lookup("goroutine").WriteTo(&buf, 2))
		var err error
		counts, where, err = Goroutines(buf.Bytes())
		require.NoError(t, err)
		return counts[id] == 7
	}, 5*time.Second, 10*time.Millisecond, "groups: %v", counts)
	assert.Equal(t, id, where[id])
	assert.Equal(t, "github.com/llorch/pool-managerd/internal/tools/soak.parkedHere (created by github.com/llorch/pool-managerd/internal/tools/soak.startParked)", Short(id))
}

func TestGoroutinesGroupAGoroutineWhereverItWaits(t *testing.T) {
	dump := `goroutine 7 [select, 3 minutes]:
github.com/llorch/pool-managerd/internal/supervisor.(*Supervisor).probe(0xc000123456, 0xc0000b2000)
	/src/internal/supervisor/supervisor.go:866 +0x1f4
created by github.com/llorch/pool-managerd/internal/supervisor.(*Supervisor).exec in goroutine 12
	/src/internal/supervisor/supervisor.go:329 +0x88

goroutine 9 [select]:
github.com/llorch/pool-managerd/internal/supervisor.(*Supervisor).probe(0xc000999999, 0xc0000b3000)
	/src/internal/supervisor/supervisor.go:866 +0x1f4
created by github.com/llorch/pool-managerd/internal/supervisor.(*Supervisor).exec in goroutine 14
	/src/internal/supervisor/supervisor.go:329 +0x88

goroutine 11 [IO wait]:
internal/poll.(*FD).Read(0xc000777777, {0xc000800000, 0x1000, 0x1000})
	/usr/local/go/src/internal/poll/fd_unix.go:165 +0x27a
github.com/llorch/pool-managerd/internal/health.(*Prober).Probe(0xc000111111, {0x9a2b40, 0xc0000b4000})
	/src/internal/health/health.go:88 +0x1f4
github.com/llorch/pool-managerd/internal/supervisor.(*Supervisor).probe(0xc000888888, 0xc0000b5000)
	/src/internal/supervisor/supervisor.go:879 +0x2a0
created by github.com/llorch/pool-managerd/internal/supervisor.(*Supervisor).exec in goroutine 16
	/src/internal/supervisor/supervisor.go:329 +0x88

goroutine 1 [chan receive, 3 minutes]:
main.main()
	/src/cmd/pool-managerd/main.go:30 +0x25
`
	counts, where, err := Goroutines([]byte(dump))
	require.NoError(t, err)
	const probe = "github.com/llorch/pool-managerd/internal/supervisor.(*Supervisor).probe\ncreated by github.com/llorch/pool-managerd/internal/supervisor.(*Supervisor).exec"
	assert.Equal(t, map[string]float64{probe: 3, "main.main": 1}, counts)
	assert.Equal(t, probe, where[probe], "where most of them wait")
	assert.Equal(t, "main.main", Short("main.main"))
}

func TestGoroutinesRefusesWhatIsNotADump(t *testing.T) {
	for _, dump := range []string{"", "404 page not found\n", "goroutine profile: total 3\n3 @ 0x1 0x2\n"} {
		_, _, err := Goroutines([]byte(dump))
		assert.Error(t, err, "%q", dump)
	}
}

func TestFDsAreGroupedByKind(t *testing.T) {
	before, err := FDs(os.Getpid())
	require.NoError(t, err)
	var files []*os.File
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	dir := t.TempDir()
	for range 3 {
		r, w, err := os.Pipe()
		require.NoError(t, err)
		files = append(files, r, w)
		f, err := os.CreateTemp(dir, "fd")
		require.NoError(t, err)
		files = append(files, f)
	}
	after, err := FDs(os.Getpid())
	require.NoError(t, err)
	assert.Equal(t, before["pipe"]+6, after["pipe"])
	kind := FDKind(files[2].Name(), nil)
	assert.Equal(t, before[kind]+3, after[kind], "temp files as one kind %q", kind)
}

func TestFDKindNamesSocketsByProtocolAndNumbersAsN(t *testing.T) {
	protos := map[string]string{"101": "unix", "102": "tcp"}
	for target, kind := range map[string]string{
		"socket:[101]":           "socket:unix",
		"socket:[102]":           "socket:tcp",
		"socket:[999]":           "socket",
		"pipe:[77]":              "pipe",
		"anon_inode:[eventpoll]": "anon_inode:[eventpoll]",
		"/proc/4242/stat":        "/proc/N/stat",
		"/dev/nvidia3":           "/dev/nvidiaN",
	} {
		assert.Equal(t, kind, FDKind(target, protos), target)
	}
}

// The soak takes load=N and nothing else; a bad argument is refused
// before anything is built.
func TestParseArgs(t *testing.T) {
	n, err := parseArgs(nil)
	require.NoError(t, err)
	assert.Equal(t, 0, n)
	n, err = parseArgs([]string{"load=2"})
	require.NoError(t, err)
	assert.Equal(t, 2, n)
	for _, bad := range [][]string{{"load"}, {"load=65"}, {"load=-1"}, {"rounds=3"}, {"2"}} {
		_, err := parseArgs(bad)
		assert.Error(t, err, "%v", bad)
		assert.ErrorContains(t, err, "usage: soak [load=N]", "%v", bad)
	}
}
