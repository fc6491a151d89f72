"""httpx's client over aiohttp's connections: the speed of aiohttp under httpx's interface.

httpx 0.28's own connection pool (httpcore) does not keep up with many requests in
flight: against the stand-in behind `deploy.py --serve-local` on this machine, 64
concurrent requests to a backend that takes 50 ms made 135 requests/s through httpx
and 1,070 through aiohttp, and at 128 httpx began to fail with ReadError (the known
httpx issue #3215). `checks.Endpoint` (its retries through cold starts, its 303
redirects, its deadline) is written against httpx; given this transport, the same
Endpoint sends its requests over an aiohttp session instead. `--batch` uses it.

The mapping follows what httpx's own transport raises (httpx/_transports/default.py),
because Endpoint retries on exactly those: a refused or failed connect is ConnectError,
a connect timeout ConnectTimeout, a read timeout ReadTimeout, a connection dropped
mid-answer ReadError. Redirects are left to httpx (aiohttp must not follow them itself).
"""

from __future__ import annotations

import aiohttp
import httpx


def _mapped(exc: BaseException, request: httpx.Request) -> httpx.TransportError:
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(text, request=request)
    if isinstance(exc, TimeoutError):  # aiohttp's SocketTimeoutError is one too
        return httpx.ReadTimeout(text, request=request)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(text, request=request)
    return httpx.ReadError(text, request=request)


class _Body(httpx.AsyncByteStream):
    """The answer's body as aiohttp receives it; closing it early drops the connection."""

    def __init__(self, resp: aiohttp.ClientResponse, request: httpx.Request):
        self.resp, self.request = resp, request

    async def __aiter__(self):
        try:
            async for chunk in self.resp.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _mapped(exc, self.request) from exc

    async def aclose(self) -> None:
        # Released when read to the end (the connection is reused), closed otherwise.
        self.resp.release() if self.resp.content.is_eof() else self.resp.close()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """At most `limit` connections, kept alive between requests (0: no limit)."""

    def __init__(self, limit: int = 100):
        self.limit = limit
        self.session: aiohttp.ClientSession | None = None

    def client_session(self) -> aiohttp.ClientSession:
        """The aiohttp session under this transport; plain aiohttp requests may share its
        connections (and its limit). Created on first use, inside the running event loop."""
        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.limit, keepalive_timeout=60),
                timeout=aiohttp.ClientTimeout(total=None), cookie_jar=aiohttp.DummyCookieJar(),
                # httpx already set the headers it wants; aiohttp must add none of its own.
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
                auto_decompress=False)  # httpx decodes Content-Encoding itself
        return self.session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeouts.get("connect"),
                                        sock_read=timeouts.get("read"))
        body = await request.aread()
        try:
            resp = await self.client_session().request(
                request.method, str(request.url), data=body or None,
                headers=request.headers.multi_items(), allow_redirects=False, timeout=timeout)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _mapped(exc, request) from exc
        return httpx.Response(resp.status, headers=resp.raw_headers, stream=_Body(resp, request),
                              request=request, extensions={"http_version": b"HTTP/1.1"})

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None
