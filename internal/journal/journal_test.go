package journal

import (
	"bytes"
	"context"
	"log/slog"
	"testing"

	"github.com/stretchr/testify/assert"
)

type ev struct{}

func (ev) MessageID() MessageID { return MsgCrash }
func (ev) Level() slog.Level    { return slog.LevelError }
func (ev) Message() string      { return "engine crashed" }
func (ev) Attrs() []slog.Attr   { return []slog.Attr{slog.String(CrashReason, "signal")} }

func TestEmitAddsPoolAndMessageID(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
		if a.Key == slog.TimeKey {
			return slog.Attr{}
		}
		return a
	}}))
	Emit(context.Background(), log, "llama8b", ev{})
	assert.Equal(t, `level=ERROR msg="engine crashed" MESSAGE_ID=b7d7597cfa114df0a87d0da1ee5155ee POOL_ID=llama8b CRASH_REASON=signal`+"\n", buf.String())
}

func TestMessageIDsAreDistinct(t *testing.T) {
	ids := []MessageID{MsgCrash, MsgRestartScheduled, MsgBreakerChanged, MsgStorm, MsgOOM, MsgDrainDone,
		MsgReloadDone, MsgReloadRolledBack, MsgStormWarning, MsgRestart, MsgRecovered, MsgOperator}
	seen := map[MessageID]bool{}
	for _, id := range ids {
		assert.Len(t, string(id), 32)
		assert.False(t, seen[id], "duplicate %s", id)
		seen[id] = true
	}
}
