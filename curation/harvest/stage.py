"""The harvest stage: logged teacher traffic -> canonical records in Parquet.

Each run reads what is new in every source (see ``curation.harvest.watermarks``), converts it to records (importers in
``curation.harvest.importers``; inline or in worker processes), carries earlier batches forward, joins feedback kept apart
from the logs (``curation.harvest.feedback``) and, where the recipe asks, replaces poor outputs with a teacher's fresh
answer (``curation.harvest.regenerate``). It writes:

- ``batches/*.parquet``: the records as imported, one set per run, carried forward by hard links;
- ``records-*.parquet``: what curation reads -- the batches with feedback joined and re-generated outputs;
- ``quarantine.jsonl``: one line per unreadable row (source, file, line, reason; never the row's text, so no PII);
- ``watermarks.json``: how far each source has been read (per file by byte offset; see ``watermarks``).
"""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from rich.progress import Progress, TextColumn

from curation.harvest import watermarks
from curation.harvest.chunks import NOT_CALLS_PREFIX, ChunkResult
from curation.harvest.feedback import FeedbackIndex
from curation.harvest.ingest import Ingest, Runner, auto_workers, ingest_files, ingest_sql
from curation.harvest.sources import list_files
from pipeline.config.harvest import HarvestConfig, Source
from pipeline.pii import DETECTOR_VERSION, Redaction, enabled
from pipeline.recipe import Recipe
from pipeline.record import from_table, to_table
from pipeline.stages import StageContext, StageResult
from pipeline.ui import stage_progress

# The stage's contract (pipeline/stages.py): the logs are its only input, outside the run directory; it redacts
# PII and secrets in every record it writes as the recipe's curate.pii says (pipeline.pii), so that setting joins
# its fingerprint.
READS: tuple[str, ...] = ()
ALSO_READS = ("curate.pii", "curate.max_record_bytes")
REPORT_FILES = ("quarantine.jsonl",)

QUARANTINE = "quarantine.jsonl"
REDACTION = "redaction.json"  # the setting the batches were redacted with (pipeline.pii.Redaction.stamp)
# Counts of what was kept but is worth knowing (chunks.ChunkResult.notes), per source, summed over runs like
# watermarks.COUNT_KEYS; kept in a source's counts only once non-zero. Besides these, "coerced:<field>": values of
# a record field dropped or truncated by the importers (importers.common.COERCED).
NOTE_KEYS = ("images", "records_with_images", "lenient_json")
COERCED_PREFIX = "coerced:"


class _Ingest(Ingest):
    """An Ingest that also adds up each chunk's notes (images, rows read leniently)."""

    notes: Counter[str]

    def __post_init__(self) -> None:
        super().__post_init__()
        self.notes = Counter()

    def done(self, res: ChunkResult) -> None:
        super().done(res)
        self.notes.update(res.notes)


def source_label(src: Source) -> str:
    return src.name or src.label


def external_inputs(recipe: Recipe) -> dict[str, str]:
    """What harvest reads from outside the run directory, so that new or changed logs rerun it: a content hash of
    every local file, size and ETag of remote ones, row count and newest timestamp of SQL sources; and the PII
    detector's version, so that a new detector rescans the carried batches even when no log changed; and, with
    re-generation on, the top_logprobs it asks for (regenerate.for_recipe reads train.objective)."""
    from curation.harvest import regenerate
    from curation.harvest.sql_source import probe

    out = {"pii:detector_version": str(DETECTOR_VERSION)} if enabled(recipe.curate.pii) else {}
    if (regen := regenerate.for_recipe(recipe)) is not None:
        out["regenerate:top_logprobs"] = str(regen.top_logprobs)
    cfg = recipe.harvest
    for i, loc in enumerate([*cfg.sources, *cfg.feedback]):
        if loc.sql is not None:
            out[f"sql:{i}:{loc.label}"] = probe(loc.sql)
            continue
        what = "harvest.sources" if i < len(cfg.sources) else "harvest.feedback"
        for f in list_files(loc, what):
            out[f"file:{f.url}"] = f.content_hash()
    return out


def _reset(work: Path) -> None:
    """Empty the work folder left by a failed attempt (its .started.json stays)."""
    for p in work.iterdir():
        if p.name != ".started.json":
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _progress(ctx: StageContext) -> Progress:
    return stage_progress(ctx.console, "harvest", TextColumn("{task.fields[rows]:,} rows"))


def run(ctx: StageContext) -> StageResult:
    cfg: HarvestConfig = ctx.recipe.harvest
    work = ctx.work
    _reset(work)
    (work / "batches").mkdir()
    prev = ctx.run.stage_dir("harvest")
    incremental = cfg.incremental and ctx.run.manifest("harvest") is not None
    last_batch, old_states = watermarks.load(prev) if incremental else (0, {})
    pii = _pii_config(ctx.recipe)
    batch = last_batch + 1
    keys = [watermarks.source_key(s) for s in cfg.sources]
    files = {k: list_files(s) for k, s in zip(keys, cfg.sources, strict=True) if s.sql is None}
    nbytes = sum(int(f.fs.info(f.path).get("size") or 0) for fs in files.values() for f in fs)
    runner = Runner(auto_workers(cfg.workers, nbytes))
    states: dict[str, watermarks.SourceState] = {}
    ingests: list[_Ingest] = []
    t0 = time.perf_counter()
    with open(work / QUARANTINE, "w") as quarantine, _progress(ctx) as progress:
        carried_labels = {source_label(s) for k, s in zip(keys, cfg.sources, strict=True) if k in old_states}
        if (prev / QUARANTINE).is_file() and incremental:
            with open(prev / QUARANTINE) as old_q:
                for line in old_q:
                    if orjson.loads(line).get("source") in carried_labels:
                        quarantine.write(line)
        task = progress.add_task("sources", total=len(cfg.sources), rows=0)
        try:
            for key, src in zip(keys, cfg.sources, strict=True):
                state = old_states.get(key) or watermarks.SourceState(key, source_label(src))
                state.label = source_label(src)
                seen = watermarks.Seen(watermarks.carry_forward(prev, work, state) if key in old_states
                                       else np.zeros(0, np.uint64))
                ing = _Ingest(src, key, state, seen, batch, work / "batches", quarantine,
                              progress=lambda n: progress.update(task, rows=progress.tasks[0].fields["rows"] + n),
                              pii=pii)
                if key in old_states:
                    _redact_carried(prev, work, state.batches, pii)
                progress.update(task, description=state.label)
                if src.sql is not None:
                    ingest_sql(ing, runner, cfg.batch_size, cfg.incremental)
                else:
                    ingest_files(ing, runner, files[key], cfg.batch_size, cfg.incremental)
                runner.finish()
                state.batches = [*state.batches, *sorted(ing.new_batches)]
                for k in watermarks.COUNT_KEYS:
                    state.counts[k] = state.counts.get(k, 0) + ing.counts.get(k, 0)
                for k, n in sorted(ing.notes.items()):  # NOTE_KEYS, coerced:<field>, not_calls:<why>
                    if n:
                        state.counts[k] = state.counts.get(k, 0) + n
                states[key] = state
                ingests.append(ing)
                progress.advance(task)
        finally:
            runner.close()
        read_s = time.perf_counter() - t0
        fb = _load_feedback(cfg, quarantine, pii)
        regen = _Regeneration(ctx, cfg, pii) if cfg.regenerate else None
        batch_files = sorted(n for s in states.values() for n in s.batches)
        try:
            if regen is not None:
                regen.prepare(work, batch_files, fb)
                regen.call(progress)
            totals = _assemble(work, batch_files, fb, regen, pii)
            if regen is not None:  # answers no batch asks for any more (an old prompt, a record gone)
                regen.pruned = regen.cache.prune(set(regen.bodies))
        finally:
            if regen is not None:
                regen.finish()
    wrote = any(i.new_batches for i in ingests)
    watermarks.save(work, batch if wrote else last_batch, states)
    (work / REDACTION).write_bytes(orjson.dumps(_stamp(pii)))
    return _result(ctx, cfg, ingests, states, totals, fb, regen, read_s, runner.workers)


def _pii_config(recipe: Recipe) -> Redaction | None:
    """The redaction the recipe's curate section asks for, or None when curate.pii looks for nothing."""
    cfg = recipe.curate.pii
    return Redaction(cfg, recipe.curate.max_record_bytes) if enabled(cfg) else None


def _stamp(pii: Redaction | None) -> dict[str, Any]:
    return pii.stamp() if pii is not None else {"curate.pii": None}


def _redact_carried(prev: Path, work: Path, names: list[str], pii: Redaction | None) -> None:
    """Earlier nights' batches (hard-linked into the work folder) redacted again where they were written under
    another curate.pii, or before harvest redacted at all: a new copy replaces the link, the earlier file is left
    as it was. A setting that now redacts less cannot restore text: rerun harvest with incremental off. A batch
    is rewritten whenever redaction changed it, a finding or not (a text over curate.max_record_bytes is masked
    whole before detection, so its PII is never a finding)."""
    try:
        same = orjson.loads((prev / REDACTION).read_bytes()) == _stamp(pii)
    except (OSError, orjson.JSONDecodeError):
        same = False
    if same or pii is None:
        return
    for name in names:
        path = work / "batches" / name
        before = pq.read_table(path)
        table, found = pii.apply(before)
        if found or not table.equals(before):
            tmp = path.with_suffix(".tmp")
            pq.write_table(table, tmp, compression="zstd")
            os.replace(tmp, path)


def _load_feedback(cfg: HarvestConfig, quarantine, pii: Redaction | None) -> FeedbackIndex | None:
    if not cfg.feedback:
        return None
    from curation.harvest.feedback import load

    fb = load(cfg.feedback)
    if pii is not None:
        fb.rekey(pii.episodes)
    for q in fb.quarantine:
        quarantine.write(orjson.dumps(q).decode() + "\n")
    return fb


class _Regeneration:
    """The re-generation pass: choose records, call the teacher for what the cache lacks, apply answers."""

    def __init__(self, ctx: StageContext, cfg: HarvestConfig, pii: Redaction | None):
        from functools import partial

        from curation.harvest import regenerate

        self.mod = regenerate
        self.cfg = regenerate.for_recipe(ctx.recipe)  # asks for logprobs when train.objective is sparse_kd
        # answers are redacted before they are cached, as the records are (the prompts sent already are)
        self.cache = regenerate.Cache(ctx.run.path / "cache" / "teacher",
                                      partial(regenerate.redact_answer, redaction=pii) if pii else None, _stamp(pii))
        self.pruned = 0
        self.chosen: dict[str, tuple[str, str]] = {}  # record id -> (request key, reason)
        self.bodies: dict[str, dict[str, Any]] = {}
        self.answers: dict[str, tuple[dict[str, Any], float | None]] = {}
        self.stats = regenerate.CallStats()
        self.cached = 0
        self.reasons: Counter[str] = Counter()

    def prepare(self, work: Path, batch_files: list[str], fb: FeedbackIndex | None) -> None:
        for name in batch_files:
            table = pq.read_table(work / "batches" / name)
            touched = fb.touches(table) if fb else None
            mask = self.mod.candidates(table, self.cfg, touched)
            if not pc.any(mask).as_py():
                continue
            for rec in from_table(table.filter(mask)):
                if fb:
                    fb.apply(rec)
                why = self.mod.reason(rec, self.cfg)
                if why is None:
                    continue
                body = self.mod.request_body(rec, self.cfg)
                key = self.mod.request_key(body)
                self.chosen[rec["id"]] = (key, why)
                self.bodies[key] = body
                self.reasons[why.split(" (")[0] if why.startswith("negative") else
                             "old teacher" if why.startswith("old teacher") else why] += 1
        self.answers = self.cache.get(list(self.bodies))
        self.cached = len(self.answers)

    def call(self, progress: Progress) -> None:
        todo = {k: b for k, b in self.bodies.items() if k not in self.answers}
        if self.cfg.max_calls is not None and len(todo) > self.cfg.max_calls:
            raise self.mod.RegenerateError(
                f"re-generation needs {len(todo):,} new calls, more than harvest.regenerate.max_calls "
                f"({self.cfg.max_calls:,}); raise the limit or narrow harvest.regenerate.when")
        if not todo:
            return
        task = progress.add_task(f"teacher {self.cfg.model}", total=len(todo), rows=0)
        self.stats = self.mod.call_all(todo, self.cfg, self.cache, lambda: progress.advance(task))
        self.answers.update(self.cache.get([k for k in todo if k not in self.stats.failures]))
        if self.stats.failures and self.cfg.on_failure == "fail":
            kinds = Counter(self.stats.failures.values())
            raise self.mod.RegenerateError(
                f"{len(self.stats.failures):,} of {len(todo):,} teacher calls failed "
                f"({'; '.join(f'{n} x {k}' for k, n in kinds.most_common(3))}). The {self.stats.answered:,} answers "
                f"received are cached in {self.cache.path.parent}; rerun the same command to send only the rest "
                "(or set harvest.regenerate.on_failure: keep)")

    def apply(self, rec: dict[str, Any]) -> bool:
        hit = self.chosen.get(rec["id"])
        if hit is None:
            return False
        key, why = hit
        if key not in self.answers:
            rec["tags"] = {**(rec.get("tags") or {}), "regenerate_failed": self.stats.failures.get(key, "no answer")}
            return True
        answer, latency = self.answers[key]
        self.mod.apply(rec, answer, latency, self.cfg, why)
        return True

    def finish(self) -> None:
        self.cache.close()

    def summary(self) -> dict[str, Any]:
        tin = tout = 0
        cost = 0.0
        for key in {k for k, _ in self.chosen.values()}:
            if key in self.answers:
                usage = self.answers[key][0].get("usage") or {}
                tin += usage.get("prompt_tokens") or 0
                tout += usage.get("completion_tokens") or 0
                cost += self.mod.cost(self.cfg, usage.get("prompt_tokens"), usage.get("completion_tokens")) or 0.0
        new = self.stats.answered
        return {"records": len(self.chosen), "requests": len(self.bodies), "cached": self.cached,
                "new_answers": new, "http_calls": self.stats.calls, "retries": self.stats.retries,
                "failed": len(self.stats.failures), "pruned": self.pruned, "reasons": dict(self.reasons),
                "input_tokens": tin,
                "output_tokens": tout, "cost_usd": round(cost, 6) if self.cfg.price else None,
                "statuses": dict(self.stats.statuses)}


def _assemble(work: Path, batch_files: list[str], fb: FeedbackIndex | None,
              regen: _Regeneration | None, pii: Redaction | None) -> dict[str, Any]:
    """records-*.parquet from the batches: a hard link where nothing joins onto a batch, else a rewritten copy
    (whose records are redacted again: a demonstration or a re-generated answer brings new text)."""
    records = changed = 0
    functions: Counter[str] = Counter()
    matched_feedback = 0
    applied: Counter[str] = Counter()  # demonstrations applied, scores set aside
    ids_hit: set[str] = set()  # record ids and episode ids that some feedback reached
    episodes_hit: set[str] = set()
    columns = {"function"} | ({"id", "episode_id"} if fb else set()) | ({"id"} if regen is not None else set())
    for name in batch_files:
        src = work / "batches" / name
        dst = work / f"records-{name}"
        table = pq.read_table(src, columns=sorted(columns))
        records += table.num_rows
        mask = None
        touched = fb.touches(table) if fb else None
        if touched is not None:
            n_touched = pc.sum(touched).as_py() or 0
            matched_feedback += n_touched
            mask = touched
            if n_touched:
                hit = table.filter(touched)
                ids_hit.update(hit["id"].to_pylist())
                episodes_hit.update(e for e in hit["episode_id"].to_pylist() if e is not None)
        if regen is not None:
            ids = pa.array(list(regen.chosen), pa.string())
            hit = pc.is_in(table["id"], value_set=ids)
            mask = hit if mask is None else pc.or_kleene(mask, hit)
        if table.num_rows:
            vc = pc.value_counts(table["function"])
            functions.update(dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True)))
        if mask is None or not pc.any(mask).as_py():
            watermarks.link(src, dst)
            continue
        table = pq.read_table(src)
        idx = pc.indices_nonzero(mask)
        rows = from_table(table.take(idx))
        for rec in rows:
            if fb:
                fb.apply(rec, applied)
            if regen is not None:
                regen.apply(rec)
        changed += len(rows)
        new = to_table(rows)
        if pii is not None:
            new, _ = pii.apply(new)
        new = new.append_column("__row", idx.cast(pa.int64()))
        rest = table.filter(pc.invert(mask))
        rest = rest.append_column("__row", pc.indices_nonzero(pc.invert(mask)).cast(pa.int64()))
        out = pa.concat_tables([rest, new]).sort_by("__row").drop_columns(["__row"])
        tmp = dst.with_suffix(".tmp")
        pq.write_table(out, tmp, compression="zstd")
        os.replace(tmp, dst)
    if not batch_files:  # an empty but typed table, so later stages read a schema
        pq.write_table(to_table([]), work / "records-empty.parquet")
    rows_matched, rows_unmatched = fb.matched_rows(ids_hit, episodes_hit) if fb else (0, 0)
    return {"records": records, "changed": changed, "functions": functions, "feedback_matched": matched_feedback,
            "feedback_rows_matched": rows_matched, "feedback_rows_unmatched": rows_unmatched,
            "demonstrations_applied": applied["demonstrations_applied"],
            "scores_set_aside": applied["scores_set_aside"]}


def _result(ctx: StageContext, cfg: HarvestConfig, ingests: list[_Ingest], states: dict[str, Any],
            totals: dict[str, Any], fb: FeedbackIndex | None, regen: _Regeneration | None, read_s: float,
            workers: int) -> StageResult:
    this_run: Counter[str] = Counter(dict.fromkeys(watermarks.COUNT_KEYS, 0))
    reasons: Counter[str] = Counter()
    for ing in ingests:
        this_run.update(ing.counts)
        reasons.update(ing.reasons)
    cumulative: Counter[str] = Counter()
    for st in states.values():
        cumulative.update(st.counts)
    quarantined = cumulative["quarantined"] + (len(fb.quarantine) if fb else 0)
    functions = {str(k): int(v) for k, v in totals["functions"].most_common()}
    counts: dict[str, Any] = {
        "files": sum(i.files_read + i.unchanged_files for i in ingests),
        "lines": cumulative["lines"], "records": totals["records"], "quarantined": quarantined,
        "skipped_old": cumulative["skipped_old"], "duplicates": cumulative["duplicates"],
        "extra_choices": cumulative["extra_choices"],
        "quarantine_reasons": dict(reasons), "functions": functions,
        # Unfinished last lines (no newline yet) left for the next run: not counted in lines until read whole.
        "held_back_partial_line": [{"source": i.state.label, "file": url, "bytes": n}
                                   for i in ingests for url, n, _ in i.held_back],
        "this_run": {"files_read": sum(i.files_read for i in ingests),
                     "files_unchanged": sum(i.unchanged_files for i in ingests), **dict(this_run),
                     "held_back_partial_line": sum(now for i in ingests for _, _, now in i.held_back),
                     "records_per_s": round(this_run["records"] / read_s, 1) if read_s > 0 else None,
                     "workers": workers},
        "sources": {st.label: {**st.counts, "watermark": _iso(st.max_ms), "batches": len(st.batches)}
                    for st in states.values()},
    }
    n_new, n_lines = this_run["records"], this_run["lines"]
    summary = [
        ("sources", ", ".join(f"{st.label} ({st.counts['records']:,} records, up to {_iso(st.max_ms) or '-'})"
                              for st in states.values())),
        ("this run", f"{n_lines:,} rows read from {counts['this_run']['files_read']} files "
                     f"({counts['this_run']['files_unchanged']} unchanged, skipped) -> {n_new:,} new records"
                     + (f" at {n_new / read_s:,.0f}/s" if read_s > 0 and n_new else "")),
    ]
    skipped = [f"{this_run[k]:,} {label}" for k, label in (("skipped_old", "at or before the watermark"),
                                                          ("duplicates", "already harvested"),
                                                          ("extra_choices", "extra choices (n > 1)"))
               if this_run[k]]
    not_calls = _prefixed((ing.notes for ing in ingests), NOT_CALLS_PREFIX)
    if not_calls:
        counts["this_run"]["not_calls"] = dict(sorted(not_calls.items()))
        skipped += [f"{n:,} {why}" for why, n in not_calls.most_common()]
        skipped[-1] += " (not calls: only the teacher's answers are training data)"
    if skipped:
        summary.append(("of which", "; ".join(skipped)))
    held = counts["held_back_partial_line"]
    if held:
        files = ", ".join(f"{h['file'].rsplit('/', 1)[-1]} ({h['bytes']:,} bytes)" for h in held[:5])
        summary.append(("held back", f"{len(held):,} unfinished last line{'s' if len(held) > 1 else ''} (no newline "
                        f"yet), read once complete on a later run: {files}" + (" ..." if len(held) > 5 else "")))
    summary.append(("records", f"{totals['records']:,}  ({', '.join(f'{k}: {v:,}' for k, v in functions.items())})"))
    if this_run["quarantined"] or quarantined:
        summary.append(("quarantined", f"{this_run['quarantined']:,} this run, {quarantined:,} in all"
                        + (f"  ({', '.join(f'{k}: {v}' for k, v in reasons.most_common())})" if reasons else "")))
        summary.append(("see", str(ctx.run.stage_dir("harvest") / QUARANTINE)))
    _notes(counts, summary, states)
    _feedback_and_regeneration(counts, summary, totals, fb, regen)
    return StageResult(counts=counts, summary=summary)


def _notes(counts: dict[str, Any], summary: list[tuple[str, str]], states: dict[str, Any]) -> None:
    """Images, leniently read rows and values coerced or dropped, counted per source (added only when there are
    any)."""
    notes = {k: sum(st.counts.get(k, 0) for st in states.values()) for k in NOTE_KEYS}
    if notes["images"]:
        counts["images"] = {"images": notes["images"], "records_with_images": notes["records_with_images"]}
        summary.append(("images", f"{notes['images']:,} image parts in {notes['records_with_images']:,} records "
                        "(kept in the messages' images; tag has_images): " + ", ".join(
                            f"{st.label} {st.counts['images']:,}" for st in states.values() if st.counts.get("images"))))
    if notes["lenient_json"]:
        counts["lenient_json"] = notes["lenient_json"]
        summary.append(("read leniently", f"{notes['lenient_json']:,} rows with raw control characters inside JSON "
                        "strings (tag lenient_json)"))
    not_calls = _prefixed((st.counts for st in states.values()), NOT_CALLS_PREFIX)  # this run's: "of which"
    if not_calls:
        counts["not_calls"] = dict(sorted(not_calls.items()))
    coerced = _prefixed((st.counts for st in states.values()), COERCED_PREFIX)
    if coerced:
        counts["coerced"] = dict(sorted(coerced.items()))
        summary.append(("coerced", f"{sum(coerced.values()):,} values dropped or truncated, not of the field's kind "
                        "(a latency that is not a number, tags that are not a map, ...): "
                        + ", ".join(f"{k} {v:,}" for k, v in sorted(coerced.items()))))


def _prefixed(counts: Iterable[dict[str, int]], prefix: str) -> Counter[str]:
    """Counts under ``prefix`` (``coerced:``, ``not_calls:``: the sources' over all runs, or this run's notes),
    summed, without the prefix."""
    out: Counter[str] = Counter()
    for c in counts:
        out.update({k[len(prefix):]: v for k, v in c.items() if k.startswith(prefix) and v})
    return out


def _feedback_and_regeneration(counts: dict[str, Any], summary: list[tuple[str, str]], totals: dict[str, Any],
                               fb: FeedbackIndex | None, regen: _Regeneration | None) -> None:
    """Feedback joined (applied and unmatched rows, demonstrations) and teacher re-generation, when configured."""
    if fb is not None:
        unmatched = totals["feedback_rows_unmatched"]
        counts["feedback"] = {"rows": fb.rows, "quarantined": len(fb.quarantine), "metrics": dict(fb.by_metric),
                              "records_matched": totals["feedback_matched"],
                              "rows_matched": totals["feedback_rows_matched"], "rows_unmatched": unmatched,
                              "demonstrations": len(fb.demonstrations),
                              "demonstrations_applied": totals["demonstrations_applied"],
                              "scores_set_aside": totals["scores_set_aside"],
                              "comments_dropped": fb.dropped_comments}
        if fb.lenient:
            counts["feedback"]["lenient_json"] = fb.lenient
        summary.append(("feedback", f"{fb.rows:,} rows ({', '.join(f'{k}: {v:,}' for k, v in fb.by_metric.items())})"
                        f" -> {totals['feedback_matched']:,} records"
                        + (f"; {unmatched:,} rows match no record" if unmatched else "")
                        + (f"; {totals['demonstrations_applied']:,} demonstrations applied (of "
                           f"{len(fb.demonstrations):,}), {totals['scores_set_aside']:,} scores of the replaced "
                           "answers set aside (tag replaced_output_feedback)" if fb.demonstrations else "")))
    if regen is not None:
        s = regen.summary()
        counts["regenerate"] = s
        cost = f", ${s['cost_usd']:.4f}" if s["cost_usd"] is not None else ""
        summary.append(("re-generated", f"{s['records']:,} records ({', '.join(f'{k}: {v}' for k, v in s['reasons'].items())})"
                        f"; {s['cached']:,} from the cache, {s['new_answers']:,} new answers in {s['http_calls']:,} "
                        f"calls ({s['retries']:,} retries); {s['input_tokens']:,} + {s['output_tokens']:,} tokens{cost}"))
        if s["failed"]:
            summary.append(("not re-generated", f"{s['failed']:,} calls failed; the records keep their logged "
                                                "output (tag regenerate_failed)"))


def _iso(t: int | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t / 1000))
