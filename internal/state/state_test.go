package state

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

type rec struct {
	Count int    `json:"count"`
	Name  string `json:"name"`
}

// Durable (persisted counters) and NoSync (runtime records in /run) files
// are written and read back the same way, atomically.
func TestSaveLoadRemove(t *testing.T) {
	for _, noSync := range []bool{false, true} {
		t.Run(map[bool]string{false: "durable", true: "nosync"}[noSync], func(t *testing.T) { saveLoadRemove(t, noSync) })
	}
}

func saveLoadRemove(t *testing.T, noSync bool) {
	d := Dir{Path: filepath.Join(t.TempDir(), "pools"), Mode: 0o644, NoSync: noSync}
	var r rec
	found, err := d.Load("a", &r)
	require.NoError(t, err)
	assert.False(t, found)
	require.NoError(t, d.Save("a", rec{3, "x"}))
	found, err = d.Load("a", &r)
	require.NoError(t, err)
	assert.True(t, found)
	assert.Equal(t, rec{3, "x"}, r)
	st, err := os.Stat(filepath.Join(d.Path, "a.json"))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o644), st.Mode().Perm())
	entries, _ := os.ReadDir(d.Path)
	assert.Len(t, entries, 1, "no temporary file is left")
	require.NoError(t, d.Remove("a"))
	require.NoError(t, d.Remove("a"), "removing twice is fine")
}

func TestCorruptFileIsSetAside(t *testing.T) {
	d := Dir{Path: t.TempDir(), Mode: 0o600}
	require.NoError(t, os.WriteFile(filepath.Join(d.Path, "p.json"), []byte(`{"count": 3,`), 0o600))
	var r rec
	found, err := d.Load("p", &r)
	assert.False(t, found)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "set aside as")
	matches, _ := filepath.Glob(filepath.Join(d.Path, "p.json.corrupt-*"))
	assert.Len(t, matches, 1)
	found, err = d.Load("p", &r)
	assert.NoError(t, err)
	assert.False(t, found, "the next load starts fresh")
}
