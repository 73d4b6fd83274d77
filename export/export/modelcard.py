"""The model card: README.md with YAML front matter (the Hugging Face card format) for a published version.

It carries the lineage, the scores against the teacher, every artefact with its size and quality change
against the master, the gate result and the intended use. It holds nothing that changes from one run to the
next on the same inputs (no timestamps, no timings), so publishing the same student again reuses the version;
timings and costs live in manifest.json.
"""

from __future__ import annotations

from typing import Any

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
    gguf = [a for a in arts if a["format"].startswith("gguf-")]
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "tok = AutoTokenizer.from_pretrained(DEST)", "model = AutoModelForCausalLM.from_pretrained(DEST)",
              "```", ""]
    if gguf:
        lines += ["```bash", f"llama-cli -m DEST/{gguf[-1]['path']} -cnv   # chat template read from the file", "```",
                  ""]
    lines += ["The routing policy (`routing_policy.json`) and the `Router` runtime decide per request whether "
              "the student answers or the teacher does; see manifest.json for lineage, package versions, timings, "
              "costs and the sha256 of every file.", ""]
    return "\n".join(lines)
