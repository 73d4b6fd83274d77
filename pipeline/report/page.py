"""The report page: one self-contained HTML file (inline CSS and SVG, no script, no external resource).

Every number shown in a table cell carries the value it was read from, ``data-k`` (what it is) and ``data-v``
(the JSON value), so that tests and scripts can check the page against the run's files.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable
from typing import Any

from pipeline.report import charts
from pipeline.report.collect import RunData, Stage, packages

TITLES = {"harvest": "Harvest", "curate": "Curate", "train": "Train", "evaluate": "Evaluate", "route": "Route",
          "export": "Export", "cost": "Cost per 1,000 requests", "lineage": "Lineage"}
NEEDS = {"cost": "evaluate", "lineage": None}


def esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def fmt(value: Any, kind: str = "int") -> str:
    """A number as the page shows it: int (1,234), pct (12.3%), usd ($0.0123), s (12.3 s), mb (1.23 MB),
    f (3 significant digits), pts (+1.2)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return {
        "int": lambda v: f"{v:,.0f}" if float(v).is_integer() or abs(v) >= 100 else f"{v:.3g}",
        "pct": lambda v: f"{100 * v:.1f}%",
        "usd": lambda v: f"${v:,.4f}" if abs(v) >= 0.001 or v == 0 else f"${v:.2e}",
        "s": lambda v: f"{v:,.1f} s",
        "mb": lambda v: f"{v / 1e6:,.2f} MB",
        "f": lambda v: f"{v:.3g}",
        "pts": lambda v: f"{v:+.1f}",
        "x": lambda v: f"{v:.2f}x",
    }[kind](value)


def num(key: str, value: Any, kind: str = "int", text: str | None = None) -> str:
    """A table cell holding a number, with its key and exact value as data attributes."""
    return (f'<td class="num" data-k="{esc(key)}" data-v="{esc(json.dumps(value))}">'
            f"{esc(fmt(value, kind) if text is None else text)}</td>")


def ci_text(ci: list[float] | None) -> str:
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else ""


def kv_table(rows: list[tuple[str, str]], caption: str = "") -> str:
    """A two-column table: a label and a cell (from :func:`num`, or any <td>)."""
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    body = "".join(f"<tr><th scope=row>{esc(k)}</th>{v}</tr>" for k, v in rows)
    return f'<table class="kv">{cap}{body}</table>'


def grid_table(head: list[str], rows: list[list[str]], caption: str = "") -> str:
    """A table with a header row; cells are <td> strings."""
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    th = "".join(f"<th scope=col>{esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(r) + "</tr>" for r in rows)
    return f'<table class="grid">{cap}<thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def td(text: Any, cls: str = "") -> str:
    return f'<td{f" class={cls!r}" if cls else ""}>{esc(text)}</td>'


def pair(svg: str, caption: str, numbers: str) -> str:
    """A picture with its numbers beside it."""
    return (f'<div class="pair"><figure>{svg}<figcaption>{esc(caption)}</figcaption></figure>'
            f'<div class="numbers">{numbers}</div></div>')


# --- sections ---------------------------------------------------------------------------------------------------


def harvest_section(d: RunData) -> str:
    c = d.files["harvest"]["counts"]
    sources = {s: (v.get("records", 0), v.get("quarantined", 0)) for s, v in (c.get("sources") or {}).items()}
    reasons = dict(sorted((c.get("quarantine_reasons") or {}).items(), key=lambda kv: -kv[1]))
    svg = charts.render("harvest", "harvest: rows per source, quarantined by reason, records per run",
                        charts.harvest, sources or {"-": (0, 0)}, reasons, d.files.get("batches") or [])
    totals = kv_table([("rows read", num("harvest.lines", c.get("lines"))),
                       ("records", num("harvest.records", c.get("records"))),
                       ("quarantined", num("harvest.quarantined", c.get("quarantined"))),
                       ("duplicates skipped", num("harvest.duplicates", c.get("duplicates"))),
                       ("older than the watermark", num("harvest.skipped_old", c.get("skipped_old"))),
                       ("files", num("harvest.files", c.get("files")))])
    why = grid_table(["reason", "rows"], [[td(r), num(f"harvest.quarantine_reasons.{r}", n)]
                                          for r, n in reasons.items()], "quarantined, by reason") if reasons else ""
    per = grid_table(["source", "rows", "records", "quarantined", "watermark"], [
        [td(s), num(f"harvest.sources.{s}.lines", v.get("lines")), num(f"harvest.sources.{s}.records", v.get("records")),
         num(f"harvest.sources.{s}.quarantined", v.get("quarantined")), td(v.get("watermark") or "–")]
        for s, v in (c.get("sources") or {}).items()], "per source")
    fns = c.get("functions") or {}
    fn_t = grid_table(["function", "records"], [[td(f), num(f"harvest.functions.{f}", n)] for f, n in fns.items()],
                      "per function") if fns else ""
    note = ("<p class=note>A row that cannot be read is quarantined with its source, file, line and reason "
            "(never its text) in <code>harvest/quarantine.jsonl</code>.</p>")
    return pair(svg, "Rows read per source (records and quarantined), quarantined rows by reason, and records "
                     "per harvest run (one per incremental run).", totals + why + fn_t) + per + note


def curate_section(d: RunData) -> str:
    r = d.files.get("curate")
    if not r:
        return "<p class=note>curate/report.json could not be read.</p>"
    ops = r.get("operators") or {}
    steps = [(op, v.get("in", 0), v.get("dropped", 0)) for op, v in ops.items()]
    splits = r.get("splits") or {}
    svg = charts.render("curate", "curate: funnel from records in to train, val and test", charts.funnel,
                        steps or [("-", 0, 0)], splits or {"-": 0})
    totals = kv_table([("records in", num("curate.records_in", r.get("records_in"))),
                       ("kept", num("curate.kept", r.get("kept"))),
                       ("rejected", num("curate.rejected", r.get("rejected"))),
                       *[(f"{s}", num(f"curate.splits.{s}", n)) for s, n in splits.items()],
                       ("PII or secrets redacted in kept", num("curate.pii_redacted_in_kept",
                                                               r.get("pii_redacted_in_kept")))])
    drops = grid_table(["operator", "in", "dropped"], [[td(op), num(f"curate.operators.{op}.in", v.get("in")),
                                                         num(f"curate.operators.{op}.dropped", v.get("dropped"))]
                                                        for op, v in ops.items()], "drops per operator")
    found = r.get("pii_and_secrets_found") or {}
    pii = grid_table(["kind", "found"], [[td(k), num(f"curate.pii_and_secrets_found.{k}", n)]
                                         for k, n in found.items()], "PII and secrets found (redacted)") if found else ""
    return (pair(svg, "Records entering each operator in chain order (red: dropped there), then the kept records "
                      "by split.", totals + drops + pii) + examples_table(d.files.get("examples") or []))


def examples_table(examples: list[dict[str, str]]) -> str:
    if not examples:
        return ("<p class=note>No examples of dropped records are shown: they are shown only when the recipe "
                "redacts PII and only from operators that run after redaction.</p>")
    rows = [[td(e["operator"]), td(e["reason"]), td(e["input"], "text"), td(e["output"], "text")] for e in examples]
    return grid_table(["operator", "reason", "last user turn (redacted)", "teacher's answer (redacted)"], rows,
                      "examples of dropped records, after PII and secret redaction") + \
        "<p class=note>Text comes from <code>curate/rejected.parquet</code>, written after PII and secret " \
        "redaction; records dropped by the PII operator itself are never shown.</p>"


def train_section(d: RunData) -> str:
    s = d.files.get("student") or {}
    series = d.files.get("metrics") or {}
    svg = charts.render("train", "train: loss and learning rate against steps", charts.training, series)
    lr = series.get("learning_rate") or []
    rows = [("steps", num("train.steps", s.get("steps"))),
            ("tokens / s", num("train.tokens_per_second", s.get("tokens_per_second"))),
            ("peak learning rate", num("train.peak_learning_rate", max((v for _, v in lr), default=None), "f")),
            ("first train loss", num("train.first_loss", s.get("first_loss"), "f")),
            ("last train loss", num("train.last_loss", s.get("last_loss"), "f")),
            ("validation loss", num("train.eval_loss", s.get("eval_loss"), "f")),
            ("training time", num("train.train_seconds", s.get("train_seconds"), "s")),
            ("tokens seen", num("train.tokens_seen", s.get("tokens_seen"))),
            ("parameters", num("train.parameters", s.get("parameters"))),
            ("trainable", num("train.trainable_parameters", s.get("trainable_parameters"))),
            ("method / objective", td(f"{s.get('method', '?')} / {s.get('objective', '?')}")),
            ("records (train / val)", td(f"{fmt(s.get('train_records'))} / {fmt(s.get('val_records'))}"))]
    if s.get("last_kl_to_teacher") is not None:
        rows.append(("KL to the teacher (last)", num("train.last_kl_to_teacher", s.get("last_kl_to_teacher"), "f")))
    return pair(svg, "Training and validation loss against steps (KD terms when used), and the learning rate "
                     "schedule, from train/metrics.jsonl.", kv_table(rows))


def _group(block: dict[str, Any]) -> dict[str, tuple[float, list[float] | None, int]]:
    return {k: (v["quality"], (v.get("ci") or {}).get("quality"), v.get("n", 0)) for k, v in (block or {}).items()
            if v.get("quality") is not None}


def evaluate_section(d: RunData) -> str:
    sc = d.files.get("scores") or {}
    fns = sc.get("functions") or {}
    groups = [(t, g) for t, g in (("per function", _group(fns)), ("by input length", _group(sc.get("by_length"))),
                                  ("by language", _group(sc.get("by_language")))) if g]
    prev = {f: v.get("quality") for f, v in (((d.store.previous or {}).get("scores") or {}).get("functions")
                                             or {}).items() if v.get("quality") is not None}
    svg = charts.render("evaluate", "evaluate: quality with confidence intervals", charts.quality, groups or
                        [("per function", {})], {f: v.get("teacher_quality", 1.0) for f, v in fns.items()}, prev)
    ov = sc.get("overall") or {}
    head = kv_table([("quality (all)", num("evaluate.overall.quality", ov.get("quality"), "pct")),
                     ("95% interval", td(ci_text((ov.get("ci") or {}).get("quality")))),
                     ("exact match", num("evaluate.overall.exact_match", ov.get("exact_match"), "pct")),
                     ("JSON field accuracy", num("evaluate.overall.field_accuracy", ov.get("field_accuracy"), "pct")),
                     ("valid JSON", num("evaluate.overall.json_valid", ov.get("json_valid"), "pct")),
                     ("held-out records", num("evaluate.overall.n", ov.get("n")))])
    per = grid_table(["", "n", "quality", "95% interval", "teacher", "exact match"], [
        [td(f), num(f"evaluate.functions.{f}.n", v.get("n")), num(f"evaluate.functions.{f}.quality", v.get("quality"), "pct"),
         td(ci_text((v.get("ci") or {}).get("quality"))), num(f"evaluate.functions.{f}.teacher_quality",
                                                             v.get("teacher_quality"), "pct"),
         num(f"evaluate.functions.{f}.exact_match", v.get("exact_match"), "pct")] for f, v in fns.items()],
        "per function")
    desc = f"<p class=note>Quality: {esc(sc.get('quality_description') or sc.get('quality_metric') or '?')}.</p>"
    out = pair(svg, "Student quality with its bootstrap 95% interval per function (teacher: grey bar; previous "
                    "published version: orange diamond), by input length in student tokens and by language.",
               head + per) + desc
    out += golden_block(sc.get("golden")) + fields_block(d.files.get("fields") or {}) + gate_block(d)
    return out


def golden_block(g: dict[str, Any] | None) -> str:
    """The golden set's figures (evaluate.golden), apart from the test split's: against its reviewed answers."""
    if not g:
        return ""
    rows = [[td(f), num(f"evaluate.golden.{f}.n", v.get("n")), num(f"evaluate.golden.{f}.quality", v.get("quality"), "pct"),
             td(ci_text((v.get("ci") or {}).get("quality"))),
             num(f"evaluate.golden.{f}.exact_match", v.get("exact_match"), "pct")]
            for f, v in (g.get("functions") or {}).items()]
    return (f"<h3>Golden set <small>({fmt(g.get('records'))} requests in {len(g.get('files') or {})} file(s), "
            "scored against their reviewed answers, not the teacher's)</small></h3>"
            + grid_table(["function", "n", "quality", "95% interval", "exact match"], rows))


def fields_block(acc: dict[str, dict[str, tuple[float, int]]]) -> str:
    if not acc:
        return ""
    svg = charts.render("fields", "evaluate: JSON field accuracy", charts.fields, acc)
    rows = [[td(f"{fn}.{k}"), num(f"evaluate.fields.{fn}.{k}", v, "pct"), num(f"evaluate.fields.{fn}.{k}.n", n)]
            for fn, per in acc.items() for k, (v, n) in per.items()]
    return pair(svg, "For JSON answers: the share with the teacher's value in each field (from "
                     "evaluate/predictions.parquet).", grid_table(["field", "accuracy", "n"], rows))


def gate_block(d: RunData) -> str:
    g = d.files.get("export_gate") or d.files.get("gate") or {}
    if not g:
        return ""
    verdict = "passed" if g.get("passed") else "failed"
    who = "export's decision" if d.files.get("export_gate") else "as evaluate reported it"
    rows = []
    for c in g.get("checks") or []:
        other = c.get("teacher", c.get("published"))
        margin = c.get("points_below", c.get("points_lost"))
        fn = c.get("function")
        check = {"teacher": "vs teacher", "golden": "golden set floor"}.get(c.get("kind"),
                                                                           f"vs {c.get('published_version')}")
        other, margin = (c.get("min_points"), None) if c.get("kind") == "golden" else (other, margin)
        rows.append([td(fn), td(check),
                     num(f"gate.{c.get('kind')}.{fn}.student", c.get("student"), "f"), num(f"gate.{c.get('kind')}.{fn}.other", other, "f"),
                     num(f"gate.{c.get('kind')}.{fn}.points", margin, "pts"), td(fmt(c.get("allowed_points"))),
                     td(c.get("skipped") or ("pass" if c.get("passed") else "FAIL"),
                        "ok" if c.get("passed") else "bad")])
    table = grid_table(["function", "check", "student", "reference", "points below", "allowed", "verdict"], rows) \
        if rows else "<p class=note>No gate limits are set in the recipe (evaluate.gate).</p>"
    fails = "".join(f"<li>{esc(f)}</li>" for f in g.get("failures") or [])
    return (f'<h3>Quality gate: <span class="verdict {verdict}" data-k="gate.passed" '
            f'data-v="{esc(json.dumps(bool(g.get("passed"))))}">{verdict}</span> <small>({who})</small></h3>'
            + table + (f"<ul class=bad>{fails}</ul>" if fails else ""))


def route_section(d: RunData) -> str:
    cal = d.files.get("calibration") or {}
    policy = d.files.get("policy") or {}
    curves = {f: v for f, v in (cal.get("functions") or {}).items() if v.get("curve")}
    svg = charts.render("route", "route: calibration curves", charts.calibration, curves or {"-": {}},
                        cal.get("tolerance"))
    op = cal.get("operating_point") or {}
    head = kv_table([("to the student", num("route.student_share", op.get("student_share"), "pct")),
                     ("95% interval", td(ci_text(op.get("student_share_ci")))),
                     ("routed quality", num("route.routed_quality", op.get("routed_quality"), "pct")),
                     ("95% interval ", td(ci_text(op.get("routed_quality_ci")))),
                     ("teacher quality", num("route.teacher_quality", op.get("teacher_quality"), "pct")),
                     ("tolerance", num("route.tolerance", cal.get("tolerance"), "pct")),
                     ("held-out requests", num("route.n", op.get("n")))], f"overall ({cal.get('quality_metric', '')})")
    rows = []
    for f, p in (policy.get("functions") or {}).items():
        c = p.get("calibration") or {}
        after = p.get("after") or {}
        rows.append([td(f), td("yes" if p.get("enabled") else f"no: {p.get('why', '')}"),
                     td(f"{after.get('signal', c.get('signal', '–'))} ≥ {fmt(after.get('threshold'), 'f')}"),
                     num(f"route.functions.{f}.student_share", c.get("student_share"), "pct"),
                     td(ci_text(c.get("student_share_ci"))),
                     num(f"route.functions.{f}.routed_quality", c.get("routed_quality"), "pct"),
                     td(ci_text(c.get("routed_quality_ci")))])
    per = grid_table(["function", "routed", "operating point", "to the student", "interval", "routed quality",
                      "interval"], rows, "per function (routing_policy.json)")
    out = pair(svg, "Routed quality against the share of requests the student answers, per function, with the "
                    "95% interval; the dot is the chosen operating point.", head) + per
    esc_counts = dict((d.files.get("escalations") or {}).most_common()) if d.files.get("escalations") else {}
    if esc_counts:
        svg2 = charts.render("escalations", "route: escalation reasons", charts.escalations, esc_counts)
        t = grid_table(["reason", "requests"], [[td(r), num(f"route.escalations.{r}", n)]
                                               for r, n in esc_counts.items()])
        out += pair(svg2, f"Why held-out requests went to the teacher (of {fmt(d.files.get('heldout'))}).", t)
    return out


def export_section(d: RunData) -> str:
    m = d.stages["export"].manifest or {}
    pending = d.pending_export
    arts = (pending.get("artefacts", []) + pending.get("flagged", [])) if pending else m.get("artefacts") or []
    pts = [(a["format"], a.get("bytes") or 0, a.get("quality") or 0.0, bool(a.get("flagged"))) for a in arts]
    svg = charts.render("export", "export: size against quality", charts.formats, [(n, b / 1e6, q, f)
                                                                                    for n, b, q, f in pts])
    rows = [[td(a["format"]), num(f"export.{a['format']}.bytes", a.get("bytes"), "mb"),
             num(f"export.{a['format']}.size_vs_master", a.get("size_vs_master"), "x"),
             num(f"export.{a['format']}.quality", a.get("quality"), "pct"),
             num(f"export.{a['format']}.points_vs_master", a.get("points_vs_master"), "pts"),
             td("flagged, not published" if a.get("flagged") else "published", "bad" if a.get("flagged") else "ok")]
            for a in arts]
    table = grid_table(["format", "weights", "vs master", "quality", "points vs master", ""], rows)
    pub = m.get("published") or {}
    where = (f"<p>Published as <code>{esc(pub.get('store'))}/{esc(pub.get('name'))}/{esc(pub.get('version'))}</code>"
             f" (<code>distill pull {esc(pub.get('store'))} {esc(pub.get('name'))}@{esc(pub.get('version'))} DEST"
             "</code>).</p>") if pub else ""
    if pending:
        where = "<p class=note>This copy of the report was written by export into the version it published.</p>"
    return pair(svg, "Each published format's weight size against its quality, re-evaluated on the held-out "
                     "records.", table) + where


def _costs(d: RunData) -> dict[str, Any]:
    if d.pending_export:
        return ((d.pending_export.get("scores") or {}).get("cost_per_1k_requests_usd")) or {}
    m = d.stages["export"].manifest or {}
    if m.get("cost_per_1k_requests_usd"):
        return m["cost_per_1k_requests_usd"]
    cost = dict((d.files.get("scores") or {}).get("cost_per_1k_requests_usd") or {})
    op = (d.files.get("calibration") or {}).get("operating_point") or {}
    if op.get("cost_per_1k_routed_usd") is not None:
        cost["routed"] = op["cost_per_1k_routed_usd"]
        cost["routed_student_share"] = op.get("student_share")
        cost["routed_ci"] = op.get("cost_per_1k_routed_usd_ci")
    return cost


def cost_section(d: RunData) -> str:
    c = _costs(d)
    bars = [(lbl, c[k], col) for lbl, k, col in (("teacher only", "teacher", charts.TEACHER),
                                                 ("student only", "student", charts.STUDENT),
                                                 ("routed", "routed", charts.ROUTED)) if c.get(k) is not None]
    if not bars:
        return "<p class=note>No costs: evaluate.teacher_price and evaluate.student_price set them.</p>"
    svg = charts.render("cost", "cost per 1,000 requests", charts.costs, bars)
    rows = [("teacher only", num("cost.teacher", c.get("teacher"), "usd")),
            ("student only", num("cost.student", c.get("student"), "usd")),
            ("routed", num("cost.routed", c.get("routed"), "usd")),
            ("routed, 95% interval", td("[" + ", ".join(fmt(x, "usd") for x in c["routed_ci"]) + "]"
                                        if c.get("routed_ci") else "–")),
            ("share to the student", num("cost.routed_student_share", c.get("routed_student_share"), "pct")),
            ("saving, routed vs teacher", num("cost.routed_saving", c.get("routed_saving"), "pct"))]
    return pair(svg, "USD per 1,000 requests: the teacher at its list prices over the logged tokens, the student "
                     "at its hourly price over its measured throughput, and the routed blend (requests the student "
                     "tried and escalated pay for both).", kv_table(rows))


def _lineage(d: RunData) -> dict[str, Any]:
    if d.pending_export:
        return d.pending_export.get("lineage") or {}
    lin = dict((d.stages["export"].manifest or {}).get("lineage") or {})
    cm = d.stages["curate"].manifest or {}
    s = d.files.get("student") or {}
    lin.setdefault("recipe", d.name)
    lin.setdefault("recipe_sha256", d.recipe_sha256())
    lin.setdefault("data_sha256", (cm.get("outputs") or {}).get("train.parquet"))
    lin.setdefault("base_model", s.get("base"))
    lin.setdefault("teacher_models", d.files.get("teachers"))
    lin.setdefault("train_fingerprint", (d.stages["train"].manifest or {}).get("fingerprint"))
    return lin


def lineage_section(d: RunData) -> str:
    lin = _lineage(d)
    durations = [(s, st.manifest.get("duration_s") or 0.0) for s, st in d.stages.items() if st.manifest]
    svg = charts.render("lineage", "stage timings", charts.timings, durations or [("-", 0.0)])
    rows = [("recipe", td(lin.get("recipe") or d.name)),
            ("recipe sha256", td(lin.get("recipe_sha256") or "–", "hash")),
            ("training data sha256", td(lin.get("data_sha256") or "–", "hash")),
            ("base model", td(f"{lin.get('base_model') or '–'}" + (f" @ {lin['base_revision']}"
                                                                   if lin.get("base_revision") else ""))),
            ("teacher", td(", ".join(lin.get("teacher_models") or []) or "–")),
            ("student fingerprint", td(lin.get("train_fingerprint") or "–", "hash"))]
    timing = grid_table(["stage", "took", "finished"], [
        [td(s), num(f"lineage.duration.{s}", st.manifest.get("duration_s"), "s"), td(st.manifest.get("finished_at", ""))]
        for s, st in d.stages.items() if st.manifest])
    pk = (d.store.manifest or {}).get("packages") or (d.pending_export or {}).get("packages") or packages()
    pkgs = grid_table(["package", "version"], [[td(p), td(v)] for p, v in pk.items()], "package versions")
    return pair(svg, "Seconds each stage took (from the stage manifests).", kv_table(rows) + timing) + pkgs


SECTIONS: dict[str, Callable[[RunData], str]] = {
    "harvest": harvest_section, "curate": curate_section, "train": train_section, "evaluate": evaluate_section,
    "route": route_section, "export": export_section, "cost": cost_section, "lineage": lineage_section}


def state_of(d: RunData, name: str) -> Stage | None:
    """The stage a section depends on (None: it always renders)."""
    if name in d.stages:
        return d.stages[name]
    dep = NEEDS.get(name)
    return d.stages[dep] if dep else None
