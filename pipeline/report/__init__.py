"""The run report: one self-contained HTML page per run (``<run>/report.html``) and per published version.

    from pipeline.report import write_report
    write_report(recipe)                      # <run>/report.html from whatever the run directory holds

It shows, each as a picture with its numbers beside it, what harvest read and quarantined, the curate funnel,
the training curves, quality per function with confidence intervals and the gate's verdict, the routing
calibration, each exported format's size against quality, the cost per 1,000 requests and the run's lineage;
stages that did not run or failed say so. When the store holds an earlier version of the student, its headline
numbers stand beside this run's. The page has no script and loads nothing: pictures are inline SVG drawn with
matplotlib, styles are inline CSS. See docs/report.md.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

from pipeline.report.collect import Outcome, RunData, collect
from pipeline.report.page import SECTIONS, TITLES, esc, fmt, num, state_of
from pipeline.report.style import CSS

__all__ = ["Outcome", "collect", "render", "render_run", "write_report"]


def _section(d: RunData, name: str) -> str:
    st = state_of(d, name)
    title = TITLES[name]
    if st is None or st.state == "complete" or d.pending_export and name in ("export", "cost"):
        try:
            body, state = SECTIONS[name](d), "complete"
        except Exception as err:  # noqa: BLE001 - one unreadable file must not cost the whole page
            body, state = (f"<p class=bad>This section could not be drawn: {esc(type(err).__name__)}: "
                           f"{esc(err)}</p><pre>{esc(traceback.format_exc(limit=3))}</pre>"), "error"
        extra = ""
        if st is not None and st.manifest and name in d.stages:
            extra = (f'<p class="when">done in {esc(fmt(st.manifest.get("duration_s"), "s"))}, finished '
                     f'{esc(st.manifest.get("finished_at", "?"))}</p>')
        return (f'<section id="{name}" class="stage {state}" data-state="{state}"><h2>{esc(title)}</h2>{extra}'
                f"{body}</section>")
    state = st.state if st is not None else "not run"
    if name not in d.stages and st is not None:
        what = f"needs {st.name}, which is {st.state}"
    else:
        what = state + (f": {st.message}" if st is not None and st.message else "")
    where = f"<p>More in <code>{esc(st.where)}</code>.</p>" if st is not None and st.where else ""
    return (f'<section id="{name}" class="stage missing" data-state="{esc(state)}"><h2>{esc(title)}</h2>'
            f'<p class="state {esc(state.replace(" ", "-"))}">{esc(what)}</p>{where}</section>')


def _banner(d: RunData) -> str:
    bad = [s for s in d.stages.values() if s.state in ("failed", "blocked", "interrupted")]
    if d.pending_export:
        return '<p class="banner ok">All six stages ran; export published this version with this report.</p>'
    if bad:
        s = bad[0]
        where = f" See <code>{esc(s.where)}</code>." if s.where else ""
        verb = {"failed": "failed", "blocked": "was blocked", "interrupted": "is not finished"}[s.state]
        return (f'<p class="banner bad" data-k="outcome" data-v="&quot;{esc(s.state)}&quot;">Stage <b>{esc(s.name)}</b> {verb}: '
                f"{esc(s.message)}.{where} Finished stages are kept: rerun the same command once fixed.</p>")
    done = [s for s in d.stages.values() if s.done]
    if len(done) == len(d.stages):
        pub = (d.stages["export"].manifest or {}).get("published") or {}
        at = f": published <code>{esc(pub.get('name'))}/{esc(pub.get('version'))}</code>" if pub else ""
        return f'<p class="banner ok" data-k="outcome" data-v="&quot;complete&quot;">All six stages are complete{at}.</p>'
    missing = ", ".join(s.name for s in d.stages.values() if not s.done)
    return f'<p class="banner warn" data-k="outcome" data-v="&quot;incomplete&quot;">Not run yet: {esc(missing)}.</p>'


def _headline_values(scores: dict[str, Any], cost: dict[str, Any], arts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"quality": (scores.get("overall") or {}).get("quality")}
    for fn, v in (scores.get("functions") or {}).items():
        out[f"quality: {fn}"] = v.get("quality")
    out["to the student (routed)"] = cost.get("routed_student_share")
    out["cost / 1k, routed"] = cost.get("routed")
    out["cost / 1k, teacher"] = cost.get("teacher")
    sizes = [a.get("bytes") for a in arts if a.get("bytes") and not a.get("flagged")]
    out["smallest format"] = min(sizes) if sizes else None
    return out


KINDS = {"quality": "pct", "to the student (routed)": "pct", "cost / 1k, routed": "usd", "cost / 1k, teacher": "usd",
         "smallest format": "mb"}


def _headline(d: RunData) -> str:
    from pipeline.report.page import _costs

    m = d.stages["export"].manifest or {}
    arts = (d.pending_export or {}).get("artefacts") or m.get("artefacts") or []
    mine = _headline_values(d.files.get("scores") or {}, _costs(d), arts)
    prev = d.store.previous
    theirs = _headline_values(prev.get("scores") or {}, (prev.get("scores") or {}).get("cost_per_1k_requests_usd")
                              or {}, prev.get("artefacts") or []) if prev else {}
    keys = list(dict.fromkeys([*mine, *theirs]))
    if all(mine.get(k) is None for k in keys) and not prev:
        return ""
    head = "<th scope=col>this run</th>" + (f"<th scope=col>previous: {esc(prev.get('name'))}/"
                                            f"{esc(prev.get('version'))}<br><small>{esc(prev.get('created_at', ''))}"
                                            "</small></th>" if prev else "")
    rows = ""
    for k in keys:
        kind = KINDS.get(k, "pct")
        row = num(f"headline.{k}", mine.get(k), kind)
        if prev:
            row += num(f"previous.{k}", theirs.get(k), kind)
        rows += f"<tr><th scope=row>{esc(k)}</th>{row}</tr>"
    return (f'<table class="grid headline"><caption>Headline numbers</caption><thead><tr><th></th>{head}</tr>'
            f"</thead><tbody>{rows}</tbody></table>")


def render(d: RunData) -> str:
    """The page for collected run data."""
    pills = "".join(f'<li class="pill {esc(s.state.replace(" ", "-"))}"><a href="#{s.name}">{esc(s.name)}</a> '
                    f"<span>{esc(s.state)}</span></li>" for s in d.stages.values())
    nav = "".join(f'<a href="#{n}">{esc(t)}</a>' for n, t in TITLES.items())
    sections = "".join(_section(d, n) for n in SECTIONS)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<title>distill run report: {esc(d.name)}</title>
<style>{CSS}</style></head>
<body><header><h1>distill run report: <span class="name">{esc(d.name)}</span></h1>
<p class="where">run directory <code>{esc(d.run)}</code></p>
<ol class="pills">{pills}</ol>{_banner(d)}{_headline(d)}
<nav aria-label="sections">{nav}</nav></header>
<main>{sections}</main>
<footer>Written by <code>distill report</code>. Self-contained: no script, no network; numbers come from the run
directory's JSON files (each table cell carries its source value in <code>data-v</code>).</footer>
</body></html>
"""


def render_run(run: str | Path, recipe: Any = None, outcome: Outcome | None = None,
               pending_export: dict[str, Any] | None = None) -> str:
    """The page for a run directory (see :func:`pipeline.report.collect.collect` for the arguments)."""
    return render(collect(Path(run), recipe, outcome, pending_export))


def write_report(recipe: Any, out: str | Path | None = None, outcome: Outcome | None = None,
                 run: str | Path | None = None) -> Path:
    """Write the report of a recipe's run directory to ``out`` (default ``<run>/report.html``)."""
    run = Path(run or recipe.run_path)
    path = Path(out) if out else run / "report.html"
    text = render_run(run, recipe, outcome)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
