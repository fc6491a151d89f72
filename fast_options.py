"""typer without pydantic for plain options: `deploy.py --list` stays fast.

typer 0.29 coerces every option that is not a bool flag through a pydantic
TypeAdapter, and importing pydantic costs ~200 ms: more than all the rest of
`--list`. Options typed plainly (str, Path, int, float, bool, or a list or tuple
of them, with no parser, bounds or path checks) need none of it, so `install()`
makes typer coerce those here; anything else still goes to typer. typer is
pinned; if its internals move, `install()` does nothing and only speed is lost
(tests/test_cli_matrix.py checks that --list imports no pydantic).
"""

import typing
from pathlib import Path

import typer

EXPECTED = {int: "a whole number", float: "a number", bool: "true or false", str: "text",
            Path: "a path"}  # what a value that does not convert should have been
_TRUE, _FALSE = {"1", "true", "t", "yes", "y", "on"}, {"0", "false", "f", "no", "n", "off", ""}


def _to_bool(value: object) -> bool:
    text = str(value).strip().lower()
    if text in _TRUE | _FALSE:
        return text in _TRUE
    raise ValueError(value)


def install() -> None:
    try:
        import typer.core as typer_core
        from typer._coercion import RuntimeParam
    except ImportError:
        return
    build = getattr(typer_core, "build_runtime_param", None)
    if build is None or getattr(build, "plain_options", False):
        return
    converters = {str: str, Path: Path, int: int, float: float, bool: _to_bool}

    def item_types(annotation) -> tuple | None:
        """(str,) for str, for list[str] (a repeatable option) and (str, Path) for
        tuple[str, Path] (one option, several values); None if not all plain."""
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        kinds = args[:1] if origin is list else args if origin is tuple else (annotation,)
        return kinds if kinds and all(k in converters for k in kinds) else None

    class PlainParam(RuntimeParam):
        def _coerce_value(self, value, param, ctx):
            def convert(kind, item):
                if type(item) is kind:
                    return item
                try:
                    return converters[kind](item)
                except (TypeError, ValueError):
                    raise typer.BadParameter(f"expected {EXPECTED[kind]}, not {item!r}",
                                             ctx=ctx, param=param) from None

            kinds, origin = item_types(self.annotation), typing.get_origin(self.annotation)
            if origin is list:
                items = value if isinstance(value, (list, tuple)) else [value]
                return [convert(kinds[0], item) for item in items]
            if origin is tuple:
                if not isinstance(value, (list, tuple)) or len(value) != len(kinds):
                    raise typer.BadParameter(f"{len(kinds)} values are required",
                                             ctx=ctx, param=param)
                return tuple(convert(k, item) for k, item in zip(kinds, value, strict=True))
            return convert(kinds[0], value)

    def build_runtime_param(descriptor):
        info = descriptor.parameter_info
        plain = (
            item_types(descriptor.annotation) is not None
            and descriptor.file_annotation is None
            and info.parser is None and info.min is None and info.max is None
            and not (info.exists or info.resolve_path or info.writable or info.allow_dash)
            and info.path_type is None
        )
        if plain:
            return PlainParam(parameter_info=info, annotation=descriptor.annotation)
        return build(descriptor)

    build_runtime_param.plain_options = True
    typer_core.build_runtime_param = build_runtime_param
