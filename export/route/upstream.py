"""serve-router's calls to its upstreams (student versions, teacher): one aiohttp pool per proxy process, sized by
the open-file limit, and a wait instead of a failure when the process is out of file descriptors.

Each client connection holds a descriptor and each upstream call in flight one more. aiohttp's default pool (100
connections) made the 101st concurrent request wait inside the proxy, so the pool follows the clients up to an
eighth of the open-file limit (idle pooled connections stay open per host beside those in use). A connect that
fails for want of a descriptor (EMFILE, ENFILE) waits until another call to the same URL ends — its connection is
then reusable — and tries again, within the timeout in all.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import functools
import math
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import (
    ClientConnectorError,
    ClientPayloadError,
    ClientResponse,
    ClientSession,
    ClientTimeout,
    ConnectionTimeoutError,
    ServerDisconnectedError,
    TCPConnector,
)
from yarl import URL

from export.route.jsonio import dumps

OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)


def upstream_limit(asked: int | None) -> int:
    """The upstream connection limit: as asked, or an eighth of this process's open-file limit. aiohttp counts
    only the connections in use (idle ones stay open for reuse, per upstream host), so the rest is left for the
    clients, idle connections and the logs. ``serve`` raises the soft limit to the hard one first; a RouterProxy
    run in-process gets the soft limit as it is."""
    if asked is not None:
        return asked
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 0 if soft == resource.RLIM_INFINITY else max(16, soft // 8)


def out_of_descriptors(err: BaseException) -> bool:
    """A connect that failed because this process (EMFILE) or the system (ENFILE) has no file descriptor left."""
    return getattr(getattr(err, "os_error", None), "errno", None) in OUT_OF_DESCRIPTORS


@functools.lru_cache(maxsize=256)
def has_user(url: str) -> bool:
    """Whether ``url`` holds a user (and password), which aiohttp sends as Basic auth."""
    try:
        return URL(url).user is not None
    except (ValueError, TypeError):
        return False


@functools.lru_cache(maxsize=256)
def url_secrets(url: str) -> tuple[str, ...]:
    """What of ``url`` an upstream could repeat back: its password (as written and decoded) and the Basic auth
    credentials aiohttp sends for its user and password (base64)."""
    try:
        u = URL(url)
    except (ValueError, TypeError):
        return ()
    if u.user is None:
        return ()
    basic = base64.b64encode(f"{u.user}:{u.password or ''}".encode("latin-1", "replace")).decode()
    return tuple(x for x in {u.password, u.raw_password, basic} if x)


def shown(url: str) -> str:
    """``url`` as messages, logs and /health show it: without a user and password (``http://user:pass@host``,
    which aiohttp sends as Basic auth) or a query (it may carry a key)."""
    try:
        u = URL(url)
        return str(u.with_user(None).with_query(None).with_fragment(None)) if u.absolute else url.split("?")[0]
    except (ValueError, TypeError):
        return "(an unreadable URL)"


def upstream_failure(url: str, err: BaseException, timeout_s: float) -> str | None:
    """Why an upstream call failed, for the client's 502 and the log; None for a plain connection error."""
    url = shown(url)
    if out_of_descriptors(err):
        return (f"cannot reach {url}: serve-router is out of file descriptors (more connections at once than its "
                f"open-file limit allows, for {timeout_s:g} s: raise it, ulimit -n or systemd LimitNOFILE=)")
    if isinstance(err, asyncio.TimeoutError):
        return (f"no answer from {url} within {timeout_s:g} s (the proxy's --timeout, which includes any wait for "
                "a free upstream connection: --upstream-connections)")
    if isinstance(err, ClientPayloadError):
        return f"{url} answered, but its answer broke off: {type(err).__name__}"
    if isinstance(err, ServerDisconnectedError):
        return f"{url} closed the connection without an answer: {type(err).__name__}"
    return None


def failure_code(err: BaseException) -> str:
    """The ``error.code`` of a call that got no answer: ``upstream_unreachable`` when no connection could be made
    (down, a wrong URL, no descriptor left), else ``upstream_failed`` (a timeout, an answer that broke off). An
    ``upstream_`` code marks a status serve-router made up, not one the upstream answered with."""
    if isinstance(err, (ClientConnectorError, ConnectionTimeoutError)) or out_of_descriptors(err):
        return "upstream_unreachable"  # no connection made: refused, a wrong host, black-holed, no descriptor
    return "upstream_failed"


def failure_status(err: BaseException) -> int:
    """The client's status for an upstream that failed: 504 when it did not answer in time, else 502."""
    return 504 if isinstance(err, asyncio.TimeoutError) else 502


class Upstreams:
    """The pool of one proxy process. ``start``/``close`` on the app's start-up and cleanup; ``call`` per request."""

    def __init__(self, connections: int | None, timeout_s: float):
        self.connections, self.timeout_s = connections, timeout_s
        self.session: ClientSession | None = None
        self.descriptor_waits = 0  # calls that had to wait for a file descriptor (/health)
        self._ended = 0  # calls ended so far
        self._waiting: dict[str, deque[asyncio.Future]] = {}  # per URL: calls waiting for a descriptor

    async def start(self) -> None:
        self.session = ClientSession(connector=TCPConnector(limit=upstream_limit(self.connections)),
                                     timeout=ClientTimeout(total=self.timeout_s, ceil_threshold=math.inf),
                                     json_serialize=lambda obj: dumps(obj).decode())

    async def close(self) -> None:
        if self.session:
            await self.session.close()

    def stream_timeout(self) -> ClientTimeout:
        return self._timeout(True)

    def _timeout(self, stream: bool, left: float | None = None) -> ClientTimeout:
        """A plain call must end within the timeout; a stream must start within it and then send its next chunk
        within it (a long answer streamed steadily is not cut)."""
        left = self.timeout_s if left is None else max(0.001, left)
        # ceil_threshold: aiohttp rounds a timeout of 5 s or more up to the next whole second (--timeout 5 took 6)
        if stream:
            return ClientTimeout(total=None, connect=left, sock_read=self.timeout_s, ceil_threshold=math.inf)
        return ClientTimeout(total=left, ceil_threshold=math.inf)

    @asynccontextmanager
    async def call(self, url: str, body: dict[str, Any], headers: dict[str, str],
                   stream: bool = False) -> AsyncIterator[ClientResponse]:
        """POST ``body`` to ``url``; the response is released when the block ends, and a call waiting for a
        descriptor to the same URL is woken. ``stream``: the timeout bounds each wait for data, not the call."""
        try:
            async with await self._post(url, body, headers, stream) as resp:
                yield resp
        finally:
            self._ended += 1
            self._wake(url)

    async def _post(self, url: str, body: dict[str, Any], headers: dict[str, str], stream: bool) -> ClientResponse:
        """POST; out of file descriptors, wait until a call to the same URL ends (one waiter woken per call ended,
        a retry at least every second) and try again, within the timeout in all."""
        loop = asyncio.get_running_loop()
        deadline, seen = loop.time() + self.timeout_s, self._ended
        try:
            return await self.session.post(url, json=body, headers=headers, timeout=self._timeout(stream))
        except ClientConnectorError as err:
            if not out_of_descriptors(err):
                raise
            last = err
        self.descriptor_waits += 1
        queue = self._waiting.setdefault(url, deque())
        while (left := deadline - loop.time()) > 0:
            if self._ended == seen:  # no call has ended since the last try: wait for one (or a second)
                while queue and queue[0].done():
                    queue.popleft()  # left by waiters that timed out or were cancelled
                woken = loop.create_future()
                queue.append(woken)
                try:
                    await asyncio.wait((woken,), timeout=min(left, 1.0))
                finally:
                    woken.cancel()  # a no-op once woken; else a later wake-up skips it
            seen = self._ended
            try:
                return await self.session.post(url, json=body, headers=headers,
                                               timeout=self._timeout(stream, deadline - loop.time()))
            except ClientConnectorError as err:
                if not out_of_descriptors(err):
                    raise
                last = err
        raise last

    def _wake(self, url: str) -> None:
        """Wake one call to ``url`` waiting for a descriptor (synchronous: safe in a ``finally``)."""
        queue = self._waiting.get(url) or ()
        while queue:
            woken = queue.popleft()
            if not woken.done():
                woken.set_result(None)
                return
