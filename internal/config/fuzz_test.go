package config

import (
	"os"
	"testing"
)

// FuzzParsePool: whatever bytes a pool file holds, parsing returns a pool or
// errors, never panics, and never both.
func FuzzParsePool(f *testing.F) {
	for _, p := range []string{"../../packaging/examples/pools.d/llama8b.pool", "../../packaging/examples/pools.d/embed.pool",
		"../../packaging/examples/pools.d/llama-server.pool.example", "../../packaging/examples/pools.d/vllm.pool.example",
		"../../packaging/examples/pools.d/sglang.pool.example"} {
		data, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	f.Add([]byte(minimalPool))
	f.Add([]byte("[Pool]\nDevices=0 GPU-8f2c1a70-0000-4000-8000-000000000000\n[Restart]\nMultiplier=cuda_error:2\n[Scope]\nMemoryMax=1G\n"))
	f.Add([]byte("x=1\n[\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		p, errs := ParsePool("/f/fz.pool", data)
		if (p == nil) == (len(errs) == 0) {
			t.Fatalf("pool %v with %d errors", p, len(errs))
		}
		for _, e := range errs {
			if e.File != "/f/fz.pool" || e.Msg == "" {
				t.Fatalf("error without file or message: %+v", e)
			}
		}
	})
}

// FuzzParseManager: the same for the manager file.
func FuzzParseManager(f *testing.F) {
	data, err := os.ReadFile("../../packaging/examples/pool-managerd.conf")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(data)
	f.Add([]byte("[Inventory]\nBackend=static\nDevice=0 GPU-8f2c1a70-0000-4000-8000-000000000000 /dev/nvidia0\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		m := DefaultManager()
		for _, e := range parseManager("/f/m.conf", data, &m) {
			if e.File != "/f/m.conf" || e.Msg == "" {
				t.Fatalf("error without file or message: %+v", e)
			}
		}
	})
}
