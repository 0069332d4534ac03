package bus_test

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	api "github.com/llorch/pool-managerd/dbus"
)

// A reload of a big model says where it is: Operation "staging" with the
// share of bytes hashed in Progress, sent at most 4 times a second.
func TestReloadShowsItsProgress(t *testing.T) {
	dir, _ := daemon(t)
	waitProp(t, "llama-8b", "Ready", "b true")
	big := filepath.Join(dir, "models", "big.gguf")
	f, err := os.Create(big)
	require.NoError(t, err)
	_, err = f.WriteString("GGUF\x03\x00\x00\x00 big")
	require.NoError(t, err)
	require.NoError(t, f.Truncate(3<<30)) // sparse: hashed at memory speed, yet for seconds
	require.NoError(t, f.Close())

	conn, err := dbus.ConnectSystemBus()
	require.NoError(t, err)
	defer conn.Close()
	path := api.PoolPath("llama-8b")
	require.NoError(t, conn.AddMatchSignal(dbus.WithMatchObjectPath(path), dbus.WithMatchInterface("org.freedesktop.DBus.Properties"), dbus.WithMatchMember("PropertiesChanged")))
	sigs := make(chan *dbus.Signal, 1024)
	conn.Signal(sigs)

	done := make(chan error, 1)
	go func() {
		_, err := call("Reload", "sst", "llama-8b", "big.gguf", "30000")
		done <- err
	}()
	type sample struct {
		at       time.Time
		op       string
		progress float64
		ok       bool
	}
	var seen []sample
	var result error
loop:
	for {
		select {
		case result = <-done:
			break loop
		case s := <-sigs:
			changed, _ := s.Body[1].(map[string]dbus.Variant)
			smp := sample{at: time.Now()}
			if v, ok := changed["Operation"]; ok {
				smp.op, _ = v.Value().(string)
			}
			if v, ok := changed["Progress"]; ok {
				smp.progress, smp.ok = v.Value().(float64)
			}
			seen = append(seen, smp)
		case <-time.After(90 * time.Second):
			t.Fatal("the reload did not end")
		}
	}
	require.NoError(t, result)
	var staging, progress []string
	var times []time.Time
	for _, s := range seen {
		if s.op != "" {
			staging = append(staging, s.op)
		}
		if s.ok && s.progress > 0 && s.progress < 1 {
			progress = append(progress, strconv.FormatFloat(s.progress, 'f', 2, 64))
			times = append(times, s.at)
		}
	}
	assert.Contains(t, staging, "staging")
	assert.Contains(t, staging, "starting")
	require.NotEmpty(t, progress, "the hash's progress is shown; operations seen: %v", staging)
	// The rate is the sender's: judged over the whole series, since a
	// busy bus delivers two signals sent 250 ms apart closer together.
	span := times[len(times)-1].Sub(times[0])
	assert.LessOrEqual(t, float64(len(times)-1), 4*span.Seconds()+1, "at most 4 progress signals a second: %v over %s", progress, span)
	t.Logf("progress while hashing 3 GiB: %s", strings.Join(progress, " "))
	assert.Equal(t, `s "big.gguf"`, getProp(t, "llama-8b", "Model"))
	assert.Equal(t, `s ""`, getProp(t, "llama-8b", "Operation"))
}
