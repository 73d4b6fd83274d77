"""The model card: README.md with YAML front matter (the Hugging Face card format) for a published version.

It carries the lineage, the scores against the teacher, every artefact with its size and quality change
against the master, the gate result and the intended use. It holds nothing that changes from one run to the
next on the same inputs (no timestamps, no timings), so publishing the same student again reuses the version;
timings and costs live in manifest.json.
"""

from __future__ import annotations

import json
import shlex
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

ENGINES = {
    "master": "transformers, vLLM, TGI, SGLang; llama.cpp after conversion",
    "bnb-8bit": "transformers (CPU/GPU); vLLM on GPU",
    "bnb-nf4": "transformers (CPU/GPU); vLLM on GPU",
    "w8a8": "vLLM (compressed-tensors INT8, GPU and x86 CPU); transformers",
    "w4a16": "vLLM (compressed-tensors INT4 weight-only, GPU); transformers",
    "gguf-f16": "llama.cpp, Ollama, LM Studio; transformers (gguf_file=); vLLM (GGUF, GPU)",
    "gguf-q8_0": "llama.cpp, Ollama, LM Studio; transformers (gguf_file=); vLLM (GGUF, GPU)",
}


def system_prompts(train_parquet: Path) -> dict[str, str]:
    """Per function, the system message the curated training data holds most often (after PII redaction: curate
    writes only redacted text); functions without a system message are left out."""
    table = pq.read_table(train_parquet, columns=["function", "messages"])
    counts: dict[str, Counter] = {}
    for fn, msgs in zip(table.column("function").to_pylist(), table.column("messages").to_pylist(), strict=True):
        system = next((m.get("content") for m in msgs or [] if m.get("role") == "system"), None)
        if fn and isinstance(system, str) and system:
            counts.setdefault(fn, Counter())[system] += 1
    # most frequent first; ties broken by the text, so the card does not depend on the row order
    return {fn: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for fn, c in sorted(counts.items())}


def usage(tokenizer, max_new_tokens: int, prompts: dict[str, str]) -> dict[str, Any]:
    """What a user needs to reproduce the evaluated answers: greedy decoding, the evaluated max_new_tokens, the
    stop token(s) and each function's production system prompt."""
    eos = tokenizer.eos_token_id
    stop = [tokenizer.eos_token] if tokenizer.eos_token else []
    return {"do_sample": False, "max_new_tokens": int(max_new_tokens), "eos_token_id": [] if eos is None else [eos],
            "pad_token_id": tokenizer.pad_token_id, "stop": stop, "system_prompts": prompts}


def write_generation_config(folder: Path, use: dict[str, Any]) -> None:
    """generation_config.json of the master: transformers' generate() then decodes greedily for the evaluated
    max_new_tokens and stops at the end-of-turn token; ``distill_system_prompts`` (ignored by transformers) holds
    each function's system prompt."""
    path = folder / "generation_config.json"
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    cfg.update({"_from_model_config": False, "do_sample": False, "max_new_tokens": use["max_new_tokens"],
                "eos_token_id": use["eos_token_id"], "distill_system_prompts": use["system_prompts"]})
    if use.get("pad_token_id") is not None:
        cfg["pad_token_id"] = use["pad_token_id"]
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def default_intended_use(name: str, functions: list[str], teachers: list[str]) -> str:
    return (f"{name} is a distilled student that answers the same requests as "
            f"{', '.join(teachers) or 'the teacher'} for these functions only: {', '.join(functions)}. Serve it "
            "behind the routing policy published with it (routing_policy.json), which sends requests it was not "
            "calibrated for, inputs longer than those seen in training, and answers it is unsure of to the "
            "teacher. It is not a general-purpose assistant and was not evaluated outside these functions.")


def _front_matter(name: str, meta: dict[str, Any], license_: str) -> dict[str, Any]:
    """The YAML front matter: license, tags, base model, distill's lineage and formats, and ``model-index``."""
    lineage, scores, gate = meta["lineage"], meta["scores"], meta["gate"]
    functions = sorted(scores["functions"])
    arts = meta["artefacts"]
    base = lineage.get("base_model")
    tags = ["distill", "distillation", "text-generation"]
    tags += sorted({t for a in arts for t in {"bnb": ["bitsandbytes"], "w8a": ["compressed-tensors"],
                                              "w4a": ["compressed-tensors"], "ggu": ["gguf"]}.get(a["format"][:3], [])})
    front: dict[str, Any] = {
        "license": license_,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": tags,
    }
    if base and base != "built from config":
        front["base_model"] = base
        front["base_model_relation"] = "finetune"
    front["distill"] = {
        "recipe": lineage.get("recipe"),
        "recipe_sha256": lineage.get("recipe_sha256"),
        "data_sha256": lineage.get("data_sha256"),
        "base_model": base,
        "base_revision": lineage.get("base_revision"),
        "method": lineage.get("method"),
        "teacher_models": lineage.get("teacher_models"),
        "train_records": lineage.get("train_records"),
        "quality_metric": scores.get("quality_metric"),
        "gate_passed": gate.get("passed"),
        "routing_policy_sha256": meta.get("routing_policy_sha256"),
        "formats": [{"format": a["format"], "path": a["path"], "bytes": a["bytes"],
                     "quality": None if a.get("quality") is None else round(a["quality"], 6),
                     "points_vs_master": None if a.get("points_vs_master") is None else round(a["points_vs_master"], 4)}
                    for a in arts],
    }
    front["model-index"] = [{
        "name": name,
        "results": [{
            "task": {"type": "text-generation"},
            "dataset": {"name": f"{lineage.get('recipe')} held-out test split", "type": "distill-heldout"},
            "metrics": [{"type": "quality", "name": f"{fn} quality vs teacher ({scores.get('quality_metric')})",
                         "value": round(100 * scores["functions"][fn]["quality"], 2)}
                        for fn in functions if scores["functions"][fn].get("quality") is not None],
        }],
    }]
    return front


def _use_section(use: dict[str, Any], gguf: list[dict[str, Any]]) -> list[str]:
    """How to get the evaluated answers: the generation settings, each function's system prompt, transformers,
    llama.cpp."""
    prompts = use.get("system_prompts") or {}
    n, stop = use.get("max_new_tokens", 256), ", ".join(f"`{t}`" for t in use.get("stop") or []) or "the EOS token"
    fn = next(iter(prompts), None)
    lines = ["## Use", "",
             f"The evaluated answers were decoded **greedily** (no sampling), at most **{n}** new tokens, stopping at "
             f"{stop}, from the chat template with the function's system prompt. `generation_config.json` holds "
             "these settings (transformers' `generate()` uses them) and the system prompts "
             "(`distill_system_prompts`). Without the system prompt the student was not trained for the request.", ""]
    for name, text in prompts.items():
        lines += [f"System prompt of `{name}` (as in the curated training data, PII redacted):", "", "```text", text,
                  "```", ""]
    lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'path = "DEST"   # this folder, e.g. after `distill pull STORE NAME DEST`',
              "tok = AutoTokenizer.from_pretrained(path)", "model = AutoModelForCausalLM.from_pretrained(path)",
              f"messages = [{{\"role\": \"system\", \"content\": {(prompts.get(fn) or '')!r}}},",
              '            {"role": "user", "content": "YOUR REQUEST"}]',
              "inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
              "return_dict=True)",
              f"out = model.generate(**inputs, max_new_tokens={n}, do_sample=False)",
              'print(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())',
              "```", ""]
    if gguf:
        file = f"DEST/{gguf[-1]['path']}"
        sys_arg = shlex.quote(prompts.get(fn) or "")
        lines += ["With llama.cpp (not run by distill's tests: llama.cpp is not installed there):", "", "```bash",
                  f"llama-cli -m {file} -sys {sys_arg} -p 'YOUR REQUEST' -n {n} --temp 0",
                  f"llama-server -m {file} --jinja --temp 0 -n {n} --port 8000   # OpenAI API; logprobs per request",
                  "```", "",
                  "On CPUs with AMX (recent Intel Xeon), llama.cpp's CPU repacking of Q8_0 weights crashes (a "
                  "llama.cpp bug: its own Q8_0 of the same weights crashes too); add `--no-repack` to either command.",
                  ""]
    return lines


def model_card(name: str, meta: dict[str, Any], intended_use: str | None, license_: str) -> str:
    """README.md text for the version whose manifest (without name, version and files) is ``meta``."""
    lineage, scores, gate = meta["lineage"], meta["scores"], meta["gate"]
    functions = sorted(scores["functions"])
    arts = meta["artefacts"]
    base = lineage.get("base_model")
    front = _front_matter(name, meta, license_)
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {name}", "",
             f"A student distilled by `distill` from the logged traffic of {', '.join(lineage.get('teacher_models') or ['its teacher'])}"
             f" ({lineage.get('method')} training on {lineage.get('train_records')} curated examples, base: "
             f"{base}).", "",
             "## Intended use", "", intended_use or default_intended_use(name, functions,
                                                                         lineage.get("teacher_models") or []), "",
             "## Quality against the teacher", "",
             f"On the held-out test split, scored by {scores.get('quality_description') or scores.get('quality_metric')}"
             f" (teacher = 100 on agreement metrics); brackets: {100 * (scores.get('bootstrap') or {}).get('confidence', 0.95):g}% "
             "bootstrap interval.", "",
             "| function | n | quality | exact match | JSON field accuracy |", "| --- | --- | --- | --- | --- |"]
    for fn in functions:
        s = scores["functions"][fn]
        ci = (s.get("ci") or {}).get("quality")
        lines.append(f"| {fn} | {s['n']} | {_pct(s.get('quality'))}"
                     + (f" [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else "")
                     + f" | {_pct(s.get('exact_match'))} | {_pct(s.get('field_accuracy'))} |")
    lines += ["", f"Quality gate: **{'passed' if gate.get('passed') else 'failed'}** (limits and the comparison with "
              "the previously published version: manifest.json, `gate`).", "", "## Artefacts", "",
              "Every artefact was made from the merged master and evaluated again on the same test records.", "",
              "| format | path | bytes | × master | quality | points vs master | engines |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for a in arts:
        pts = a.get("points_vs_master")
        lines.append(f"| {a['format']} | `{a['path']}` | {a['bytes']:,} | {a.get('size_vs_master', 1.0):.2f} | "
                     f"{_pct(a.get('quality'))} | {'–' if pts is None else f'{pts:+.2f}'} | "
                     f"{ENGINES.get(a['format'], '')} |")
    lines += _use_section(meta.get("usage") or {}, [a for a in arts if a["format"].startswith("gguf-")])
    lines += ["The routing policy (`routing_policy.json`) and the `Router` runtime decide per request whether "
              "the student answers or the teacher does; see manifest.json for lineage, package versions, timings, "
              "costs and the sha256 of every file.", ""]
    return "\n".join(lines)
