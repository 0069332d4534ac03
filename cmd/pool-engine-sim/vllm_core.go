package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

// The engine core is the second process of the vLLM mode, as vLLM V1's
// EngineCore_DP0: the API server starts it (this binary again, with
// --engine-core) and talks to it over a socketpair on fd 3, one JSON
// object a line each way. It loads the weights, holds the simulated GPU
// memory while awake and produces the tokens; the API server notices its
// death as the end of the socket.

// coreFD is where the API server's end of the socketpair lands.
const coreFD = 3

// coreMsg is one message either way. Requests carry an ID; the answer to
// one carries the same ID.
type coreMsg struct {
	Op       string `json:"op"`
	ID       int64  `json:"id,omitempty"`
	N        int    `json:"n,omitempty"`
	Level    int    `json:"level,omitempty"`
	Bytes    int64  `json:"bytes,omitempty"`
	Sleeping bool   `json:"sleeping,omitempty"`
	Kind     string `json:"kind,omitempty"`
	Err      string `json:"err,omitempty"`
}

// The messages. API server to engine core: gen (ID, N tokens), cancel,
// sleep (Level), wake, mem, stall, busy, fault (Kind: exit, oom, cuda).
// Engine core to API server: ready (Bytes), tok (ID, one token), done (ID,
// N made), err (ID, Err), ok (ID, Bytes, Sleeping) for the others.
const (
	opGen    = "gen"
	opCancel = "cancel"
	opSleep  = "sleep"
	opWake   = "wake"
	opMem    = "mem"
	opStall  = "stall"
	opBusy   = "busy"
	opFault  = "fault"
	opReady  = "ready"
	opTok    = "tok"
	opDone   = "done"
	opErr    = "err"
	opOK     = "ok"

	errSleepingText = "sleeping"
)

type engineCore struct {
	model     string
	memBytes  int
	tokenTime time.Duration

	mu       sync.Mutex // guards enc and everything below
	enc      *json.Encoder
	mem      []byte
	sleeping bool
	stalled  bool
	busy     bool
	cancels  map[int64]context.CancelFunc
}

const coreWhere = "core.py:710"

// coreFrames are the engine core's frames in a fatal error's traceback.
var coreFrames = []string{
	`  File "/usr/local/lib/python3.12/dist-packages/vllm/v1/engine/core.py", line 701, in run_engine_core`,
	`    engine_core.run_busy_loop()`,
	`  File "/usr/local/lib/python3.12/dist-packages/vllm/v1/engine/core.py", line 728, in run_busy_loop`,
	`    self._process_engine_step()`,
	`  File "/usr/local/lib/python3.12/dist-packages/vllm/v1/engine/core.py", line 754, in _process_engine_step`,
	`    outputs, model_executed = self.step_fn()`,
}

// coreFatal logs what EngineCore logs when its busy loop raises (logger.exception,
// so the traceback is in the log lines, on stdout).
func coreFatal(exc string) {
	lines := append([]string{"EngineCore encountered a fatal error.", "Traceback (most recent call last):"}, coreFrames...)
	lines = append(lines, exc)
	for _, l := range lines {
		vlog("ERROR", coreWhere, "%s", l)
	}
}

// runEngineCore is the child's main: load, tell the API server, serve it
// until its end of the socket closes.
func runEngineCore(o vllmOptions) int {
	setProcPrefix("EngineCore_DP0")
	// Stopping is the API server's call: it closes the socket. A SIGTERM
	// or Ctrl-C for the whole group must not make this look like a crash.
	signal.Ignore(syscall.SIGTERM, syscall.SIGINT)
	f := os.NewFile(coreFD, "api-server")
	conn, err := net.FileConn(f)
	_ = f.Close()
	if err != nil {
		logf("sim: engine core: fd %d is not the API server's socket: %v", coreFD, err)
		return 1
	}
	c := &engineCore{
		model:     o.model,
		memBytes:  o.gpuMemMB << 20,
		tokenTime: o.tokenTime,
		enc:       json.NewEncoder(conn),
		cancels:   map[int64]context.CancelFunc{},
	}
	// Read from the start: a fault may come while loading.
	go func() {
		dec := json.NewDecoder(conn)
		for {
			var m coreMsg
			if err := dec.Decode(&m); err != nil {
				// The API server closed its end or died: so does the
				// engine core.
				os.Exit(0)
			}
			c.handle(m)
		}
	}()
	started := time.Now()
	vlog("INFO", "core.py:644", "Waiting for init message from front-end.")
	vlog("INFO", "core.py:77", "Initializing a V1 LLM engine (v%s) with config: model='%s', speculative_config=None, tokenizer='%s', "+
		"skip_tokenizer_init=False, tokenizer_mode=auto, revision=None, trust_remote_code=False, dtype=torch.bfloat16, "+
		"max_seq_len=%d, download_dir=None, load_format=auto, tensor_parallel_size=1, pipeline_parallel_size=1, "+
		"data_parallel_size=1, enforce_eager=False, device_config=cuda, seed=0, served_model_name=%s, enable_prefix_caching=True",
		vllmVersion, o.model, o.model, o.maxModelLen, o.servedName)
	vlog("INFO", "gpu_model_runner.py:2602", "Starting to load model %s...", o.model)
	weights, err := c.loadWeights()
	if err != nil {
		coreStartFailure(err)
		return 1
	}
	c.mu.Lock()
	err = c.allocate()
	c.mu.Unlock()
	if err != nil {
		coreStartFailure(err)
		return 1
	}
	vlog("INFO", "default_loader.py:267", "Loading weights took %.2f seconds", time.Since(started).Seconds())
	vlog("INFO", "gpu_model_runner.py:2653", "Model loading took %.4f GiB and %.6f seconds", float64(weights)/(1<<30), time.Since(started).Seconds())
	if d := o.loadTime - time.Since(started); d > 0 {
		time.Sleep(d)
	}
	vlog("INFO", "gpu_worker.py:298", "Available KV cache memory: %.2f GiB", float64(c.memBytes)/(1<<30))
	vlog("INFO", "core.py:210", "init engine (profile, create kv cache, warmup model) took %.2f seconds", time.Since(started).Seconds())
	c.send(coreMsg{Op: opReady, Bytes: int64(c.memBytes)})
	select {} // the reader ends the process
}

// coreStartFailure logs why loading failed as EngineCore does
// ("EngineCore failed to start." with the exception) and the exit that
// follows; the API server reports the rest.
func coreStartFailure(err error) {
	vlog("ERROR", "core.py:708", "EngineCore failed to start.")
	vlog("ERROR", "core.py:708", "Traceback (most recent call last):")
	vlog("ERROR", "core.py:708", `  File "/usr/local/lib/python3.12/dist-packages/vllm/v1/engine/core.py", line 699, in run_engine_core`)
	vlog("ERROR", "core.py:708", `    engine_core = EngineCoreProc(*args, **kwargs)`)
	vlog("ERROR", "core.py:708", "%s", err.Error())
}

type coreError string

func (e coreError) Error() string { return string(e) }

// loadWeights reads every *.safetensors file of the model directory, as
// the default loader does, and returns their size.
func (c *engineCore) loadWeights() (int64, error) {
	files, _ := filepath.Glob(filepath.Join(c.model, "*.safetensors"))
	if len(files) == 0 {
		return 0, coreError(fmt.Sprintf("RuntimeError: Cannot find any model weights with `%s`", c.model))
	}
	var total int64
	for _, p := range files {
		f, err := os.Open(p)
		if err != nil {
			return 0, coreError(fmt.Sprintf("%s: [Errno %d] %s: '%s'", pyErrType(err), errnoOf(err), errText(err), p))
		}
		n, err := io.Copy(io.Discard, f)
		_ = f.Close()
		if err != nil {
			return 0, coreError(fmt.Sprintf("OSError: [Errno %d] %s: '%s'", errnoOf(err), errText(err), p))
		}
		total += n
	}
	return total, nil
}

func errnoOf(err error) int {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return int(errno)
	}
	return 5 // EIO
}

// pyErrType is the OSError subclass Python raises for err.
func pyErrType(err error) string {
	switch {
	case errors.Is(err, syscall.ENOENT):
		return "FileNotFoundError"
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		return "PermissionError"
	case errors.Is(err, syscall.EISDIR):
		return "IsADirectoryError"
	}
	return "OSError"
}

// allocate maps and touches the simulated GPU memory, so that it is
// resident and counts against the scope's memory. Under mu.
func (c *engineCore) allocate() error {
	if c.memBytes == 0 || c.mem != nil {
		return nil
	}
	mem, err := syscall.Mmap(-1, 0, c.memBytes, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANON)
	if err != nil {
		return coreError(fmt.Sprintf("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate %d MiB (simulated: mmap: %v)", c.memBytes>>20, err))
	}
	page := os.Getpagesize()
	for i := 0; i < len(mem); i += page {
		mem[i] = 1
	}
	c.mem = mem
	return nil
}

// release unmaps the simulated GPU memory and returns how much it was.
// Under mu.
func (c *engineCore) release() int {
	n := len(c.mem)
	if c.mem != nil {
		_ = syscall.Munmap(c.mem)
		c.mem = nil
	}
	return n
}

func (c *engineCore) send(m coreMsg) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.sendLocked(m)
}

func (c *engineCore) sendLocked(m coreMsg) {
	// A failed write means the API server is gone; the read loop ends.
	_ = c.enc.Encode(m)
}

func (c *engineCore) handle(m coreMsg) {
	switch m.Op {
	case opGen:
		ctx, cancel := context.WithCancel(context.Background())
		c.mu.Lock()
		c.cancels[m.ID] = cancel
		c.mu.Unlock()
		go c.generate(ctx, m.ID, m.N)
	case opCancel:
		c.mu.Lock()
		if cancel, ok := c.cancels[m.ID]; ok {
			cancel()
			delete(c.cancels, m.ID)
		}
		c.mu.Unlock()
	case opSleep:
		start := time.Now()
		c.mu.Lock()
		freed := c.release()
		c.sleeping = true
		c.sendLocked(coreMsg{Op: opOK, ID: m.ID, Sleeping: true})
		c.mu.Unlock()
		vlog("INFO", "gpu_worker.py:117", "Sleep mode freed %.2f GiB memory, 0.00 GiB memory is still in use.", float64(freed)/(1<<30))
		vlog("INFO", "executor_base.py:189", "It took %.6f seconds to fall asleep.", time.Since(start).Seconds())
	case opWake:
		start := time.Now()
		c.mu.Lock()
		err := c.allocate()
		reply := coreMsg{Op: opOK, ID: m.ID, Bytes: int64(len(c.mem))}
		if err != nil {
			reply.Err = err.Error()
		} else {
			c.sleeping = false
		}
		reply.Sleeping = c.sleeping
		c.sendLocked(reply)
		c.mu.Unlock()
		if err == nil {
			vlog("INFO", "executor_base.py:205", "It took %.6f seconds to wake up tags {'weights', 'kv_cache'}.", time.Since(start).Seconds())
		}
	case opMem:
		c.mu.Lock()
		c.sendLocked(coreMsg{Op: opOK, ID: m.ID, Bytes: int64(len(c.mem)), Sleeping: c.sleeping})
		c.mu.Unlock()
	case opStall:
		c.mu.Lock()
		c.stalled = true
		c.sendLocked(coreMsg{Op: opOK, ID: m.ID})
		c.mu.Unlock()
	case opBusy:
		c.mu.Lock()
		c.busy = true
		c.sendLocked(coreMsg{Op: opOK, ID: m.ID})
		c.mu.Unlock()
	case opFault:
		c.fault(m)
	}
}

func (c *engineCore) fault(m coreMsg) {
	switch m.Kind {
	case "exit":
		vlog("ERROR", coreWhere, "EngineCore encountered a fatal error.")
		os.Exit(1)
	case "cuda":
		coreFatal("RuntimeError: CUDA error: an illegal memory access was encountered\n" +
			"CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below might be incorrect.")
		os.Exit(1)
	case "oom":
		c.send(coreMsg{Op: opOK, ID: m.ID})
		go allocateUntilKilled()
	}
}

func (c *engineCore) step() time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return tokenPace(c.tokenTime, c.busy)
}

// generate produces n tokens at the engine's pace, one message each. A
// stalled engine produces none again and holds the request until it is
// cancelled; a sleeping one fails it.
func (c *engineCore) generate(ctx context.Context, id int64, n int) {
	defer func() {
		c.mu.Lock()
		if cancel, ok := c.cancels[id]; ok {
			cancel()
			delete(c.cancels, id)
		}
		c.mu.Unlock()
	}()
	_, err := paced(ctx, nil, n, c.step, func(made int) error {
		c.mu.Lock()
		switch {
		case c.stalled:
			c.mu.Unlock()
			<-ctx.Done()
			return ctx.Err()
		case c.sleeping:
			c.sendLocked(coreMsg{Op: opErr, ID: id, N: made, Err: errSleepingText})
			c.mu.Unlock()
			return errSleeping
		}
		c.sendLocked(coreMsg{Op: opTok, ID: id})
		c.mu.Unlock()
		return nil
	})
	if err == nil {
		c.send(coreMsg{Op: opDone, ID: id, N: n})
	}
}
