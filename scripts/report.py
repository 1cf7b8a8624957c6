#!/usr/bin/env python3
"""Compare training runs of train_moe: a markdown summary and plots.

Usage:
    python3 scripts/report.py --out DIR [--smooth 100] [--title T] [--no-plots] \
        NAME=LOG.jsonl ...        (or LOG.jsonl alone: the run is named by the file stem)

Writes into DIR:
    summary.md            one row per run (method, losses, MaxVio, idle experts,
                          throughput) and per-layer MaxVio tables
    maxvio_batch.png      MaxVio_batch over steps: raw and moving average
    loss.png              training loss (moving average) and validation loss
    gamma.png             the bias update rate gamma_t over steps
    dual.png              the primal-dual quantities of the routing over steps
                          (mean over MoE layers): duality gap, L1 norm of the
                          subgradient c - C, share of token slots the bias moved
    loads_<run>.png       per MoE layer, expert load / mean load over steps
    bias_<run>.png        per MoE layer, every expert's bias over steps
The tables need nothing beyond Python 3; the plots need numpy and matplotlib
(--no-plots writes summary.md alone).

The log it reads is the JSON-lines file of `train_moe --log FILE` (written by
train/trainer.c and model/balance.c), one JSON object per line, told apart by "type":

  {"type":"config", "backend":..., "resumed_at":S, "params":N, (multi-rank builds: "ranks", "ep")
   "options":{"balance":"alf", "gamma":"0.001", "n-routed":"8", ...}}
        at the start of every invocation; every option as a string. The log is
        appended to, so a resumed run (--resume) adds a second config record with
        resumed_at = the checkpoint's step.
  {"type":"step", "step":s, "loss":..., "aux_loss":..., "lr":..., "gamma":...,
   "grad_norm":..., "tokens_per_s":..., "step_time_s":...,
   "maxvio_batch":..., "maxvio_layers":[per MoE layer], "load_min_layers":[...],
   "idle":n, "idle_layers":[...], "bias_mean":..., "bias_min":..., "bias_max":...,
   "dual":..., "primal":..., "gap":..., "subgrad_l1":..., "subgrad_l2":..., "moved_frac":...,
   "from_over":..., "to_under":..., "dual_layers":[...], "primal_layers":[...], "gap_layers":[...],
   "subgrad_l1_layers":[...], "subgrad_l2_layers":[...], "moved_layers":[slots per MoE layer],
   "loads":[[count per expert] per MoE layer], "bias":[[bias per expert] per MoE layer]}
        after every optimizer step (1-based s). The MoE fields are absent when the
        model has no MoE layer; "loads" (the step's token counts) and "bias" (the
        biases after the step's update) only every --log-loads-every steps.
  {"type":"eval", "step":s, "val_loss":..., "val_ppl":..., "maxvio_global":...,
   "maxvio_global_layers":[...]}
        after an evaluation on the validation set.

Resumed runs: a config record with resumed_at = R discards the records of steps
after R logged before it (the run went back to its step-R checkpoint), so later
records for the same step replace earlier ones and a step-ordered history remains.
MaxVio is (max load - mean load) / mean load (Wang et al., arXiv 2408.15664);
papers report its average over MoE layers and smooth MaxVio_batch over 100
neighbouring steps in their plots.
"""

import argparse
import json
import math
import os
import re
import statistics
import sys

RECORD_TYPES = ("config", "step", "eval")
BIAS_METHODS = ("alf", "alf+seqaux")  # the methods that route with a bias
AUX_METHODS = ("aux", "seqaux", "alf+seqaux")
TAIL_FRACTION = 0.1  # "final" values average the last 10% of steps
DASH = "–"


class LogError(Exception):
    """A file that is not a readable train_moe log; the message names file and line."""


# ----------------------------------------------------------------------------
# Reading a log


class Run:
    """One training run: its options and its step and eval records in step order."""

    def __init__(self, name, path):
        self.name = name
        self.path = path
        self.config = None       # the last config record
        self.invocations = 0     # config records seen (1 + number of resumes)
        self.steps = []          # step records, increasing step
        self.evals = []          # eval records, increasing step

    def option(self, key, default=None):
        return self.config["options"].get(key, default)

    @property
    def n_moe(self):
        """MoE layers: from the step records, or from the config if there are none."""
        for s in reversed(self.steps):
            if isinstance(s.get("maxvio_layers"), list):
                return len(s["maxvio_layers"])
        if self.steps:
            return 0  # steps without MoE metrics: a model without MoE layers
        try:
            return max(0, int(self.option("n-layers")) - int(self.option("n-dense")))
        except (TypeError, ValueError):
            return 0

    @property
    def n_dense(self):
        try:
            return int(self.option("n-dense", "0"))
        except ValueError:
            return 0

    @property
    def uses_bias(self):
        return self.option("balance") in BIAS_METHODS and self.n_moe > 0

    @property
    def load_records(self):
        return [s for s in self.steps if "loads" in s]


def parse_record(text, where):
    """One log line -> record dict. Raises LogError naming file:line."""
    try:
        rec = json.loads(text)
    except ValueError as e:
        raise LogError(f"{where}: not JSON ({e}); is this a train_moe --log file?") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("type"), str):
        raise LogError(f'{where}: not a train_moe log record (a JSON object with a "type")')
    return rec


def check_record(rec, where):
    """Checks the fields this report relies on; raises LogError."""
    t = rec["type"]
    need = {"config": ("options",), "step": ("step", "loss"), "eval": ("step", "val_loss")}[t]
    for key in need:
        if key not in rec:
            raise LogError(f'{where}: "{t}" record without "{key}"')
    if t == "config" and not isinstance(rec["options"], dict):
        raise LogError(f'{where}: "options" of the config record is not an object')
    if t != "config" and not isinstance(rec["step"], int):
        raise LogError(f'{where}: "step" is not an integer')
    for key in ("loads", "bias"):
        if key in rec and not (isinstance(rec[key], list) and all(isinstance(r, list) for r in rec[key])):
            raise LogError(f'{where}: "{key}" is not a list of per-layer lists')


def read_log(path, name):
    """Reads one log into a Run; raises LogError on anything that is not such a log."""
    run = Run(name, path)
    steps, evals = {}, {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise LogError(f"{path}: cannot read: {e}") from None
    # A file not ending in a newline was cut mid-write (a killed run): its last
    # line may be partial, and is skipped with a warning if it does not parse.
    partial_last = lines[-1] != ""
    for i, text in enumerate(lines):
        if not text.strip():
            continue
        where = f"{path}:{i + 1}"
        try:
            rec = parse_record(text, where)
        except LogError:
            if partial_last and i == len(lines) - 1 and run.config is not None:
                warn(f"{where}: skipping the unfinished last line")
                continue
            raise
        if rec["type"] not in RECORD_TYPES:
            warn(f'{where}: skipping a record of unknown type "{rec["type"]}"')
            continue
        check_record(rec, where)
        if rec["type"] == "config":
            resumed_at = rec.get("resumed_at", 0)
            if not isinstance(resumed_at, int):
                raise LogError(f'{where}: "resumed_at" is not an integer')
            dropped = drop_after(steps, resumed_at) + drop_after(evals, resumed_at)
            if dropped and resumed_at == 0:
                warn(f"{where}: a fresh run (resumed_at 0) starts here; the {dropped} records of the "
                     "run(s) logged before it in this file are ignored")
            run.config = rec
            run.invocations += 1
        elif run.config is None:
            raise LogError(f'{where}: a "{rec["type"]}" record before any config record; '
                           "is this a train_moe --log file?")
        else:
            (steps if rec["type"] == "step" else evals)[rec["step"]] = rec
    if run.config is None:
        raise LogError(f"{path}: no config record; is this a train_moe --log file?")
    run.steps = [steps[k] for k in sorted(steps)]
    run.evals = [evals[k] for k in sorted(evals)]
    return run


def drop_after(records, step):
    """Deletes the records (dict step -> record) after `step`; returns how many."""
    later = [k for k in records if k > step]
    for k in later:
        del records[k]
    return len(later)


def warn(msg):
    print(f"warning: {msg}", file=sys.stderr)


# ----------------------------------------------------------------------------
# Summary numbers


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def tail(records):
    """The last 10% of the records (at least one)."""
    return records[-max(1, math.ceil(len(records) * TAIL_FRACTION)):] if records else []


def series(records, key):
    """(steps, values) of the records that carry a finite number under key."""
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def summarize(run):
    """The numbers of one row of the summary table (None where the log has none)."""
    last_eval = run.evals[-1] if run.evals else {}
    last_step = run.steps[-1] if run.steps else {}
    _, tps = series(run.steps, "tokens_per_s")
    n_experts = run.n_moe * int(run.option("n-routed", "0") or 0)
    return {
        "steps": last_step.get("step"),
        "steps_planned": run.option("steps"),
        "train_loss": mean(r.get("loss") for r in tail(run.steps)),
        "val_loss": last_eval.get("val_loss"),
        "val_ppl": last_eval.get("val_ppl"),
        "eval_step": last_eval.get("step"),
        "maxvio_global": last_eval.get("maxvio_global"),
        "maxvio_batch_all": mean(r.get("maxvio_batch") for r in run.steps),
        "maxvio_batch_tail": mean(r.get("maxvio_batch") for r in tail(run.steps)),
        "idle": last_step.get("idle"),
        "n_experts": n_experts,
        "tokens_per_s": statistics.median(tps) if tps else None,
    }


def layer_means(records, key):
    """Per-layer mean of a per-layer list field over records; [] if none has it."""
    rows = [r[key] for r in records if isinstance(r.get(key), list)]
    if not rows:
        return []
    return [mean(row[l] for row in rows if l < len(row)) for l in range(max(len(r) for r in rows))]


# ----------------------------------------------------------------------------
# Markdown


def fmt(x, spec):
    return DASH if x is None else format(x, spec)


def fmt_option_number(s):
    """Options are logged with full precision ("0.0030000000000000001"): show %g."""
    try:
        return format(float(s), "g")
    except (TypeError, ValueError):
        return s or DASH


def md_escape(s):
    return str(s).replace("|", "\\|")


def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def method_cells(run):
    """balance (with the aux weight), gamma-rule, gamma, gamma-schedule (with its parameters)."""
    balance = run.option("balance", DASH)
    if run.n_moe == 0:
        return ["(no MoE layers)", DASH, DASH, DASH]
    if balance in AUX_METHODS:
        balance += f" (α={fmt_option_number(run.option('aux-alpha'))})"
    if not run.uses_bias:
        return [balance, DASH, DASH, DASH]
    sched = run.option("gamma-schedule", DASH)
    param = {"inv": "gamma-tau", "invsqrt": "gamma-tau", "cosine": "gamma-min", "stop": "gamma-stop-frac"}.get(sched)
    if param:
        sched += f" ({param.rsplit('-', 1)[1]}={fmt_option_number(run.option(param))})"
    rule = run.option("gamma-rule", DASH)
    if run.option("gamma-center") == "1":
        rule += ", centred"
    return [balance, rule, fmt_option_number(run.option("gamma")), sched]


def summary_row(run):
    s = summarize(run)
    steps = fmt(s["steps"], "d")
    if s["steps"] is not None and s["steps_planned"] not in (None, str(s["steps"])):
        steps += f" / {s['steps_planned']}"  # an unfinished run
    idle = DASH if s["idle"] is None else f"{s['idle']} / {s['n_experts']}"
    return [run.name] + method_cells(run) + [
        steps, fmt(s["train_loss"], ".4f"), fmt(s["val_loss"], ".4f"), fmt(s["val_ppl"], ".2f"),
        fmt(s["maxvio_global"], ".4f"), fmt(s["maxvio_batch_all"], ".4f"), fmt(s["maxvio_batch_tail"], ".4f"),
        idle, fmt(s["tokens_per_s"], ",.0f")]


SUMMARY_HEADER = ["run", "balance", "gamma rule", "gamma", "gamma schedule", "steps",
                  "train loss (last 10%)", "val loss", "val ppl", "MaxVio_global",
                  "MaxVio_batch (all)", "MaxVio_batch (last 10%)", "idle experts (last step)",
                  "tokens/s (median)"]


def per_layer_table(runs, values_of):
    """Rows: runs; columns: mean, worst layer, then every MoE layer."""
    per_run = [(run, values_of(run)) for run in runs]
    n = max((len(v) for _, v in per_run), default=0)
    if n == 0:
        return None
    header = ["run", "mean", "worst"] + [f"moe{l}" for l in range(n)]
    rows = []
    for run, v in per_run:
        known = [(x, l) for l, x in enumerate(v) if x is not None]
        worst = max(known) if known else None
        rows.append([run.name, fmt(mean(v), ".4f"),
                     DASH if worst is None else f"{worst[0]:.4f} (moe{worst[1]})"]
                    + [fmt(v[l] if l < len(v) else None, ".4f") for l in range(n)])
    return md_table(header, rows)


def summary_markdown(runs, title, plots):
    out = [f"# {title}", "",
           f"Runs: {', '.join(f'`{r.name}` ({os.path.basename(r.path)})' for r in runs)}.", "",
           md_table(SUMMARY_HEADER, [summary_row(r) for r in runs]), "",
           "Train loss: mean of the last 10% of the steps. Val loss, val ppl and MaxVio_global: the last "
           "evaluation. MaxVio = (max load - mean load) / mean load, averaged over the MoE layers "
           "(arXiv 2408.15664); MaxVio_batch per training step, MaxVio_global over the whole validation "
           "set. Idle experts: experts that got no token in the last step, over all MoE layers. "
           "`steps` shows `done / planned` for an unfinished run.", ""]
    notes = [f"- `{r.name}`: resumed {r.invocations - 1} time(s)" for r in runs if r.invocations > 1]
    notes += [f"- `{r.name}`: no evaluation records" for r in runs if not r.evals]
    notes += [f"- `{r.name}`: no MoE layers (no balance metrics)" for r in runs if r.steps and r.n_moe == 0]
    if notes:
        out += ["Notes:", ""] + notes + [""]
    layer_note = ("MoE layer `moeI` is model layer `n-dense + I`; the worst layer is what an average over "
                  "layers hides.")
    t = per_layer_table(runs, lambda r: r.evals[-1].get("maxvio_global_layers", []) if r.evals else [])
    if t:
        out += ["## MaxVio_global per MoE layer (last evaluation)", "", t, "", layer_note, ""]
    t = per_layer_table(runs, lambda r: layer_means(tail(r.steps), "maxvio_layers"))
    if t:
        out += ["## MaxVio_batch per MoE layer (mean of the last 10% of steps)", "", t, ""]
    if plots:
        out += ["## Plots", ""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots] + [""]
    return "\n".join(out)


# ----------------------------------------------------------------------------
# Plots (numpy and matplotlib, imported only when plotting)

plt = np = None


def import_plotting():
    """Imports matplotlib (Agg backend) and numpy, or exits with how to get them."""
    global plt, np
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot
        import numpy
    except ImportError as e:
        sys.exit(f"error: the plots need matplotlib and numpy ({e}); install them (Debian: "
                 "apt-get install python3-matplotlib python3-numpy) or pass --no-plots for summary.md alone")
    plt, np = matplotlib.pyplot, numpy


def moving_average(y, window):
    """Centred moving average over `window` neighbouring points, shrinking at the ends."""
    y = np.asarray(y, dtype=float)
    n = len(y)
    if window <= 1 or n < 2:
        return y
    c = np.concatenate([[0.0], np.cumsum(y)])
    i = np.arange(n)
    lo = np.clip(i - window // 2, 0, n)
    hi = np.clip(i - window // 2 + window, 0, n)
    return (c[hi] - c[lo]) / (hi - lo)


def smooth_window(requested, n):
    """--smooth, capped at a fifth of the run so a short run keeps its shape."""
    return max(1, min(requested, n // 5))


def wants_log_scale(values, ratio=30.0):
    """Log scale when the positive values span more than `ratio`."""
    pos = [v for v in values if v > 0]
    return len(pos) > 1 and max(pos) / min(pos) > ratio


def save(fig, out_dir, name, written):
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(name)


def empty_note(ax, text):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def plot_maxvio(runs, args, out_dir, written):
    fig, ax = plt.subplots(figsize=(10, 5.5))
    smoothed_all, any_data = [], False
    for color, run in zip(run_colors(len(runs)), runs):
        x, y = series(run.steps, "maxvio_batch")
        if not x:
            continue
        any_data = True
        w = smooth_window(args.smooth, len(y))
        ys = moving_average(y, w)
        smoothed_all += list(ys)
        ax.plot(x, y, color=color, lw=0.5, alpha=0.25)
        ax.plot(x, ys, color=color, lw=1.6, label=f"{run.name} (mean of {w} steps)")
    if not any_data:
        empty_note(ax, "no MoE metrics in these logs")
    elif wants_log_scale(smoothed_all, ratio=10.0):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("MaxVio_batch (mean over MoE layers)")
    ax.set_title(f"{args.title}: MaxVio_batch (thin: every step)")
    ax.grid(True, which="both", alpha=0.3)
    if any_data:
        ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, out_dir, "maxvio_batch.png", written)


def plot_loss(runs, args, out_dir, written):
    fig, ax = plt.subplots(figsize=(10, 5.5))
    for color, run in zip(run_colors(len(runs)), runs):
        x, y = series(run.steps, "loss")
        if x:
            w = smooth_window(args.smooth, len(y))
            ax.plot(x, y, color=color, lw=0.5, alpha=0.2)
            ax.plot(x, moving_average(y, w), color=color, lw=1.5, label=f"{run.name} train (mean of {w})")
        xv, yv = series(run.evals, "val_loss")
        if xv:
            ax.plot(xv, yv, color=color, lw=1.2, ls="--", marker="o", ms=3, label=f"{run.name} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(f"{args.title}: training and validation loss")
    ax.grid(True, alpha=0.3)
    if any(r.steps for r in runs):
        ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, out_dir, "loss.png", written)


def plot_gamma(runs, args, out_dir, written):
    fig, ax = plt.subplots(figsize=(10, 4.5))
    values = []
    for color, run in zip(run_colors(len(runs)), runs):
        x, y = series(run.steps, "gamma")
        if run.uses_bias and x:
            values += y
            ax.plot(x, y, color=color, lw=1.4, drawstyle="steps-post", label=f"{run.name} ({method_cells(run)[3]})")
    if not values:
        empty_note(ax, "no run updates a bias")
    else:
        if wants_log_scale(values, ratio=10.0):
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("gamma_t (bias update rate)")
    ax.set_title(f"{args.title}: bias update rate")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    save(fig, out_dir, "gamma.png", written)


def plot_dual(runs, args, out_dir, written):
    """The primal-dual quantities of docs/balance.md over steps, mean over MoE layers."""
    panels = [("gap", "duality gap D(b) - primal"), ("subgrad_l1", "||c - C||_1 (subgradient, L1)"),
              ("moved_frac", "share of slots the bias moved")]
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.5), squeeze=False)
    any_run = False
    for color, run in zip(run_colors(len(runs)), runs):
        for (key, _), ax in zip(panels, axes[0]):
            x, y = series(run.steps, key)
            if not x:
                continue
            any_run = True
            w = smooth_window(args.smooth, len(y))
            ax.plot(x, y, color=color, lw=0.5, alpha=0.35)
            ax.plot(x, moving_average(y, w), color=color, lw=1.5, label=f"{run.name} (avg {w})")
    for (key, label), ax in zip(panels, axes[0]):
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=10)
        ax.grid(True, alpha=0.3)
        if not any_run:
            empty_note(ax, "no run logged the primal-dual quantities")
    if any_run:
        axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{args.title}: the routing's primal-dual quantities (mean over MoE layers)")
    fig.tight_layout()
    save(fig, out_dir, "dual.png", written)


def run_colors(n):
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def layer_grid(n_layers, panel_h):
    """A figure with one panel per MoE layer, at most 3 columns; returns (fig, axes list)."""
    cols = min(3, n_layers)
    rows = math.ceil(n_layers / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, panel_h * rows + 0.8), squeeze=False,
                             constrained_layout=True)
    flat = list(axes.flat)
    for ax in flat[n_layers:]:
        ax.set_visible(False)
    return fig, flat[:n_layers]


def step_edges(steps):
    """Cell edges around each step for a heatmap whose columns may be unevenly spaced."""
    s = np.asarray(steps, dtype=float)
    if len(s) == 1:
        return np.array([s[0] - 0.5, s[0] + 0.5])
    mid = (s[1:] + s[:-1]) / 2
    return np.concatenate([[s[0] - (mid[0] - s[0])], mid, [s[-1] + (s[-1] - mid[-1])]])


def layer_title(run, l):
    return f"moe{l} (layer {run.n_dense + l})"


def plot_loads(run, args, out_dir, written):
    """Per MoE layer: expert (y) x step (x), colour = load / mean load of that step."""
    recs = run.load_records
    loads = np.array([r["loads"] for r in recs], dtype=float)  # (records, layers, experts)
    n_layers, E = loads.shape[1], loads.shape[2]
    mean_load = loads.sum(axis=2, keepdims=True) / E
    ratio = np.divide(loads, mean_load, out=np.ones_like(loads), where=mean_load > 0)
    import matplotlib.colors as mcolors
    norm = mcolors.TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(ratio.max())))
    fig, axes = layer_grid(n_layers, 2.8)
    x, y = step_edges([r["step"] for r in recs]), np.arange(E + 1) - 0.5
    for l, ax in enumerate(axes):
        mesh = ax.pcolormesh(x, y, ratio[:, l, :].T, cmap="RdBu_r", norm=norm, shading="flat")
        ax.set_title(layer_title(run, l), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("expert", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.colorbar(mesh, ax=axes, label="load / mean load (1 = balanced, 0 = idle)")
    fig.suptitle(f"{args.title}: {run.name}, expert loads of the logged steps")
    save(fig, out_dir, f"loads_{file_name(run.name)}.png", written)


def plot_bias(run, args, out_dir, written):
    """Per MoE layer: every expert's bias (after the step's update) over steps."""
    recs = [r for r in run.load_records if "bias" in r]
    bias = np.array([[[np.nan if b is None else b for b in layer] for layer in r["bias"]] for r in recs])
    steps = [r["step"] for r in recs]
    n_layers, E = bias.shape[1], bias.shape[2]
    colors = plt.get_cmap("viridis")(np.linspace(0, 1, E))
    fig, axes = layer_grid(n_layers, 2.8)
    for l, ax in enumerate(axes):
        for e in range(E):
            ax.plot(steps, bias[:, l, e], color=colors[e], lw=0.6, alpha=0.8)
        ax.set_title(layer_title(run, l), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("bias", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{args.title}: {run.name}, expert biases after the update (one line per expert, "
                 "colour = expert id)")
    save(fig, out_dir, f"bias_{file_name(run.name)}.png", written)


def bias_moves(run):
    """Whether any logged bias differs from the first logged one (a run with a bias to plot)."""
    recs = [r["bias"] for r in run.load_records if "bias" in r]
    return run.uses_bias and any(b != recs[0] for b in recs[1:])


def write_plots(runs, args, out_dir):
    written = []
    plot_maxvio(runs, args, out_dir, written)
    plot_loss(runs, args, out_dir, written)
    plot_gamma(runs, args, out_dir, written)
    plot_dual(runs, args, out_dir, written)
    for run in runs:
        if run.load_records:
            plot_loads(run, args, out_dir, written)
        if bias_moves(run):
            plot_bias(run, args, out_dir, written)
    return written


# ----------------------------------------------------------------------------
# Command line


def file_name(name):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def parse_run_arg(arg):
    """NAME=LOG or LOG -> (name, path). A path that exists as given wins over NAME=."""
    if "=" in arg and not os.path.exists(arg):
        name, path = arg.split("=", 1)
        if name and "/" not in name:
            return name, path
    return os.path.splitext(os.path.basename(arg))[0], arg


def load_runs(run_args):
    runs, seen = [], {}
    for arg in run_args:
        name, path = parse_run_arg(arg)
        key = file_name(name)
        if key in seen:
            raise LogError(f"two runs named '{name}' ({seen[key]} and {path}): name them with NAME=LOG")
        seen[key] = path
        run = read_log(path, name)
        if not run.steps:
            warn(f"{path}: no step records")
        runs.append(run)
    return runs


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Summarise and plot train_moe JSON-lines logs (--log): a markdown table and PNGs.")
    p.add_argument("runs", nargs="+", metavar="[NAME=]LOG", help="a log file, optionally named (default: its stem)")
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--smooth", type=int, default=100,
                   help="moving-average window in steps for MaxVio_batch and loss (default 100, as Wang et al.; "
                        "capped at a fifth of a run's steps)")
    p.add_argument("--title", default="train_moe runs", help="title of the summary and the plots")
    p.add_argument("--no-plots", action="store_true", help="write summary.md only (needs no matplotlib)")
    args = p.parse_args(argv)
    if args.smooth < 1:
        p.error("--smooth must be at least 1")
    if not args.no_plots:
        import_plotting()  # fail before any work if the plots cannot be made
    try:
        runs = load_runs(args.runs)
    except LogError as e:
        sys.exit(f"error: {e}")
    os.makedirs(args.out, exist_ok=True)
    plots = [] if args.no_plots else write_plots(runs, args, args.out)
    text = summary_markdown(runs, args.title, plots)
    with open(os.path.join(args.out, "summary.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text.split("\n## ")[0].rstrip())
    print(f"\nwrote {os.path.join(args.out, 'summary.md')}" + (f" and {len(plots)} plots" if plots else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
