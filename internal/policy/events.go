package policy

import (
	"fmt"
	"log/slog"
	"time"

	"github.com/llorch/pool-managerd/internal/breaker"
	"github.com/llorch/pool-managerd/internal/crash"
	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/storm"
)

// Event is something the policy decided or noticed. Every event carries
// its journal fields; POOL_ID is added when it is written.
type Event = journal.Event

func at(t time.Time) string { return t.UTC().Format(time.RFC3339Nano) }

// Crashed: an engine crash was counted. It is the one crash entry: the
// policy fills in its counts, the pool's lifecycle what it knows of the
// exit and the engine.
type Crashed struct {
	Reason     crash.Reason
	CrashCount uint64
	// Streak is the crash's place in the current run of crashes.
	Streak       int
	RestartCount uint64
	// Detail says what happened ("exited with status 3", "GPU fault:
	// ..."); it may quote the engine and must be bounded text.
	Detail string
	// ExitCode is set when the engine exited, ExitSignal when a signal
	// ended it or its scope.
	ExitCode   *int
	ExitSignal string
	// Uptime is how long the engine ran (negative: not known).
	Uptime                           time.Duration
	EngineVersion, Model, DeviceMask string
}

func (e Crashed) MessageID() journal.MessageID {
	if e.Reason == crash.OutOfMemory {
		return journal.MsgOOM
	}
	return journal.MsgCrash
}
func (e Crashed) Level() slog.Level {
	if e.Reason == crash.OutOfMemory {
		return journal.LevelCritical
	}
	return slog.LevelError
}
func (e Crashed) Message() string {
	if e.Detail != "" {
		return "engine crashed: " + e.Detail
	}
	return fmt.Sprintf("engine crashed (%s), crash %d", e.Reason, e.CrashCount)
}
func (e Crashed) Attrs() []slog.Attr {
	a := []slog.Attr{
		slog.String(journal.CrashReason, string(e.Reason)),
		slog.Uint64(journal.CrashCount, e.CrashCount),
		slog.Uint64(journal.RestartCount, e.RestartCount),
		slog.Int(journal.FailureStreak, e.Streak),
	}
	for _, f := range [][2]string{{journal.EngineVersion, e.EngineVersion}, {journal.Model, e.Model}, {journal.DeviceMask, e.DeviceMask}} {
		if f[1] != "" {
			a = append(a, slog.String(f[0], f[1]))
		}
	}
	if e.ExitCode != nil {
		a = append(a, slog.Int(journal.ExitCode, *e.ExitCode))
	}
	if e.ExitSignal != "" {
		a = append(a, slog.String(journal.ExitSignal, e.ExitSignal))
	}
	if e.Uptime >= 0 {
		a = append(a, slog.Int64(journal.UptimeSec, int64(e.Uptime.Seconds())))
	}
	return a
}

// RestartScheduled: the engine restarts after a backoff delay.
type RestartScheduled struct {
	Reason       crash.Reason
	Delay        time.Duration
	At           time.Time
	CrashCount   uint64
	RestartCount uint64
	// Streak is the run of crashes the backoff counts.
	Streak int
}

func (RestartScheduled) MessageID() journal.MessageID { return journal.MsgRestartScheduled }
func (RestartScheduled) Level() slog.Level            { return journal.LevelNotice }
func (e RestartScheduled) Message() string {
	return fmt.Sprintf("restart scheduled in %s after %s", e.Delay, e.Reason)
}
func (e RestartScheduled) Attrs() []slog.Attr {
	return []slog.Attr{
		slog.String(journal.CrashReason, string(e.Reason)),
		slog.Int64(journal.BackoffMS, e.Delay.Milliseconds()),
		slog.String(journal.NextRestartAt, at(e.At)),
		slog.Uint64(journal.CrashCount, e.CrashCount),
		slog.Uint64(journal.RestartCount, e.RestartCount),
		slog.Int(journal.FailureStreak, e.Streak),
	}
}

// RestartHeld: an open breaker (or a full storm window) holds the restart.
type RestartHeld struct {
	Reason crash.Reason
	// RetryAt is when the hold can lift; zero while a test restart is out.
	RetryAt time.Time
}

func (RestartHeld) MessageID() journal.MessageID { return journal.MsgRestartScheduled }
func (RestartHeld) Level() slog.Level            { return slog.LevelWarn }
func (e RestartHeld) Message() string {
	if e.RetryAt.IsZero() {
		return "restart held until the test restart resolves"
	}
	return "restart held by the circuit breaker until " + at(e.RetryAt) + "; AllowRestart or ResetBreaker to override"
}
func (e RestartHeld) Attrs() []slog.Attr {
	a := []slog.Attr{slog.String(journal.CrashReason, string(e.Reason))}
	if !e.RetryAt.IsZero() {
		a = append(a, slog.String(journal.NextRestartAt, at(e.RetryAt)))
	}
	return a
}

// BreakerChanged: one circuit breaker changed state.
type BreakerChanged struct{ breaker.Transition }

func (BreakerChanged) MessageID() journal.MessageID { return journal.MsgBreakerChanged }
func (e BreakerChanged) Level() slog.Level {
	switch e.To {
	case breaker.Open:
		return slog.LevelWarn
	case breaker.HalfOpen:
		return journal.LevelNotice
	}
	return slog.LevelInfo
}
func (e BreakerChanged) Message() string {
	m := fmt.Sprintf("%s circuit breaker %s -> %s after %d consecutive failures", e.Class, e.From, e.To, e.Failures)
	if e.To == breaker.Open {
		k := storm.KindOf(e.Class)
		m += fmt.Sprintf(" (%s): %s", k, k.Hint())
	}
	return m
}

// Attrs name, when a breaker opens, the kind of storm its class of
// failures makes and what to do: with the default settings a class's
// breaker opens before the storm limit is reached.
func (e BreakerChanged) Attrs() []slog.Attr {
	a := []slog.Attr{
		slog.String(journal.BreakerClass, string(e.Class)),
		slog.String(journal.OldState, e.From.String()),
		slog.String(journal.NewState, e.To.String()),
		slog.Int(journal.FailureCount, e.Failures),
	}
	if !e.Until.IsZero() {
		a = append(a, slog.String(journal.NextRestartAt, at(e.Until)))
	}
	if e.To == breaker.Open {
		k := storm.KindOf(e.Class)
		a = append(a, slog.String(journal.StormKind, string(k)), slog.String(journal.Hint, k.Hint()))
	}
	return a
}

// Storm is what both storm events say of the restart window, and their
// journal fields.
type Storm struct {
	// Kind is what the storm is, or for a warning would be if it reached
	// the limit now.
	Kind         storm.Kind
	InWindow     int
	Window       time.Duration
	RestartCount uint64
}

func (e Storm) Attrs() []slog.Attr {
	return []slog.Attr{
		slog.String(journal.StormKind, string(e.Kind)),
		slog.Uint64(journal.RestartCount, e.RestartCount),
		slog.Int(journal.RestartsInWindow, e.InWindow),
		slog.Int64(journal.TimeWindowSec, int64(e.Window/time.Second)),
		slog.String(journal.Hint, e.Kind.Hint()),
	}
}

// StormWarning: the restart window is filling past half.
type StormWarning struct {
	Storm
	Max int
}

func (StormWarning) MessageID() journal.MessageID { return journal.MsgStormWarning }
func (StormWarning) Level() slog.Level            { return slog.LevelWarn }
func (e StormWarning) Message() string {
	return fmt.Sprintf("restart rate high (%s): %d restarts in %s (limit %d): %s", e.Kind, e.InWindow, e.Window, e.Max, e.Kind.Hint())
}

// StormDetected: the restart limit is reached; the restart is held and the
// breaker of the storm's class opens.
type StormDetected struct{ Storm }

func (StormDetected) MessageID() journal.MessageID { return journal.MsgStorm }
func (StormDetected) Level() slog.Level            { return journal.LevelCritical }
func (e StormDetected) Message() string {
	return fmt.Sprintf("restart storm (%s): %d restarts in %s, restarts held: %s", e.Kind, e.InWindow, e.Window, e.Kind.Hint())
}

// Restarting: a restart was let through.
type Restarting struct {
	Reason       crash.Reason
	RestartCount uint64
	InWindow     int
	// Test is set for the one test restart of a half-open breaker.
	Test bool
	// Override is set when an operator's AllowRestart let it through.
	Override bool
}

func (Restarting) MessageID() journal.MessageID { return journal.MsgRestart }
func (Restarting) Level() slog.Level            { return slog.LevelInfo }
func (e Restarting) Message() string {
	switch {
	case e.Override:
		return fmt.Sprintf("restarting engine (restart %d, allowed by operator)", e.RestartCount)
	case e.Test:
		return fmt.Sprintf("restarting engine (restart %d, circuit breaker test)", e.RestartCount)
	}
	return fmt.Sprintf("restarting engine (restart %d)", e.RestartCount)
}
func (e Restarting) Attrs() []slog.Attr {
	return []slog.Attr{
		slog.String(journal.CrashReason, string(e.Reason)),
		slog.Uint64(journal.RestartCount, e.RestartCount),
		slog.Int(journal.RestartsInWindow, e.InWindow),
	}
}

// Recovered: the engine ran healthy long enough for a counter to start over.
type Recovered struct {
	// What started over: "backoff" or "restart_count".
	What   string
	Stable time.Duration
}

func (Recovered) MessageID() journal.MessageID { return journal.MsgRecovered }
func (Recovered) Level() slog.Level            { return slog.LevelInfo }
func (e Recovered) Message() string {
	return fmt.Sprintf("engine healthy for %s: %s reset", e.Stable, e.What)
}
func (e Recovered) Attrs() []slog.Attr { return nil }

// OperatorOverride: an operator reset the breaker or allowed a restart.
type OperatorOverride struct {
	// Action is "ResetBreaker" or "AllowRestart".
	Action       string
	CrashCount   uint64
	RestartCount uint64
}

func (OperatorOverride) MessageID() journal.MessageID { return journal.MsgOperator }
func (OperatorOverride) Level() slog.Level            { return journal.LevelNotice }
func (e OperatorOverride) Message() string            { return "operator override: " + e.Action }
func (e OperatorOverride) Attrs() []slog.Attr {
	return []slog.Attr{
		slog.Uint64(journal.CrashCount, e.CrashCount),
		slog.Uint64(journal.RestartCount, e.RestartCount),
	}
}
