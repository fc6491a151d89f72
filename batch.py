"""Batch runs (`deploy.py --batch KEY --input FILE`): a file of requests through one deployed
app, resumable, with tokens and an estimated cost.

The input is OpenAI's Batch API input, which vLLM's `run-batch` reads too: one JSON object
per line, `{"custom_id", "method": "POST", "url": "/v1/chat/completions" or
"/v1/completions", "body": {...}}`. The output files follow OpenAI's batch output
(`BatchRequestOutput` in OpenAI's API reference; vLLM writes the same class in
vllm/entrypoints/launchers/run_batch.py) field by field, one line per request:

    output  {"id": "batch_req_…", "custom_id", "response": {"status_code", "request_id",
            "body"}, "error": null}       every request that got an answer, 2xx or not
    errors  {"id": "batch_req_…", "custom_id", "response": null,
            "error": {"code", "message"}}  every request that got no answer it could use

OpenAI's reference gives `response.status_code` as "the HTTP status code of the response"
and `error` as being "for requests that failed with a non-HTTP error": so a 4xx (or a 500)
is an answer and goes to the output with its body; the error file holds the requests that
got none (the endpoint answered nothing before the deadline, or something that is not JSON).
vLLM's run-batch differs here (run_batch.py run_request): it writes an error answer's status
in `response` but its body in `error` (`response.body` null), ids as `vllm-…`, in input order.

The order of work, and why:
- The whole file is checked before anything is sent (one streamed pass), so a typo on line
  90,000 costs nothing. Memory: one byte per line (its model) and a table of custom_ids,
  16 bytes a slot (`IdTable`), never the requests themselves.
- Resume: the output is read back; every custom_id with a 2xx answer is skipped, every
  other answer is dropped (rewritten atomically) and its request sent again, so the
  output never holds a custom_id twice.
- One reader per model streams the file and shares `--concurrency` slots with the others,
  so a file sorted by model still keeps every model's pool busy at once.
- Each model's requests go through `checks.Endpoint` (retried through cold starts and
  Modal's 303s), over aiohttp (`aiohttp_transport`: httpx's own pool falls far behind at
  64 requests in flight). The `--deadline` is how long a model may go without answering
  anything: every answer moves it on, so a long run is not cut short by its own length.
- Every answer is written and flushed as it arrives: a crash loses nothing answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import secrets
import shlex
import signal
import sys
import time
import zlib
from array import array
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import config
import plan

URLS = ("/v1/chat/completions", "/v1/completions")  # what the gateway serves
MAX_PROBLEMS = 50  # lines of a broken file shown; the rest are counted
BLANK, ANSWERED = 255, 254  # in Checked.line_model: no request / already answered
POLL_INTERVAL = 30.0  # seconds between counts of the running replicas (cost estimate)
GRACE = 15.0  # seconds that requests in flight may still finish after Ctrl-C
INTERRUPTED = 130  # exit code after Ctrl-C, as a shell reports SIGINT


# ## A compact set of custom_ids


class IdTable:
    """Every custom_id of the file and the line it is on, in 16 bytes a slot (slots at most
    70 % full: about 32 MB for 1M ids; a Python set of the strings takes about 95 MB).

    An id is kept as its 64-bit hash (Python's, stable within one process) and its CRC-32:
    96 bits, so two different ids among a million look alike with a probability near 1e-17.
    Open addressing with linear probing, in flat arrays.
    """

    def __init__(self, expected: int = 0):
        size = 1024
        while size * 7 < expected * 10:
            size *= 2
        self._allocate(size)

    def _allocate(self, size: int) -> None:
        self.size, self.count = size, 0
        self.keys = array("q", bytes(8 * size))  # 0: empty slot
        self.tags = array("I", bytes(4 * size))
        self.lines = array("I", bytes(4 * size))

    @staticmethod
    def _fingerprint(text: str) -> tuple[int, int]:
        return hash(text) or 1, zlib.crc32(text.encode("utf-8", "surrogatepass"))

    def _slot(self, key: int, tag: int) -> int:
        keys, tags, mask = self.keys, self.tags, self.size - 1
        i = key & mask
        while keys[i] and not (keys[i] == key and tags[i] == tag):
            i = (i + 1) & mask
        return i

    def add(self, text: str, line: int) -> int:
        """0 if `text` is new (it is kept with its line), else the line it was first seen on."""
        key, tag = self._fingerprint(text)
        i = self._slot(key, tag)
        if self.keys[i]:
            return self.lines[i]
        self.keys[i], self.tags[i], self.lines[i] = key, tag, line
        self.count += 1
        if self.count * 10 > self.size * 7:
            self._grow()
        return 0

    def line_of(self, text: str) -> int:
        """The line `text` is on, or 0 if it is not in the file."""
        i = self._slot(*self._fingerprint(text))
        return self.lines[i] if self.keys[i] else 0

    def _grow(self) -> None:
        old, count = (self.keys, self.tags, self.lines), self.count
        self._allocate(self.size * 2)
        for key, tag, line in zip(*old, strict=True):
            if key:
                i = self._slot(key, tag)
                self.keys[i], self.tags[i], self.lines[i] = key, tag, line
        self.count = count

    def __len__(self) -> int:
        return self.count


# ## Checking the whole file before anything is sent


class FileProblems(config.UsageError):
    """One line per problem, each with its line number (exit 2, nothing sent)."""


@dataclass
class Checked:
    """A checked input file: which model each line goes to, and where each model starts."""

    path: Path
    models: list[config.Model]  # the app's models; their index is the byte in line_model
    line_model: bytearray  # per line of the file: its model's index, BLANK or ANSWERED
    starts: dict[int, tuple[int, int]]  # model index -> (line number, byte offset) of its first
    counts: dict[str, Counter]  # model key -> url -> requests
    ids: IdTable

    @property
    def requests(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())

    def to_send(self, index: int) -> int:
        return self.line_model.count(bytes([index]))


def count_lines(path: Path) -> int:
    lines = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            lines += chunk.count(b"\n")
    return lines + 1


def model_names(models: list[config.Model]) -> dict[str, int]:
    """Every name the gateway takes for a model (any case) -> the model's index: served name,
    Hugging Face id, short key, and its LoRA adapters as `name` or `<any base name>:name`."""
    names = {}
    for index, model in enumerate(models):
        for alias in model.aliases:
            names[alias.lower()] = index
            for adapter in model.adapters:
                names[f"{alias}:{adapter.name}".lower()] = index
        for adapter in model.adapters:
            names[adapter.name.lower()] = index
    return names


def _line_problems(item, default: int | None, names: dict[str, int], served: str,
                   app_name: str) -> tuple[int | None, list[str]]:
    """The model index a parsed line goes to (None if it cannot go anywhere), and what is
    wrong with it."""
    if not isinstance(item, dict):
        return None, ["not a JSON object"]
    problems = []
    cid = item.get("custom_id")
    if not isinstance(cid, str) or not cid:
        problems.append("custom_id is missing" if cid is None else
                        "custom_id must be a non-empty string")
    method = item.get("method")
    if method != "POST":
        problems.append(f"method {json.dumps(method)} is not served; use \"POST\"")
    url = item.get("url")
    if url not in URLS:
        problems.append(f"url {json.dumps(url)} is not served; use {' or '.join(URLS)}")
    body = item.get("body")
    if not isinstance(body, dict):
        problems.append("body is missing" if body is None else "body must be a JSON object")
        return None, problems
    if body.get("stream"):
        problems.append("body.stream is set; a batch takes whole answers (remove it)")
    name = body.get("model")
    if name is None:
        if default is None:
            problems.append(f"body.model is missing; name the model or give --test-model "
                            f"({app_name} serves {served})")
        return default, problems
    index = names.get(name.strip().lower()) if isinstance(name, str) else None
    if index is None:
        problems.append(f"body.model {json.dumps(name)} is not served by {app_name}; "
                        f"it serves {served}")
    return index, problems


def check_file(path: Path, models: list[config.Model], default: config.Model | None,
               app_name: str) -> Checked:
    """Every line checked, streamed; FileProblems lists what is wrong, line by line."""
    try:
        expected = count_lines(path)
    except OSError as exc:
        raise config.UsageError(f"--input {path}: cannot read it: {exc.strerror or exc}") \
            from None
    names, served = model_names(models), ", ".join(m.key for m in models)
    default_index = None if default is None else models.index(default)
    ids = IdTable(expected)
    line_model = bytearray()
    starts: dict[int, tuple[int, int]] = {}
    counts: dict[str, Counter] = {}
    problems: list[str] = []
    more = 0
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            at, offset = offset, offset + len(raw)
            if not raw.strip():
                line_model.append(BLANK)
                continue
            try:
                item = json.loads(raw)
            except ValueError as exc:
                index, found = None, [f"not valid JSON ({getattr(exc, 'msg', 'not UTF-8')})"]
            else:
                index, found = _line_problems(item, default_index, names, served, app_name)
                cid = item.get("custom_id") if isinstance(item, dict) else None
                if isinstance(cid, str) and cid:
                    first = ids.add(cid, number)
                    if first:
                        found.append(f"custom_id {json.dumps(cid)} is a duplicate "
                                     f"(first on line {first})")
            if found:
                for text in found:
                    if len(problems) < MAX_PROBLEMS:
                        problems.append(f"{path}:{number}: {text}")
                    else:
                        more += 1
                line_model.append(BLANK)
                continue
            line_model.append(index)
            starts.setdefault(index, (number, at))
            counts.setdefault(models[index].key, Counter())[item["url"]] += 1
    if more:
        problems.append(f"{path}: {more} more problem(s) not shown")
    if not problems and not counts:
        problems.append(f"{path}: no requests (the file has no non-blank line)")
    if problems:
        raise FileProblems("\n".join(problems))
    return Checked(path, models, line_model, starts, counts, ids)


# ## The output and error files, and resuming


def output_paths(input_path: Path, output: Path | None) -> tuple[Path, Path]:
    """The output (default: beside the input, named after it) and the error file beside it."""
    if output is not None and str(output) == "-":
        raise config.UsageError("--batch writes its answers to a file (a resumed run reads it "
                                "back): give -o FILE, not -")
    if output is None:
        out = input_path.with_name(f"{input_path.stem}.output.jsonl")
        errors = input_path.with_name(f"{input_path.stem}.errors.jsonl")
    else:
        out = output
        errors = out.with_name(f"{out.stem}.errors{out.suffix or '.jsonl'}")
    given = input_path.resolve()
    for path, what in ((out, "output"), (errors, "error file")):
        if path.resolve() == given:
            raise config.UsageError(f"the {what} {path} would overwrite the input; "
                                    "choose another -o FILE")
    return out, errors


@dataclass
class Previous:
    """What an earlier run left in the output file."""

    answered: int = 0  # requests of the input with a 2xx answer there: not sent again
    stale: int = 0  # 2xx answers for custom_ids not in the input (kept as they are)
    dropped: int = 0  # other answers, broken lines, second answers: removed, sent again
    keep: bytearray | None = None  # per output line: keep it? (None: keep them all)


def _status(item) -> int | None:
    response = item.get("response") if isinstance(item, dict) else None
    status = response.get("status_code") if isinstance(response, dict) else None
    return status if type(status) is int else None


def scan_output(path: Path, checked: Checked) -> Previous:
    """Marks every request with a 2xx answer in the output as ANSWERED in `checked`; says
    which lines a resumed run keeps (the first 2xx answer of each custom_id)."""
    found = Previous()
    if not path.exists():
        return found
    keep = bytearray()
    tail_ok = True
    try:
        with open(path, "rb") as f:
            for raw in f:
                tail_ok = raw.endswith(b"\n")
                try:
                    item = json.loads(raw)
                except ValueError:
                    item = None
                status = _status(item)
                cid = item.get("custom_id") if status is not None else None
                kept = False
                if isinstance(cid, str) and 200 <= status < 300:
                    line = checked.ids.line_of(cid)
                    if not line:
                        found.stale += 1
                        kept = True
                    elif checked.line_model[line - 1] != ANSWERED:
                        checked.line_model[line - 1] = ANSWERED
                        found.answered += 1
                        kept = True
                keep.append(kept)
                found.dropped += not kept
    except OSError as exc:
        raise config.UsageError(f"-o {path}: cannot read it: {exc.strerror or exc}") from None
    if found.dropped or not tail_ok:  # a line cut off by a crash would glue onto the next
        found.keep = keep
    return found


def compact(path: Path, keep: bytearray) -> None:
    """Rewrite the output with only the kept lines: to a temporary file, synced, then
    renamed over it, so a crash leaves either the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        for kept, raw in zip(keep, src, strict=False):
            if kept:
                dst.write(raw if raw.endswith(b"\n") else raw + b"\n")
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, path)


def output_line(custom_id: str, status: int, request_id: str | None, raw: bytes,
                body: dict) -> str:
    """One answer in OpenAI's batch output shape; the body as the endpoint sent it (already
    one line of JSON from vLLM and the gateway; re-encoded if it spans lines)."""
    text = None
    if b"\n" not in raw and b"\r" not in raw:
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            text = None
    if text is None:
        text = json.dumps(body, ensure_ascii=False)
    request_id = request_id or f"req_{secrets.token_hex(16)}"
    return (f'{{"id": "batch_req_{secrets.token_hex(16)}", "custom_id": {json.dumps(custom_id)}, '
            f'"response": {{"status_code": {status}, "request_id": {json.dumps(request_id)}, '
            f'"body": {text}}}, "error": null}}\n')


def error_line(custom_id: str, code: str, message: str) -> str:
    return json.dumps({"id": f"batch_req_{secrets.token_hex(16)}", "custom_id": custom_id,
                       "response": None, "error": {"code": code, "message": message}}) + "\n"


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


# ## Running


@dataclass
class ModelRun:
    """One model's part of the run, counted as it goes."""

    model: config.Model
    to_send: int
    sent: int = 0
    ok: int = 0
    failed: int = 0
    in_flight: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_sent: float | None = None
    last_done: float | None = None
    gave_up: str = ""  # why its remaining requests were not sent


@dataclass
class Job:
    """Everything a run needs, decided before it starts."""

    target: object  # checks.Target: the app, its URL and key, the deadline
    checked: Checked
    output: Path
    errors: Path
    concurrency: int
    resume: str  # the command that resumes this run
    poll: Callable[[], dict[str, int | None]] | None  # running replicas per model; None: no cost
    price: dict[str, float]  # model key -> $/hour per replica


@dataclass
class Samples:
    """Running replicas counted during the run: (monotonic time, {model: count})."""

    points: list[tuple[float, dict[str, int | None]]] = field(default_factory=list)
    failure: str = ""


class Lane:
    """How one model's requests are sent: a plain aiohttp request first, and anything but an
    answer that Endpoint would take at once (a 502, 503 or 504, a redirect, a failed
    connection, a timeout) through `checks.Endpoint`, which retries it through the cold
    start with its backoff and deadline and follows Modal's 303s. Both share one aiohttp
    connection pool. The first try costs about a third of the CPU of the same request
    through httpx, which is what keeps the runner off the critical path
    (benchmarks/batch_throughput.py)."""

    def __init__(self, target, connections: int):
        import aiohttp

        import aiohttp_transport
        import checks

        self.transport = aiohttp_transport.AiohttpTransport(connections)
        self.endpoint = target.endpoint(transport=self.transport)
        self.headers = {**self.endpoint.headers(), "Content-Type": "application/json"}
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=checks.CONNECT_TIMEOUT,
                                             sock_read=checks.READ_TIMEOUT)
        self.retry = checks.RETRY_STATUSES
        self.errors = (aiohttp.ClientError, TimeoutError)

    async def send(self, url: str, body: dict) -> tuple[int, str | None, bytes]:
        """(status, request id, body) of the answer; NotReady if none came before the deadline."""
        session = self.transport.client_session()
        try:
            async with session.post(self.endpoint.base_url + url, data=json.dumps(body).encode(),
                                    headers=self.headers, allow_redirects=False,
                                    timeout=self.timeout) as resp:
                raw = await resp.read()
                if resp.status not in self.retry and not 300 <= resp.status < 400:
                    return resp.status, resp.headers.get("x-request-id"), raw
        except self.errors:
            pass  # Endpoint tries it again, with its backoff
        answer = await self.endpoint.send("POST", url, body)
        return answer.status, answer.resp.headers.get("x-request-id"), answer.resp.content


class Slots:
    """`--concurrency` shared by the models: each model still sending may hold an equal share
    (at least one), and a model done sending leaves its share to the others; never more than
    `total` in flight. A shared pool alone would let a slow model hold nearly every slot (its
    requests last longer) while a fast model's pool sat idle."""

    def __init__(self, total: int, models: list[int]):
        self.total, self.used = total, 0
        self.held = dict.fromkeys(models, 0)
        self.limits: dict[int, int] = {}
        self.waiting: dict[int, asyncio.Future] = {}  # one reader per model waits at most
        self._share(models)

    def _share(self, models: list[int]) -> None:
        base, extra = divmod(self.total, max(1, len(models)))
        self.limits = {m: max(1, base + (n < extra)) for n, m in enumerate(sorted(models))}

    async def acquire(self, model: int) -> None:
        while self.used >= self.total or self.held[model] >= self.limits.get(model, 1):
            self.waiting[model] = asyncio.get_running_loop().create_future()
            await self.waiting[model]
        self.used += 1
        self.held[model] += 1

    def release(self, model: int) -> None:
        self.used -= 1
        self.held[model] -= 1
        self._wake()

    def done(self, model: int) -> None:
        """The model sends nothing more: its share goes to the models still sending."""
        self._share([m for m in self.limits if m != model])
        self._wake()

    def _wake(self) -> None:
        for future in self.waiting.values():
            if not future.done():
                future.set_result(None)
        self.waiting.clear()


class Run:
    def __init__(self, job: Job, runs: dict[int, ModelRun], out, errors):
        self.job, self.runs, self.out, self.errors = job, runs, out, errors
        self.slots = Slots(job.concurrency, list(runs))
        self.stopping = asyncio.Event()  # Ctrl-C, or the key was rejected: send nothing more
        self.hurry = asyncio.Event()  # a second Ctrl-C: do not wait for requests in flight
        self.idle = asyncio.Event()  # every request sent and answered
        self.inflight: set[asyncio.Task] = set()
        self.fed = False
        self.interrupted = False
        self.rejected = ""  # why the endpoint refused our key
        self.dropped = 0  # requests in flight abandoned after the grace period
        self.unanswered = 0  # lines written to the error file
        self.failure: BaseException | None = None  # e.g. the disk filled up: stop, then raise
        self.samples = Samples()
        self.started = self.ended = 0.0

    # Ctrl-C: the first stops sending, the second stops waiting
    def on_sigint(self) -> None:
        if self.stopping.is_set():
            self.hurry.set()
        self.interrupted = True
        self.stopping.set()

    def reject(self, reason: str) -> None:
        self.rejected = self.rejected or reason
        self.stopping.set()

    def _task_done(self, task: asyncio.Task) -> None:
        self.inflight.discard(task)
        if not task.cancelled() and task.exception() is not None and self.failure is None:
            self.failure = task.exception()
            self.stopping.set()
        if self.fed and not self.inflight:
            self.idle.set()

    async def feed(self, index: int, lane: Lane) -> None:
        """Send one model's requests, in file order, each as soon as a slot is free."""
        run, line_model = self.runs[index], self.job.checked.line_model
        first, offset = self.job.checked.starts[index]
        last = line_model.rfind(bytes([index])) + 1
        try:
            # Read in the event loop: a line is a page-cache read, far cheaper than a thread hop.
            with open(self.job.checked.path, "rb") as f:  # noqa: ASYNC230
                f.seek(offset)
                for number, raw in enumerate(f, first):
                    if number > last:
                        break
                    if line_model[number - 1] != index:
                        if number % 4096 == 0:
                            await asyncio.sleep(0)  # a long skip must not stall other models
                        continue
                    await self.slots.acquire(index)
                    if self.stopping.is_set() or run.gave_up:
                        self.slots.release(index)
                        return
                    item = json.loads(raw)
                    body = item["body"]
                    if body.get("model") is None:
                        body["model"] = run.model.name
                    task = asyncio.create_task(self.send(index, lane, item["custom_id"],
                                                         item["url"], body))
                    self.inflight.add(task)
                    task.add_done_callback(self._task_done)
        finally:
            self.slots.done(index)

    async def send(self, index: int, lane: Lane, custom_id: str, url: str, body: dict) -> None:
        import httpx

        import checks

        run = self.runs[index]
        if run.first_sent is None:
            run.first_sent = time.monotonic()
        run.sent += 1
        run.in_flight += 1
        try:
            status, request_id, raw = await lane.send(url, body)
        except checks.NotReady as exc:
            return self._failed(run, custom_id, "deadline_exceeded", str(exc), give_up=True)
        except checks.Unreachable as exc:  # the endpoint, not this request: stop, keep, resume
            return self.reject(str(exc))
        except httpx.HTTPError as exc:  # e.g. too many redirects; transport errors are retried
            return self._failed(run, custom_id, "request_failed",
                                f"{type(exc).__name__}: {_clip(str(exc))}")
        finally:
            run.in_flight -= 1
            self.slots.release(index)
        now = run.last_done = time.monotonic()
        # The model answers: a later cold start (a crashed replica replaced) may take the
        # whole deadline again. It runs out only when the model answers nothing for that long.
        lane.endpoint.deadline = now + lane.endpoint.deadline_s
        if status in (401, 403):  # about our key, not this request: not written, sent again
            return self.reject(f"the endpoint rejected the API key: HTTP {status}: "
                               f"{checks.error_message(httpx.Response(status, content=raw))}")
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            return self._failed(run, custom_id, "invalid_response",
                                f"HTTP {status}: the answer is not a JSON object: "
                                f"{_clip(raw.decode('utf-8', 'replace'))!r}")
        self.out.write(output_line(custom_id, status, request_id, raw, data))
        self.out.flush()
        if 200 <= status < 300:
            run.ok += 1
            usage = data.get("usage")
            if isinstance(usage, dict):
                run.prompt_tokens += _count(usage.get("prompt_tokens"))
                run.completion_tokens += _count(usage.get("completion_tokens"))
        else:
            run.failed += 1

    def _failed(self, run: ModelRun, custom_id: str, code: str, message: str, *,
                give_up: bool = False) -> None:
        run.failed += 1
        run.last_done = time.monotonic()
        if give_up and not run.gave_up:
            run.gave_up = message
        self.errors.write(error_line(custom_id, code, message))
        self.errors.flush()
        self.unanswered += 1

    async def poll_replicas(self) -> None:
        """Count the running replicas now and every POLL_INTERVAL (cancelled at the end)."""
        while True:
            await self.sample()
            await asyncio.sleep(POLL_INTERVAL)

    async def sample(self) -> None:
        if self.job.poll is None:
            return
        try:
            counts = await asyncio.to_thread(self.job.poll)
        except Exception as exc:  # noqa: BLE001 - a failed count costs the estimate, not the run
            self.samples.failure = _clip(" ".join(str(exc).split()) or type(exc).__name__)
            return
        self.samples.points.append((time.monotonic(), counts))

    async def run(self, lanes: dict[int, Lane], on_tick=None) -> None:
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGINT, self.on_sigint)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            pass
        self.started = time.monotonic()
        poller = asyncio.create_task(self.poll_replicas())
        ticker = asyncio.create_task(_tick(on_tick)) if on_tick else None
        readers = asyncio.gather(*(self.feed(i, lanes[i]) for i in self.runs))
        stop = asyncio.create_task(self.stopping.wait())
        idle = asyncio.create_task(self.idle.wait())
        try:
            await asyncio.wait({readers, stop}, return_when=asyncio.FIRST_COMPLETED)
            if readers.done() and readers.exception() is not None:
                self.failure = readers.exception()
                self.stopping.set()  # not the endpoint's fault: stop, keep what was answered
            if not self.stopping.is_set():
                self.fed = True
                if not self.inflight:
                    self.idle.set()
                await asyncio.wait({idle, stop}, return_when=asyncio.FIRST_COMPLETED)
            if self.stopping.is_set():
                readers.cancel()
                await asyncio.gather(readers, return_exceptions=True)
                await self._drain()
        finally:
            self.ended = time.monotonic()
            for task in (poller, stop, idle, ticker):
                if task is not None:
                    task.cancel()
            try:
                loop.remove_signal_handler(signal.SIGINT)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        if self.failure is not None:
            if isinstance(self.failure, OSError):  # writing the answers: say so in one line
                raise config.UserError(
                    f"writing the answers failed: {self.failure.strerror or self.failure}; "
                    f"every answer before it is kept. Resume: {self.job.resume}") \
                    from self.failure
            raise self.failure
        if self.job.poll is not None:
            await self.sample()  # the end of the run, for the estimate
        if on_tick:
            on_tick()

    async def _drain(self) -> None:
        """Let requests in flight finish for at most GRACE seconds (less after a second
        Ctrl-C); what is still unanswered then is dropped, and sent again on resume."""
        if self.inflight:
            pending = asyncio.ensure_future(asyncio.gather(*self.inflight,
                                                           return_exceptions=True))
            hurry = asyncio.create_task(self.hurry.wait())
            await asyncio.wait({pending, hurry}, timeout=GRACE,
                               return_when=asyncio.FIRST_COMPLETED)
            hurry.cancel()
            self.dropped = len(self.inflight)
            for task in list(self.inflight):
                task.cancel()
            await asyncio.gather(pending, return_exceptions=True)


def _count(value) -> int:
    return value if type(value) is int and value > 0 else 0


async def _tick(on_tick) -> None:
    while True:
        on_tick()
        await asyncio.sleep(0.25)


def _event_loop():
    """uvloop where installed (a locked dependency, for the gateway): less CPU per request."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def execute(job: Job, runs: dict[int, ModelRun], *, on_tick=None) -> Run:
    """Send every request that needs sending; the answers go to the output and error files."""
    target = job.target
    with contextlib.ExitStack() as files:
        try:
            out = files.enter_context(open(job.output, "a", encoding="utf-8", newline="\n"))
            errors = files.enter_context(open(job.errors, "w", encoding="utf-8", newline="\n"))
        except OSError as exc:
            raise config.UserError(f"{exc.filename}: cannot write it: {exc.strerror or exc}") \
                from None
        run = Run(job, runs, out, errors)

        async def main() -> None:
            lanes = {i: Lane(target, job.concurrency) for i in runs}
            try:
                await run.run(lanes, on_tick)
            finally:
                for lane in lanes.values():
                    await lane.endpoint.__aexit__(None, None, None)

        with asyncio.Runner(loop_factory=_event_loop) as runner:
            runner.run(main())
    return run


# ## Cost: replica-seconds seen running x $/hour per replica (an estimate)


def replica_seconds(points: list[tuple[float, int | None]]) -> float | None:
    """Running replicas integrated over time, straight lines between counts (trapezoids)."""
    known = [(t, n) for t, n in points if n is not None]
    if len(known) < 2:
        return None
    return sum((n0 + n1) / 2 * (t1 - t0) for (t0, n0), (t1, n1) in itertools.pairwise(known))


def cost_estimate(model_key: str, samples: Samples, price: float | None, *, base_url: bool,
                  scaledown_s: float) -> tuple[int | None, float | None, str]:
    """(replicas seen, estimated $, how it was estimated) for one model of the run."""
    if base_url:
        return None, None, ("no estimate: a --base-url endpoint is not looked up on Modal, so "
                            "the replicas that served it are unknown")
    points = [(t, counts.get(model_key)) for t, counts in samples.points]
    seconds = replica_seconds(points)
    if seconds is None or price is None:
        why = f": {samples.failure}" if samples.failure else ""
        return None, None, f"no estimate: the running replicas could not be counted on Modal{why}"
    seen = max(n for _, n in points if n is not None)
    usd = seconds / 3600 * price
    return seen, round(usd, 6), (
        f"estimate: {seconds:.0f} replica-seconds seen running ({len(points)} counts on Modal, "
        f"every {POLL_INTERVAL:g} s, at the start and at the end) x ${price:.2f}/hour per "
        f"replica; not counted: the CPU router, and the replicas idling out the "
        f"{scaledown_s / 60:g}-minute scaledown window after the run")


# ## Summary (saved under results/ for later comparison; `--report` reads it)


def _rates(ok: int, completion_tokens: int, wall: float) -> tuple[float, float]:
    if wall <= 0:
        return 0.0, 0.0
    return round(ok / wall, 3), round(completion_tokens / wall, 3)


def summarize(job: Job, run: Run, started_at: str) -> dict:
    target = job.target
    base_url = job.poll is None
    scaledown = target.defaults.scaledown_window_seconds
    models = {}
    for model_run in run.runs.values():
        key = model_run.model.key
        wall = 0.0
        if model_run.first_sent is not None and model_run.last_done is not None:
            wall = round(max(0.0, model_run.last_done - model_run.first_sent), 6)
        rps, tps = _rates(model_run.ok, model_run.completion_tokens, wall)
        seen, usd, basis = cost_estimate(key, run.samples, job.price.get(key), base_url=base_url,
                                         scaledown_s=scaledown)
        models[key] = {
            "requests_ok": model_run.ok, "requests_failed": model_run.failed,
            "prompt_tokens": model_run.prompt_tokens,
            "completion_tokens": model_run.completion_tokens,
            "wall_s": wall, "requests_per_s": rps, "output_tokens_per_s": tps,
            "replicas_seen": seen, "usd_estimate": usd, "cost_basis": basis,
        }
    wall = round(max(0.0, run.ended - run.started), 6)
    ok = sum(m["requests_ok"] for m in models.values())
    completion = sum(m["completion_tokens"] for m in models.values())
    rps, tps = _rates(ok, completion, wall)
    seen = [m["replicas_seen"] for m in models.values() if m["replicas_seen"] is not None]
    usds = [m["usd_estimate"] for m in models.values() if m["usd_estimate"] is not None]
    first_basis = next(iter(models.values()))["cost_basis"] if models else "no requests"
    totals = {
        "requests_ok": ok,
        "requests_failed": sum(m["requests_failed"] for m in models.values()),
        "prompt_tokens": sum(m["prompt_tokens"] for m in models.values()),
        "completion_tokens": completion,
        "wall_s": wall, "requests_per_s": rps, "output_tokens_per_s": tps,
        "replicas_seen": sum(seen) if seen else None,
        "usd_estimate": round(sum(usds), 6) if usds else None,
        "cost_basis": ("the sum of the models' estimates (each: replica-seconds seen running "
                       "x $/hour per replica)" if usds else first_basis),
    }
    return {
        "kind": "modal-vllm-batch", "version": 1,
        "app": target.app.name, "gpu": None if base_url else target.app.gpu.key,
        "endpoint": target.base_url, "input": str(job.checked.path), "output": str(job.output),
        "errors": str(job.errors), "started_at": started_at, "wall_s": wall,
        "cost_is_estimate": True, "models": models, "totals": totals,
    }


def save_summary(summary: dict, input_path: Path, results_dir: Path) -> Path:
    import bench

    stamp = datetime.fromisoformat(summary["started_at"]).strftime("%Y%m%dT%H%M%SZ")
    return bench.save_json(summary, results_dir, f"batch-{input_path.stem}-{stamp}")


# ## Presentation: a progress bar on a terminal (stderr), the summary on stdout


def _console(stderr: bool = False):
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False, emoji=False)
    if not console.is_terminal:  # piped: no terminal to fit, so no column cut short
        console.width = max(console.width, 140)
    return console


class ProgressView:
    """Done, failed, in flight, requests/s and output tokens/s (over the last 10 s), ETA."""

    WINDOW = 10.0  # seconds the rates are measured over

    def __init__(self, console, runs: dict[int, ModelRun], description: str):
        from rich.progress import BarColumn, Progress, TextColumn

        self.runs = runs
        self.total = sum(r.to_send for r in runs.values())
        self.history: deque[tuple[float, int, int]] = deque()
        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(),
            TextColumn("{task.completed}/{task.total} done"),
            TextColumn("{task.fields[failed]} failed"),
            TextColumn("{task.fields[in_flight]} in flight"),
            TextColumn("{task.fields[rps]} req/s"), TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("ETA {task.fields[eta]}"),
            console=console, transient=True, auto_refresh=False)
        self.task = self.bar.add_task(description, total=self.total, **self.fields(0, 0, 0))

    def fields(self, failed: int, in_flight: int, done: int) -> dict:
        now = time.monotonic()
        tokens = sum(r.completion_tokens for r in self.runs.values())
        self.history.append((now, done, tokens))
        while len(self.history) > 2 and now - self.history[1][0] >= self.WINDOW:
            self.history.popleft()
        t0, done0, tokens0 = self.history[0]
        span = now - t0
        rps = (done - done0) / span if span > 0 else 0.0
        tps = (tokens - tokens0) / span if span > 0 else 0.0
        left = self.total - done
        eta = "-" if rps <= 0 else time.strftime("%H:%M:%S", time.gmtime(left / rps))
        return {"failed": failed, "in_flight": in_flight, "rps": f"{rps:.1f}",
                "tps": f"{tps:.0f}", "eta": "0:00:00" if left == 0 else eta}

    def tick(self) -> None:
        failed = sum(r.failed for r in self.runs.values())
        done = sum(r.ok for r in self.runs.values()) + failed
        in_flight = sum(r.in_flight for r in self.runs.values())
        self.bar.update(self.task, completed=done, **self.fields(failed, in_flight, done))
        self.bar.refresh()


def show_summary(summary: dict, run: Run, previous: Previous, saved: Path) -> None:
    from rich.markup import escape
    from rich.table import Table

    import bench

    console = _console()
    table = Table(title=f"Batch through {summary['app']} at {summary['endpoint']}",
                  title_justify="left")
    for column in ("model", "ok", "failed", "prompt tok", "output tok", "wall", "req/s",
                   "out tok/s", "replicas", "cost (est.)"):
        table.add_column(column, no_wrap=True, justify="left" if column == "model" else "right")
    rows = [*summary["models"].items(), ("total", summary["totals"])]
    for name, m in rows:
        table.add_row(name, str(m["requests_ok"]), str(m["requests_failed"]),
                      str(m["prompt_tokens"]), str(m["completion_tokens"]), f"{m['wall_s']:.1f} s",
                      f"{m['requests_per_s']:.2f}", f"{m['output_tokens_per_s']:.1f}",
                      "-" if m["replicas_seen"] is None else str(m["replicas_seen"]),
                      bench._money(m["usd_estimate"]))
    console.print(table)
    say = lambda text: console.print(escape(text), soft_wrap=True)
    bases = {m["cost_basis"] for m in summary["models"].values()}
    if all(m["usd_estimate"] is None for m in summary["models"].values()):
        say(f"Cost: {' / '.join(sorted(bases))}.")
    else:
        for name, m in summary["models"].items():
            say(f"Cost of {name}, an {m['cost_basis']}.")
    totals = summary["totals"]
    say(f"Output: {summary['output']} (this run: {totals['requests_ok']} with a 2xx, "
        f"{totals['requests_failed'] - run.unanswered} without; {previous.answered} answered "
        "by an earlier run, not sent again)")
    say(f"Errors: {summary['errors']} ({run.unanswered} request(s) without an answer)")
    for model_run in run.runs.values():
        if model_run.gave_up:
            say(f"{model_run.model.key}: gave up, {model_run.to_send - model_run.sent} request(s) "
                f"not sent: {model_run.gave_up}")
    say(f"Saved {saved}")


def outcome_lines(run: Run, job: Job) -> list[str]:
    """What went wrong, and how to go on: for stderr."""
    lines = []
    if run.rejected:
        lines.append(f"Stopped: {run.rejected}")
    if run.interrupted:
        lines.append(f"Interrupted: {run.dropped} request(s) still in flight after "
                     f"{GRACE:g} s were dropped; every answer received is in {job.output}.")
    unsent = sum(r.to_send - r.sent for r in run.runs.values())
    failed = sum(r.failed for r in run.runs.values())
    if run.rejected or run.interrupted or unsent or failed or run.dropped:
        lines.append(f"Resume (sends every request without a 2xx answer): {job.resume}")
    return lines


# ## The command


def resume_command(key: str, input_path: Path, output: Path, *, test_model: str | None,
                   base_url: str | None, concurrency: int | None, deadline: str | None,
                   environment: str | None, config_path: Path | None,
                   api_key_given: bool, results_dir: Path | None = None) -> str:
    """The same run again, with the output named (the key is never printed)."""
    args = ["uv", "run", "deploy.py", "--batch", key, "--input", str(input_path), "-o", str(output)]
    for flag, value in (("--test-model", test_model), ("--base-url", base_url),
                        ("--concurrency", concurrency), ("--deadline", deadline),
                        ("--env", environment), ("--config", config_path),
                        ("--results-dir", results_dir)):
        if value is not None:
            args += [flag, str(value)]
    text = shlex.join(args)
    return text + ("  (and your --api-key: it is never printed)" if api_key_given else "")


def batch_command(matrix: config.Matrix, app: plan.App, key: str, *, input_path: Path | None,
                  output: Path | None, test_model: str | None, base_url: str | None,
                  api_key: str | None, api_key_given: bool, deadline: str | None,
                  concurrency: int | None, environment: str | None, config_path: Path | None,
                  dry_run: bool, as_json: bool, results_dir: Path | None = None) -> int:
    """`--batch KEY --input FILE`: check, then (unless --dry-run) run; the exit code.
    The summary is saved in `results_dir` (default results/) and its results page updated."""
    if input_path is None:
        raise config.UsageError("--batch needs --input FILE (one OpenAI Batch API request a line)")
    served = [p.model for p in app.pools]
    if not served:
        raise config.UsageError(f"{app.name} serves no model: none fits on {app.gpu.modal_gpu} "
                                "(uv run deploy.py --list shows the fit check)")
    default = served[0] if len(served) == 1 else None
    if test_model:
        default = matrix.resolve_model(test_model)
        if default not in served:
            raise config.UsageError(f"{app.name} does not serve '{test_model}'; it serves "
                                    f"{', '.join(m.key for m in served)}")
    deadline_s = config.parse_duration(deadline) if deadline else None
    output, errors = output_paths(input_path, output)
    checked = check_file(input_path, served, default, app.name)
    previous = scan_output(output, checked)
    # A model with a line left to send has a start: counting its lines is the one test.
    runs = {i: ModelRun(m, n) for i, m in enumerate(served) if (n := checked.to_send(i))}
    if dry_run:
        return show_dry_run(checked, previous, output, runs, as_json=as_json)
    if previous.keep is not None:
        compact(output, previous.keep)
    err = _console(stderr=True)
    if previous.dropped:
        err.print(f"{output}: {previous.dropped} earlier answer(s) without a 2xx (or cut off) "
                  "removed; their requests are sent again", soft_wrap=True)
    if previous.stale:
        err.print(f"{output}: {previous.stale} answer(s) for custom_ids not in {input_path} "
                  "(kept)", soft_wrap=True)
    if not runs:
        _console().print(f"All {previous.answered} requests of {input_path} already have an "
                         f"answer in {output}; nothing to send.", soft_wrap=True)
        return 0
    import checks

    target = checks.resolve_target(matrix, app, test_model=test_model, base_url=base_url,
                                   api_key=api_key, deadline_s=deadline_s, environment=environment)
    poll = None
    if base_url is None:
        import cloud

        def poll() -> dict[str, int | None]:
            return cloud.running_replicas(app, environment)
    slots = concurrency or matrix.defaults.max_concurrent_inputs * len(runs)
    job = Job(target, checked, output, errors, slots,
              resume_command(key, input_path, output, test_model=test_model, base_url=base_url,
                             concurrency=concurrency, deadline=deadline, environment=environment,
                             config_path=config_path, api_key_given=api_key_given,
                             results_dir=results_dir),
              poll, {p.model.key: p.usd_per_hour for p in app.pools})
    started_at = datetime.now(UTC).isoformat(timespec="milliseconds")
    view = None
    if err.is_terminal:
        view = ProgressView(err, runs, f"{input_path.name} → {app.name}")
        view.bar.start()
    try:
        run = execute(job, runs, on_tick=view.tick if view else None)
    finally:
        if view:
            view.bar.stop()
    summary = summarize(job, run, started_at)
    import bench  # where --bench saves and --report reads, unless --results-dir says otherwise
    import report  # the results page, rewritten with this run (plotly is imported only there)

    folder = results_dir or bench.DEFAULT_RESULTS_DIR
    saved = save_summary(summary, input_path, folder)
    page = report.update_after_run(folder)
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        err.print(page.line, soft_wrap=True, markup=False)  # stdout stays one JSON document
    else:
        show_summary(summary, run, previous, saved)
        _console().print(page.line, soft_wrap=True, markup=False)
    for line in outcome_lines(run, job):
        err.print(line, soft_wrap=True, markup=False)
    if run.interrupted:
        return INTERRUPTED
    failed = any(r.failed or r.sent < r.to_send for r in runs.values())
    return 1 if failed or run.rejected or run.dropped else 0


def show_dry_run(checked: Checked, previous: Previous, output: Path, runs: dict[int, ModelRun],
                 *, as_json: bool) -> int:
    to_send = sum(r.to_send for r in runs.values())
    data = {"input": str(checked.path), "requests": checked.requests,
            "models": {k: dict(v) for k, v in checked.counts.items()},
            "output": str(output), "already_answered": previous.answered, "to_send": to_send}
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return 0
    from rich.table import Table

    console = _console()
    console.print(f"{checked.path}: {checked.requests} requests, every line valid",
                  soft_wrap=True, markup=False)
    table = Table()
    for column in ("model", "url", "requests"):
        table.add_column(column, no_wrap=True, justify="right" if column == "requests" else "left")
    for key, urls in checked.counts.items():
        for url, n in sorted(urls.items()):
            table.add_row(key, url, str(n))
    console.print(table)
    if previous.answered:
        console.print(f"Already answered in {output}: {previous.answered}; a run sends the "
                      f"other {to_send}.", soft_wrap=True, markup=False)
    console.print("Dry run: nothing sent.")
    return 0
