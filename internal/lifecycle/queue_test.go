package lifecycle

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

// An event raised while a step is carried out waits for the step's end.
func TestAnEventRaisedDuringAStepWaitsForItsEnd(t *testing.T) {
	var q Queue
	var order []string
	var step func(Event)
	step = func(ev Event) {
		switch ev.(type) {
		case StartRequested:
			order = append(order, "start begins")
			q.Feed(Healthy{}, step) // reported at once by an action
			order = append(order, "start ends")
		case Healthy:
			order = append(order, "healthy")
		}
	}
	q.Feed(StartRequested{}, step)
	assert.Equal(t, []string{"start begins", "start ends", "healthy"}, order)
	q.Feed(Healthy{}, step)
	assert.Equal(t, "healthy", order[len(order)-1], "the queue runs again after a step")
}
