"""``distill serve-student FOLDER``: a small OpenAI-compatible server for a published student on CPU (or one GPU),
built on transformers, for machines where vLLM or llama.cpp is not at hand.

    POST /v1/chat/completions   greedy answers; ``logprobs`` / ``top_logprobs`` in OpenAI's shape when asked
    GET  /v1/models, /health

FOLDER is a pulled store version or the run's export folder (the master: config.json, model.safetensors, the
tokenizer and generation_config.json). Answers are made exactly as the evaluate stage made them: the chat
template over the messages' text, greedy decoding, at most the evaluated ``max_new_tokens`` (from
generation_config.json; a request's ``max_tokens`` / ``max_completion_tokens`` lowers or raises it), stopping at
the end-of-turn token, whose logprob is reported too (as evaluate recorded it for route's calibration).
``stop`` (a string or up to 4) ends the answer before the first of them, as OpenAI does (the tokens up to the one
that completed it are counted and reported); ``temperature``, ``top_p`` and ``seed`` are accepted and ignored
(always greedy); ``n`` > 1 is refused;
``tools`` and ``response_format`` are not applied (evaluate did not apply them either). ``stream: true`` gets the
answer as ``chat.completion.chunk`` events (usage last with ``stream_options.include_usage``) once it is whole:
rows of a batch are generated together, so tokens are not sent as they come.

Concurrent requests are batched: requests that arrive while a batch runs (or within ``batch_wait_ms`` of the
first) are answered together, left-padded, in one ``generate`` call of at most ``max_batch`` rows; each row keeps
its own token limit. Generation runs in one worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from export.route.wire import completion_chunks, send_events
from pipeline.chat import message_text

MAX_TOP_LOGPROBS = 20  # OpenAI's limit


@dataclass
class Pending:
    messages: list[dict[str, str]]
    max_tokens: int
    top_logprobs: int  # -1: no logprobs; 0: logprobs without alternatives
    stop: tuple[str, ...] = ()  # the client's stop sequences: the answer ends before the first
    future: asyncio.Future = field(repr=False, default=None)  # type: ignore[assignment]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error"}}, status=status)


def parse_request(body: Any, default_max: int) -> Pending | str:
    """The request as a Pending, or the reason it is refused."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"] or \
            not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in body["messages"]):
        return "the request body must be a chat-completions object with a non-empty 'messages' list"
    if not isinstance(body.get("stream_options") or {}, dict):
        return "stream_options must be an object"
    if (body.get("n") or 1) != 1:
        return "n > 1 is not supported (answers are greedy: they would all be the same)"
    limit = body.get("max_completion_tokens") or body.get("max_tokens") or default_max
    if not isinstance(limit, int) or limit < 1:
        return "max_tokens must be a positive integer"
    top = -1
    if body.get("logprobs"):
        top = body.get("top_logprobs") or 0
        if not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
            return f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}"
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, (str, list)):
        return "stop must be a non-empty string or a list of up to 4 of them"
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if not all(isinstance(x, str) and x for x in stop) or len(stop) > 4:
        return "stop must be a non-empty string or a list of up to 4 of them"
    messages = [{"role": m["role"], "content": message_text(m)} for m in body["messages"]]
    return Pending(messages, limit, top, stop)


class StudentServer:
    """The model, its tokenizer and the batching queue."""

    def __init__(self, folder: str | Path, model_name: str | None = None, max_batch: int = 8,
                 batch_wait_ms: float = 5.0, device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise FileNotFoundError(f"{self.folder} holds no model (config.json): pass a pulled store version or "
                                    "the run's export folder")
        if not any(self.folder.glob("*.safetensors")):
            raise FileNotFoundError(f"{self.folder} holds no safetensors weights: serve-student loads safetensors "
                                    "only (a pickled pytorch_model.bin can run code when loaded); export the model "
                                    "with distill export, or save it with save_pretrained(safe_serialization=True)")
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.tokenizer.padding_side = "left"
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = AutoModelForCausalLM.from_pretrained(self.folder, dtype=torch.float32,
                                                          use_safetensors=True).to(self.device).eval()
        gen = self.folder / "generation_config.json"
        gcfg = json.loads(gen.read_text()) if gen.is_file() else {}
        self.max_new_tokens = int(gcfg.get("max_new_tokens") or 256)
        eos = gcfg.get("eos_token_id", self.tokenizer.eos_token_id)
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None} or {self.tokenizer.eos_token_id}
        self.name = model_name or _manifest_name(self.folder) or self.folder.resolve().name
        self.max_batch, self.wait_s = max(1, max_batch), batch_wait_ms / 1000
        self.queue: asyncio.Queue[Pending] | None = None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distill-generate")
        self.stats = {"requests": 0, "batches": 0, "max_batch": 0}
        self._worker: asyncio.Task | None = None

    # -- generation ---------------------------------------------------------------------------------------------
    def generate(self, batch: list[Pending]) -> list[dict[str, Any]]:
        """Greedy answers for a batch, each cut at its own limit, with per-token logprobs and top alternatives."""
        import torch

        tok = self.tokenizer
        texts = [tok.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True) for p in batch]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        with torch.no_grad():
            gen = self.model.generate(**enc, max_new_tokens=max(p.max_tokens for p in batch), do_sample=False,
                                      output_scores=True, return_dict_in_generate=True,
                                      pad_token_id=tok.pad_token_id, eos_token_id=sorted(self.eos))
        new = gen.sequences[:, enc["input_ids"].shape[1]:]
        k = max(p.top_logprobs for p in batch)
        out = []
        for j, p in enumerate(batch):
            ids, content, finish = [], [], "length"
            for i, t in enumerate(new[j].tolist()[: p.max_tokens]):
                ids.append(t)
                if p.top_logprobs >= 0:
                    lp = torch.log_softmax(gen.scores[i][j].float(), dim=-1)
                    content.append(self._token_logprob(t, lp, min(k, p.top_logprobs)))
                if t in self.eos:
                    finish = "stop"
                    break
            text = tok.decode(ids, skip_special_tokens=True).lstrip()
            if p.stop and any(x in text for x in p.stop):
                text, ids, content, finish = self._cut_at_stop(ids, content, p.stop)
            out.append({"text": text.strip(), "finish_reason": finish,
                        "prompt_tokens": int(enc["attention_mask"][j].sum()), "completion_tokens": len(ids),
                        "logprobs": content if p.top_logprobs >= 0 else None})
        return out

    def _cut_at_stop(self, ids: list[int], content: list[dict[str, Any]], stop: tuple[str, ...]
                     ) -> tuple[str, list[int], list[dict[str, Any]], str]:
        """The answer up to the first stop sequence (left out, as OpenAI does), the tokens up to the one that
        completed it (found by bisection: whether a prefix holds a stop only changes once as it grows), and
        finish_reason "stop". Searched in the answer as it is sent, leading whitespace stripped."""
        def cut(n: int) -> tuple[str, int]:
            text = self.tokenizer.decode(ids[:n], skip_special_tokens=True).lstrip()
            return text, min((text.find(x) for x in stop if x in text), default=-1)

        lo, hi = 1, len(ids)  # the whole answer holds one (the caller checked): find the shortest prefix that does
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if cut(mid)[1] >= 0 else (mid + 1, hi)
        text, at = cut(lo)
        return text[:at], ids[:lo], content[:lo], "stop"

    def _token_logprob(self, token_id: int, lp, k: int) -> dict[str, Any]:
        import math

        import torch

        def entry(t: int, v: float) -> dict[str, Any]:
            text = self.tokenizer.decode([t])
            return {"token": text, "logprob": v if math.isfinite(v) else -9999.0, "bytes": list(text.encode())}

        item = entry(token_id, float(lp[token_id]))
        top = torch.topk(lp, k) if k else None
        item["top_logprobs"] = [] if top is None else [entry(int(t), float(v))
                                                       for v, t in zip(top.values, top.indices, strict=True)]
        return item

    # -- batching -----------------------------------------------------------------------------------------------
    async def _batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get_nowait() if loop.time() >= deadline else
                                 await asyncio.wait_for(self.queue.get(), deadline - loop.time()))
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
            self.stats["batches"] += 1
            self.stats["max_batch"] = max(self.stats["max_batch"], len(batch))
            try:
                results = await loop.run_in_executor(self.pool, self.generate, batch)
            except Exception as err:  # noqa: BLE001 - every waiting request gets the error, the server stays up
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(err)
                continue
            for p, r in zip(batch, results, strict=True):
                if not p.future.done():
                    p.future.set_result(r)

    # -- HTTP ---------------------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, _app) -> None:
        self.queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._batches())

    async def _stop(self, _app) -> None:
        if self._worker:
            self._worker.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def models(self, _request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.name, "object": "model",
                                                              "owned_by": "distill"}]})

    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "model": self.name, **self.stats})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the request body is not valid JSON")
        pending = parse_request(body, self.max_new_tokens)
        if isinstance(pending, str):
            return _error(400, pending)
        pending.future = asyncio.get_running_loop().create_future()
        self.stats["requests"] += 1
        await self.queue.put(pending)
        try:
            r = await pending.future
        except Exception as err:  # noqa: BLE001
            return web.json_response({"error": {"message": f"generation failed: {err}", "type": "server_error"}},
                                     status=500)
        choice = {"index": 0, "message": {"role": "assistant", "content": r["text"]},
                  "logprobs": None if r["logprobs"] is None else {"content": r["logprobs"], "refusal": None},
                  "finish_reason": r["finish_reason"]}
        resp = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name, "choices": [choice],
                "usage": {"prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"],
                          "total_tokens": r["prompt_tokens"] + r["completion_tokens"]}}
        if body.get("stream"):  # the whole answer as chunk events (what serve-router sends for a checked answer)
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return await send_events(request, completion_chunks(resp, usage), {})
        return web.json_response(resp)


def _manifest_name(folder: Path) -> str | None:
    try:
        return json.loads((folder / "manifest.json").read_text()).get("name")
    except (OSError, ValueError, AttributeError):
        return None


def serve(folder: str | Path, host: str = "127.0.0.1", port: int = 8000, *, model_name: str | None = None,
          max_batch: int = 8, batch_wait_ms: float = 5.0, print_fn=print) -> None:
    """Load the student and serve until interrupted."""
    from pipeline.hf import quiet_hf

    quiet_hf()
    server = StudentServer(folder, model_name, max_batch, batch_wait_ms)
    print_fn(f"distill serve-student: {server.name} from {server.folder} on {server.device}; greedy, "
             f"max_new_tokens {server.max_new_tokens}, batches of up to {server.max_batch}; "
             f"listening on http://{host}:{port}/v1")
    web.run_app(server.app(), host=host, port=port, print=None)
