"""A deterministic generator of realistic logged teacher traffic, as a logging proxy keeps it.

Each line is one OpenAI chat-completions call: ``timestamp``, ``status_code``, ``latency_ms``,
``request`` (the body sent), ``response`` (the body received, with usage) and, for part of the
traffic, ``feedback`` joined by the proxy. Two functions: ``ticket_triage`` (structured JSON output)
and ``product_faq`` (short free text). The mess real logs have is there on purpose: truncated lines,
HTTP errors, empty and cut-off outputs, exact and near duplicates, refusals, teacher mistakes with
negative feedback, e-mail addresses and phone numbers, and some non-English tickets.

    python -m curation.harvest.demo_traffic OUT_DIR   # writes the two days bundled under recipes/data/
"""

from __future__ import annotations

import gzip
import json
import random
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

TEACHER = "gpt-4o-2024-08-06"
PRODUCTS = {
    # name: (shipping days, return days, warranty years, in stock)
    "AeroPress Mini": (2, 30, 1, True),
    "Nimbus Router": (3, 14, 2, True),
    "Pulse Earbuds": (2, 30, 1, False),
    "Orbit Smartwatch": (4, 30, 2, True),
    "Lumen Desk Lamp": (5, 60, 3, True),
    "Vortex Blender": (3, 30, 5, False),
    "Summit Backpack": (2, 90, 10, True),
    "Echo Speaker": (4, 14, 1, True),
}
INTENTS = {
    "refund": [
        "I want my money back for the {p}.",
        "Please refund my {p} order.",
        "I returned the {p} two weeks ago and still have no refund.",
        "Can I get a refund on the {p}?",
    ],
    "shipping_delay": [
        "My {p} has not arrived yet.",
        "The {p} I ordered is a week late.",
        "Where is my {p}? Tracking has not moved in days.",
        "Delivery of my {p} keeps getting pushed back.",
    ],
    "account_access": [
        "I can't log in to manage my {p}.",
        "The password reset link for my {p} account does not work.",
        "I am locked out of my account since I registered the {p}.",
        "The {p} app says my account is disabled.",
    ],
    "billing_error": [
        "I was charged twice for the {p}.",
        "The invoice for my {p} shows the wrong amount.",
        "My card was billed for a {p} I never ordered.",
        "There is an extra fee on my {p} bill.",
    ],
    "product_defect": [
        "The {p} stopped working after two days.",
        "My {p} arrived broken.",
        "The {p} keeps turning off by itself.",
        "The {p} makes a loud noise and then dies.",
    ],
    "cancel_subscription": [
        "Please cancel the subscription for my {p}.",
        "I want to stop the monthly plan on the {p}.",
        "How do I end my {p} membership?",
        "Cancel my {p} protection plan, please.",
    ],
}
FOREIGN = {  # a few tickets arrive in other languages; the teacher answers them the same way
    "refund": ["Quiero que me devuelvan el dinero del {p}.", "Ich möchte mein Geld für den {p} zurück."],
    "shipping_delay": ["Mi {p} todavía no ha llegado.", "Mon {p} n'est toujours pas arrivé."],
    "account_access": ["No puedo entrar en mi cuenta del {p}.", "Je n'arrive pas à me connecter à mon compte {p}."],
    "billing_error": ["Me cobraron dos veces el {p}.", "Mir wurde der {p} doppelt berechnet."],
    "product_defect": ["Mi {p} llegó roto.", "Mein {p} funktioniert nicht mehr."],
    "cancel_subscription": ["Cancelen la suscripción de mi {p}.", "Bitte kündigen Sie das Abo für meinen {p}."],
}
URGENCY = {
    "high": ["This is urgent, I need it fixed today.", "I need this resolved immediately!",
             "This is the third time I am writing, please escalate."],
    "medium": ["Please look into it this week.", "I would appreciate a reply soon.",
               "Could someone get back to me in the next few days?"],
    "low": ["No rush, whenever you have time.", "Just letting you know.", "It is not urgent."],
}
GREETINGS = ["Hi,", "Hello team,", "Good morning,", "Hey,", "Dear support,", ""]
NAMES = ["Ana", "Ben", "Chloe", "Dmitri", "Elif", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Luca"]
DOMAINS = ["example.com", "mail.example.org", "inbox.example.net"]
FAQ_QUESTIONS = {
    "shipping": ["How long does shipping take for the {p}?", "When will the {p} ship if I order today?",
                 "What is the delivery time for the {p}?"],
    "returns": ["What is the return window for the {p}?", "How many days do I have to return the {p}?",
                "Can I still return the {p} after a few weeks?"],
    "warranty": ["Does the {p} come with a warranty?", "How long is the warranty on the {p}?",
                 "Is the {p} covered if it breaks?"],
    "stock": ["Is the {p} in stock?", "Can I buy the {p} right now?", "Do you have the {p} available?"],
}
FAQ_OPENERS = ["", "", "Hi!", "Quick question:", "Hello,", "Hey there,"]
FAQ_CLOSERS = ["", "", "Thanks!", "Thank you.", "Cheers", "Thanks in advance."]
TRIAGE_SYSTEM = (
    "You triage customer support tickets. Reply with JSON only: "
    '{"intent": one of ' + ", ".join(INTENTS) + ', "priority": "low" | "medium" | "high", '
    '"product": the product name}.'
)
FAQ_SYSTEM = "You answer customer questions about our products in one short sentence."
TRIAGE_SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "triage",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {
                "intent": {"type": "string", "enum": list(INTENTS)},
                "priority": {"type": "string", "enum": ["low", "medium", "high"]},
                "product": {"type": "string"},
            },
            "required": ["intent", "priority", "product"],
            "additionalProperties": False,
        },
    },
}
REFUSAL = "I'm sorry, but I can't help with that request."


def faq_answer(topic: str, p: str) -> str:
    ship, ret, warranty, stock = PRODUCTS[p]
    if topic == "shipping":
        return f"The {p} ships within {ship} business days."
    if topic == "returns":
        return f"You can return the {p} within {ret} days of delivery."
    if topic == "warranty":
        return f"The {p} comes with a {warranty}-year warranty."
    return f"Yes, the {p} is in stock." if stock else f"Sorry, the {p} is out of stock right now."


def _ticket(rng: random.Random) -> tuple[str, dict]:
    intent = rng.choice(list(INTENTS))
    priority = rng.choice(["low", "low", "medium", "medium", "high"])
    p = rng.choice(list(PRODUCTS))
    foreign = rng.random() < 0.06
    issue = rng.choice(FOREIGN[intent] if foreign else INTENTS[intent]).format(p=p)
    name = rng.choice(NAMES)
    parts = [rng.choice(GREETINGS), issue, rng.choice(URGENCY[priority])]
    roll = rng.random()
    if roll < 0.1:
        parts.append(f"You can reach me at {name.lower()}.{rng.randint(10, 99)}@{rng.choice(DOMAINS)}.")
    elif roll < 0.18:
        parts.append(f"Call me at +1 555-{rng.randint(100, 999)}-{rng.randint(1000, 9999)}.")
    parts.append(rng.choice([f"Thanks, {name}", f"Regards, {name}", name, ""]))
    text = " ".join(x for x in parts if x)
    return text, {"intent": intent, "priority": priority, "product": p}


def _call(rng: random.Random, function: str) -> tuple[list[dict], str, dict | None, dict]:
    """(messages, teacher output, response_format, request extras)."""
    if function == "ticket_triage":
        text, label = _ticket(rng)
        out = json.dumps(label)
        return ([{"role": "system", "content": TRIAGE_SYSTEM}, {"role": "user", "content": text}], out,
                TRIAGE_SCHEMA, {"temperature": 0})
    topic = rng.choice(list(FAQ_QUESTIONS))
    p = rng.choice(list(PRODUCTS))
    q = rng.choice(FAQ_QUESTIONS[topic]).format(p=p)
    q = " ".join(x for x in (rng.choice(FAQ_OPENERS), q, rng.choice(FAQ_CLOSERS)) if x)
    return [{"role": "system", "content": FAQ_SYSTEM}, {"role": "user", "content": q}], faq_answer(topic, p), None, {
        "temperature": 0.2, "max_tokens": 60}


def _tokens(text: str) -> int:
    return max(1, round(len(text) / 4))


def _near_duplicate(rng: random.Random, text: str) -> str:
    choice = rng.randint(0, 2)
    if choice == 0:
        return text.replace(" ", "  ", 1)
    if choice == 1:
        return text.lower()
    return text + " " if not text.endswith(" ") else text.rstrip()


def teacher_outcome(rng: random.Random, out: str) -> tuple[int, str, str, float]:
    """How one logged teacher call went, at the demo's rates: (HTTP status, output, finish_reason, the draw).
    3 % failed (429/5xx), 1.5 % came back empty, 1 % were cut off by the length limit, 2 % were refusals; a
    caller adds rarer outcomes of its own for draws of 0.075 and up."""
    status, finish = 200, "stop"
    r = rng.random()
    if r < 0.03:
        status = rng.choice([429, 500, 503])
    elif r < 0.045:
        out = ""
    elif r < 0.055:
        out, finish = out[: max(3, len(out) // 2)], "length"
    elif r < 0.075:
        out = REFUSAL
    return status, out, finish, r

def generate(n: int, day: str, seed: int = 0) -> list[str]:
    """``n`` log lines (JSON strings; some deliberately broken) for one day, deterministic in ``seed``."""
    rng = random.Random(f"{seed}-{day}")
    start = datetime.fromisoformat(day).replace(tzinfo=timezone.utc)
    lines: list[str] = []
    history: list[dict] = []
    for i in range(n):
        ts = start + timedelta(seconds=int(i * 86400 / n) + rng.randint(0, 30))
        roll = rng.random()
        if history and roll < 0.05:  # the client retried the same request
            base = json.loads(json.dumps(rng.choice(history)))
        elif history and roll < 0.08:  # the same ticket sent again with small edits
            base = json.loads(json.dumps(rng.choice(history)))
            msgs = base["request"]["messages"]
            msgs[-1]["content"] = _near_duplicate(rng, msgs[-1]["content"])
        else:
            function = "ticket_triage" if rng.random() < 0.65 else "product_faq"
            messages, out, fmt, extra = _call(rng, function)
            body = {"model": "gpt-4o", "messages": messages, **extra,
                    "metadata": {"function": function, "user_id": f"u{rng.randint(1000, 9999)}"}}
            if fmt:
                body["response_format"] = fmt
            base = {"request": body, "output": out}
        body, out = base["request"], base["output"]
        function = body["metadata"]["function"]
        status, out, finish, r = teacher_outcome(rng, out)
        feedback = None
        if 0.075 <= r < 0.105 and function == "ticket_triage":  # the teacher gets it wrong ...
            label = json.loads(out)
            label["intent"] = rng.choice([k for k in INTENTS if k != label["intent"]])
            out = json.dumps(label)
            if rng.random() < 0.8:  # ... and most users say so
                feedback = {"thumbs_up": 0}
        if feedback is None and status == 200 and rng.random() < 0.3:
            feedback = {"thumbs_up": 1}
        rid = f"req_{day.replace('-', '')}_{i:06d}"
        prompt_tokens = sum(_tokens(m["content"]) for m in body["messages"]) + 4 * len(body["messages"])
        line: dict = {
            "id": rid,
            "timestamp": ts.isoformat().replace("+00:00", "Z"),
            "status_code": status,
            "latency_ms": rng.randint(350, 1600),
            "request": body,
        }
        if status == 200:
            line["response"] = {
                "id": f"chatcmpl-{rng.getrandbits(64):016x}",
                "object": "chat.completion",
                "created": int(ts.timestamp()),
                "model": TEACHER,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out}, "finish_reason": finish}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": _tokens(out),
                          "total_tokens": prompt_tokens + _tokens(out)},
            }
        else:
            kind = "rate_limit_exceeded" if status == 429 else "server_error"
            line["response"] = {"error": {"message": f"{kind} (HTTP {status})", "type": kind, "code": status}}
        if feedback:
            line["feedback"] = feedback
        if status == 200 and out and out != REFUSAL and finish == "stop":
            history.append(base)
        text = json.dumps(line, ensure_ascii=False)
        if rng.random() < 0.01:  # the proxy died mid-write
            text = text[: rng.randint(20, len(text) - 20)]
        elif rng.random() < 0.003:
            text = json.dumps({"id": rid, "timestamp": line["timestamp"], "note": "health check"})
        lines.append(text)
    return lines


DAYS = {"2026-11-23": 2400, "2026-11-24": 700}


def write_demo(out_dir: str | Path, days: dict[str, int] | None = None, seed: int = 0) -> list[Path]:
    """Write one gzipped JSONL file per day (byte-identical for the same arguments)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for day, n in (days or DAYS).items():
        path = out / f"{day}.jsonl.gz"
        data = ("\n".join(generate(n, day, seed)) + "\n").encode()
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
            gz.write(data)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write_demo(sys.argv[1] if len(sys.argv) > 1 else "recipes/data/demo-traffic"):
        print(p)
