package bus_test

import (
	"bufio"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// textfileValue reads one sample of the daemon's metrics textfile.
func textfileValue(t *testing.T, path, series string) (float64, bool) {
	f, err := os.Open(path)
	if err != nil {
		return 0, false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), series+" "); ok {
			n, err := strconv.ParseFloat(v, 64)
			require.NoError(t, err)
			return n, true
		}
	}
	return 0, false
}

// In the running daemon, the restart-rate gauge node_exporter reads falls
// to 0 once the restarts have left the storm window, with nothing else
// happening: an alert on it clears when the storm is over.
func TestRestartRateInTheTextfileFallsAfterTheStormWindow(t *testing.T) {
	dir, _ := configure(t)
	conf := filepath.Join(dir, "pool-managerd.conf")
	src, err := os.ReadFile(conf)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(conf, []byte(strings.Replace(string(src), "[Inventory]", "MetricsIntervalSec=1\n[Inventory]", 1)), 0o644))
	pool := filepath.Join(dir, "pools.d", "llama-8b.pool")
	f, err := os.OpenFile(pool, os.O_APPEND|os.O_WRONLY, 0)
	require.NoError(t, err)
	_, err = f.WriteString("StormWindowSec=4\n")
	require.NoError(t, err)
	require.NoError(t, f.Close())
	start(t, dir)
	textfile := filepath.Join(dir, "metrics", "pool-managerd.prom")
	const series = `pool_managerd_restart_rate{pool_id="llama-8b"}`
	rate := func() float64 {
		v, ok := textfileValue(t, textfile, series)
		if !ok {
			return -1
		}
		return v
	}

	waitProp(t, "llama-8b", "Ready", "b true")
	for n := 1; n <= 2; n++ {
		pid := strings.TrimPrefix(getProp(t, "llama-8b", "MainPID"), "u ")
		sh(t, "kill", "-SEGV", pid)
		waitProp(t, "llama-8b", "CrashCount", "u "+strconv.Itoa(n))
		waitProp(t, "llama-8b", "Ready", "b true")
	}
	lastRestart := time.Now()
	require.Eventually(t, func() bool { return rate() == 2 }, 10*time.Second, 100*time.Millisecond,
		"the textfile shows both restarts in the window")
	require.Eventually(t, func() bool { return rate() == 0 }, 15*time.Second, 100*time.Millisecond,
		"the restart rate falls to 0 after the window")
	assert.GreaterOrEqual(t, time.Since(lastRestart), 3*time.Second, "not before the restarts left the window")
	assert.Equal(t, "u 2", getProp(t, "llama-8b", "CrashCount"), "no crash meanwhile")
	assert.Equal(t, "b true", getProp(t, "llama-8b", "Ready"))
}
