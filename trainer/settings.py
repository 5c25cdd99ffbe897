"""Every user-facing setting, declared once: default, range, choices, help, and whether it is an
essential or an advanced one.

Method configs (trainer/methods/) and the run options (trainer/run.py) are dataclasses whose fields
are declared with `setting(...)`. The ComfyUI nodes build their inputs from these declarations
(nodes/schema.py) and `dstrain` its flags (dstrain/cli.py), so a default, a range or a help text
cannot differ between the frontends; tests/test_settings.py checks both against the dataclasses.

A setting's *name* is the node input's name; its CLI flag is `--name-with-dashes` unless `flag`
says otherwise. Errors raised here (`SettingError`) carry the name so that each frontend reports
the input or flag the user actually typed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterable

from .errors import SettingError

KINDS = ("int", "float", "str", "text", "bool", "choice")
MAX_TEXT = 2000  # characters of any text setting (prompts, words)


@dataclass(frozen=True)
class Spec:
    """What a frontend needs to show one setting."""

    name: str
    default: Any
    kind: str
    help: str
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple = ()
    advanced: bool = False
    flag: str = ""
    node: bool = True  # shown as a node input
    cli: bool = True  # offered as a dstrain flag

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


def setting(default, help: str, *, kind: str | None = None, min=None, max=None, step=None, choices=(),
            advanced: bool = False, flag: str = "", node: bool = True, cli: bool = True):
    """A dataclass field carrying its Spec (the field's name fills in Spec.name)."""
    if kind is None:
        kind = ("bool" if isinstance(default, bool) else "int" if isinstance(default, int)
                else "float" if isinstance(default, float) else "choice" if choices else "str")
    if kind not in KINDS:
        raise ValueError(f"unknown setting kind {kind!r}")
    meta = dict(kind=kind, help=help, min=min, max=max, step=step, choices=tuple(choices), advanced=advanced,
                flag=flag, node=node, cli=cli)
    return dataclasses.field(default=default, metadata={"spec": meta})


def specs(cls_or_obj) -> list[Spec]:
    """The Specs of a config dataclass (class or instance), in field order."""
    out = []
    for f in dataclasses.fields(cls_or_obj):
        meta = f.metadata.get("spec")
        if meta is None:
            continue
        out.append(Spec(name=f.name, default=f.default, **meta))
    return out


def spec(cls_or_obj, name: str) -> Spec:
    for s in specs(cls_or_obj):
        if s.name == name:
            return s
    raise KeyError(name)


def check(cfg, names: Iterable[str] | None = None) -> None:
    """Type, finiteness, range and choice checks of every declared setting (or of `names`),
    raising SettingError with the fix. Method-specific rules live in the methods."""
    wanted = None if names is None else set(names)
    for s in specs(cfg):
        if wanted is not None and s.name not in wanted:
            continue
        check_value(s, getattr(cfg, s.name))


def _range_text(s: Spec) -> str:
    if s.min is not None and s.max is not None:
        return f"between {s.min:g} and {s.max:g}"
    if s.min is not None:
        return f">= {s.min:g}"
    return f"<= {s.max:g}"


def check_value(s: Spec, v: Any) -> None:
    if s.kind == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            raise SettingError(s.name, v, f"use a whole number {_range_text(s) if s.min is not None or s.max is not None else ''}".strip())
    elif s.kind == "float":
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise SettingError(s.name, v, f"use a finite number {_range_text(s) if s.min is not None or s.max is not None else ''}".strip())
    elif s.kind == "bool":
        if not isinstance(v, bool):
            raise SettingError(s.name, v, "use true or false")
    elif s.kind == "choice":
        if v not in s.choices:
            raise SettingError(s.name, v, f"choose one of {', '.join(map(str, s.choices))}")
        return
    elif s.kind in ("str", "text"):
        if not isinstance(v, str):
            raise SettingError(s.name, v, "use text")
        if len(v) > MAX_TEXT:
            raise SettingError(s.name, v[:40] + "...", f"it is {len(v)} characters long; use at most {MAX_TEXT} (a "
                               "prompt longer than a few hundred words only slows encoding down)")
        return
    if s.kind in ("int", "float"):
        if (s.min is not None and v < s.min) or (s.max is not None and v > s.max):
            raise SettingError(s.name, v, f"use a value {_range_text(s)}")


def as_dict(cfg) -> dict[str, Any]:
    """The declared settings of a config as a plain dict (for metadata and run.json)."""
    return {s.name: getattr(cfg, s.name) for s in specs(cfg)}


def replace(cfg, **changes):
    """dataclasses.replace, refusing names the config does not declare."""
    names = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise KeyError(f"{type(cfg).__name__} has no setting {', '.join(unknown)}")
    return dataclasses.replace(cfg, **changes)
