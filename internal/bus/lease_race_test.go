package bus

import (
	"context"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/manager"
	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

// A router's AcquireLease and its departure from the bus race: method
// calls run beside the loop that handles departures. A lease added after
// its caller's departure was handled is undone, not kept forever.
func TestLeaseOfDepartedCallerIsNotKept(t *testing.T) {
	sandbox.Need(t)
	// The server runs here, on the sandbox's system bus, under the shipped
	// policy; the installed daemon must not hold the name.
	exec.Command("systemctl", "stop", "pool-managerd.service").Run()
	policy, err := os.ReadFile("../../dbus/org.llorch.PoolManager1.conf")
	require.NoError(t, err)
	require.NoError(t, os.WriteFile("/etc/dbus-1/system.d/org.llorch.PoolManager1.conf", policy, 0o644))
	out, err := exec.Command("systemctl", "reload", "dbus.service").CombinedOutput()
	require.NoError(t, err, "%s", out)

	e := testpool.New(t, nil)
	p := e.Pool("race", "0", "", "")
	_, err = p.Wait("ready", testpool.ReadyAfter(1))
	require.NoError(t, err)

	client, err := dbus.ConnectSystemBus()
	require.NoError(t, err)
	defer client.Close()
	router := client.Names()[0]
	holding, left, answered := make(chan struct{}, 1), make(chan struct{}, 1), make(chan struct{}, 1)
	hold := make(chan struct{})
	var release sync.Once
	letGo := func() { release.Do(func() { close(hold) }) }
	t.Cleanup(letGo)
	h := hooks{
		acquiring: func(sender string) {
			if sender == router {
				holding <- struct{}{}
				<-hold
			}
		},
		left: func(name string) {
			if name == router {
				left <- struct{}{}
			}
		},
		acquired: func(sender string) {
			if sender == router {
				answered <- struct{}{}
			}
		},
	}

	ctx, cancel := context.WithCancel(context.Background())
	conn, err := dbus.ConnectSystemBus()
	require.NoError(t, err)
	t.Cleanup(func() {
		cancel()
		conn.Close()
	})
	_, err = serve(ctx, conn, manager.New(p.Supervisor), slog.New(slog.DiscardHandler), "pool-admin", h)
	require.NoError(t, err)

	wait := func(c chan struct{}, what string) {
		t.Helper()
		select {
		case <-c:
		case <-time.After(20 * time.Second):
			require.FailNow(t, "timed out: "+what)
		}
	}
	client.Object(Name, ManagerPath).Go(ManagerIface+".AcquireLease", dbus.FlagNoReplyExpected, nil, "race")
	wait(holding, "the AcquireLease reaches the server")
	client.Close()
	wait(left, "the router's departure is handled")
	letGo()
	wait(answered, "the AcquireLease answers")
	assert.Equal(t, uint32(0), p.Snapshot().ActiveLeases, "no lease is kept for the router that left")
}

func TestDeparturesAreBounded(t *testing.T) {
	t0 := time.Unix(1700000000, 0)
	d := newDepartures()
	require.True(t, d.begin(":1.busy"), "a caller still on the bus may acquire")
	d.add(":1.busy", t0)
	for i := range departedMax + 100 {
		d.add(":2."+strconv.Itoa(i), t0)
	}
	assert.LessOrEqual(t, len(d.at), departedMax+1, "bounded in number")
	assert.Contains(t, d.at, ":1.busy", "a caller whose AcquireLease is under way is not forgotten")
	assert.False(t, d.begin(":1.busy"), "a caller that left may not acquire")

	d.add(":3.late", t0.Add(departedKeep))
	assert.Equal(t, map[string]time.Time{":1.busy": t0, ":3.late": t0.Add(departedKeep)}, d.at, "bounded in time")
	assert.True(t, d.end(":1.busy"), "the AcquireLease learns its caller left")
	d.add(":4.later", t0.Add(2*departedKeep))
	assert.NotContains(t, d.at, ":1.busy", "forgotten once its AcquireLease is done")
	assert.Len(t, d.order, len(d.at))
}
