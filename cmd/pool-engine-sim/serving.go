package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"path/filepath"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"
)

type metricsMode int32

const (
	metricsServed metricsMode = iota
	metricsMissing
	metricsGarbled
	metricsHung
)

// garbledMetrics is what bad-metrics serves: a cut-off exposition that
// no Prometheus text parser accepts.
const garbledMetrics = "# HELP llamacpp:requests_processing Number of requests processing.\n" +
	"# TYPE llamacpp:requests_processing gauge\n" +
	"llamacpp:requests_processing{ 1\n" +
	"llamacpp:tokens_predicted_total twelve\n"

// maxCompletionBody bounds a /completion body; a warm-up request is tiny.
const maxCompletionBody = 1 << 20

// handleMetrics serves the text exposition only, as llama-server does,
// whatever the client's Accept header asks for.
func (s *server) handleMetrics(w http.ResponseWriter, r *http.Request) {
	if !allowMethods(w, r, http.MethodGet, http.MethodHead) {
		return
	}
	if s.metricsFault(w, r) {
		return
	}
	if loaded, _ := s.state(); !loaded {
		writeError(w, http.StatusServiceUnavailable, "Loading model", "unavailable_error")
		return
	}
	writeRegistry(w, s.engine.reg)
}

// metricsFault answers /metrics as a metrics fault says, if one is in
// effect, and reports whether it did.
func (s *server) metricsFault(w http.ResponseWriter, r *http.Request) bool {
	switch metricsMode(s.metrics.Load()) {
	case metricsMissing:
		writeError(w, http.StatusNotFound, "File Not Found", "not_found_error")
		return true
	case metricsGarbled:
		w.Header().Set("Content-Type", string(expfmt.FmtText))
		_, _ = io.WriteString(w, garbledMetrics)
		return true
	case metricsHung:
		s.hang(r)
	}
	return false
}

// writeRegistry serves a registry in the text exposition.
func writeRegistry(w http.ResponseWriter, reg *prometheus.Registry) {
	families, err := reg.Gather()
	var buf bytes.Buffer
	for _, mf := range families {
		if err != nil {
			break
		}
		_, err = expfmt.MetricFamilyToText(&buf, mf)
	}
	if err != nil {
		writeError(w, http.StatusInternalServerError, err.Error(), "server_error")
		return
	}
	w.Header().Set("Content-Type", string(expfmt.FmtText))
	_, _ = w.Write(buf.Bytes())
}

type completionRequest struct {
	Prompt   json.RawMessage `json:"prompt"`
	NPredict *int            `json:"n_predict"`
	Stream   bool            `json:"stream"`
}

type completionResponse struct {
	Content         string `json:"content"`
	IDSlot          int    `json:"id_slot"`
	Model           string `json:"model"`
	TokensPredicted int    `json:"tokens_predicted"`
	TokensEvaluated int    `json:"tokens_evaluated"`
	Stop            bool   `json:"stop"`
	StopType        string `json:"stop_type"`
	Truncated       bool   `json:"truncated"`
}

// words are the simulated tokens, cycled.
var words = []string{" The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", "."}

// handleCompletion answers llama-server's native POST /completion without
// streaming. The prompt is engine input and never logged: only the
// log:TEXT fault puts request text into the log.
func (s *server) handleCompletion(w http.ResponseWriter, r *http.Request) {
	if !s.loadedFor(w, r, http.MethodPost) {
		return
	}
	body, status, msg := readCompletionBody(w, r)
	if status != 0 {
		writeError(w, status, msg, "invalid_request_error")
		return
	}
	req, promptTokens, msg := parseCompletion(body)
	if msg != "" {
		writeError(w, http.StatusBadRequest, msg, "invalid_request_error")
		return
	}
	if s.failCompletion.Load() {
		writeError(w, http.StatusInternalServerError, "simulated failure", "server_error")
		return
	}
	n := defaultNPredict
	if req.NPredict != nil {
		n = *req.NPredict
	}
	if n < 0 || n > maxNPredict {
		n = maxNPredict
	}

	task := s.engine.tasks.Add(1) - 1
	logf("slot launch_slot_: id  0 | task %d | processing task", task)
	made, err := s.engine.generate(r.Context(), n)
	if err != nil {
		// The client is gone or the process is ending: the answer is
		// for the log line.
		writeError(w, http.StatusServiceUnavailable, err.Error(), "unavailable_error")
		return
	}
	logf("slot      release: id  0 | task %d | stop processing: n_tokens = %d, truncated = 0", task, promptTokens+made)
	writeJSON(w, http.StatusOK, completionResponse{
		Content:         generatedText(made),
		Model:           filepath.Base(s.opts.model),
		TokensPredicted: made,
		TokensEvaluated: promptTokens,
		Stop:            true,
		StopType:        "limit",
	})
}

// readCompletionBody reads a completion request's body, bounded;
// status and msg say what went wrong, if anything.
func readCompletionBody(w http.ResponseWriter, r *http.Request) (body []byte, status int, msg string) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxCompletionBody))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return nil, http.StatusRequestEntityTooLarge, "request body larger than 1 MiB"
		}
		return nil, http.StatusBadRequest, "reading the request body: " + err.Error()
	}
	return body, 0, ""
}

// generatedText is the text of n simulated tokens.
func generatedText(n int) string {
	var text strings.Builder
	for i := range n {
		text.WriteString(words[i%len(words)])
	}
	return text.String()
}

// textTokens counts a text prompt's tokens roughly: BOS and a token a word.
func textTokens(text string) int {
	return 1 + len(strings.Fields(text))
}

// parseCompletion checks a /completion body as llama-server would and
// counts the prompt's tokens roughly; msg says what is wrong, if anything.
func parseCompletion(body []byte) (req completionRequest, promptTokens int, msg string) {
	if err := json.Unmarshal(body, &req); err != nil {
		return req, 0, "the request body is not valid JSON: " + err.Error()
	}
	switch p := bytes.TrimSpace(req.Prompt); {
	case len(p) == 0 || string(p) == "null":
		return req, 0, `"prompt" must be provided`
	case p[0] == '"':
		var text string
		if err := json.Unmarshal(p, &text); err != nil {
			return req, 0, `"prompt": ` + err.Error()
		}
		promptTokens = textTokens(text)
	case p[0] == '[':
		var parts []json.RawMessage
		if err := json.Unmarshal(p, &parts); err != nil {
			return req, 0, `"prompt": ` + err.Error()
		}
		promptTokens = len(parts)
	default:
		return req, 0, `"prompt" must be a string or an array`
	}
	if req.Stream {
		return req, 0, `"stream": true is not simulated; ask without it`
	}
	return req, promptTokens, ""
}
