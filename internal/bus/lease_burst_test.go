package bus_test

import (
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	api "github.com/llorch/pool-managerd/dbus"
	"github.com/llorch/pool-managerd/internal/bus"
)

// A router's burst of lease calls is announced at most once per 20 ms,
// not once a call: the signals it would cost share the CPUs and the bus
// with every reply. A Get answers the count at once, and the burst's end
// is announced.
func TestALeaseBurstIsAnnouncedOncePerWindow(t *testing.T) {
	daemon(t)
	waitProp(t, "llama-8b", "Ready", "b true")
	watcher, err := dbus.ConnectSystemBus()
	require.NoError(t, err)
	defer watcher.Close()
	require.NoError(t, watcher.AddMatchSignal(dbus.WithMatchObjectPath(api.PoolPath("llama-8b")),
		dbus.WithMatchInterface("org.freedesktop.DBus.Properties"), dbus.WithMatchMember("PropertiesChanged")))
	sigs := make(chan *dbus.Signal, 4096)
	watcher.Signal(sigs)
	router, err := dbus.ConnectSystemBus()
	require.NoError(t, err)
	defer router.Close()
	obj := router.Object(bus.Name, mgr)

	const calls = 100
	t0 := time.Now()
	for i := range calls {
		var lease string
		require.NoError(t, obj.Call(bus.ManagerIface+".AcquireLease", 0, "llama-8b").Store(&lease))
		if i == 0 {
			v, err := router.Object(bus.Name, api.PoolPath("llama-8b")).GetProperty(bus.PoolIface + ".ActiveLeases")
			require.NoError(t, err)
			assert.Equal(t, uint32(1), v.Value(), "a Get answers the count at once")
		}
		require.NoError(t, obj.Call(bus.ManagerIface+".ReleaseLease", 0, lease).Err)
	}
	took := time.Since(t0)

	// The last announcement comes within a window of the burst's end.
	var counts []uint32
	quiet := time.After(time.Second)
	for done := false; !done; {
		select {
		case s := <-sigs:
			changed, _ := s.Body[1].(map[string]dbus.Variant)
			if v, ok := changed["ActiveLeases"]; ok {
				counts = append(counts, v.Value().(uint32))
			}
		case <-quiet:
			done = true
		}
	}
	require.NotEmpty(t, counts)
	assert.Equal(t, uint32(0), counts[len(counts)-1], "the burst's end is announced: %v", counts)
	most := int(took/(20*time.Millisecond)) + 2
	assert.LessOrEqual(t, len(counts), most, "%d lease calls in %s announced %d times: %v", 2*calls, took, len(counts), counts)
	t.Logf("%d lease calls in %s: %d announcements", 2*calls, took, len(counts))
}
