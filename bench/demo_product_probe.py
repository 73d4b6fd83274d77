"""Which products a demo student copies: for every ticket_triage record of a split, the student reads the prompt
and the teacher's answer up to ``"product": "`` (teacher-forced) and its most likely next token is compared with
the teacher's first product token. Tells an optimisation miss (the training split wrong too) from overfitting.

    .venv/bin/python bench/demo_product_probe.py RUN_DIR/curate MODEL_DIR [--out FILE.json]

MODEL_DIR: a trained student folder (``train/model`` or ``cache/candidates/<fp>/model``) with its tokenizer.
Used for docs/train.md (the demo over seeds): bench/results/demo_student_variants.json, ``stalled_run``.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

MARK = '"product": "'


def probe(curate: Path, model_dir: Path) -> dict:
    """Per split: records, share whose first product token is right, the most common (teacher, student) swaps."""
    import pandas as pd
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).eval()
    out = {}
    for split in ("train", "val", "test"):
        df = pd.read_parquet(curate / f"{split}.parquet")
        df = df[df.function == "ticket_triage"]
        right, swaps = 0, collections.Counter()
        for _, r in df.iterrows():
            msgs = [{"role": m["role"], "content": m["content"]} for m in r.messages]
            ref = r.output["content"]
            cut = ref.index(MARK) + len(MARK)
            prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) + ref[:cut]
            ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
            target = tok(prompt + ref[cut:], add_special_tokens=False).input_ids[ids.shape[1]]
            with torch.no_grad():
                pred = int(model(ids).logits[0, -1].argmax())
            right += pred == target
            if pred != target:
                swaps[f"{tok.decode([target])} -> {tok.decode([pred])}"] += 1
        out[split] = {"records": len(df), "first_product_token_right": round(right / max(len(df), 1), 6),
                      "swaps": dict(swaps.most_common(6))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("curate", type=Path)
    ap.add_argument("model", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result = probe(args.curate, args.model)
    print("| split | ticket_triage records | first product token right | most common swaps (teacher -> student) |")
    print("| --- | --- | --- | --- |")
    for split, r in result.items():
        print(f"| {split} | {r['records']} | {100 * r['first_product_token_right']:.1f} % | {r['swaps']} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
