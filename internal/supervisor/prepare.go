package supervisor

import (
	"context"
	"errors"
	"time"

	"github.com/llorch/pool-managerd/internal/engine"
	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/model"
	"github.com/llorch/pool-managerd/internal/safetext"
)

// Ahead is how long before a scheduled restart its scope is prepared at
// least (lifecycle.Config.Ahead; spread up to 4 times that, so that a
// storm's preparations do not all fall together): enough for systemd to
// make a scope on a busy host, short enough that a shim waits only
// briefly.
const Ahead = 250 * time.Millisecond

// prepared is a restart's scope made during its backoff.
type prepared struct {
	// done is closed once the scope is made or could not be; st, p and
	// err are set before.
	done chan struct{}
	st   model.Staged
	p    *engine.Prepared
	err  error
}

// prepare stages the restart's model and makes its scope, off the loop
// and after any stop of the scope under way (which must not reach it).
func (s *Supervisor) prepare(a lifecycle.Prepare) {
	s.unprepare()
	pr := &prepared{done: make(chan struct{})}
	s.prep = pr
	stopped := s.stopping
	go func() {
		if stopped != nil {
			<-stopped
		}
		st, err := s.cfg.Stager.Stage(a.Ref, a.Want)
		if err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			// The note's start is the preparation's, up to Ahead before
			// the engine's.
			pr.p, err = s.rt.Prepare(ctx, s.spec(st, false, time.Now()))
			cancel()
		}
		pr.st, pr.err = st, err
		// Closed before the loop is asked anything: a launch may be
		// waiting on it there.
		close(pr.done)
		if err != nil {
			// The restart starts on its own path, and says what fails.
			s.log.Debug("scope not prepared ahead of the restart", journal.PoolID, s.cfg.Pool, journal.Error, safetext.Bound(err.Error()))
			return
		}
		s.post(func() {
			if s.prep == pr {
				s.step(lifecycle.ScopePrepared{Invocation: pr.p.Invocation})
			}
		})
	}()
}

// unprepare gives up the prepared scope, once it is made if it is being
// made; the next start waits for it to be gone.
func (s *Supervisor) unprepare() {
	pr := s.prep
	if pr == nil {
		return
	}
	s.prep = nil
	done := make(chan struct{})
	previous := s.stopping
	s.stopping = done
	go func() {
		defer close(done)
		if previous != nil {
			<-previous
		}
		<-pr.done
		if pr.p != nil {
			pr.p.Abort()
		}
	}()
}

// startPrepared starts a's engine in the prepared scope, if one was made
// for it and for st. It returns nil, nil when the start must make its
// own scope; a prepared scope it does not use is gone by then, since its
// stop by name must not reach the new one.
func (s *Supervisor) startPrepared(ctx context.Context, a lifecycle.Launch, st model.Staged, check engine.Precheck) (*engine.Engine, error) {
	pr := s.prep
	if pr == nil {
		return nil, nil
	}
	s.prep = nil
	// At most systemd's making of the scope, which a start without it
	// would wait for too.
	<-pr.done
	if pr.err != nil {
		return nil, nil
	}
	if !a.Prepared || pr.st.Path != st.Path || pr.st.Digest != st.Digest {
		pr.p.Abort()
		return nil, nil
	}
	e, err := pr.p.Go(ctx, check)
	if errors.Is(err, engine.ErrPreparedLost) {
		s.log.Info("the prepared scope is gone: the restart makes its own", journal.PoolID, s.cfg.Pool, journal.Error, safetext.Bound(err.Error()))
		return nil, nil
	}
	return e, err
}
