package manager_test

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/manager"
	"github.com/llorch/pool-managerd/internal/shim"
	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

func TestMain(m *testing.M) {
	if shim.Is() {
		os.Exit(shim.Main())
	}
	os.Exit(sandbox.Main(m, testpool.Options, sandbox.Build(testpool.Sim)))
}

func TestRoutesByPoolAndLease(t *testing.T) {
	e := testpool.New(t, nil)
	a := e.Pool("a", "0", "", "")
	b := e.Pool("b", "1", "", "")
	for _, p := range []*testpool.Pool{a, b} {
		_, err := p.Wait("ready", testpool.ReadyAfter(1))
		require.NoError(t, err)
	}
	m := manager.New(a.Supervisor, b.Supervisor)
	assert.Equal(t, []string{"a", "b"}, m.IDs())

	_, err := m.AcquireLease("nope", "router")
	assert.ErrorIs(t, err, manager.ErrNoSuchPool)
	assert.ErrorIs(t, m.Start("nope"), manager.ErrNoSuchPool)
	_, err = m.Reload(context.Background(), "nope", "/m.gguf", time.Second)
	assert.ErrorIs(t, err, manager.ErrNoSuchPool)
	assert.ErrorIs(t, m.ReleaseLease("not-a-lease"), lifecycle.ErrNoSuchLease)
	assert.ErrorIs(t, m.ReleaseLease("nope/0123"), lifecycle.ErrNoSuchLease)

	la, err := m.AcquireLease("a", "conn-1")
	require.NoError(t, err)
	_, err = m.AcquireLease("b", "conn-1")
	require.NoError(t, err)
	_, err = m.AcquireLease("b", "conn-2")
	require.NoError(t, err)
	require.NoError(t, m.ReleaseLease(la))
	assert.ErrorIs(t, m.ReleaseLease(la), lifecycle.ErrNoSuchLease)
	assert.Equal(t, 1, m.ReleaseOwner("conn-1"), "one lease of conn-1 was left, on b")
	assert.Equal(t, uint32(1), b.Snapshot().ActiveLeases)

	res, err := m.Drain(context.Background(), "a", time.Second)
	require.NoError(t, err)
	assert.Equal(t, lifecycle.Drained, res.Outcome)
}
