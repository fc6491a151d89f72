"""How `deploy.py` behaves as a command line, whatever its options: every usage error is
one line, help labels read right, a closed pipe is not an error, and option values are
checked before anything slow.

- Errors: typer 0.29 prints click's usage errors (unknown option, missing value, a
  value that is not a number) as a boxed panel of 5 to 8 lines under the usage line.
  `Command.main` turns each into one `Error: ...` line on stderr naming the option as
  typed, exit 2, through `print_error`, the one formatter every error of the CLI uses.
- Help: typer 0.29 labels every option with its Python type (`--list <bool>`, `--host
  <str>`), which invites `--list true`. Flags get no label; a valued option its
  metavar, or its own name in capitals.
- Pipes: `deploy.py ... | head -1` closes the pipe early. Python (and rich) then raise
  BrokenPipeError, typer and rich turn it into exit 1, and the interpreter's last flush
  prints "Exception ignored". A reader that stopped reading is no failure of ours: exit
  0 quietly, with stdout (and stderr) pointed at devnull as Python's documentation
  recommends (https://docs.python.org/3/library/signal.html#note-on-sigpipe). An error
  whose message cannot be written keeps its exit code.
- Values: the checks `deploy.VALUES` applies to each option's value, one line each.
"""

import errno
import math
import os
import re
import sys
from urllib.parse import urlsplit

import typer
from typer.core import TyperCommand

import config

API_KEY_ENV = "VLLM_API_KEY"


def api_key_from_environment() -> str | None:
    """The endpoints' key: VLLM_API_KEY from the environment, else from `./.env`, the file
    the spec's LiteLLM set-up writes it in (and docker compose reads), so the spec's
    `deploy.py --test-gpu h100` works as written there. MODAL_VLLM_ENV_FILE names another
    file (the tests point it at an empty home). Only that one variable is read."""
    key = os.environ.get(API_KEY_ENV)
    if key:
        return key
    try:
        with open(os.environ.get("MODAL_VLLM_ENV_FILE", ".env"), encoding="utf-8") as f:
            lines = f.read(1 << 20).splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines:
        name, sep, value = line.strip().removeprefix("export ").partition("=")
        if sep and name.strip() == API_KEY_ENV:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            else:
                value = value.split(" #", 1)[0].strip()  # docker compose's inline comment
            return value or None
    return None


def print_error(text: str) -> None:
    """Each line of `text` as one `Error: ...` line on stderr, never wrapped, never markup."""
    from rich.console import Console
    from rich.markup import escape

    # emoji=False: no ":name:" codes here, and their table costs ~15 ms to import.
    console = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
    try:
        try:
            for line in text.splitlines() or ["unknown error"]:
                console.print(f"[bold red]Error:[/bold red] {escape(line)}")
        except SystemExit as exc:  # rich's Console.on_broken_pipe
            if not _closed_pipe(exc.__context__):
                raise
            raise BrokenPipeError from exc
    except OSError as exc:  # nobody reads stderr: the exit code still tells the error
        if not _closed_pipe(exc):
            raise
        _quiet_after_closed_pipe()


# ## Usage errors as one line


def _option(command, name: str):
    return next((p for p in command.params if name in getattr(p, "opts", ())), None)


def usage_message(exc: typer.TyperException, command=None) -> str:
    """Click's usage error, as one line that names the option as the user typed it.

    Told apart by their attributes (click's classes live in typer's private `_click`):
    NoSuchOption has `possibilities`, BadOptionUsage an `option_name`, BadParameter a
    `param`.
    """
    message = " ".join(exc.format_message().split())
    if hasattr(exc, "possibilities"):
        near = sorted(exc.possibilities or ())
        either = ", ".join(near[:-1]) + " or " + near[-1] if len(near) > 1 else "".join(near)
        hint = f"; did you mean {either}?" if near else " (--help lists them)"
        return f"unknown option {exc.option_name}{hint}"
    if hasattr(exc, "option_name"):
        name, param = exc.option_name, _option(command, exc.option_name) if command else None
        if "requires" in message:
            count = getattr(param, "nargs", 1) or 1
            what = "a value" if count == 1 else f"{count} values"
            shown = f" ({param.metavar})" if param is not None and param.metavar else ""
            return f"{name} needs {what}{shown}"
        if "does not take a value" in message:
            return f"{name} is a flag: it takes no value"
        return message
    param = getattr(exc, "param", None)
    if param is not None and getattr(param, "opts", None):
        return f"{param.opts[0]}: {' '.join(exc.message.split())}"
    extra = re.fullmatch(r"Got unexpected extra argument(?:s|\(s\))? \((.*)\)", message)
    if extra:
        return (f"unexpected argument '{extra[1]}': every value follows its option "
                "(--help lists them)")
    return message[:1].lower() + message[1:]


# ## Closed pipes


def _closed_pipe(exc: BaseException | None) -> bool:
    return isinstance(exc, BrokenPipeError) or (
        isinstance(exc, OSError) and exc.errno == errno.EPIPE)


def _quiet_after_closed_pipe() -> None:
    """Point stdout and stderr at devnull, so that nothing (not even the interpreter's last
    flush of a buffer that cannot be written) reports the closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, stream.fileno())
        except (AttributeError, OSError, ValueError):  # no file descriptor (a test runner)
            pass
    os.close(devnull)


# ## The command


class Command(TyperCommand):
    """typer's command, as a command line should behave (see the module's docstring)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            try:
                code = super().main(args, prog_name, complete_var, standalone_mode=False,
                                    **extra)
                sys.stdout.flush()  # here, where a closed pipe can still be caught
            except SystemExit as exc:
                # rich (Console.on_broken_pipe) and typer exit 1 while handling a closed pipe.
                if _closed_pipe(exc.__context__):
                    raise BrokenPipeError from exc
                raise
        except typer.TyperException as exc:  # click's usage errors, raised in this mode
            print_error(usage_message(exc, self))
            sys.exit(exc.exit_code)
        except typer.Abort:
            print_error("aborted")
            sys.exit(1)
        except OSError as exc:
            if not _closed_pipe(exc):
                raise
            _quiet_after_closed_pipe()
            sys.exit(0)
        sys.exit(code if isinstance(code, int) else 0)

    def format_help(self, ctx, formatter) -> None:
        for param in self.get_params(ctx):
            if getattr(param, "is_flag", False):
                param.metavar = ""  # a flag takes no value: no label at all
            elif param.metavar is None and param.param_type_name == "option":
                param.metavar = param.name.upper()
        super().format_help(ctx, formatter)


# ## Option values, checked before anything slow: each check takes the option as typed
# and its value, and returns the problem as one line, or None.


def at_least_one(flag: str, value: int) -> str | None:
    return None if value >= 1 else f"{flag} must be at least 1, not {value}"


def above_zero(flag: str, value: float) -> str | None:
    if not math.isfinite(value) or value <= 0:
        return f"{flag} must be a number above 0, not {value:g}"
    return None


def duration_above_zero(flag: str, text: str) -> str | None:
    """'90s', '15m', '2h' or seconds, as config.parse_duration reads them, and not zero."""
    match = config.DURATION.fullmatch(text)
    if not match:
        return f"{flag}: cannot read duration '{text}'; use e.g. 90s, 15m or 2h"
    if float(match[1]) == 0:
        return f"{flag} must be longer than 0, not '{text}'"
    return None


def http_url(flag: str, text: str) -> str | None:
    try:
        parts = urlsplit(text.strip())
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        return f"{flag} '{text}': not a valid URL ({exc})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{flag} '{text}': expected an http(s):// URL"
    return None


def not_empty(flag: str, text: str) -> str | None:
    return None if text.strip() else f"{flag} is empty"


def one_of(*choices: str):
    def check(flag: str, text: str) -> str | None:
        if text.strip().lower() in choices:
            return None
        return f"{flag} '{text}': choose one of {', '.join(choices)}"
    return check


def directory_or_new(flag: str, path) -> str | None:
    if path.exists() and not path.is_dir():
        return f"{flag} {path}: exists and is not a directory"
    return None
