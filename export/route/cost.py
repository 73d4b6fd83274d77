"""What one proxied request cost, and what the teacher alone would have cost, in USD: ``routing.cost`` on every
line serve-router logs, which ``distill ledger`` sums."""

from __future__ import annotations

from typing import Any

Price = tuple[float, float]  # USD per million input, output tokens


def usage_tokens(usage: Any) -> tuple[int, int] | None:
    """(prompt, completion) tokens of an OpenAI ``usage`` object, or None where it lacks them."""
    if not isinstance(usage, dict):
        return None
    tin, tout = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not isinstance(tin, int) or not isinstance(tout, int):
        return None
    return tin, tout


def usd(price: Price | None, tokens: tuple[int, int] | None) -> float | None:
    """Tokens at a per-million price; None where either is unknown."""
    if price is None or tokens is None:
        return None
    return (tokens[0] * price[0] + tokens[1] * price[1]) / 1e6


def request_cost(tried: bool, student_usage: Any, teacher_usage: Any, route: str, *, student_price: Price | None,
                 per_request_usd: float | None, teacher_price: Price | None) -> dict[str, Any]:
    """None where a price or the usage is unknown. The student costs ``student_price`` per token when one is set,
    else evaluate's cost per request (its hourly price over its measured throughput, in the policy); a request the
    student did not answer is priced for the teacher-only case at the teacher's own usage, one the student
    answered at the student's token counts (a different tokenizer: an estimate)."""
    s_tok = usage_tokens(student_usage) if tried else None
    t_tok = usage_tokens(teacher_usage) if route == "teacher" else None
    if not tried:
        student_usd, basis = 0.0, "not asked"
    elif student_price:
        student_usd, basis = usd(student_price, s_tok or (0, 0)), "per token"
    else:
        student_usd, basis = per_request_usd, "per request (evaluate)"
    teacher_usd = usd(teacher_price, t_tok) if route == "teacher" else 0.0
    teacher_only = teacher_usd if route == "teacher" else usd(teacher_price, s_tok)
    spent = None if student_usd is None or teacher_usd is None else student_usd + teacher_usd
    return {"usd": spent, "student_usd": student_usd, "teacher_usd": teacher_usd, "teacher_only_usd": teacher_only,
            "saved_usd": None if spent is None or teacher_only is None else teacher_only - spent,
            "student_tokens": list(s_tok) if s_tok else None, "teacher_tokens": list(t_tok) if t_tok else None,
            "student_basis": basis,
            "teacher_only_basis": "teacher usage" if route == "teacher" else "student tokens"}
