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

// Save never writes null, {} or a non-object: such a file is corrupt, set
// aside like a torn one, not read as a fresh zero value.
func TestNullEmptyAndNonObjectFilesAreCorrupt(t *testing.T) {
	for name, text := range map[string]string{
		"null":   "null",
		"empty":  "{}",
		"spaced": " { }\n",
		"array":  "[]",
		"number": "0",
	} {
		t.Run(name, func(t *testing.T) {
			d := Dir{Path: t.TempDir(), Mode: 0o600}
			require.NoError(t, os.WriteFile(filepath.Join(d.Path, "p.json"), []byte(text), 0o600))
			r := rec{Count: 7}
			found, err := d.Load("p", &r)
			assert.False(t, found)
			require.Error(t, err)
			assert.Contains(t, err.Error(), "set aside as")
			matches, _ := filepath.Glob(filepath.Join(d.Path, "p.json.corrupt-*"))
			assert.Len(t, matches, 1)
		})
	}
}

// A hold is a file: it outlives the process that set it, says why, and
// lasts until Release.
func TestHoldOutlivesTheDirValueUntilRelease(t *testing.T) {
	path := filepath.Join(t.TempDir(), "pools")
	_, held := Dir{Path: path, Mode: 0o600}.Held("p")
	assert.False(t, held)
	require.NoError(t, Dir{Path: path, Mode: 0o600}.Hold("p", "state unreadable"))

	d := Dir{Path: path, Mode: 0o600}
	why, held := d.Held("p")
	assert.True(t, held)
	assert.Equal(t, "state unreadable", why)
	_, held = d.Held("q")
	assert.False(t, held, "a hold is the pool's own")
	st, err := os.Stat(filepath.Join(path, "p.held"))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), st.Mode().Perm())

	require.NoError(t, d.Release("p"))
	_, held = d.Held("p")
	assert.False(t, held)
	require.NoError(t, d.Release("p"), "releasing twice is fine")

	// An empty hold file still holds.
	require.NoError(t, os.WriteFile(filepath.Join(path, "p.held"), nil, 0o600))
	why, held = d.Held("p")
	assert.True(t, held)
	assert.NotEmpty(t, why)
}
