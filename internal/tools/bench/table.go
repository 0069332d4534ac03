package main

import (
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
)

// printTable writes one line per figure: ours and the reference (medians
// over rounds), the ratio's spread over rounds, the goal, what the goal
// judged (median over rounds), whether it was met and the worst round.
func printTable(w io.Writer, rep Report) {
	h := rep.Host
	fmt.Fprintln(w, h.Describe("every round"))
	if h.Weights != "" {
		fmt.Fprintf(w, "CPU weights in the kernel: %s\n", h.Weights)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "figure\tours\treference\tref.\tratio min / med / max\tgoal\tjudged\tmet\tworst round")
	for _, f := range rep.Figures {
		ratio := "-"
		if f.RatioMedian != 0 {
			ratio = fmt.Sprintf("%s / %s / %s", fmtNum(f.RatioMin), fmtNum(f.RatioMedian), fmtNum(f.RatioMax))
		}
		ref, refName := "-", f.Reference
		if f.RefValue != 0 {
			ref = fmtNum(f.RefValue) + " " + f.Unit
		}
		if refName == "" {
			refName = "-"
		}
		judged, worst, met := "-", "-", "report"
		if f.Goal.Of != "" {
			unit := " " + f.Unit
			if f.Goal.Of == "ratio" {
				unit = "x"
			}
			judged = fmtNum(f.Judged) + unit
			worst = fmt.Sprintf("#%d: %s%s", f.WorstRound, fmtNum(f.WorstJudged), unit)
			met = map[bool]string{true: "yes", false: "NO"}[f.Met]
		}
		fmt.Fprintf(tw, "%s (%s, %d rounds)\t%s %s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n",
			f.Name, f.Basis, len(f.Rounds), fmtNum(f.Ours), f.Unit, refName, ref, ratio, f.Goal.Text, judged, met, worst)
	}
	tw.Flush()
	// Breakdowns, where a figure has them.
	for _, f := range rep.Figures {
		if len(f.Parts) == 0 {
			continue
		}
		keys := make([]string, 0, len(f.Parts))
		for k := range f.Parts {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		var b strings.Builder
		for i, k := range keys {
			if i > 0 {
				b.WriteString(", ")
			}
			fmt.Fprintf(&b, "%s %s", k, fmtNum(f.Parts[k]))
		}
		fmt.Fprintf(w, "  %s, medians over rounds (%s unless named): %s\n", f.Name, f.Unit, b.String())
	}
}
