package main

import (
	"fmt"
	"os"
	"strings"
	"time"
)

// vLLM logs through Python's logging to stdout (vllm/logger.py,
// DEFAULT_LOGGING_CONFIG) as "LEVEL MM-DD HH:MM:SS [file.py:line] text",
// each process's lines behind "(APIServer pid=N) " or
// "(EngineCore_DP0 pid=N) "; uvicorn's own lines are "INFO:     text".
// Uncaught exceptions print their traceback to stderr.

// vllmVersion is what the vLLM mode reports as its version.
const vllmVersion = "0.11.0"

// procPrefix is this process's "(APIServer pid=N) " prefix.
var procPrefix string

func setProcPrefix(name string) {
	procPrefix = fmt.Sprintf("(%s pid=%d) ", name, os.Getpid())
}

func writeLines(f *os.File, text string) {
	var b strings.Builder
	for line := range strings.SplitSeq(strings.TrimSuffix(text, "\n"), "\n") {
		b.WriteString(procPrefix)
		b.WriteString(line)
		b.WriteByte('\n')
	}
	logMu.Lock()
	defer logMu.Unlock()
	_, _ = f.WriteString(b.String())
}

// vlog writes one vLLM logger line to stdout; where is "file.py:line".
func vlog(level, where, format string, args ...any) {
	stamp := time.Now().Format("01-02 15:04:05")
	text := fmt.Sprintf(format, args...)
	var b strings.Builder
	for line := range strings.SplitSeq(text, "\n") {
		fmt.Fprintf(&b, "%s %s [%s] %s\n", level, stamp, where, line)
	}
	writeLines(os.Stdout, b.String())
}

// uvlog writes one of uvicorn's lines ("INFO:     Started server process
// [4711]") to stdout.
func uvlog(format string, args ...any) {
	writeLines(os.Stdout, "INFO:     "+fmt.Sprintf(format, args...))
}

// traceback prints an uncaught Python exception to stderr: the frames,
// then "Type: message".
func traceback(frames []string, exc string) {
	var b strings.Builder
	b.WriteString("Traceback (most recent call last):\n")
	for _, f := range frames {
		b.WriteString(f)
		b.WriteByte('\n')
	}
	b.WriteString(exc)
	writeLines(os.Stderr, b.String())
}

// The frames of an API server that fails before serving.
var apiServerFrames = []string{
	`  File "/usr/local/bin/vllm", line 10, in <module>`,
	`    sys.exit(main())`,
	`  File "/usr/local/lib/python3.12/dist-packages/vllm/entrypoints/cli/main.py", line 54, in main`,
	`    args.dispatch_function(args)`,
	`  File "/usr/local/lib/python3.12/dist-packages/vllm/entrypoints/cli/serve.py", line 57, in cmd`,
	`    uvloop.run(run_server(args))`,
	`  File "/usr/local/lib/python3.12/dist-packages/vllm/entrypoints/openai/api_server.py", line 1884, in run_server`,
	`    await run_server_worker(listen_address, sock, args, **uvicorn_kwargs)`,
}
