package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const (
	vRunning    = "vllm:num_requests_running"
	vWaiting    = "vllm:num_requests_waiting"
	vGeneration = "vllm:generation_tokens_total"
	vPrompt     = "vllm:prompt_tokens_total"
)

// hfModel writes a model directory in Hugging Face layout.
func hfModel(t *testing.T, config string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "tiny-llama")
	require.NoError(t, os.Mkdir(dir, 0o755))
	if config != "" {
		require.NoError(t, os.WriteFile(filepath.Join(dir, "config.json"), []byte(config), 0o644))
	}
	weights := make([]byte, 64<<10)
	for i := range weights {
		weights[i] = byte(i * 7)
	}
	require.NoError(t, os.WriteFile(filepath.Join(dir, "model.safetensors"), weights, 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "tokenizer.json"), []byte(`{"version":"1.0"}`), 0o644))
	return dir
}

const tinyConfig = `{"architectures":["LlamaForCausalLM"],"model_type":"llama","max_position_embeddings":2048}`

func startVLLM(t *testing.T, model string, extra ...string) *sim {
	t.Helper()
	return startSim(t, model, append([]string{"--engine", "vllm"}, extra...)...)
}

// waitIn waits for text matching re in b and returns its submatches.
func (s *sim) waitIn(b *outBuf, re string) []string {
	s.t.Helper()
	rx := regexp.MustCompile(re)
	deadline := time.After(10 * time.Second)
	for {
		if m := rx.FindStringSubmatch(b.String()); m != nil {
			return m
		}
		select {
		case <-deadline:
			s.t.Fatalf("no output matching %q in:\n%s", re, b.String())
		case <-b.eof:
			if m := rx.FindStringSubmatch(b.String()); m != nil {
				return m
			}
			s.t.Fatalf("output closed without matching %q:\n%s", re, b.String())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// waitOut waits for a line on stdout, where vLLM logs.
func (s *sim) waitOut(re string) []string {
	s.t.Helper()
	return s.waitIn(s.stdout, re)
}

func (s *sim) post(path, body string) (int, []byte) {
	s.t.Helper()
	c := s.postCtx(context.Background(), path, body)
	require.NoError(s.t, c.err)
	return c.code, c.body
}

func (s *sim) postCtx(ctx context.Context, path, body string) completion {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, s.url(path), strings.NewReader(body))
	if err != nil {
		return completion{err: err}
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := client(0).Do(req)
	if err != nil {
		return completion{err: err}
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return completion{code: resp.StatusCode, body: b, err: err}
}

func (s *sim) completeV1Async(ctx context.Context, body string) <-chan completion {
	done := make(chan completion, 1)
	go func() { done <- s.postCtx(ctx, "/v1/completions", body) }()
	return done
}

type simPids struct {
	APIServer  int `json:"api_server"`
	EngineCore int `json:"engine_core"`
}

func (s *sim) pids() simPids {
	s.t.Helper()
	code, body := s.get("/sim/pids", 2*time.Second)
	require.Equal(s.t, http.StatusOK, code, string(body))
	var p simPids
	require.NoError(s.t, json.Unmarshal(body, &p))
	require.Equal(s.t, s.cmd.Process.Pid, p.APIServer)
	require.NotZero(s.t, p.EngineCore)
	return p
}

type simMemory struct {
	GPUMemBytes int64 `json:"gpu_mem_bytes"`
	Sleeping    bool  `json:"sleeping"`
	Alive       bool  `json:"engine_core_alive"`
}

func (s *sim) memory() simMemory {
	s.t.Helper()
	code, body := s.get("/sim/memory", 2*time.Second)
	require.Equal(s.t, http.StatusOK, code, string(body))
	var m simMemory
	require.NoError(s.t, json.Unmarshal(body, &m))
	return m
}

// ppid reads a process's parent from /proc/<pid>/stat.
func ppid(pid int) (int, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	i := strings.LastIndexByte(string(b), ')')
	fields := strings.Fields(string(b[i+1:]))
	if len(fields) < 2 {
		return 0, fmt.Errorf("bad stat %q", b)
	}
	return strconv.Atoi(fields[1])
}

// gone says whether pid has ended (a zombie counts: nobody serves there).
func gone(pid int) bool {
	st, err := procState(pid)
	return err != nil || st == 'Z'
}

// killLater kills a process of the simulator's in cleanup should it
// outlive the test.
func killLater(t *testing.T, pid int) {
	t.Cleanup(func() {
		if !gone(pid) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	})
}

func TestVLLMLoadsAModelDirectory(t *testing.T) {
	t.Parallel()
	model := hfModel(t, tinyConfig)
	s := startVLLM(t, model, "--load-time", "300ms", "--gpu-mem-mb", "4")
	s.waitListening()

	resp, err := client(2 * time.Second).Get(s.url("/health"))
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode, "loading")
	assert.Empty(t, body)
	code, _ := s.get("/v1/models", 2*time.Second)
	assert.Equal(t, http.StatusServiceUnavailable, code)

	s.waitHealthy()
	code, body = s.get("/health", 2*time.Second)
	assert.Equal(t, http.StatusOK, code)
	assert.Empty(t, body, "vLLM's /health is an empty 200")

	code, body = s.get("/v1/models", 2*time.Second)
	require.Equal(t, http.StatusOK, code, string(body))
	var models struct {
		Object string `json:"object"`
		Data   []struct {
			ID          string `json:"id"`
			Object      string `json:"object"`
			OwnedBy     string `json:"owned_by"`
			Root        string `json:"root"`
			MaxModelLen int    `json:"max_model_len"`
		} `json:"data"`
	}
	require.NoError(t, json.Unmarshal(body, &models))
	assert.Equal(t, "list", models.Object)
	require.Len(t, models.Data, 1)
	assert.Equal(t, "tiny-llama", models.Data[0].ID)
	assert.Equal(t, "model", models.Data[0].Object)
	assert.Equal(t, "vllm", models.Data[0].OwnedBy)
	assert.Equal(t, model, models.Data[0].Root)
	assert.Equal(t, 2048, models.Data[0].MaxModelLen, "config.json's max_position_embeddings")

	code, body = s.get("/version", 2*time.Second)
	assert.Equal(t, http.StatusOK, code)
	assert.JSONEq(t, `{"version":"0.11.0"}`, string(body))
	code, body = s.get("/nope", 2*time.Second)
	assert.Equal(t, http.StatusNotFound, code)
	assert.JSONEq(t, `{"detail":"Not Found"}`, string(body))

	// vLLM logs to stdout, each process behind its own prefix.
	api := fmt.Sprintf(`\(APIServer pid=%d\) `, s.cmd.Process.Pid)
	stamp := `\d\d-\d\d \d\d:\d\d:\d\d`
	s.waitOut(api + `INFO ` + stamp + ` \[api_server\.py:\d+\] vLLM API server version 0\.11\.0\n`)
	s.waitOut(`\(EngineCore_DP0 pid=\d+\) INFO ` + stamp + ` \[gpu_model_runner\.py:\d+\] Starting to load model ` + regexp.QuoteMeta(model) + `\.\.\.\n`)
	s.waitOut(api + `INFO ` + stamp + ` \[model\.py:\d+\] Resolved architecture: LlamaForCausalLM\n`)
	s.waitOut(api + `INFO:     Application startup complete\.\n`)
	s.waitOut(api + `INFO:     127\.0\.0\.1:\d+ - "GET /health HTTP/1\.1" 503 Service Unavailable\n`)
	s.waitOut(api + `INFO:     127\.0\.0\.1:\d+ - "GET /health HTTP/1\.1" 200 OK\n`)

	require.NoError(t, s.cmd.Process.Signal(syscall.SIGTERM))
	ws := s.wait()
	require.True(t, ws.Exited(), "got %v", ws)
	assert.Equal(t, 0, ws.ExitStatus())
	s.waitOut(api + `INFO:     Finished server process \[\d+\]\n`)
}

// vllm serve MODEL: the model as the first argument, vLLM's flags that
// the simulator does not model dropped.
func TestVLLMServeArguments(t *testing.T) {
	t.Parallel()
	model := hfModel(t, tinyConfig)
	port := freePort(t)
	s := startSimArgs(t, port, "--engine", "vllm", "serve", model, "--port", strconv.Itoa(port), "--host", "127.0.0.1",
		"--tensor-parallel-size", "1", "--enforce-eager", "--served-model-name", "tiny", "--gpu-mem-mb", "1")
	s.waitHealthy()
	code, body := s.get("/v1/models", 2*time.Second)
	require.Equal(t, http.StatusOK, code)
	assert.Contains(t, string(body), `"id":"tiny"`)
	s.waitLog(`sim: ignoring vLLM argument --tensor-parallel-size 1\n`)
	s.waitLog(`sim: ignoring vLLM argument --enforce-eager\n`)

	code, stdout, stderr := runSim(t, "--engine", "vllm", "--version")
	assert.Equal(t, 0, code, stderr)
	assert.Equal(t, "0.11.0\n", stdout)
	code, _, stderr = runSim(t, "--engine", "vllm", "--port", "1")
	assert.Equal(t, 2, code)
	assert.Contains(t, stderr, "the following arguments are required: model_tag")
	code, _, stderr = runSim(t, "--engine", "vllm", model, "--fault", "bogus")
	assert.Equal(t, 2, code)
	assert.Contains(t, stderr, "unknown fault kind")
	code, _, stderr = runSim(t, "--engine", "llama", "--model", model, "--port", "1")
	assert.Equal(t, 1, code)
	assert.Contains(t, stderr, `invalid --engine "llama"`)
}

// A model vLLM cannot load fails as vLLM fails: a traceback on stderr
// and exit status 1.
func TestVLLMRefusesWhatIsNotAModelDirectory(t *testing.T) {
	t.Parallel()
	noConfig := hfModel(t, "")
	file := filepath.Join(t.TempDir(), "model.gguf")
	require.NoError(t, os.WriteFile(file, []byte("GGUF\x03\x00\x00\x00"), 0o644))
	missing := filepath.Join(t.TempDir(), "absent")
	for _, tc := range []struct{ name, model string }{
		{"no config.json", noConfig},
		{"a regular file", file},
		{"no such path", missing},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			code, _, stderr := runSim(t, "--engine", "vllm", "--model", tc.model, "--port", strconv.Itoa(freePort(t)))
			assert.Equal(t, 1, code)
			assert.Contains(t, stderr, "Traceback (most recent call last):\n")
			assert.Contains(t, stderr, "ValueError: Invalid repository ID or local directory specified: '"+tc.model+"'.\n")
			assert.Contains(t, stderr, "ensure the presence of a 'config.json'")
			assert.Regexp(t, `^\(APIServer pid=\d+\) Traceback`, stderr, "each line behind the process's prefix")
		})
	}
	t.Run("config.json not JSON", func(t *testing.T) {
		t.Parallel()
		model := hfModel(t, "{not json")
		code, _, stderr := runSim(t, "--engine", "vllm", "--model", model, "--port", strconv.Itoa(freePort(t)))
		assert.Equal(t, 1, code)
		assert.Contains(t, stderr, "OSError: It looks like the config file at '"+model+"/config.json' is not a valid JSON file.\n")
	})
	t.Run("no weights", func(t *testing.T) {
		t.Parallel()
		model := hfModel(t, tinyConfig)
		require.NoError(t, os.Remove(filepath.Join(model, "model.safetensors")))
		code, stdout, stderr := runSim(t, "--engine", "vllm", "--model", model, "--port", strconv.Itoa(freePort(t)))
		assert.Equal(t, 1, code)
		// The engine core fails to load, then the API server gives up.
		assert.Regexp(t, `\(EngineCore_DP0 pid=\d+\) ERROR \S+ \S+ \[core\.py:\d+\] RuntimeError: Cannot find any model weights with `+
			"`"+regexp.QuoteMeta(model)+"`\n", stdout)
		assert.Contains(t, stderr, "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore_DP0': 1}\n")
	})
}

// The API server runs the engine core as its child, which holds the
// simulated GPU memory and ends with it.
func TestVLLMRunsAnEngineCoreChild(t *testing.T) {
	t.Parallel()
	for _, how := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
		t.Run(how.String(), func(t *testing.T) {
			t.Parallel()
			model := hfModel(t, tinyConfig)
			s := startVLLM(t, model, "--gpu-mem-mb", "48")
			s.waitHealthy()
			p := s.pids()
			killLater(t, p.EngineCore)
			parent, err := ppid(p.EngineCore)
			require.NoError(t, err)
			assert.Equal(t, p.APIServer, parent)
			// Each thread lists the children it forked.
			if files, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", p.APIServer)); len(files) > 0 {
				var children []string
				for _, f := range files {
					b, _ := os.ReadFile(f)
					children = append(children, strings.Fields(string(b))...)
				}
				assert.Contains(t, children, strconv.Itoa(p.EngineCore))
			}
			cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", p.EngineCore))
			require.NoError(t, err)
			assert.Contains(t, string(cmdline), "\x00--engine-core\x00")
			rss, err := vmRSS(p.EngineCore)
			require.NoError(t, err)
			assert.GreaterOrEqual(t, rss, 48<<10, "the simulated GPU memory is resident")
			m := s.memory()
			assert.Equal(t, simMemory{GPUMemBytes: 48 << 20, Alive: true}, m)

			// A SIGTERM for the whole group (Ctrl-C, a scope's stop) is
			// the API server's to act on; the child does not die first.
			require.NoError(t, syscall.Kill(p.EngineCore, syscall.SIGTERM))
			time.Sleep(100 * time.Millisecond)
			assert.False(t, gone(p.EngineCore))

			require.NoError(t, s.cmd.Process.Signal(how))
			ws := s.wait()
			if how == syscall.SIGTERM {
				require.True(t, ws.Exited(), "got %v", ws)
				assert.Equal(t, 0, ws.ExitStatus())
				assert.NotContains(t, s.stdout.String(), "died unexpectedly", "a stop is no crash")
			}
			assert.Eventually(t, func() bool { return gone(p.EngineCore) }, 10*time.Second, 10*time.Millisecond,
				"the engine core ends with the API server")
		})
	}
}

func TestVLLMCompletionMovesMetrics(t *testing.T) {
	t.Parallel()
	model := hfModel(t, tinyConfig)
	s := startVLLM(t, model, "--token-time", "20ms", "--gpu-mem-mb", "1")
	s.waitHealthy()

	code, body := s.get("/metrics", 2*time.Second)
	require.Equal(t, http.StatusOK, code)
	for _, line := range []string{
		"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{engine=\"0\",model_name=\"tiny-llama\"} 0\n",
		"# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{engine=\"0\",model_name=\"tiny-llama\"} 0\n",
		"# TYPE vllm:generation_tokens_total counter\nvllm:generation_tokens_total{engine=\"0\",model_name=\"tiny-llama\"} 0\n",
		"# TYPE vllm:prompt_tokens_total counter\nvllm:prompt_tokens_total{engine=\"0\",model_name=\"tiny-llama\"} 0\n",
	} {
		assert.Contains(t, string(body), line)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	done := s.completeV1Async(ctx, `{"model":"tiny-llama","prompt":"Say hello","max_tokens":25}`)
	mid := s.waitMetrics("a request running that has produced tokens", func(m map[string]float64) bool {
		return m[vRunning] == 1 && m[vGeneration] > 0
	})
	assert.Less(t, mid[vGeneration], 25.0, "tokens count one at a time, not all at the end")
	assert.Equal(t, 3.0, mid[vPrompt])

	var c completion
	select {
	case c = <-done:
	case <-ctx.Done():
		t.Fatal("/v1/completions did not answer")
	}
	require.NoError(t, c.err)
	require.Equal(t, http.StatusOK, c.code, string(c.body))
	var got struct {
		ID      string `json:"id"`
		Object  string `json:"object"`
		Model   string `json:"model"`
		Choices []struct {
			Text         string `json:"text"`
			FinishReason string `json:"finish_reason"`
		} `json:"choices"`
		Usage struct {
			PromptTokens     int `json:"prompt_tokens"`
			CompletionTokens int `json:"completion_tokens"`
			TotalTokens      int `json:"total_tokens"`
		} `json:"usage"`
	}
	require.NoError(t, json.Unmarshal(c.body, &got))
	assert.True(t, strings.HasPrefix(got.ID, "cmpl-"), got.ID)
	assert.Equal(t, "text_completion", got.Object)
	assert.Equal(t, "tiny-llama", got.Model)
	require.Len(t, got.Choices, 1)
	assert.True(t, strings.HasPrefix(got.Choices[0].Text, " The quick brown fox"), got.Choices[0].Text)
	assert.Equal(t, "length", got.Choices[0].FinishReason)
	assert.Equal(t, 3, got.Usage.PromptTokens)
	assert.Equal(t, 25, got.Usage.CompletionTokens)
	assert.Equal(t, 28, got.Usage.TotalTokens)
	assert.Equal(t, map[string]float64{vRunning: 0, vWaiting: 0, vGeneration: 25, vPrompt: 3}, s.scrape())

	// Without max_tokens: vLLM's default, 16.
	code, body = s.post("/v1/completions", `{"prompt":[1,2,3,4]}`)
	require.Equal(t, http.StatusOK, code, string(body))
	assert.Equal(t, map[string]float64{vRunning: 0, vWaiting: 0, vGeneration: 25 + 16, vPrompt: 3 + 4}, s.scrape())
	s.waitOut(`INFO:     127\.0\.0\.1:\d+ - "POST /v1/completions HTTP/1\.1" 200 OK\n`)
}

// Beyond --max-num-seqs requests wait; a long generation keeps its
// request running.
func TestVLLMRequestsRunningAndWaiting(t *testing.T) {
	t.Parallel()
	model := hfModel(t, tinyConfig)
	s := startVLLM(t, model, "--token-time", "5ms", "--max-num-seqs", "1", "--gpu-mem-mb", "1")
	s.waitHealthy()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	first := s.completeV1Async(ctx, `{"prompt":"a","max_tokens":200}`)
	s.waitMetrics("one running", func(m map[string]float64) bool { return m[vRunning] == 1 })
	second := s.completeV1Async(ctx, `{"prompt":"b","max_tokens":1}`)
	m := s.waitMetrics("one waiting", func(m map[string]float64) bool { return m[vWaiting] == 1 })
	assert.Equal(t, 1.0, m[vRunning])
	last := m[vGeneration]
	for range 3 {
		m = s.waitMetrics("the long generation producing", func(m map[string]float64) bool { return m[vGeneration] > last })
		assert.Equal(t, 1.0, m[vRunning], "running all along the generation")
		last = m[vGeneration]
	}
	for _, ch := range []<-chan completion{first, second} {
		c := <-ch
		require.NoError(t, c.err)
		assert.Equal(t, http.StatusOK, c.code, string(c.body))
	}
	assert.Equal(t, map[string]float64{vRunning: 0, vWaiting: 0, vGeneration: 201, vPrompt: 4}, s.scrape())
}

func TestVLLMCompletionRejectsBadBodies(t *testing.T) {
	t.Parallel()
	model := hfModel(t, tinyConfig)
	s := startVLLM(t, model, "--gpu-mem-mb", "1")
	s.waitHealthy()
	for _, tc := range []struct {
		name, body string
		code       int
		typ, msg   string
	}{
		{"bad JSON", `{"prompt":`, 400, "BadRequestError", "not valid JSON"},
		{"another model", `{"model":"gpt-4","prompt":"Hi"}`, 404, "NotFoundError", "The model `gpt-4` does not exist."},
		{"no prompt", `{"max_tokens":1}`, 400, "BadRequestError", "prompt"},
		{"zero tokens", `{"prompt":"Hi","max_tokens":0}`, 400, "BadRequestError", "max_tokens must be at least 1, got 0."},
		{"past the context", `{"prompt":"Hi","max_tokens":5000}`, 400, "BadRequestError", "maximum context length is 2048 tokens"},
		{"streaming", `{"prompt":"Hi","stream":true}`, 400, "BadRequestError", "stream"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, body := s.post("/v1/completions", tc.body)
			assert.Equal(t, tc.code, code, string(body))
			var e struct {
				Error struct {
					Message string `json:"message"`
					Type    string `json:"type"`
					Code    int    `json:"code"`
				} `json:"error"`
			}
			require.NoError(t, json.Unmarshal(body, &e), string(body))
			assert.Contains(t, e.Error.Message, tc.msg)
			assert.Equal(t, tc.typ, e.Error.Type)
			assert.Equal(t, tc.code, e.Error.Code)
		})
	}
	code, body := s.get("/v1/completions", 2*time.Second)
	assert.Equal(t, http.StatusMethodNotAllowed, code)
	assert.JSONEq(t, `{"detail":"Method Not Allowed"}`, string(body))
	assert.Equal(t, 0.0, s.scrape()[vGeneration])
}

// child-exit: the engine core dies, the API server stays; /health says
// what it was told to, completions fail with 500.
func TestVLLMFaultChildExit(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		args   []string
		health int
	}{
		{nil, http.StatusOK},
		{[]string{"--dead-health-status", "503"}, http.StatusServiceUnavailable},
	} {
		t.Run(strconv.Itoa(tc.health), func(t *testing.T) {
			t.Parallel()
			model := hfModel(t, tinyConfig)
			s := startVLLM(t, model, append([]string{"--gpu-mem-mb", "1"}, tc.args...)...)
			s.waitHealthy()
			p := s.pids()
			killLater(t, p.EngineCore)
			code, body := s.post("/v1/completions", `{"prompt":"Hi","max_tokens":2}`)
			require.Equal(t, http.StatusOK, code, string(body))

			s.postFault("child-exit")
			assert.True(t, gone(p.EngineCore), "the engine core is gone once the fault is answered")
			s.waitOut(`\(EngineCore_DP0 pid=\d+\) ERROR \S+ \S+ \[core\.py:\d+\] EngineCore encountered a fatal error\.\n`)
			s.waitOut(`\(APIServer pid=\d+\) ERROR \S+ \S+ \[core_client\.py:\d+\] Engine core proc EngineCore_DP0 died unexpectedly, shutting down client\.\n`)
			code, _ = s.get("/health", 2*time.Second)
			assert.Equal(t, tc.health, code)
			code, body = s.post("/v1/completions", `{"prompt":"Hi","max_tokens":2}`)
			assert.Equal(t, http.StatusInternalServerError, code)
			assert.Empty(t, body)
			assert.Equal(t, simMemory{}, s.memory())
			time.Sleep(100 * time.Millisecond)
			assert.True(t, s.alive(), "the API server keeps running")
			assert.Equal(t, 2.0, s.scrape()[vGeneration])
		})
	}
}

// child-exit-server-exits, and an engine core killed from outside: the
// API server notices and exits 1, as vLLM V1 does; unless told to stay.
func TestVLLMEngineCoreDeathEndsTheAPIServer(t *testing.T) {
	t.Parallel()
	t.Run("child-exit-server-exits", func(t *testing.T) {
		t.Parallel()
		s := startVLLM(t, hfModel(t, tinyConfig), "--gpu-mem-mb", "1")
		s.waitHealthy()
		killLater(t, s.pids().EngineCore)
		s.postFault("child-exit-server-exits")
		ws := s.wait()
		require.True(t, ws.Exited(), "got %v", ws)
		assert.Equal(t, 1, ws.ExitStatus())
		<-s.stdout.eof
		out := s.stdout.String()
		assert.Contains(t, out, "Engine core proc EngineCore_DP0 died unexpectedly, shutting down client.\n")
		assert.Contains(t, out, "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. See stack trace (above) for the root cause.\n")
		assert.NotContains(t, s.stderr.String(), "goroutine ", "no Go panic")
	})
	t.Run("killed from outside", func(t *testing.T) {
		t.Parallel()
		s := startVLLM(t, hfModel(t, tinyConfig), "--gpu-mem-mb", "1")
		s.waitHealthy()
		require.NoError(t, syscall.Kill(s.pids().EngineCore, syscall.SIGKILL))
		ws := s.wait()
		require.True(t, ws.Exited(), "got %v", ws)
		assert.Equal(t, 1, ws.ExitStatus())
		s.waitOut(`died unexpectedly`)
	})
	t.Run("killed from outside, kept alive", func(t *testing.T) {
		t.Parallel()
		s := startVLLM(t, hfModel(t, tinyConfig), "--gpu-mem-mb", "1", "--keep-alive-on-engine-death")
		s.waitHealthy()
		require.NoError(t, syscall.Kill(s.pids().EngineCore, syscall.SIGKILL))
		s.waitOut(`died unexpectedly`)
		require.Eventually(t, func() bool {
			code, _ := s.post("/v1/completions", `{"prompt":"Hi","max_tokens":1}`)
			return code == http.StatusInternalServerError
		}, 10*time.Second, 10*time.Millisecond)
		assert.True(t, s.alive())
	})
	t.Run("during loading", func(t *testing.T) {
		t.Parallel()
		s := startVLLM(t, hfModel(t, tinyConfig), "--gpu-mem-mb", "1", "--load-time", "1m", "--fault", "child-exit", "--fault-after", "100ms")
		ws := s.wait()
		require.True(t, ws.Exited(), "got %v", ws)
		assert.Equal(t, 1, ws.ExitStatus())
		<-s.stderr.eof
		assert.Contains(t, s.stderr.String(), "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore_DP0': 1}\n")
	})
	t.Run("from the model's config.json", func(t *testing.T) {
		t.Parallel()
		model := hfModel(t, `{"architectures":["MistralForCausalLM"],"sim_fault":"child-exit-server-exits"}`)
		s := startVLLM(t, model, "--gpu-mem-mb", "1")
		ws := s.wait()
		require.True(t, ws.Exited(), "got %v", ws)
		assert.Equal(t, 1, ws.ExitStatus())
		s.waitLog(`sim: model asks for fault child-exit-server-exits`)
		s.waitOut(`Resolved architecture: MistralForCausalLM`)
	})
}

// child-oom: the engine core grows until the kernel kills it (here the
// test plays the OOM killer), and the API server exits 1.
func TestVLLMFaultChildOOM(t *testing.T) {
	t.Parallel()
	s := startVLLM(t, hfModel(t, tinyConfig), "--gpu-mem-mb", "1")
	s.waitHealthy()
	p := s.pids()
	killLater(t, p.EngineCore)
	s.postFault("child-oom")
	s.waitLog(`oom: 64 MiB allocated`)
	rss, err := vmRSS(p.EngineCore)
	require.NoError(t, err)
	assert.GreaterOrEqual(t, rss, 64<<10, "the engine core's pages are touched, its RSS grows")
	apiRSS, err := vmRSS(p.APIServer)
	require.NoError(t, err)
	assert.Less(t, apiRSS, rss, "the engine core grows, not the API server")
	require.NoError(t, syscall.Kill(p.EngineCore, syscall.SIGKILL))
	ws := s.wait()
	require.True(t, ws.Exited(), "got %v", ws)
	assert.Equal(t, 1, ws.ExitStatus())
	s.waitOut(`Engine core proc EngineCore_DP0 died unexpectedly`)
}

// The common faults act on the API server; its death ends the engine core.
func TestVLLMCommonFaultsKill(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		kind   string
		signal syscall.Signal
		code   int
		out    string // on stdout
		err    string // on stderr
	}{
		{kind: "segv", signal: syscall.SIGSEGV},
		{kind: "abort", signal: syscall.SIGABRT, err: "Fatal Python error: Aborted\n"},
		{kind: "exit:3", code: 3},
		// A CUDA error is the engine core's; the API server follows it.
		{kind: "cuda", code: 1, out: "ERROR [core.py:710] RuntimeError: CUDA error: an illegal memory access was encountered\n"},
	} {
		t.Run(tc.kind, func(t *testing.T) {
			t.Parallel()
			s := startVLLM(t, hfModel(t, tinyConfig), "--gpu-mem-mb", "1")
			s.waitHealthy()
			p := s.pids()
			killLater(t, p.EngineCore)
			s.postFault(tc.kind)
			ws := s.wait()
			if tc.signal != 0 {
				require.True(t, ws.Signaled(), "want death by %v, got %v", tc.signal, ws)
				assert.Equal(t, tc.signal, ws.Signal())
			} else {
				require.True(t, ws.Exited(), "got %v", ws)
				assert.Equal(t, tc.code, ws.ExitStatus())
			}
			<-s.stdout.eof
			<-s.stderr.eof
			stamp := regexp.MustCompile(` \d\d-\d\d \d\d:\d\d:\d\d `)
			assert.Contains(t, stamp.ReplaceAllString(s.stdout.String(), " "), tc.out)
			assert.Contains(t, s.stderr.String(), tc.err)
			assert.NotContains(t, s.stderr.String(), "goroutine ", "no Go panic")
			assert.Eventually(t, func() bool { return gone(p.EngineCore) }, 10*time.Second, 10*time.Millisecond,
				"the engine core ends with the API server")
		})
	}
}

// The serving faults work in the vLLM mode too.
func TestVLLMServingFaults(t *testing.T) {
	t.Parallel()
	t.Run("stall", func(t *testing.T) {
		t.Parallel()
		s := startVLLM(t, hfModel(t, tinyConfig), "--gpu-mem-mb", "1", "--token-time", "2ms")
		s.waitHealthy()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		running := s.completeV1Async(ctx, `{"prompt":"Hi","max_tokens":2000}`)
		s.waitMetrics("the request producing", func(m map[string]float64) bool { return m[vGeneration] > 5 })
		s.postFault("stall")
		frozen := s.scrape()
		assert.Equal(t, 2.0, frozen[vRunning], "the request and the stuck one")
		for end := time.Now().Add(200 * time.Millisecond); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
			assert.Equal(t, frozen[vGeneration], s.scrape()[vGeneration])
		}
		code, _ := s.get("/health", 2*time.Second)
		assert.Equal(t, http.StatusOK, code)
		cancel()
		<-running
		s.waitMetrics("only the stuck request", func(m map[string]float64) bool { return m[vRunning] == 1 })
	})
	t.Run("busy", func(t *testing.T) {
		t.Parallel()
		s := startVLLM(t, hfModel(t, tinyConfig), "--gpu-mem-mb", "1")
		s.waitHealthy()
		s.postFault("busy")
		last := s.scrape()[vGeneration]
		for range 2 {
			m := s.waitMetrics("the counter moving", func(m map[string]float64) bool { return m[vGeneration] > last })
			assert.GreaterOrEqual(t, m[vRunning], 1.0)
			last = m[vGeneration]
		}
	})
	t.Run("fail-completion, hang-health, no-metrics", func(t *testing.T) {
		t.Parallel()
		s := startVLLM(t, hfModel(t, tinyConfig), "--gpu-mem-mb", "1")
		s.waitHealthy()
		s.postFault("fail-completion")
		code, body := s.post("/v1/completions", `{"prompt":"Hi","max_tokens":1}`)
		assert.Equal(t, http.StatusInternalServerError, code)
		assert.Contains(t, string(body), "simulated failure")
		s.postFault("no-metrics")
		code, _ = s.get("/metrics", 2*time.Second)
		assert.Equal(t, http.StatusNotFound, code)
		s.postFault("hang-health")
		_, err := client(300 * time.Millisecond).Get(s.url("/health"))
		var ne net.Error
		require.ErrorAs(t, err, &ne)
		assert.True(t, ne.Timeout(), "%v", err)
	})
	t.Run("ignore-term", func(t *testing.T) {
		t.Parallel()
		s := startVLLM(t, hfModel(t, tinyConfig), "--gpu-mem-mb", "1")
		s.waitHealthy()
		killLater(t, s.pids().EngineCore)
		s.postFault("ignore-term")
		require.NoError(t, s.cmd.Process.Signal(syscall.SIGTERM))
		time.Sleep(200 * time.Millisecond)
		code, _ := s.get("/health", 2*time.Second)
		assert.Equal(t, http.StatusOK, code)
	})
	t.Run("log", func(t *testing.T) {
		t.Parallel()
		s := startVLLM(t, hfModel(t, tinyConfig), "--gpu-mem-mb", "1")
		s.waitHealthy()
		code, body := s.post("/sim/fault?kind="+url.QueryEscape("log:RuntimeError: CUDA error: it's\nsecond line"), "")
		require.Equal(t, http.StatusAccepted, code, string(body))
		s.waitOut(`\(APIServer pid=\d+\) INFO \S+ \S+ \[logger\.py:43\] Received request cmpl-[0-9a-f]{32}-0: ` +
			`prompt: 'RuntimeError: CUDA error: it\\'s\\nsecond line', params: SamplingParams\(`)
		assert.True(t, s.alive())
	})
	t.Run("unknown kind", func(t *testing.T) {
		t.Parallel()
		s := startVLLM(t, hfModel(t, tinyConfig), "--gpu-mem-mb", "1")
		s.waitListening()
		code, body := s.post("/sim/fault?kind=child-bogus", "")
		assert.Equal(t, http.StatusBadRequest, code)
		for _, kind := range []string{"child-exit", "child-exit-server-exits", "child-oom", "segv"} {
			assert.Contains(t, string(body), kind)
		}
	})
}

// The llama mode does not know the engine-core faults.
func TestLlamaModeRefusesEngineCoreFaults(t *testing.T) {
	t.Parallel()
	model, _ := ggufModel(t)
	code, _, stderr := runSim(t, "--model", model, "--port", "1", "--fault", "child-exit")
	assert.Equal(t, 1, code)
	assert.Contains(t, stderr, `unknown fault kind "child-exit"`)
	code, _, _ = runSim(t, "--engine", "llamacpp", "--version")
	assert.Equal(t, 0, code)
}

// Sleep mode: the engine core gives its simulated GPU memory back and
// takes it again; completions fail meanwhile.
func TestVLLMSleepAndWake(t *testing.T) {
	t.Parallel()
	t.Run("without --enable-sleep-mode", func(t *testing.T) {
		t.Parallel()
		s := startVLLM(t, hfModel(t, tinyConfig), "--gpu-mem-mb", "1")
		s.waitHealthy()
		for _, req := range []struct{ method, path string }{{"POST", "/sleep?level=1"}, {"POST", "/wake_up"}, {"GET", "/is_sleeping"}} {
			var code int
			var body []byte
			if req.method == "POST" {
				code, body = s.post(req.path, "")
			} else {
				code, body = s.get(req.path, 2*time.Second)
			}
			assert.Equal(t, http.StatusNotFound, code, req.path)
			assert.JSONEq(t, `{"detail":"Not Found"}`, string(body))
		}
		assert.Equal(t, simMemory{GPUMemBytes: 1 << 20, Alive: true}, s.memory())
	})
	for _, level := range []string{"1", "2"} {
		t.Run("level "+level, func(t *testing.T) {
			t.Parallel()
			s := startVLLM(t, hfModel(t, tinyConfig), "--gpu-mem-mb", "64", "--enable-sleep-mode", "--token-time", "5ms")
			s.waitHealthy()
			p := s.pids()
			killLater(t, p.EngineCore)
			awake, err := vmRSS(p.EngineCore)
			require.NoError(t, err)
			assert.Equal(t, simMemory{GPUMemBytes: 64 << 20, Alive: true}, s.memory())
			code, body := s.get("/is_sleeping", 2*time.Second)
			require.Equal(t, http.StatusOK, code)
			assert.JSONEq(t, `{"is_sleeping":false}`, string(body))

			// A request in flight when the engine falls asleep fails.
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			inFlight := s.completeV1Async(ctx, `{"prompt":"Hi","max_tokens":1000}`)
			s.waitMetrics("the request running", func(m map[string]float64) bool { return m[vGeneration] > 0 })

			code, body = s.post("/sleep?level="+level, "")
			require.Equal(t, http.StatusOK, code, string(body))
			assert.Empty(t, body)
			assert.Equal(t, simMemory{GPUMemBytes: 0, Sleeping: true, Alive: true}, s.memory())
			asleep, err := vmRSS(p.EngineCore)
			require.NoError(t, err)
			assert.Less(t, asleep, awake-48<<10, "the memory is given back to the system")
			code, body = s.get("/is_sleeping", 2*time.Second)
			require.Equal(t, http.StatusOK, code)
			assert.JSONEq(t, `{"is_sleeping":true}`, string(body))
			c := <-inFlight
			require.NoError(t, c.err)
			assert.Equal(t, http.StatusServiceUnavailable, c.code, string(c.body))

			code, body = s.post("/v1/completions", `{"prompt":"Hi","max_tokens":1}`)
			assert.Equal(t, http.StatusServiceUnavailable, code)
			assert.Contains(t, string(body), "sleeping")
			code, _ = s.get("/health", 2*time.Second)
			assert.Equal(t, http.StatusOK, code, "a sleeping engine is healthy")

			code, body = s.post("/wake_up", "")
			require.Equal(t, http.StatusOK, code, string(body))
			assert.Equal(t, simMemory{GPUMemBytes: 64 << 20, Alive: true}, s.memory())
			rss, err := vmRSS(p.EngineCore)
			require.NoError(t, err)
			assert.GreaterOrEqual(t, rss, 64<<10)
			code, body = s.post("/v1/completions", `{"prompt":"Hi","max_tokens":3}`)
			assert.Equal(t, http.StatusOK, code, string(body))

			s.waitOut(`INFO \S+ \S+ \[api_server\.py:\d+\] sleep the engine with level ` + level + `\n`)
			s.waitOut(`\(EngineCore_DP0 pid=\d+\) INFO \S+ \S+ \[gpu_worker\.py:\d+\] Sleep mode freed 0\.06 GiB memory`)
			s.waitOut(`INFO \S+ \S+ \[api_server\.py:\d+\] wake up the engine with tags: None\n`)
		})
	}
	t.Run("faults", func(t *testing.T) {
		t.Parallel()
		s := startVLLM(t, hfModel(t, tinyConfig), "--gpu-mem-mb", "8", "--enable-sleep-mode")
		s.waitHealthy()
		code, body := s.post("/sim/fault?kind=sleep-fail", "")
		require.Equal(t, http.StatusAccepted, code, string(body))
		code, body = s.post("/sleep?level=1", "")
		assert.Equal(t, http.StatusInternalServerError, code, string(body))
		assert.Equal(t, simMemory{GPUMemBytes: 8 << 20, Alive: true}, s.memory(), "a failed sleep keeps the memory")

		s2 := startVLLM(t, hfModel(t, tinyConfig), "--gpu-mem-mb", "8", "--enable-sleep-mode", "--fault", "wake-fail")
		s2.waitHealthy()
		code, body = s2.post("/sleep?level=2", "")
		require.Equal(t, http.StatusOK, code, string(body))
		code, body = s2.post("/wake_up", "")
		assert.Equal(t, http.StatusInternalServerError, code, string(body))
		assert.Equal(t, simMemory{Sleeping: true, Alive: true}, s2.memory(), "a failed wake leaves it asleep")
		code, _ = s2.post("/v1/completions", `{"prompt":"Hi","max_tokens":1}`)
		assert.Equal(t, http.StatusServiceUnavailable, code)

		code, body = s2.post("/sim/fault?kind=wake-hang", "")
		require.Equal(t, http.StatusAccepted, code, string(body))
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel()
		req, err := http.NewRequestWithContext(ctx, "POST", s2.url("/wake_up"), nil)
		require.NoError(t, err)
		_, err = http.DefaultClient.Do(req)
		assert.ErrorIs(t, err, context.DeadlineExceeded, "a hanging wake never answers")
		assert.Equal(t, simMemory{Sleeping: true, Alive: true}, s2.memory())
	})
	t.Run("bad level", func(t *testing.T) {
		t.Parallel()
		s := startVLLM(t, hfModel(t, tinyConfig), "--gpu-mem-mb", "1", "--enable-sleep-mode")
		s.waitHealthy()
		code, _ := s.post("/sleep?level=3", "")
		assert.Equal(t, http.StatusBadRequest, code)
		code, _ = s.get("/sleep", 2*time.Second)
		assert.Equal(t, http.StatusMethodNotAllowed, code)
		assert.Equal(t, simMemory{GPUMemBytes: 1 << 20, Alive: true}, s.memory())
	})
}

func TestParseVLLMFaults(t *testing.T) {
	for _, kind := range []string{"child-exit", "child-exit-server-exits", "child-oom", "segv", "exit:3", "stall", "sleep-fail", "wake-fail", "wake-hang"} {
		f, err := parseVLLMFault(kind)
		require.NoError(t, err, kind)
		assert.Equal(t, kind, f.String())
	}
	for _, kind := range []string{"child-exit", "child-exit-server-exits", "child-oom", "sleep-fail", "wake-fail", "wake-hang"} {
		_, err := parseFault(kind)
		assert.Error(t, err, "%s is the vLLM mode's only", kind)
	}
	f, _ := parseVLLMFault("child-exit")
	assert.True(t, f.kind.beforeAnswer(), "the next request sees the dead engine core")
	f, _ = parseVLLMFault("child-exit-server-exits")
	assert.False(t, f.kind.beforeAnswer())
}

func TestEngineArg(t *testing.T) {
	assert.Equal(t, "vllm", engineArg([]string{"--model", "m", "--engine", "vllm"}))
	assert.Equal(t, "vllm", engineArg([]string{"-engine=vllm"}))
	assert.Equal(t, "", engineArg([]string{"--model", "m"}))
	assert.Equal(t, "", engineArg([]string{"--", "--engine", "vllm"}))
}
