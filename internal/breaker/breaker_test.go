package breaker

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/crash"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func at(s int) time.Time { return t0.Add(time.Duration(s) * time.Second) }

func TestClassBreakerTripsBeforeGeneral(t *testing.T) {
	s := New(Defaults())
	for i := range 4 {
		assert.Empty(t, s.Failure(at(i), crash.ClassCUDA))
	}
	tr := s.Failure(at(4), crash.ClassCUDA)
	require.Len(t, tr, 1)
	assert.Equal(t, Transition{Class: crash.ClassCUDA, From: Closed, To: Open, Failures: 5, Until: at(304)}, tr[0])
	st, n := s.Class(crash.ClassGeneral)
	assert.Equal(t, Closed, st)
	assert.Equal(t, 5, n, "the general breaker counts every failure")
	assert.Equal(t, Open, s.State())
}

func TestMixedFailuresTripGeneral(t *testing.T) {
	s := New(Defaults())
	for i, c := range []crash.Class{crash.ClassCUDA, crash.ClassProcess, crash.ClassOOM, crash.ClassCUDA} {
		assert.Empty(t, s.Failure(at(i), c))
	}
	tr := s.Failure(at(4), crash.ClassHealth)
	require.Len(t, tr, 1)
	assert.Equal(t, crash.ClassGeneral, tr[0].Class)
	assert.Equal(t, Open, tr[0].To)
}

func TestHalfOpenSingleTestAndReopenDoubling(t *testing.T) {
	p := Defaults()
	s := New(p)
	for i := range 5 {
		s.Failure(at(i), crash.ClassProcess)
	}
	ok, _, retry := s.Allow(at(100))
	assert.False(t, ok)
	assert.Equal(t, at(304), retry)
	assert.Empty(t, s.Settle(at(303), time.Time{}))
	tr := s.Settle(at(304), time.Time{})
	require.Len(t, tr, 1)
	assert.Equal(t, HalfOpen, tr[0].To)

	ok, test, _ := s.Allow(at(304))
	assert.True(t, ok)
	assert.True(t, test)
	ok, _, retry = s.Allow(at(305))
	assert.False(t, ok, "half-open lets exactly one restart through")
	assert.True(t, retry.IsZero())

	tr = s.Failure(at(310), crash.ClassProcess)
	require.Len(t, tr, 1)
	assert.Equal(t, Transition{Class: crash.ClassProcess, From: HalfOpen, To: Open, Failures: 6, Until: at(910)}, tr[0])
	assert.Equal(t, 600*time.Second, s.OpenFor(crash.ClassProcess))
	for i := range 10 {
		s.Settle(s.OpenUntil(), time.Time{})
		s.Allow(s.OpenUntil())
		s.Failure(at(1000*(i+1)), crash.ClassProcess)
	}
	assert.Equal(t, p.OpenMax, s.OpenFor(crash.ClassProcess), "the open time doubles up to its cap")
}

func TestStableRunClosesAndClears(t *testing.T) {
	s := New(Defaults())
	for i := range 5 {
		s.Failure(at(i), crash.ClassProcess)
	}
	s.Settle(at(304), time.Time{})
	s.Allow(at(304))
	healthy := at(320)
	assert.Equal(t, at(380), s.NextChange(healthy))
	assert.Empty(t, s.Settle(at(379), healthy))
	tr := s.Settle(at(380), healthy)
	require.Len(t, tr, 1)
	assert.Equal(t, Closed, tr[0].To)
	assert.Equal(t, Closed, s.State())
	assert.False(t, s.Testing())
	_, n := s.Class(crash.ClassProcess)
	assert.Zero(t, n)
	_, n = s.Class(crash.ClassGeneral)
	assert.Zero(t, n)
	assert.Equal(t, 300*time.Second, s.OpenFor(crash.ClassProcess), "closing restores the base open time")
}

func TestClosedCountClearsAfterStableRun(t *testing.T) {
	s := New(Defaults())
	for i := range 4 {
		s.Failure(at(i), crash.ClassProcess)
	}
	s.Settle(at(100), at(40))
	assert.Empty(t, s.Failure(at(101), crash.ClassProcess), "the run of failures was broken by a stable run")
	_, n := s.Class(crash.ClassProcess)
	assert.Equal(t, 1, n)
}

func TestTripAndReset(t *testing.T) {
	s := New(Defaults())
	tr := s.Trip(at(0), crash.ClassOOM)
	require.Len(t, tr, 1)
	assert.Equal(t, Open, s.State())
	assert.Empty(t, s.Trip(at(1), crash.ClassOOM), "tripping an open breaker changes nothing")
	tr = s.Reset(at(2))
	require.Len(t, tr, 1)
	assert.Equal(t, Transition{Class: crash.ClassOOM, From: Open, To: Closed}, tr[0])
	ok, test, _ := s.Allow(at(2))
	assert.True(t, ok)
	assert.False(t, test)
	assert.True(t, s.NextChange(time.Time{}).IsZero())
}

func TestValidate(t *testing.T) {
	require.NoError(t, Defaults().Validate())
	for _, p := range []Params{
		{Threshold: 0, Open: time.Second, OpenMax: time.Second, Stable: time.Second},
		{Threshold: 1, Open: 0, OpenMax: time.Second, Stable: time.Second},
		{Threshold: 1, Open: 2 * time.Second, OpenMax: time.Second, Stable: time.Second},
		{Threshold: 1, Open: time.Second, OpenMax: time.Second, Stable: 0},
	} {
		assert.Error(t, p.Validate(), "%+v", p)
	}
}
