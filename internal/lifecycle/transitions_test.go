package lifecycle

import (
	"bufio"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// docEdges reads the transitions drawn in docs/states.md's mermaid
// stateDiagram-v2 block, as "from -> to" (the initial [*] edge left out).
func docEdges(t *testing.T) []string {
	t.Helper()
	f, err := os.Open("../../docs/states.md")
	require.NoError(t, err)
	defer f.Close()
	edge := regexp.MustCompile(`^\s*(\S+)\s*-->\s*(\S+?)\s*(:.*)?$`)
	var edges []string
	in, found := false, false
	for sc := bufio.NewScanner(f); sc.Scan(); {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "```mermaid":
			in = true
		case in && line == "```":
			in = false
		case in && line == "stateDiagram-v2":
			found = true
		case in:
			if m := edge.FindStringSubmatch(line); m != nil && m[1] != "[*]" {
				edges = append(edges, m[1]+" -> "+m[2])
			}
		}
	}
	require.True(t, found, "docs/states.md has a mermaid stateDiagram-v2 block")
	slices.Sort(edges)
	return edges
}

// The diagram in docs/states.md draws exactly the moves the machine
// allows: none missing, none more.
func TestStatesDocMatchesTheTransitionTable(t *testing.T) {
	var table []string
	for from, tos := range transitions {
		for _, to := range tos {
			table = append(table, from.String()+" -> "+to.String())
		}
	}
	slices.Sort(table)
	doc := docEdges(t)
	for _, e := range table {
		assert.Contains(t, doc, e, "docs/states.md lacks a move the machine makes")
	}
	for _, e := range doc {
		assert.Contains(t, table, e, "docs/states.md draws a move the machine's table lacks")
	}
	assert.Equal(t, len(slices.Compact(slices.Clone(doc))), len(doc), "an edge drawn twice")
}

// Every state has its row, and no row lists its own state.
func TestTheTransitionTableIsWhole(t *testing.T) {
	for _, s := range States() {
		tos, ok := transitions[s]
		require.True(t, ok, "no row for %s", s)
		assert.NotContains(t, tos, s, "%s lists itself", s)
	}
}

func TestAnIllegalTransitionPanicsUnderTest(t *testing.T) {
	require.True(t, strictTransitions, "tests run strict")
	p := newPool(t, nil)
	require.Equal(t, Stopped, p.m.State())
	assert.PanicsWithValue(t, "lifecycle: illegal pool state move stopped -> ready (test)", func() {
		p.m.transition(Ready, "test")
	})
	assert.Panics(t, func() { p.m.drainTo(&drainOp{phase: drainStopping}, drainLeases) })
	assert.Panics(t, func() { p.m.reloadTo(&reloadOp{phase: reloadStarting}, reloadStaging) })
	assert.Panics(t, func() { p.m.startTo(&startOp{phase: startLaunching}, startStaging) })
}

// Outside tests an illegal move is refused and logged: the daemon goes
// on, in the state it had.
func TestAnIllegalTransitionIsRefusedInProduction(t *testing.T) {
	strictTransitions = false
	t.Cleanup(func() { strictTransitions = true })
	p := newPool(t, nil)
	p.m.out = nil
	p.m.transition(Ready, "test")
	assert.Equal(t, Stopped, p.m.State())
	logs := all[Log](p.m.out)
	require.Len(t, logs, 1)
	assert.Equal(t, "illegal pool state move refused: kept as it was", logs[0].Msg)
	assert.Equal(t, []any{"OLD_STATE", "stopped", "NEW_STATE", "ready", "REASON", "test"}, logs[0].Attrs)

	op := &reloadOp{phase: reloadStarting}
	p.m.reloadTo(op, reloadStaging)
	assert.Equal(t, reloadStarting, op.phase)
}
