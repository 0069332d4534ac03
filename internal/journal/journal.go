// Package journal holds the structured-log vocabulary of pool-managerd: the
// journal field names operators filter on, the MESSAGE_ID of each event kind
// (each has a catalog entry), and the one function that writes an event.
package journal

import (
	"context"
	"log/slog"

	slogjournal "github.com/systemd/slog-journal"
)

// Field names. They are journal fields as written (upper case), and the
// same keys appear in the plain-text log.
const (
	PoolID           = "POOL_ID"
	Model            = "MODEL"
	EngineVersion    = "ENGINE_VERSION"
	DeviceMask       = "DEVICE_MASK"
	CrashReason      = "CRASH_REASON"
	ExitCode         = "EXIT_CODE"
	ExitSignal       = "EXIT_SIGNAL"
	UptimeSec        = "UPTIME_SEC"
	CrashCount       = "CRASH_COUNT"
	RestartCount     = "RESTART_COUNT"
	BackoffMS        = "BACKOFF_MS"
	NextRestartAt    = "NEXT_RESTART_AT"
	OldState         = "OLD_STATE"
	NewState         = "NEW_STATE"
	FailureCount     = "FAILURE_COUNT"
	ActiveLeases     = "ACTIVE_LEASES"
	TimeWindowSec    = "TIME_WINDOW_SEC"
	StormKind        = "STORM_KIND"
	BreakerClass     = "BREAKER_CLASS"
	RestartsInWindow = "RESTARTS_IN_WINDOW"
	Hint             = "HINT"
	// FailureStreak is the run of crashes the backoff counts; it starts
	// over after a stable run, unlike CRASH_COUNT.
	FailureStreak = "FAILURE_STREAK"
	// Error carries an error's text beside a fixed message.
	Error = "ERROR"
	// Output carries what a command printed (its bounded tail).
	Output         = "OUTPUT"
	MessageIDField = "MESSAGE_ID"
	// Bus callers and objects.
	Sender    = "SENDER"
	CallerUID = "CALLER_UID"
	Method    = "METHOD"
	Lease     = "LEASE"
	Property  = "PROPERTY"
	// Unit is a systemd unit (an engine's scope).
	Unit = "UNIT"
	// DropIn is a drop-in file the daemon wrote or removed.
	DropIn = "DROP_IN"
	// Setting is a manager setting (Section/Key) a reload could not apply.
	Setting = "SETTING"
	// Drains, reloads and starts.
	Outcome        = "OUTCOME"
	RevokedLeases  = "REVOKED_LEASES"
	DurationSec    = "DURATION_SEC"
	EngineStopUsec = "ENGINE_STOP_USEC"
	StartupSec     = "STARTUP_SEC"
	StartUsec      = "START_USEC"
	// A start's phases (engine.StartPhases), beside START_USEC: staging
	// the model (after any stop of the scope under way), checking the
	// GPUs (alongside the scope's creation), the shim's fork and exec, the
	// scope's creation, the engine's exec (and the scope's InvocationID
	// read alongside).
	StageUsec = "STAGE_USEC"
	CheckUsec = "CHECK_USEC"
	ShimUsec  = "SHIM_USEC"
	ScopeUsec = "SCOPE_USEC"
	ExecUsec  = "EXEC_USEC"
	// the part of SCOPE_USEC spent on an earlier scope of the same name
	LeftoverUsec = "LEFTOVER_USEC"
	// how long a scope prepared during the backoff waited for its
	// go-ahead (0: made on the start's path)
	AheadUsec   = "AHEAD_USEC"
	ModelDigest = "MODEL_DIGEST"
	Reason      = "REASON"
	// GPU faults: the engine's output line, an NVML XID and its GPU.
	Line = "LINE"
	XID  = "XID"
	GPU  = "GPU"
	// The engine's own requests in flight, as its metrics tell them.
	InFlight = "IN_FLIGHT"
	// A process an XID names (the kernel's pid=).
	PID = "PID"
	// Warnings others cause, rate-limited (Limiter): their kind, and how
	// many were left out of the journal.
	WarningKind = "WARNING_KIND"
	Suppressed  = "SUPPRESSED"
	// A group of pools that take turns on their GPUs, and the members a
	// swap parked.
	Group  = "GROUP"
	Parked = "PARKED_POOLS"
)

// Levels beyond slog's own, mapped to syslog priorities by slog-journal.
const (
	LevelNotice   = slogjournal.LevelNotice
	LevelCritical = slogjournal.LevelCritical // PRIORITY=2
)

// MessageID identifies an event kind across releases; the catalog in
// packaging/ explains each.
type MessageID string

const (
	MsgCrash            MessageID = "b7d7597cfa114df0a87d0da1ee5155ee"
	MsgRestartScheduled MessageID = "c698aeb5b2d5434193b4076086e2282c"
	MsgBreakerChanged   MessageID = "ad4e10e1e5de467a87ed9ad7ed11477d"
	MsgStorm            MessageID = "30f6e50e6ff04f24bb0b2b15fc61abe5"
	MsgOOM              MessageID = "8328e70b46c6467baa31e0915d715135"
	MsgDrainDone        MessageID = "893bc5e51e154421a72a1db097c4c260"
	MsgReloadDone       MessageID = "5d6384075fe5483d80d97cbb0b7185cb"
	MsgReloadRolledBack MessageID = "bf79adbc50af4784854c19c94c99b0fb"
	MsgStormWarning     MessageID = "8ce97e2d63d24d708b7d95a6954986bf"
	MsgRestart          MessageID = "6f3861b47afa4ffeab99a6bc047d51c6"
	MsgRecovered        MessageID = "4088c57751c047968efa4c67c3099faa"
	MsgOperator         MessageID = "6018531e4a104b0bacee2909f523bf30"
)

// Event is anything worth one journal entry.
type Event interface {
	MessageID() MessageID
	Level() slog.Level
	Message() string
	Attrs() []slog.Attr
}

// Emit writes each event for the pool, with POOL_ID and MESSAGE_ID added.
func Emit(ctx context.Context, log *slog.Logger, pool string, events ...Event) {
	for _, e := range events {
		attrs := append([]slog.Attr{
			slog.String(MessageIDField, string(e.MessageID())),
			slog.String(PoolID, pool),
		}, e.Attrs()...)
		log.LogAttrs(ctx, e.Level(), e.Message(), attrs...)
	}
}
