package journal

import (
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Every event kind has a catalog entry with a subject and an explanation.
func TestCatalogExplainsEveryMessageID(t *testing.T) {
	b, err := os.ReadFile("../../packaging/pool-managerd.catalog")
	require.NoError(t, err)
	entries := map[string]string{}
	head := regexp.MustCompile(`(?m)^-- ([0-9a-f]{32})$`)
	idx := head.FindAllStringSubmatchIndex(string(b), -1)
	for i, m := range idx {
		end := len(b)
		if i+1 < len(idx) {
			end = idx[i+1][0]
		}
		entries[string(b[m[2]:m[3]])] = string(b[m[1]:end])
	}
	for _, id := range []MessageID{MsgCrash, MsgRestartScheduled, MsgBreakerChanged, MsgStorm, MsgOOM, MsgDrainDone,
		MsgReloadDone, MsgReloadRolledBack, MsgStormWarning, MsgRestart, MsgRecovered, MsgOperator} {
		e, ok := entries[string(id)]
		require.True(t, ok, "no catalog entry for %s", id)
		assert.Regexp(t, `(?m)^Subject: .+`, e, id)
		assert.Contains(t, e, "Defined-By: pool-managerd", id)
		parts := strings.SplitN(e, "\n\n", 2)
		require.Len(t, parts, 2, "%s has a body", id)
		assert.NotEmpty(t, strings.TrimSpace(parts[1]), id)
	}
	assert.Len(t, entries, 12)
}
