package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/godbus/dbus/v5"

	"github.com/llorch/pool-managerd/internal/safetext"
)

// events prints every pool's changes as they come, until interrupted.
func (c *cli) events(_ []string) error {
	// Caught before the first line: a reader may stop us at once.
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(stop)
	sigs, own, err := c.watch("")
	if err != nil {
		return err
	}
	// Subscribed first, then the state now: a change in between comes
	// after it, none is lost.
	refs, pools, err := c.all()
	if err != nil {
		return err
	}
	now := time.Now()
	for i, m := range pools {
		c.printState(now, refs[i].ID, m)
	}
	for {
		select {
		case <-stop:
			return nil
		case s, ok := <-sigs:
			if !ok {
				return fmt.Errorf("the bus connection closed")
			}
			now := time.Now()
			switch ev := classify(s, own).(type) {
			case change:
				c.printChange(now, ev)
			case ownerChange:
				c.printOwner(now, ev)
			}
		}
	}
}

const eventTime = "2006-01-02T15:04:05.000Z07:00"

func (c *cli) printChange(now time.Time, ev change) {
	if c.json {
		line, _ := json.Marshal(struct {
			Time    string          `json:"time"`
			Pool    string          `json:"pool"`
			Changed json.RawMessage `json:"changed"`
		}{now.Format(eventTime), ev.Pool, jsonObject(ev.Changed)})
		fmt.Fprintf(c.stdout, "%s\n", line)
		return
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s", now.Format(eventTime), safetext.Line(ev.Pool))
	for _, k := range ordered(ev.Changed) {
		fmt.Fprintf(&b, " %s=%s", safetext.Line(k), raw(ev.Changed[k]))
	}
	fmt.Fprintln(c.stdout, b.String())
}

// stateProps are the properties an events line shows of a pool's state
// at the start; --json has them all.
var stateProps = []string{"State", "Ready", "ActiveLeases", "Model", "BreakerState", "Operation", "LastError"}

// printState writes a pool as it is when events starts.
func (c *cli) printState(now time.Time, id string, m map[string]dbus.Variant) {
	if c.json {
		line, _ := json.Marshal(struct {
			Time  string          `json:"time"`
			Pool  string          `json:"pool"`
			State json.RawMessage `json:"state"`
		}{now.Format(eventTime), id, jsonObject(m)})
		fmt.Fprintf(c.stdout, "%s\n", line)
		return
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s", now.Format(eventTime), safetext.Line(id))
	for _, k := range stateProps {
		if v, ok := m[k]; ok {
			fmt.Fprintf(&b, " %s=%s", k, raw(v))
		}
	}
	fmt.Fprintln(c.stdout, b.String())
}

// printOwner says that the daemon left the bus or came back: its pools'
// changes stop or go on.
func (c *cli) printOwner(now time.Time, ev ownerChange) {
	what := "pool-managerd left the bus"
	if ev.new != "" {
		what = "pool-managerd is on the bus as " + ev.new
	}
	if c.json {
		line, _ := json.Marshal(struct {
			Time   string `json:"time"`
			Daemon string `json:"daemon"`
		}{now.Format(eventTime), ev.new})
		fmt.Fprintf(c.stdout, "%s\n", line)
		return
	}
	fmt.Fprintf(c.stdout, "%s - %s\n", now.Format(eventTime), safetext.Line(what))
}
