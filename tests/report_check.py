#!/usr/bin/python3
"""tests/report_check.py - checks the DOM of a `kdkit report` page as
headless Chromium built it (--dump-dom) against the run directory's own
files: the plots hold the right number of points and the markers sit at the
steps events.jsonl, metrics.jsonl and checkpoints.json say.

usage: report_check.py DOM_FILE RUN_DIR [--budget X] [--teacher] [--rewound]
Exit 0 when every check passes; otherwise prints each failure and exits 1.
Standard library only (Debian's /usr/bin/python3)."""
import html.parser
import json
import os
import sys


class Dom(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.els = []   # (tag, attrs)
        self.scripts = 0
        self.text = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script":
            self.scripts += 1
        self.els.append((tag, a))

    def handle_data(self, data):
        self.text.append(data)


def jsonl(path):
    out = []
    if not os.path.exists(path):
        return out
    with open(path, "rb") as f:
        for raw in f:
            if raw.endswith(b"\n"):
                out.append(json.loads(raw))
    return out


def main():
    dom_file, run = sys.argv[1], sys.argv[2]
    args = sys.argv[3:]
    budget = float(args[args.index("--budget") + 1]) if "--budget" in args else None
    d = Dom()
    with open(dom_file, encoding="utf-8") as f:
        d.feed(f.read())
    bad = []

    def check(cond, what):
        if not cond:
            bad.append(what)

    check(d.scripts == 0, "the page has %d <script> elements" % d.scripts)
    plots = {a.get("data-plot") for t, a in d.els if t == "figure"}
    for p in ("loss", "components", "lr", "throughput", "cost", "responses"):
        check(p in plots, "no figure data-plot=%s (have %s)" % (p, sorted(x for x in plots if x)))
    series = {}
    for t, a in d.els:
        if t == "path" and "data-series" in a:
            series[a["data-series"]] = a
    metrics = jsonl(os.path.join(run, "metrics.jsonl"))
    finite = [m for m in metrics if isinstance(m.get("loss"), (int, float))]
    loss = series.get("loss")
    check(loss is not None, "no loss series")
    if loss:
        # fewer lines than buckets: every point is drawn
        check(int(loss["data-raw"]) == len(finite),
              "loss: data-raw %s, metrics.jsonl has %d finite losses" % (loss["data-raw"], len(finite)))
        check(int(loss["data-points"]) == len(finite),
              "loss: %s points drawn of %d" % (loss["data-points"], len(finite)))
        mx = max(m["loss"] for m in finite)
        check(abs(float(loss["data-ymax"]) - mx) <= 1e-9 * abs(mx),
              "loss: highest drawn %s, highest in the file %r" % (loss["data-ymax"], mx))
    if "--rewound" in args:
        rew = jsonl(os.path.join(run, "metrics.rewound.jsonl"))
        check(len(rew) > 0, "the run has no rewound lines: the test proves too little")
        r = series.get("rewound")
        check(r is not None and int(r["data-points"]) == len(rew) and "faint" in r.get("class", ""),
              "rewound: expected a faint series of %d points, got %r" % (len(rew), r))
    evals = jsonl(os.path.join(run, "eval.jsonl"))
    if evals:
        v = series.get("val_loss")
        check(v is not None and int(v["data-points"]) == len(evals),
              "val_loss: expected %d points, got %r" % (len(evals), v))

    def marks(kind):
        return sorted(int(float(a["data-step"])) for t, a in d.els
                      if a.get("data-kind") == kind and "data-step" in a
                      and t in ("line", "circle") and a.get("class", "").startswith("mk"))

    # the loss chart's markers (each chart repeats them; count on the first figure)
    events = jsonl(os.path.join(run, "events.jsonl"))
    exp_resume = sorted(e["detail"]["steps_completed"] for e in events if e["type"] == "resume")
    exp_rewind = sorted(e["detail"]["to_step"] for e in events if e["type"] == "rewind"
                        and not (e["detail"]["lines_moved"] == 0 and e["detail"]["from_step"] == e["detail"]["to_step"]))
    exp_pause = []
    for e in events:
        if e["type"] != "pause":
            continue
        before = [m["step"] for m in metrics if m.get("timestamp", 0) < e["time"]]
        exp_pause.append(before[-1] if before else 0)
    exp_pause.sort()
    nfig_mark = 3  # loss, components, throughput carry the event lines
    got = marks("resume")
    check(got == sorted(exp_resume * nfig_mark), "resume markers at %s, events.jsonl says %s" % (got, exp_resume))
    got = marks("rewind")
    check(got == sorted(exp_rewind * nfig_mark), "rewind markers at %s, events.jsonl says %s" % (got, exp_rewind))
    got = marks("pause")
    check(got == sorted(exp_pause * nfig_mark), "pause markers at %s, expected %s" % (got, exp_pause))
    check(len(exp_resume) >= 2 and len(exp_pause) >= 1,
          "the run has %d resumes and %d pauses: the test proves too little" % (len(exp_resume), len(exp_pause)))
    with open(os.path.join(run, "checkpoints.json")) as f:
        man = json.load(f)
    live = sorted(c["checkpoint_step"] for c in man["checkpoints"].values() if not c.get("deleted"))
    best = man.get("best_checkpoint_step")
    got = marks("checkpoint") + marks("best")
    check(sorted(got) == live, "checkpoint markers at %s, live checkpoints %s" % (sorted(got), live))
    check(marks("best") == [best], "best marker at %s, best_checkpoint_step %s" % (marks("best"), best))
    rows = [a for t, a in d.els if t == "tr" and "data-step" in a]
    check(len(rows) == len(man["checkpoints"]),
          "checkpoint table has %d rows, manifest %d" % (len(rows), len(man["checkpoints"])))
    if "--teacher" in args:
        api = jsonl(os.path.join(run, "api_recovery.jsonl"))
        fails = jsonl(os.path.join(run, "failures.jsonl"))
        check(len(api) > 0 and len(fails) > 0, "no teacher lines: the test proves too little")
        c = series.get("cost")
        check(c is not None and int(c["data-points"]) == len(api),
              "cost: expected %d points, got %r" % (len(api), c))
        if c:
            total = sum(a["cost"] for a in api)
            check(abs(float(c["data-ymax"]) - total) <= 1e-9, "cost: top %s, ledger total %r" % (c["data-ymax"], total))
        kinds = [a for t, a in d.els if t == "tr" and "data-count" in a]
        check(sum(int(a["data-count"]) for a in kinds) == len(fails),
              "failures by kind add up to %d, failures.jsonl has %d" % (sum(int(a["data-count"]) for a in kinds), len(fails)))
        billed = [f for f in fails if f.get("possibly_billed")]
        check(len(billed) > 0, "no possibly-billed failure: the test proves too little")
        bm = [a for t, a in d.els if a.get("data-kind") == "possibly-billed"]
        check(len(bm) == len(billed), "%d possibly-billed marks, %d in failures.jsonl" % (len(bm), len(billed)))
        if budget is not None:
            b = [a for t, a in d.els if a.get("data-kind") == "budget"]
            check(len(b) == 1 and abs(float(b[0]["data-value"]) - budget) < 1e-12,
                  "budget line %r, expected %r" % (b, budget))
    for b in bad:
        print("report_check: " + b)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
