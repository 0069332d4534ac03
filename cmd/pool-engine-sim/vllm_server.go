package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// vLLM's metric names (vllm/v1/metrics/loggers.py), each with the labels
// vLLM gives them.
const (
	metricVLLMRunning      = "vllm:num_requests_running"
	metricVLLMWaiting      = "vllm:num_requests_waiting"
	metricVLLMGeneration   = "vllm:generation_tokens_total"
	metricVLLMPromptTokens = "vllm:prompt_tokens_total"
)

// vllmDefaultMaxTokens is what a /v1/completions without max_tokens
// generates (vLLM's CompletionRequest default).
const vllmDefaultMaxTokens = 16

// vllmServer is the API server process of the vLLM mode. It shares the
// llama mode's fault switches, shutdown channel and loaded state.
type vllmServer struct {
	*server
	vo   vllmOptions
	core *coreClient

	reg          *prometheus.Registry
	running      prometheus.Gauge
	waiting      prometheus.Gauge
	generation   prometheus.Counter
	promptTokens prometheus.Counter
	slots        chan struct{} // --max-num-seqs

	keepAlive atomic.Bool // the API server outlives the engine core
	dead      atomic.Bool // the engine core is gone, the API server stays
	sleeping  atomic.Bool
	// Sleep-mode faults: every sleep fails, every wake fails, or every
	// wake hangs (until its caller gives up or the server stops).
	sleepFail, wakeFail, wakeHang atomic.Bool

	// For the periodic stats line.
	nRunning, nWaiting, nGenerated, nPrompt atomic.Int64
}

func newVLLMServer(o vllmOptions) *vllmServer {
	labels := prometheus.Labels{"engine": "0", "model_name": o.servedName}
	v := &vllmServer{
		server: newServer(o.options),
		vo:     o,
		reg:    prometheus.NewRegistry(),
		running: prometheus.NewGauge(prometheus.GaugeOpts{Name: metricVLLMRunning,
			Help: "Number of requests in model execution batches.", ConstLabels: labels}),
		waiting: prometheus.NewGauge(prometheus.GaugeOpts{Name: metricVLLMWaiting,
			Help: "Number of requests waiting to be processed.", ConstLabels: labels}),
		generation: prometheus.NewCounter(prometheus.CounterOpts{Name: metricVLLMGeneration,
			Help: "Number of generation tokens processed.", ConstLabels: labels}),
		promptTokens: prometheus.NewCounter(prometheus.CounterOpts{Name: metricVLLMPromptTokens,
			Help: "Number of prefill tokens processed.", ConstLabels: labels}),
		slots: make(chan struct{}, o.maxNumSeqs),
	}
	v.reg.MustRegister(v.running, v.waiting, v.generation, v.promptTokens)
	v.keepAlive.Store(o.keepAlive)
	return v
}

// token counts one token the engine core produced.
func (v *vllmServer) token() {
	v.generation.Inc()
	v.nGenerated.Add(1)
}

func (v *vllmServer) addRunning(d int64) {
	v.running.Add(float64(d))
	v.nRunning.Add(d)
}

func (v *vllmServer) addWaiting(d int64) {
	v.waiting.Add(float64(d))
	v.nWaiting.Add(d)
}

// statsLoop logs vLLM's periodic stats line while there is work.
func (v *vllmServer) statsLoop() {
	const every = 10 * time.Second
	t := time.NewTicker(every)
	defer t.Stop()
	var lastGen, lastPrompt int64
	for {
		select {
		case <-v.shutdown:
			return
		case <-t.C:
		}
		gen, prompt := v.nGenerated.Load(), v.nPrompt.Load()
		running, waiting := v.nRunning.Load(), v.nWaiting.Load()
		if gen == lastGen && prompt == lastPrompt && running == 0 && waiting == 0 {
			continue
		}
		vlog("INFO", "loggers.py:123", "Engine 000: Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "+
			"Running: %d reqs, Waiting: %d reqs, GPU KV cache usage: 0.0%%, Prefix cache hit rate: 0.0%%",
			float64(prompt-lastPrompt)/every.Seconds(), float64(gen-lastGen)/every.Seconds(), running, waiting)
		lastGen, lastPrompt = gen, prompt
	}
}

// apiRoutes are the routes of vLLM's API, in the order vLLM logs them.
func (v *vllmServer) apiRoutes() []route {
	r := []route{
		{"/health", v.handleHealth},
		{"/metrics", v.handleMetrics},
		{"/version", v.handleVersion},
		{"/v1/models", v.handleModels},
		{"/v1/completions", v.handleCompletions},
	}
	if v.vo.sleepMode {
		r = append(r, route{"/sleep", v.handleSleep}, route{"/wake_up", v.handleWakeUp}, route{"/is_sleeping", v.handleIsSleeping})
	}
	return r
}

func (v *vllmServer) routes() []string {
	var paths []string
	for _, rt := range v.apiRoutes() {
		paths = append(paths, rt.path)
	}
	return paths
}

func (v *vllmServer) httpServer() *http.Server {
	mux := serveMux(append(v.apiRoutes(),
		route{"/sim/memory", v.handleMemory},
		route{"/sim/pids", v.handlePids},
		route{"/sim/fault", v.handleFault},
		route{"/sim/devices", v.handleDevices},
	), func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusNotFound, map[string]string{"detail": "Not Found"})
	})
	return simHTTPServer(uvicornAccessLog(mux), "sim: http: ")
}

// uvicornAccessLog logs each request as uvicorn does,
// `INFO:     127.0.0.1:43210 - "GET /health HTTP/1.1" 200 OK`, and runs a
// fault the handler left for after the answer.
func uvicornAccessLog(h http.Handler) http.Handler {
	return logRequests(h, func(r *http.Request, status int) {
		target := r.URL.Path
		if r.URL.RawQuery != "" {
			target += "?" + r.URL.RawQuery
		}
		uvlog("%s - \"%s %s HTTP/%d.%d\" %d %s", r.RemoteAddr, r.Method, target, r.ProtoMajor, r.ProtoMinor,
			status, http.StatusText(status))
	})
}

// vllmError answers in vLLM's OpenAI error shape.
func vllmError(w http.ResponseWriter, status int, msg, typ string) {
	writeJSON(w, status, map[string]any{
		"error": map[string]any{"message": msg, "type": typ, "param": nil, "code": status},
	})
}

// fastAPIMethods answers 405 as FastAPI does unless the method is allowed.
func fastAPIMethods(w http.ResponseWriter, r *http.Request, methods ...string) bool {
	if slices.Contains(methods, r.Method) {
		return true
	}
	w.Header().Set("Allow", strings.Join(methods, ", "))
	writeJSON(w, http.StatusMethodNotAllowed, map[string]string{"detail": "Method Not Allowed"})
	return false
}

// loadedFor passes a request in one of methods once the model is
// loaded, and answers any other as vLLM does.
func (v *vllmServer) loadedFor(w http.ResponseWriter, r *http.Request, methods ...string) bool {
	if !fastAPIMethods(w, r, methods...) {
		return false
	}
	return v.loaded(w)
}

// loaded says whether the engine core has loaded the model, and answers
// 503 as vLLM does if not.
func (v *vllmServer) loaded(w http.ResponseWriter) bool {
	if loaded, _ := v.state(); !loaded {
		vllmError(w, http.StatusServiceUnavailable, "The engine is loading the model", "ServiceUnavailableError")
		return false
	}
	return true
}

// emptyStatus answers as FastAPI's Response(status_code=N): no body.
func emptyStatus(w http.ResponseWriter, status int) {
	w.Header().Set("Content-Length", "0")
	w.WriteHeader(status)
}

// handleHealth answers vLLM's empty 200. The API server of this simulator
// listens while the engine core loads (vLLM listens only once it is up;
// --listen-after imitates that) and says 503 meanwhile.
func (v *vllmServer) handleHealth(w http.ResponseWriter, r *http.Request) {
	if !fastAPIMethods(w, r, http.MethodGet, http.MethodHead) {
		return
	}
	if v.hangHealth.Load() {
		v.hang(r)
	}
	switch loaded, _ := v.state(); {
	case !loaded:
		emptyStatus(w, http.StatusServiceUnavailable)
	case v.dead.Load():
		emptyStatus(w, v.vo.deadHealth)
	default:
		emptyStatus(w, http.StatusOK)
	}
}

func (v *vllmServer) handleVersion(w http.ResponseWriter, r *http.Request) {
	if !fastAPIMethods(w, r, http.MethodGet) {
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"version": vllmVersion})
}

func (v *vllmServer) handleMetrics(w http.ResponseWriter, r *http.Request) {
	if !fastAPIMethods(w, r, http.MethodGet, http.MethodHead) {
		return
	}
	if v.metricsFault(w, r) {
		return
	}
	writeRegistry(w, v.reg)
}

type vllmModelEntry struct {
	ID          string  `json:"id"`
	Object      string  `json:"object"`
	Created     int64   `json:"created"`
	OwnedBy     string  `json:"owned_by"`
	Root        string  `json:"root"`
	Parent      *string `json:"parent"`
	MaxModelLen int     `json:"max_model_len"`
}

func (v *vllmServer) handleModels(w http.ResponseWriter, r *http.Request) {
	if !v.loadedFor(w, r, http.MethodGet) {
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{
		"object": "list",
		"data": []vllmModelEntry{{
			ID: v.vo.servedName, Object: "model", Created: time.Now().Unix(), OwnedBy: "vllm",
			Root: v.vo.model, MaxModelLen: v.vo.maxModelLen,
		}},
	})
}

type vllmCompletionRequest struct {
	Model     *string         `json:"model"`
	Prompt    json.RawMessage `json:"prompt"`
	MaxTokens *int            `json:"max_tokens"`
	Stream    bool            `json:"stream"`
}

type vllmChoice struct {
	Index        int     `json:"index"`
	Text         string  `json:"text"`
	Logprobs     *string `json:"logprobs"`
	FinishReason string  `json:"finish_reason"`
	StopReason   *string `json:"stop_reason"`
}

type vllmUsage struct {
	PromptTokens     int `json:"prompt_tokens"`
	TotalTokens      int `json:"total_tokens"`
	CompletionTokens int `json:"completion_tokens"`
}

type vllmCompletionResponse struct {
	ID      string       `json:"id"`
	Object  string       `json:"object"`
	Created int64        `json:"created"`
	Model   string       `json:"model"`
	Choices []vllmChoice `json:"choices"`
	Usage   vllmUsage    `json:"usage"`
}

// parseVLLMCompletion checks a /v1/completions body as vLLM's request
// model does and counts the prompt's tokens roughly; status and msg say
// what is wrong, if anything.
func (v *vllmServer) parseVLLMCompletion(body []byte) (n, promptTokens, status int, msg string) {
	var req vllmCompletionRequest
	if err := json.Unmarshal(body, &req); err != nil {
		return 0, 0, http.StatusBadRequest, "the request body is not valid JSON: " + err.Error()
	}
	if req.Model != nil && *req.Model != v.vo.servedName {
		return 0, 0, http.StatusNotFound, fmt.Sprintf("The model `%s` does not exist.", *req.Model)
	}
	switch p := bytes.TrimSpace(req.Prompt); {
	case len(p) == 0 || string(p) == "null":
		return 0, 0, http.StatusBadRequest, "Either prompt or prompt_embeds must be provided and non-empty."
	case p[0] == '"':
		var text string
		if err := json.Unmarshal(p, &text); err != nil {
			return 0, 0, http.StatusBadRequest, "prompt: " + err.Error()
		}
		promptTokens = textTokens(text)
	case p[0] == '[':
		var ids []int
		var texts []string
		switch {
		case json.Unmarshal(p, &ids) == nil:
			promptTokens = len(ids)
		case json.Unmarshal(p, &texts) == nil && len(texts) == 1:
			promptTokens = textTokens(texts[0])
		case len(texts) > 1:
			return 0, 0, http.StatusBadRequest, "prompt: a batch of prompts is not simulated; send one"
		default:
			return 0, 0, http.StatusBadRequest, "prompt: want a string, a list of one string or a list of token ids"
		}
	default:
		return 0, 0, http.StatusBadRequest, "prompt: want a string, a list of one string or a list of token ids"
	}
	if req.Stream {
		return 0, 0, http.StatusBadRequest, `"stream": true is not simulated; ask without it`
	}
	n = vllmDefaultMaxTokens
	if req.MaxTokens != nil {
		n = *req.MaxTokens
	}
	if n < 1 {
		return 0, 0, http.StatusBadRequest, fmt.Sprintf("max_tokens must be at least 1, got %d.", n)
	}
	if promptTokens+n > v.vo.maxModelLen {
		return 0, 0, http.StatusBadRequest, fmt.Sprintf("This model's maximum context length is %d tokens. However, you requested %d tokens "+
			"(%d in the messages, %d in the completion). Please reduce the length of the messages or completion.",
			v.vo.maxModelLen, promptTokens+n, promptTokens, n)
	}
	return n, promptTokens, 0, ""
}

func (v *vllmServer) handleCompletions(w http.ResponseWriter, r *http.Request) {
	if !v.loadedFor(w, r, http.MethodPost) {
		return
	}
	body, status, msg := readCompletionBody(w, r)
	if status != 0 {
		vllmError(w, status, msg, "BadRequestError")
		return
	}
	n, promptTokens, status, msg := v.parseVLLMCompletion(body)
	switch {
	case status == http.StatusNotFound:
		vllmError(w, status, msg, "NotFoundError")
		return
	case status != 0:
		vllmError(w, status, msg, "BadRequestError")
		return
	case v.dead.Load():
		// What vLLM's handler for EngineDeadError answers.
		emptyStatus(w, http.StatusInternalServerError)
		return
	case v.failCompletion.Load():
		vllmError(w, http.StatusInternalServerError, "simulated failure", "InternalServerError")
		return
	case v.sleeping.Load():
		v.sleepingError(w)
		return
	}

	ctx := r.Context()
	v.addWaiting(1)
	select {
	case v.slots <- struct{}{}:
		v.addWaiting(-1)
	case <-ctx.Done():
		v.addWaiting(-1)
		vllmError(w, http.StatusServiceUnavailable, ctx.Err().Error(), "ServiceUnavailableError")
		return
	}
	v.addRunning(1)
	v.promptTokens.Add(float64(promptTokens))
	v.nPrompt.Add(int64(promptTokens))
	made, err := v.core.generate(ctx, v.shutdown, n)
	v.addRunning(-1)
	<-v.slots
	switch {
	case errors.Is(err, errEngineDead):
		emptyStatus(w, http.StatusInternalServerError)
		return
	case errors.Is(err, errSleeping):
		v.sleepingError(w)
		return
	case err != nil:
		// The client is gone or the process is ending.
		vllmError(w, http.StatusServiceUnavailable, err.Error(), "ServiceUnavailableError")
		return
	}
	writeJSON(w, http.StatusOK, vllmCompletionResponse{
		ID:      "cmpl-" + randomHex(16),
		Object:  "text_completion",
		Created: time.Now().Unix(),
		Model:   v.vo.servedName,
		Choices: []vllmChoice{{Text: generatedText(made), FinishReason: "length"}},
		Usage:   vllmUsage{PromptTokens: promptTokens, CompletionTokens: made, TotalTokens: promptTokens + made},
	})
}

// sleepingError is the answer to a request for a sleeping engine. vLLM
// releases do worse (the engine core fails on the freed memory, issue
// vllm-project/vllm#15483); this is the 503 its proposed fix gives.
func (v *vllmServer) sleepingError(w http.ResponseWriter) {
	vllmError(w, http.StatusServiceUnavailable, "The engine is sleeping; call POST /wake_up before sending requests.", "ServiceUnavailableError")
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// coreCall is a call to the engine core from a handler, bounded in time.
func (v *vllmServer) coreCall(r *http.Request, m coreMsg) (coreMsg, error) {
	ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
	defer cancel()
	return v.core.call(ctx, m)
}

func (v *vllmServer) engineReady(w http.ResponseWriter) bool {
	if !v.loaded(w) {
		return false
	}
	if v.dead.Load() {
		emptyStatus(w, http.StatusInternalServerError)
		return false
	}
	return true
}

// handleSleep is vLLM's POST /sleep?level=N (1: weights offloaded, KV
// cache dropped; 2: both dropped). Either way the engine core gives its
// simulated GPU memory back.
func (v *vllmServer) handleSleep(w http.ResponseWriter, r *http.Request) {
	if !fastAPIMethods(w, r, http.MethodPost) {
		return
	}
	level := 1
	if s := r.URL.Query().Get("level"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > 2 {
			vllmError(w, http.StatusBadRequest, fmt.Sprintf("invalid sleep level %q (want 1 or 2)", s), "BadRequestError")
			return
		}
		level = n
	}
	if !v.engineReady(w) {
		return
	}
	vlog("INFO", "api_server.py:995", "sleep the engine with level %d", level)
	if v.sleepFail.Load() {
		vlog("ERROR", "api_server.py:997", "sim: sleep-fail: the engine stays awake")
		vllmError(w, http.StatusInternalServerError, "sleep failed", "InternalServerError")
		return
	}
	if _, err := v.coreCall(r, coreMsg{Op: opSleep, Level: level}); err != nil {
		emptyStatus(w, http.StatusInternalServerError)
		return
	}
	v.answerSleeping(w, true)
}

func (v *vllmServer) handleWakeUp(w http.ResponseWriter, r *http.Request) {
	if !fastAPIMethods(w, r, http.MethodPost) {
		return
	}
	if !v.engineReady(w) {
		return
	}
	tags := "None"
	if t := r.URL.Query()["tags"]; len(t) > 0 {
		tags = "['" + strings.Join(t, "', '") + "']"
	}
	vlog("INFO", "api_server.py:1003", "wake up the engine with tags: %s", tags)
	switch {
	case v.wakeHang.Load():
		select {
		case <-r.Context().Done():
		case <-v.shutdown:
		}
		return
	case v.wakeFail.Load():
		vlog("ERROR", "api_server.py:1005", "sim: wake-fail: the engine stays asleep")
		vllmError(w, http.StatusInternalServerError, "wake up failed", "InternalServerError")
		return
	}
	reply, err := v.coreCall(r, coreMsg{Op: opWake})
	if err != nil || reply.Err != "" {
		vllmError(w, http.StatusInternalServerError, "wake up failed: "+reply.Err, "InternalServerError")
		return
	}
	v.answerSleeping(w, false)
}

// answerSleeping records what the engine core now does and answers
// vLLM's empty 200.
func (v *vllmServer) answerSleeping(w http.ResponseWriter, sleeping bool) {
	v.sleeping.Store(sleeping)
	emptyStatus(w, http.StatusOK)
}

func (v *vllmServer) handleIsSleeping(w http.ResponseWriter, r *http.Request) {
	if !fastAPIMethods(w, r, http.MethodGet) {
		return
	}
	vlog("INFO", "api_server.py:1011", "check whether the engine is sleeping")
	writeJSON(w, http.StatusOK, map[string]bool{"is_sleeping": v.sleeping.Load()})
}

// handleMemory reports the engine core's simulated GPU memory, as it
// says, so a test sees the sleep mode release and take it back.
func (v *vllmServer) handleMemory(w http.ResponseWriter, r *http.Request) {
	if !allowMethods(w, r, http.MethodGet) {
		return
	}
	out := map[string]any{"gpu_mem_bytes": 0, "sleeping": v.sleeping.Load(), "engine_core_alive": false}
	if !v.core.dead() {
		reply, err := v.coreCall(r, coreMsg{Op: opMem})
		if err == nil {
			out = map[string]any{"gpu_mem_bytes": reply.Bytes, "sleeping": reply.Sleeping, "engine_core_alive": true}
		}
	}
	writeJSON(w, http.StatusOK, out)
}

func (v *vllmServer) handlePids(w http.ResponseWriter, r *http.Request) {
	if !allowMethods(w, r, http.MethodGet) {
		return
	}
	writeJSON(w, http.StatusOK, map[string]int{"api_server": os.Getpid(), "engine_core": v.core.pid()})
}

func (v *vllmServer) handleFault(w http.ResponseWriter, r *http.Request) {
	serveFault(w, r, parseVLLMFault, v.fire)
}

// fire puts a fault in effect. The engine core's own faults and the
// serving ones go to the engine core; the rest act on the API server as
// in the llama mode.
func (v *vllmServer) fire(f fault) {
	switch f.kind {
	case faultChildExit:
		v.keepAlive.Store(true)
		_ = v.core.send(coreMsg{Op: opFault, Kind: "exit"})
		// The next request must already see it.
		select {
		case <-v.core.gone:
			v.dead.Store(true)
		case <-time.After(10 * time.Second):
			logf("%ssim: child-exit: the engine core did not exit", procPrefix)
		}
	case faultChildExitServerExits:
		v.keepAlive.Store(false)
		_ = v.core.send(coreMsg{Op: opFault, Kind: "exit"})
	case faultChildOOM:
		v.keepAlive.Store(false)
		_ = v.core.send(coreMsg{Op: opFault, Kind: "oom"})
	case faultCuda:
		v.keepAlive.Store(false)
		_ = v.core.send(coreMsg{Op: opFault, Kind: "cuda"})
	case faultSleepFail:
		v.sleepFail.Store(true)
	case faultWakeFail:
		v.wakeFail.Store(true)
	case faultWakeHang:
		v.wakeHang.Store(true)
	case faultAbort:
		writeLines(os.Stderr, "Fatal Python error: Aborted")
		dieBySignal(syscall.SIGABRT)
	case faultExit:
		vlog("ERROR", "api_server.py:1890", "sim: exiting with status %d", f.code)
		os.Exit(f.code)
	case faultStall:
		// Once the engine core says it stalled no token comes again; a
		// request stays in flight for good.
		if _, err := v.core.call(context.Background(), coreMsg{Op: opStall}); err == nil {
			v.addRunning(1)
		}
		logf("%ssim: stall: a request stays in flight and no token is produced from now on", procPrefix)
	case faultBusy:
		if _, err := v.core.call(context.Background(), coreMsg{Op: opBusy}); err == nil {
			v.addRunning(1)
			go func() { _, _ = v.core.generate(context.Background(), v.shutdown, math.MaxInt32) }()
		}
		logf("%ssim: busy: a request stays in flight, producing a token every %v", procPrefix, busyTokenTime)
	case faultLog:
		// vLLM's request log (--enable-log-requests), on one line as
		// Python's repr writes it.
		text := strings.NewReplacer(`\`, `\\`, "'", `\'`, "\n", `\n`, "\r", `\r`).Replace(f.text)
		vlog("INFO", "logger.py:43", "Received request cmpl-%s-0: prompt: '%s', params: SamplingParams(n=1, temperature=1.0, max_tokens=16), "+
			"prompt_token_ids: None, lora_request: None.", randomHex(16), text)
	default:
		v.server.fire(f)
	}
}
