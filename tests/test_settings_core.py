"""Every setting declared once (trainer/settings.py): each method config and RunOptions field is a
Spec with a default and a help text, the settings a node shows together agree wherever two configs
declare the same name, and settings.check names the setting and the fix."""

from __future__ import annotations

import dataclasses
import math

import pytest

from comfyui_domainstudio.trainer import settings
from comfyui_domainstudio.trainer.errors import SettingError
from comfyui_domainstudio.trainer.methods import METHODS, for_node
from comfyui_domainstudio.trainer.methods.domainstudio import DomainStudioConfig
from comfyui_domainstudio.trainer.methods.finetune import FinetuneConfig
from comfyui_domainstudio.trainer.methods.personalize import PersonalizeConfig
from comfyui_domainstudio.trainer.run import RunOptions
from comfyui_domainstudio.trainer.settings import KINDS, Spec, setting

CONFIGS = sorted({m.config for m in METHODS.values()}, key=lambda c: c.__name__) + [RunOptions]
# What each node shows: the configs of the methods it offers, and the options every method shares.
NODES = {node: [METHODS[n].config for n in for_node(node)] + [RunOptions] for node in ("domain", "subject")}
COMPARED = ("default", "kind", "min", "max", "step", "choices", "advanced", "flag", "node", "cli")


def test_the_nodes_show_the_expected_configs():
    assert NODES["domain"] == [DomainStudioConfig, FinetuneConfig, RunOptions]
    assert NODES["subject"] == [PersonalizeConfig] * 4 + [RunOptions]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_is_a_declared_setting_with_default_and_help(cls):
    fields = dataclasses.fields(cls)
    specs = {s.name: s for s in settings.specs(cls)}
    assert [f.name for f in fields] == list(specs), "every field is declared with setting(...)"
    instance = cls()
    for f in fields:
        s = specs[f.name]
        assert s.kind in KINDS
        assert s.default is not dataclasses.MISSING and getattr(instance, f.name) == s.default
        assert len(s.help) >= 5 and s.help.strip() == s.help, f"{cls.__name__}.{s.name} needs a help text"
        settings.check_value(s, s.default)  # the default is a valid value
        if s.kind == "choice":
            assert s.default in s.choices and len(s.choices) >= 2
        if s.kind in ("int", "float"):
            assert s.min is not None and s.max is not None and s.min <= s.default <= s.max
        assert s.cli_flag.startswith("--") and " " not in s.cli_flag
    settings.check(instance)


@pytest.mark.parametrize("node", list(NODES))
def test_a_name_shown_twice_on_a_node_means_the_same_setting(node):
    seen: dict[str, tuple[str, Spec]] = {}
    flags: dict[str, str] = {}
    for cls in NODES[node]:
        for s in settings.specs(cls):
            if s.name in seen:
                other_cls, other = seen[s.name]
                for attr in COMPARED:
                    assert getattr(s, attr) == getattr(other, attr), \
                        f"{node} node: {cls.__name__}.{s.name}.{attr} = {getattr(s, attr)!r} but " \
                        f"{other_cls}.{s.name}.{attr} = {getattr(other, attr)!r}"
            else:
                seen[s.name] = (cls.__name__, s)
            assert flags.setdefault(s.cli_flag, s.name) == s.name, f"{s.cli_flag} names two settings"


def test_method_settings_and_run_options_never_share_a_name():
    # the frontends split one set of values between the method's config and RunOptions by name
    shared = {s.name for s in settings.specs(RunOptions)}
    for cls in CONFIGS[:-1]:
        assert not shared & {s.name for s in settings.specs(cls)}, cls.__name__


def _bad_values(s: Spec):
    """Values of the wrong type or outside the range of `s`, with a word the fix must contain."""
    if s.kind == "int":
        yield 1.5, "whole number"
        yield True, "whole number"
        yield "3", "whole number"
        yield int(s.min) - 1, f"{s.min:g}"
        yield int(s.max) + 1, f"{s.max:g}"
    elif s.kind == "float":
        yield math.nan, "finite number"
        yield math.inf, "finite number"
        yield "0.1", "finite number"
        yield s.min - max(1.0, abs(s.min)), f"{s.min:g}"
        yield s.max * 2 + 1, f"{s.max:g}"
    elif s.kind == "choice":
        yield "nope", ", ".join(map(str, s.choices))
    elif s.kind == "bool":
        yield 1, "true or false"
    else:
        yield 5, "text"


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_check_names_the_setting_and_the_fix(cls):
    checked = 0
    for s in settings.specs(cls):
        for value, fix in _bad_values(s):
            cfg = dataclasses.replace(cls(), **{s.name: value})
            with pytest.raises(SettingError) as e:
                settings.check(cfg)
            err = e.value
            assert err.name == s.name and (err.value is value or err.value == value)
            assert fix in err.fix, (s.name, value, err.fix)
            assert str(err).startswith(f"{s.name}=") and err.fix in str(err)
            assert err.labelled(s.cli_flag).startswith(f"{s.cli_flag}=")
            checked += 1
            settings.check(cfg, names=[n.name for n in settings.specs(cls) if n.name != s.name])  # only that one
    assert checked >= len(settings.specs(cls))


def test_as_dict_replace_and_spec_lookup():
    cfg = settings.replace(FinetuneConfig(), steps=7, target_prompt="x")
    assert settings.as_dict(cfg) == {"target_prompt": "x", "steps": 7, "learning_rate": 3e-4, "batch_size": 4}
    with pytest.raises(KeyError, match="FinetuneConfig has no setting lambda_img, zz"):
        settings.replace(cfg, zz=1, lambda_img=2.0)
    assert settings.spec(FinetuneConfig, "learning_rate").cli_flag == "--lr"
    assert settings.spec(RunOptions, "train_seed").cli_flag == "--seed"
    assert settings.spec(PersonalizeConfig, "ti_steps").cli_flag == "--ti-steps"
    with pytest.raises(KeyError):
        settings.spec(FinetuneConfig, "nothing")


def test_setting_infers_kinds_and_refuses_unknown_ones():
    @dataclasses.dataclass
    class C:
        a: int = setting(1, "An int.", min=0, max=2)
        b: float = setting(0.5, "A float.", min=0.0, max=1.0)
        c: bool = setting(False, "A flag.")
        d: str = setting("x", "A choice.", choices=("x", "y"))
        e: str = setting("", "Text.")
        f: str = setting("", "Long text.", kind="text")

    assert [s.kind for s in settings.specs(C)] == ["int", "float", "bool", "choice", "str", "text"]
    with pytest.raises(ValueError, match="unknown setting kind"):
        setting(1, "x", kind="number")


def test_method_option_defaults_are_valid_and_agree_on_each_node():
    from comfyui_domainstudio.trainer.methods import node_option_defaults
    from comfyui_domainstudio.trainer.run import default_options

    for name, m in METHODS.items():
        opts = default_options(m)  # an unknown name or a bad value is refused here
        settings.check(opts)
        assert all(getattr(opts, k) == v for k, v in m.option_defaults.items()), name
        assert default_options(m, train_seed=7).train_seed == 7
    for node in ("domain", "subject"):
        shown = node_option_defaults(node)  # raises when the node's methods disagree
        for name in for_node(node):
            assert default_options(name).train_mode == shown.get("train_mode", RunOptions().train_mode)
    # the frontier's evidence on the GPU-trained miniworld (README, Defaults): every-layer LoRA for
    # the domain methods; the subject methods keep attention-only
    assert default_options("domainstudio").train_mode == default_options("finetune").train_mode == "lora_all"
    assert {default_options(n).train_mode for n in for_node("subject")} == {"lora_attn"}


def test_disagreeing_option_defaults_on_one_node_are_refused(monkeypatch):
    from comfyui_domainstudio.trainer import methods

    monkeypatch.setattr(METHODS["finetune"], "option_defaults", {"train_mode": "full_attn"})
    with pytest.raises(ValueError, match="domain node's methods disagree on the default of train_mode"):
        methods.node_option_defaults("domain")
