//go:build linux && cgo

package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxh100"
	godbus "github.com/godbus/dbus/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	api "github.com/llorch/pool-managerd/dbus"
	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/gpu"
	"github.com/llorch/pool-managerd/internal/gpu/nvmlmock"
)

// The daemon on an NVML host (go-nvml's DGX H100 mock) whose GPU 0 has
// most of its memory taken by another process: Start and EnsureReady of
// a pool that needs 30G there are answered NoGPUMemory naming that
// process, no crash is counted, and the pool starts by itself once the
// memory is free.
func TestDaemonOnAnNVMLHostRefusesAStartWithoutGPUMemory(t *testing.T) {
	host := nvmlmock.New(dgxh100.New())
	newNVML = func() gpu.NVML { return gpu.NewNVMLWith(host.Server) }
	t.Cleanup(func() { newNVML = gpu.NewNVML })
	dir, _ := daemonDir(t, "fit", "", "[Pool]\nAutoStart=no\nMemoryRequired=30G\n[Health]\nIntervalSec=0.5\nTimeoutSec=0.5\n")
	installShim(t)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pool-managerd.conf"), []byte(`[Manager]
StateDir=`+dir+`/state
RuntimeDir=`+dir+`/run
CacheDir=`+dir+`/cache
ModelsDir=`+dir+`/models
MetricsTextfile=
[Inventory]
Backend=nvml
`), 0o644))
	cfg, err := config.Load(dir)
	require.NoError(t, err)

	hog := exec.Command("sleep", "300")
	require.NoError(t, hog.Start())
	t.Cleanup(func() { hog.Process.Kill(); hog.Wait() })
	host.RunComputeMemory(0, nil, hog.Process.Pid, 70<<30)

	logs, exit := runDaemon(t, dir, cfg, "pool-engine-fit.scope")
	conn, err := godbus.ConnectSystemBus()
	require.NoError(t, err)
	defer conn.Close()
	mgr := conn.Object(api.BusName, api.ManagerPath)
	prop := func(name string) string {
		out, _ := exec.Command("busctl", "get-property", api.BusName, string(api.PoolPath("fit")), api.PoolInterface, name).CombinedOutput()
		return strings.TrimSpace(string(out))
	}
	require.Eventually(t, func() bool {
		select {
		case code := <-exit:
			exit <- code
			return true
		default:
		}
		return prop("State") == `s "stopped"`
	}, 30*time.Second, 100*time.Millisecond, "the daemon is up")
	require.Equal(t, `s "stopped"`, prop("State"), "the daemon ended early:\n%s", logs.String())

	holder := "used by pid " + strconv.Itoa(hog.Process.Pid) + " (sleep, 70G)"
	for _, call := range []*godbus.Call{
		mgr.Call(api.ManagerInterface+".Start", 0, "fit"),
		mgr.Call(api.ManagerInterface+".EnsureReady", 0, "fit", uint64(10000)),
	} {
		var de godbus.Error
		require.ErrorAs(t, call.Err, &de, call.Method)
		assert.Equal(t, api.ErrNoGPUMemory, de.Name, call.Method)
		require.NotEmpty(t, de.Body)
		msg, _ := de.Body[0].(string)
		assert.Contains(t, msg, "the pool needs 30G of GPU memory (MemoryRequired=): GPU "+host.GPU(0).UUID+" has 10G free of 80G, "+holder, call.Method)
	}
	assert.Equal(t, `s "failed"`, prop("State"))
	assert.Contains(t, prop("LastError"), holder)
	assert.Equal(t, "u 0", prop("CrashCount"), "not a crash")
	assert.Equal(t, "u 0", prop("FailureStreak"))
	assert.Equal(t, `s "closed"`, prop("BreakerState"))

	host.StopCompute(0, hog.Process.Pid)
	require.Eventually(t, func() bool { return prop("Ready") == "b true" }, 30*time.Second, 100*time.Millisecond,
		"the pool starts by itself once the memory is free")
	assert.Equal(t, "u 0", prop("CrashCount"))
	assert.NotContains(t, logs.String(), "GPU memory fit not checked", "NVML tells the free memory")
}
