"""Node inputs generated from the core's setting declarations (trainer/settings.py), so a node's
defaults, ranges, choices and tooltips are the method config's own (tests/test_settings.py checks)."""

from __future__ import annotations

import dataclasses

from comfy_api.v0_0_2 import io

from ..trainer import settings
from ..trainer.hosts import comfy_compat as compat

def spec_input(s: settings.Spec, optional: bool = False):
    """The io input for one Spec; advanced settings fold away where the frontend supports it."""
    common = dict(tooltip=s.help, optional=optional, **compat.input_options(s.advanced))
    if s.kind == "int":
        return io.Int.Input(s.name, default=s.default, min=int(s.min if s.min is not None else -2**63),
                            max=int(s.max if s.max is not None else 2**63 - 1), **common)
    if s.kind == "float":
        kw = {}
        if s.step is not None:
            kw["step"] = s.step
        return io.Float.Input(s.name, default=s.default, min=s.min if s.min is not None else -1e12,
                              max=s.max if s.max is not None else 1e12, **kw, **common)
    if s.kind == "bool":
        return io.Boolean.Input(s.name, default=s.default, **common)
    if s.kind == "choice":
        return io.Combo.Input(s.name, options=list(s.choices), default=s.default, **common)
    return io.String.Input(s.name, default=s.default, multiline=s.kind == "text", **common)


# Run options added after workflows were shared: the frontend restores widget values by position,
# so these come after every older widget (after resume_from) and old workflows keep their values.
APPENDED_OPTIONS = ("min_timestep", "max_timestep")


def inputs_for(*config_classes, exclude=(), only=None, defaults: dict | None = None) -> list:
    """Inputs for the union of the settings of `config_classes` (first declaration of a name wins;
    names shared by several configs must agree, which the settings tests check). Essential inputs
    first, then the advanced ones, each in declaration order. `defaults` replaces declared defaults
    (a node's methods' option_defaults)."""
    seen: dict[str, settings.Spec] = {}
    for cls in config_classes:
        for s in settings.specs(cls):
            if s.node and s.name not in exclude and s.name not in seen and (only is None or s.name in only):
                if defaults and s.name in defaults:
                    s = dataclasses.replace(s, default=defaults[s.name])
                seen[s.name] = s
    ordered = [s for s in seen.values() if not s.advanced] + [s for s in seen.values() if s.advanced]
    return [spec_input(s) for s in ordered]


def split_values(kwargs: dict, *config_classes) -> list[dict]:
    """Node input values split per config class (each gets the names it declares)."""
    out = []
    for cls in config_classes:
        names = {s.name for s in settings.specs(cls)}
        out.append({k: v for k, v in kwargs.items() if k in names})
    return out


def trainer_tail(node: str, save_name: str, save_tooltip: str, resume_tooltip: str) -> list:
    """The inputs every trainer node ends with: the file name, the IMAGE-input resolution, the run
    options (at the defaults of the methods `node` offers), the optional CLIP vision model of the
    quality report, resume_from, then the options added since (APPENDED_OPTIONS)."""
    from ..trainer.methods import node_option_defaults
    from ..trainer.run import RunOptions
    from . import common

    return [
        io.String.Input("save_name", default=save_name, tooltip=save_tooltip),
        io.Int.Input("resolution", default=512, min=64, max=4096, step=8,
                     tooltip="Used only for a plain IMAGE input; an image set keeps its own.",
                     **compat.input_options(True)),
        *inputs_for(RunOptions, exclude=APPENDED_OPTIONS, defaults=node_option_defaults(node)),
        io.ClipVision.Input("clip_vision", optional=True,
                            tooltip="Optional: a CLIP vision model (stock Load CLIP Vision) gives the quality report "
                            "its feature space; without it the report uses VAE latents.",
                            **compat.input_options(True)),
        io.Combo.Input("resume_from", options=[common.NONE] + common.weight_file_options(), default=common.NONE,
                       tooltip=resume_tooltip, **compat.input_options(True)),
        *inputs_for(RunOptions, only=APPENDED_OPTIONS, defaults=node_option_defaults(node)),
    ]
