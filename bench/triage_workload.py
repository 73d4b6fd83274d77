"""A harder workload than the demo: the shape of a real support-triage log.

    .venv/bin/python bench/triage_workload.py OUT_DIR [--calls 4000] [--seed 0]   # writes OUT_DIR/triage.jsonl.gz

How it is built (deterministic: the same arguments give byte-identical output):

- **35 intents** in 9 areas (orders, billing, account, ...), each with 3 short phrasings. Intent frequencies follow
  a Zipf law (exponent 1.1, in the order listed), so the head intents have hundreds of calls and the tail ones a
  handful: with 4,000 calls the rarest intent has 21; with 2,500 (bench/candidates.py's size, seed 0) the most
  frequent has 634 and the rarest 9, and after curation (val 8 %, test 15 %) every intent reaches the training
  split, the smallest with 7 examples (1,481 train, 152 validation, 303 test records).
- **Short, noisy user messages** (about 4 to 14 words): lower-cased half of the time, chat abbreviations ("pls",
  "u", "acct", "thx"), one or two typos (adjacent swap, dropped or doubled letter) in 60 % of messages, optional
  greeting and sign-off, and trailing punctuation dropped or repeated.
- **12 products**, named in 80 % of the messages whose intent concerns a product (by an alias such as "the
  router" 40 % of the time); otherwise the teacher answers ``"product": "none"``.
- **Priority** comes from urgency cues in the text ("asap", "urgent", "right now", ... -> high; "no rush",
  "whenever", "fyi" ... -> low; none -> medium).
- The teacher answers ``{"intent", "priority", "product"}`` as JSON under a JSON schema with the intents as an
  enum (one function, ``support_triage``, and a short system prompt that does not list the intents). The mess real
  logs have is the demo's (``curation.harvest.demo_traffic.teacher_outcome``): 3 % HTTP errors, empty, cut-off and
  refused answers; plus 3 % teacher mistakes (a wrong intent), most of them with negative feedback, 5 % client
  retries and 3 % resent-with-edits near duplicates.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from curation.harvest.demo_traffic import REFUSAL, TEACHER, teacher_outcome  # noqa: E402

FUNCTION = "support_triage"
AREAS = {  # area -> intent -> phrasings ({p}: the product, or a generic noun when none is named)
    "orders": {
        "order_status": ["where is my order for the {p}", "any update on my {p} order", "status of {p} order?"],
        "order_cancel": ["cancel my order for the {p}", "i want to cancel the {p} i just ordered",
                         "stop my {p} order before it ships"],
        "order_change": ["change the color of my {p} order", "can i swap the {p} in my order",
                         "need to edit my {p} order"],
        "wrong_item": ["got the wrong item instead of the {p}", "box had something else not the {p}",
                       "you sent me the wrong {p}"],
    },
    "shipping": {
        "shipping_delay": ["my {p} is late", "{p} still not delivered", "tracking for the {p} has not moved"],
        "shipping_address": ["change the delivery address for the {p}", "wrong address on my {p} shipment",
                             "ship the {p} to my office instead"],
        "lost_package": ["my {p} package is lost", "courier says delivered but no {p}",
                         "the {p} parcel went missing"],
        "damaged_in_transit": ["the {p} box arrived crushed", "{p} came damaged in shipping",
                               "package with the {p} was torn open"],
    },
    "billing": {
        "refund_request": ["i want a refund for the {p}", "refund the {p} please", "money back for the {p}"],
        "double_charge": ["charged twice for the {p}", "two charges for one {p}", "billed double for the {p}"],
        "invoice_request": ["need an invoice for the {p}", "send me the receipt for the {p}",
                            "vat invoice for my {p}"],
        "payment_failed": ["payment for the {p} keeps failing", "card declined buying the {p}",
                           "checkout error paying for the {p}"],
        "price_match": ["the {p} is cheaper elsewhere", "can you price match the {p}", "saw the {p} on sale today"],
    },
    "account": {
        "password_reset": ["reset link not working", "forgot my password", "cant reset my password"],
        "account_locked": ["my account is locked", "locked out after too many tries", "account got suspended"],
        "email_change": ["change the email on my account", "update my login email", "new email address for acct"],
        "delete_account": ["delete my account", "close my account for good", "remove all my data and account"],
        "two_factor": ["2fa code never arrives", "lost my phone for two factor", "authenticator code rejected"],
    },
    "product": {
        "product_defect": ["the {p} stopped working", "my {p} is broken", "{p} turns off by itself"],
        "setup_help": ["how do i set up the {p}", "cant get the {p} to pair", "{p} setup keeps failing"],
        "compatibility": ["does the {p} work with my phone", "is the {p} compatible with mac",
                          "will the {p} fit my old charger"],
        "firmware_update": ["update for the {p} failed", "{p} stuck updating", "new firmware broke my {p}"],
        "battery_issue": ["battery on the {p} drains fast", "{p} wont charge", "{p} battery dies in an hour"],
    },
    "returns": {
        "return_label": ["need a return label for the {p}", "how do i send the {p} back", "return label for {p}"],
        "return_status": ["did you get my {p} return", "status of my {p} return", "returned the {p} no update"],
        "exchange": ["exchange the {p} for another size", "swap my {p} for a new one", "can i exchange the {p}"],
    },
    "subscription": {
        "subscription_cancel": ["cancel my {p} subscription", "stop the monthly plan for the {p}",
                                "end my {p} membership"],
        "subscription_upgrade": ["upgrade my {p} plan", "move my {p} plan to premium", "want the bigger {p} plan"],
        "trial_question": ["when does my {p} trial end", "will the {p} trial charge me", "extend the {p} trial"],
    },
    "warranty": {
        "warranty_claim": ["warranty claim for the {p}", "{p} broke under warranty", "is the {p} covered"],
        "repair_status": ["status of my {p} repair", "when is the {p} back from repair", "{p} repair taking forever"],
    },
    "other": {
        "feedback_praise": ["love the {p} thanks", "great job on the {p}", "the {p} is awesome"],
        "complaint_staff": ["your agent was rude about my {p}", "bad service on the {p} call",
                            "support hung up on me about the {p}"],
        "gdpr_request": ["send me all data you hold", "gdpr request for my data", "what personal data do you keep"],
        "business_inquiry": ["bulk order of the {p} for my company", "reseller pricing for the {p}",
                             "partnership about the {p}"],
    },
}
INTENTS = [intent for area in AREAS.values() for intent in area]
PHRASES = {intent: phrases for area in AREAS.values() for intent, phrases in area.items()}
PRODUCTS = {
    "AeroPress Mini": ["aeropress", "the press"], "Nimbus Router": ["the router", "nimbus"],
    "Pulse Earbuds": ["earbuds", "pulse buds"], "Orbit Smartwatch": ["the watch", "orbit watch"],
    "Lumen Desk Lamp": ["the lamp", "lumen lamp"], "Vortex Blender": ["blender", "vortex"],
    "Summit Backpack": ["backpack", "summit bag"], "Echo Speaker": ["speaker", "echo spkr"],
    "Halo Doorbell": ["doorbell", "halo bell"], "Drift Scooter": ["scooter", "drift"],
    "Atlas Tablet": ["tablet", "atlas tab"], "Ember Kettle": ["kettle", "ember"],
}
HIGH = ["asap", "urgent", "right now", "need this today", "emergency", "!!!"]
LOW = ["no rush", "whenever", "fyi", "not urgent", "when u can"]
GREETINGS = ["", "", "", "hi", "hey", "hello", "yo", "good morning"]
SIGNOFFS = ["", "", "", "thx", "thanks", "ty", "cheers"]
ABBREV = {"please": "pls", "you": "u", "account": "acct", "thanks": "thx", "because": "bc", "your": "ur"}
SYSTEM = "Triage the support message. Reply with JSON: intent, priority (low|medium|high), product (or none)."
SCHEMA = {"type": "json_schema", "json_schema": {"name": "triage", "strict": True, "schema": {
    "type": "object", "additionalProperties": False, "required": ["intent", "priority", "product"],
    "properties": {"intent": {"type": "string", "enum": INTENTS},
                   "priority": {"type": "string", "enum": ["low", "medium", "high"]},
                   "product": {"type": "string"}}}}}


def _typo(rng: random.Random, word: str) -> str:
    if len(word) < 4 or not word.isalpha():
        return word
    i = rng.randrange(1, len(word) - 1)
    kind = rng.randrange(3)
    if kind == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == 1:
        return word[:i] + word[i + 1:]
    return word[:i] + word[i] + word[i:]


def message(rng: random.Random) -> tuple[str, dict[str, str]]:
    """One noisy user message and the teacher's label for it."""
    weights = [1 / (k + 1) ** 1.1 for k in range(len(INTENTS))]
    intent = rng.choices(INTENTS, weights)[0]
    phrase = rng.choice(PHRASES[intent])
    product = rng.choice(list(PRODUCTS)) if "{p}" in phrase and rng.random() < 0.8 else None
    if product is None:
        phrase = " ".join(phrase.replace("the {p}", "it").replace("{p}", "").split())
    else:
        name = product if rng.random() < 0.6 else rng.choice(PRODUCTS[product])
        phrase = phrase.replace("the {p}", name if name.startswith("the ") else f"the {name}").replace("{p}", name)
    roll = rng.random()
    priority = "high" if roll < 0.25 else "low" if roll < 0.45 else "medium"
    words = phrase.split()
    if rng.random() < 0.6:
        for _ in range(rng.choice([1, 1, 2])):
            k = rng.randrange(len(words))
            words[k] = _typo(rng, words[k])
    words = [ABBREV.get(w, w) if rng.random() < 0.5 else w for w in words]
    cue = {"high": rng.choice(HIGH), "low": rng.choice(LOW), "medium": ""}[priority]
    parts = [rng.choice(GREETINGS), " ".join(words), cue, rng.choice(SIGNOFFS)]
    text = " ".join(p for p in parts if p)
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    text += rng.choice(["", "", ".", "?", "??", "!"])
    return text, {"intent": intent, "priority": priority, "product": product or "none"}


def _line(rng: random.Random, base: dict, rid: str, ts: datetime) -> tuple[str, bool]:
    """One logged call as JSON text, and whether it is a clean answer (worth retrying or resending later)."""
    body, out = base["request"], base["output"]
    status, out, finish, r = teacher_outcome(rng, out)
    feedback = None
    if 0.075 <= r < 0.105:  # the teacher picks a wrong intent, and most users say so
        label = json.loads(out)
        label["intent"] = rng.choice([k for k in INTENTS if k != label["intent"]])
        out = json.dumps(label)
        feedback = {"thumbs_up": 0} if rng.random() < 0.8 else None
    if feedback is None and status == 200 and rng.random() < 0.3:
        feedback = {"thumbs_up": 1}
    toks = sum(max(1, len(m["content"]) // 4) for m in body["messages"]) + 8
    line: dict = {"id": rid, "timestamp": ts.isoformat().replace("+00:00", "Z"), "status_code": status,
                  "latency_ms": rng.randint(300, 1400), "request": body}
    if status == 200:
        line["response"] = {"id": f"chatcmpl-{rng.getrandbits(64):016x}", "object": "chat.completion",
                            "created": int(ts.timestamp()), "model": TEACHER,
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": out},
                                         "finish_reason": finish}],
                            "usage": {"prompt_tokens": toks, "completion_tokens": max(1, len(out) // 4),
                                      "total_tokens": toks + max(1, len(out) // 4)}}
    else:
        kind = "rate_limit_exceeded" if status == 429 else "server_error"
        line["response"] = {"error": {"message": f"{kind} (HTTP {status})", "type": kind, "code": status}}
    if feedback:
        line["feedback"] = feedback
    clean = status == 200 and bool(out) and out != REFUSAL and finish == "stop"
    return json.dumps(line, ensure_ascii=False), clean


def generate(n: int, seed: int = 0, day: str = "2026-11-30") -> list[str]:
    """``n`` log lines (JSON strings) of one day, deterministic in ``seed``."""
    rng = random.Random(f"triage-{seed}-{day}")
    start = datetime.fromisoformat(day).replace(tzinfo=timezone.utc)
    lines, history = [], []
    for i in range(n):
        roll = rng.random()
        if history and roll < 0.05:  # a client retry
            base = json.loads(json.dumps(rng.choice(history)))
        elif history and roll < 0.08:  # resent with small edits
            base = json.loads(json.dumps(rng.choice(history)))
            msg = base["request"]["messages"][-1]
            msg["content"] = msg["content"].lower() if rng.random() < 0.5 else msg["content"] + " pls"
        else:
            text, label = message(rng)
            base = {"request": {"model": "gpt-4o", "temperature": 0, "response_format": SCHEMA,
                                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
                                "metadata": {"function": FUNCTION, "user_id": f"u{rng.randint(1000, 9999)}"}},
                    "output": json.dumps(label)}
        ts = start + timedelta(seconds=int(i * 86400 / n) + rng.randint(0, 20))
        text, clean = _line(rng, base, f"tri_{seed}_{i:06d}", ts)
        if clean:
            history.append(base)
        lines.append(text)
    return lines


def write_workload(out_dir: str | Path, calls: int = 4000, seed: int = 0) -> Path:
    """Write ``OUT_DIR/triage.jsonl.gz`` (byte-identical for the same arguments) and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "triage.jsonl.gz"
    data = ("\n".join(generate(calls, seed)) + "\n").encode()
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        gz.write(data)
    return path


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--calls", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(write_workload(a.out_dir, a.calls, a.seed))
