package policy

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/breaker"
	"github.com/llorch/pool-managerd/internal/crash"
	"github.com/llorch/pool-managerd/internal/journal"
)

// entry is one event as journal.Emit writes it: its message and fields.
type entry struct {
	msg    string
	fields map[string]string
}

func render(t *testing.T, e Event) entry {
	t.Helper()
	var buf bytes.Buffer
	journal.Emit(context.Background(), slog.New(slog.NewJSONHandler(&buf, nil)), "p", e)
	var m map[string]any
	require.NoError(t, json.Unmarshal(buf.Bytes(), &m))
	out := entry{msg: m["msg"].(string), fields: map[string]string{}}
	for k, v := range m {
		if s, ok := v.(string); ok {
			out.fields[k] = s
			continue
		}
		b, err := json.Marshal(v)
		require.NoError(t, err)
		out.fields[k] = string(b)
	}
	return out
}

// loop crashes the engine with reasons in turn, restarting it whenever
// the policy lets it, and returns every event.
func loop(t *testing.T, tr *Tracker, n int, rs ...crash.Reason) []Event {
	t.Helper()
	var all []Event
	now := t0
	for i := range n {
		d := tr.Crash(now, rs[i%len(rs)])
		all = append(all, d.Events...)
		if d.Held {
			break
		}
		now = d.At
		pm, err := tr.Restart(now)
		require.NoError(t, err)
		all = append(all, pm.Events...)
		now = now.Add(time.Second)
	}
	return all
}

// With the default settings a class's breaker opens (5 failures) before
// the storm limit (10 restarts): its opening names the kind of storm and
// what to do, so the operator sees the classification.
func TestBreakerOpeningNamesStormKindAndHint(t *testing.T) {
	cases := []struct {
		name    string
		reasons []crash.Reason
		class   crash.Class
		kind    string
		hint    string
	}{
		{"out of memory", []crash.Reason{crash.OutOfMemory}, crash.ClassOOM, "oom_storm", "MemoryMax="},
		{"cuda", []crash.Reason{crash.CUDAError}, crash.ClassCUDA, "cuda_storm", "Xid"},
		{"exit code", []crash.Reason{crash.ExitCode}, crash.ClassProcess, "process_storm", "journalctl -u pool-engine-<id>.scope"},
		{"health", []crash.Reason{crash.HealthCheck}, crash.ClassHealth, "health_storm", "HealthURL="},
		{"start", []crash.Reason{crash.StartFailure}, crash.ClassStart, "start_storm", "ExecStart="},
		{"mixed", []crash.Reason{crash.CUDAError, crash.ExitCode, crash.CUDAError, crash.OutOfMemory, crash.Signal},
			crash.ClassGeneral, "mixed_storm", "several ways"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tr := New(Defaults(), half)
			var opened []entry
			for _, e := range loop(t, tr, 5, c.reasons...) {
				if b, ok := e.(BreakerChanged); ok {
					require.Equal(t, breaker.Open, b.To)
					opened = append(opened, render(t, e))
				}
			}
			require.Len(t, opened, 1, "one breaker opens")
			f := opened[0].fields
			assert.Equal(t, string(c.class), f[journal.BreakerClass])
			assert.Equal(t, c.kind, f[journal.StormKind])
			assert.Contains(t, f[journal.Hint], c.hint)
			assert.Contains(t, opened[0].msg, c.kind)
			assert.Contains(t, opened[0].msg, c.hint)
		})
	}
}

// Only an opening classifies: half-open and closed say nothing of storms.
func TestBreakerHalfOpenAndCloseCarryNoStormKind(t *testing.T) {
	for _, to := range []breaker.State{breaker.HalfOpen, breaker.Closed} {
		e := render(t, BreakerChanged{breaker.Transition{Class: crash.ClassCUDA, From: breaker.Open, To: to}})
		assert.NotContains(t, e.fields, journal.StormKind, to.String())
		assert.NotContains(t, e.fields, journal.Hint, to.String())
	}
}

// The warning past half of the storm limit already names the storm's kind
// and what to do.
func TestStormWarningNamesKindAndHint(t *testing.T) {
	cases := []struct {
		name    string
		reasons []crash.Reason
		kind    string
		hint    string
	}{
		{"out of memory", []crash.Reason{crash.OutOfMemory}, "oom_storm", "MemoryMax="},
		{"cuda", []crash.Reason{crash.CUDAError, crash.DriverXID}, "cuda_storm", "Xid"},
		{"signal", []crash.Reason{crash.Signal}, "process_storm", "journalctl -u"},
		{"mixed", []crash.Reason{crash.OutOfMemory, crash.CUDAError, crash.ExitCode}, "mixed_storm", "several ways"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := Defaults()
			p.Breaker.Threshold = 100
			p.Backoff.Initial, p.Backoff.Min, p.Backoff.Max = time.Second, time.Second, time.Second
			tr := New(p, half)
			var warnings []entry
			for _, e := range loop(t, tr, 6, c.reasons...) {
				if _, ok := e.(StormWarning); ok {
					warnings = append(warnings, render(t, e))
				}
			}
			require.Len(t, warnings, 1, "the sixth crash warns")
			f := warnings[0].fields
			assert.Equal(t, c.kind, f[journal.StormKind])
			assert.Contains(t, f[journal.Hint], c.hint)
			assert.Equal(t, "6", f[journal.RestartsInWindow])
			assert.Contains(t, warnings[0].msg, c.kind)
		})
	}
}

// FAILURE_STREAK on the crash and restart-scheduled entries is the run
// the backoff counts: it starts over after ResetBreaker, CRASH_COUNT not.
func TestCrashEntriesCarryFailureStreak(t *testing.T) {
	tr := New(Defaults(), half)
	type fields struct{ streak, crashes string }
	var got []fields
	now := t0
	crashOnce := func() {
		d := tr.Crash(now, crash.ExitCode)
		var crashed, scheduled map[string]string
		for _, e := range d.Events {
			switch e.(type) {
			case Crashed:
				crashed = render(t, e).fields
			case RestartScheduled:
				scheduled = render(t, e).fields
			}
		}
		require.NotNil(t, crashed)
		require.NotNil(t, scheduled)
		assert.Equal(t, crashed[journal.FailureStreak], scheduled[journal.FailureStreak])
		got = append(got, fields{crashed[journal.FailureStreak], crashed[journal.CrashCount]})
		now = d.At
		_, err := tr.Restart(now)
		require.NoError(t, err)
	}
	crashOnce()
	crashOnce()
	crashOnce()
	tr.ResetBreaker(now)
	crashOnce()
	assert.Equal(t, []fields{{"1", "1"}, {"2", "2"}, {"3", "3"}, {"1", "4"}}, got)
	assert.Equal(t, 1, tr.Status(now).Streak)
}

// ResetBreaker on a pool held by the storm limit lets the held restart
// through, once: the window still holds the storm, so the next crash is
// held again.
func TestResetBreakerLetsStormHeldRestartThroughOnce(t *testing.T) {
	p := Defaults()
	p.Breaker.Threshold = 100
	p.Storm.Max = 2
	p.Storm.Window = 600 * time.Second
	tr := New(p, half)
	now := t0
	for range 2 {
		d := tr.Crash(now, crash.ExitCode)
		require.False(t, d.Held)
		now = d.At
		_, err := tr.Restart(now)
		require.NoError(t, err)
	}
	d := tr.Crash(now, crash.ExitCode)
	require.True(t, d.Held, "the third crash is past the storm limit")
	require.Equal(t, breaker.Open, tr.Status(now).Breaker)

	now = now.Add(time.Second)
	tr.ResetBreaker(now)
	assert.Equal(t, breaker.Closed, tr.Status(now).Breaker)
	pm, err := tr.Restart(now)
	require.NoError(t, err, "the operator's reset lets the held restart through")
	assert.True(t, pm.Override)
	st := tr.Status(now)
	assert.Equal(t, uint64(3), st.RestartCount)
	assert.Equal(t, uint64(3), st.CrashCount)
	assert.Equal(t, 3, st.RestartRate, "the window keeps its history")

	d = tr.Crash(now.Add(time.Second), crash.ExitCode)
	assert.True(t, d.Held, "the storm goes on: held again")
	_, err = tr.Restart(now.Add(2 * time.Second))
	var r *Refusal
	require.ErrorAs(t, err, &r)
}
