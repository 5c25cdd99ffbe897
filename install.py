"""Dependency installer for ComfyUI-DomainStudio (stdlib only).

Who runs it, and how:

* ComfyUI-Manager runs ``python install.py`` in the pack folder with ComfyUI's own interpreter.
* A1111 / Forge (``launch_utils.run_extension_installer``) run ``"<python>" install.py`` as a
  subprocess with the web UI's interpreter. Very old A1111 versions instead ``exec()``-ed the file
  with a globals dict holding only ``__file__``; ``__name__`` then resolves to ``"builtins"``.

Entry-point rule: ``main(argv)`` does the work and *returns* an exit code.

* ``__name__ == "__main__"``  -> ``sys.exit(main())`` (command line, Manager, A1111 subprocess);
* ``__name__ == "builtins"``  -> ``main([])`` without ``sys.exit`` and without reading the host's
  ``sys.argv`` (old A1111 ``exec``: exiting would kill the web UI);
* any other name (``import install``, tests loading it under their own name) -> nothing runs.

What it does: reads ``requirements.txt`` next to this file, and installs into the *running*
interpreter (``sys.executable -m pip install ...``) only the requirements that are missing or whose
installed version does not satisfy the specifier. torch, torchvision and torchaudio are never
installed, upgraded or replaced: torch builds are platform/CUDA specific, so if torch is missing the
user is told to install it first and the script exits non-zero; if present it is skipped whatever its
version, and pip is given a constraint pinning the installed torch so no dependency can replace it.

Options: ``--dry-run`` prints the pip command instead of running it (exit 0);
``--requirements PATH`` uses another requirements file.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

try:  # stdlib since 3.8
    from importlib import metadata as _metadata
except ImportError:  # pragma: no cover - Python < 3.8 is not supported by the hosts anyway
    _metadata = None

try:  # optional: exact PEP 440 semantics when available (it almost always is, pip vendors it)
    from packaging.requirements import Requirement as _PkgRequirement
    from packaging.specifiers import SpecifierSet as _PkgSpecifierSet
    from packaging.version import Version as _PkgVersion
except Exception:  # noqa: BLE001 - any import problem means "use the fallback"
    _PkgRequirement = _PkgSpecifierSet = _PkgVersion = None

TAG = "[DomainStudio]"
TORCH_FAMILY = ("torch", "torchvision", "torchaudio")
TORCH_HELP = (
    "Install PyTorch for your platform first (CUDA / ROCm / MPS / CPU build), following "
    "https://pytorch.org/get-started/locally/ , then run this installer again. "
    "DomainStudio never installs or replaces torch itself."
)

try:
    _HERE = os.path.dirname(os.path.abspath(__file__))
except NameError:  # exec() without __file__
    _HERE = os.getcwd()


def _say(msg):
    print(f"{TAG} {msg}", flush=True)


def normalize(name):
    return re.sub(r"[-_.]+", "-", name).lower()


# ----------------------------------------------------------------------------- parsing

class Req:
    """One requirement line: ``name``, ``spec`` (e.g. ``>=0.4.2,<1``) and the ``line`` given to pip."""

    def __init__(self, name, spec, line, marker_ok=True):
        self.name = name
        self.key = normalize(name)
        self.spec = spec
        self.line = line
        self.marker_ok = marker_ok

    def __repr__(self):
        return f"Req({self.line!r})"


_NAME_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")


def parse_line(raw):
    """Parse one requirements.txt line; None for blanks, comments and pip options."""
    line = raw.split(" #", 1)[0].split("\t#", 1)[0].strip()
    if not line or line.startswith("#"):
        return None
    if line.startswith("-"):  # -r, -c, --index-url, -e ...: not ours to interpret
        _say(f"ignoring pip option line: {line}")
        return None
    if _PkgRequirement is not None:
        try:
            r = _PkgRequirement(line)
            ok = r.marker.evaluate() if r.marker is not None else True
            return Req(r.name, str(r.specifier), line, ok)
        except Exception:  # noqa: BLE001 - fall through to the simple parser
            pass
    body, _, marker = line.partition(";")
    m = _NAME_RE.match(body)
    if not m:
        raise ValueError(f"cannot parse requirement line: {raw.strip()!r}")
    name, rest = m.group(1), m.group(3).strip()
    if rest.startswith("@"):  # direct URL: any installed version satisfies it
        rest = ""
    rest = rest.strip("()").replace(" ", "")
    # Without `packaging` markers are not evaluated: the requirement is treated as applicable.
    return Req(name, rest, line, True)


def read_requirements(path):
    reqs = []
    with open(path, encoding="utf-8") as f:
        for raw in f:
            r = parse_line(raw)
            if r is not None and r.marker_ok:
                reqs.append(r)
    return reqs


# ----------------------------------------------------------------------------- versions

def installed_version(name):
    if _metadata is None:
        return None
    for candidate in dict.fromkeys((name, normalize(name), normalize(name).replace("-", "_"))):
        try:
            return _metadata.version(candidate)
        except _metadata.PackageNotFoundError:
            continue
        except Exception:  # noqa: BLE001 - broken metadata counts as missing
            continue
    return None


def _num(v):
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", v)
    return tuple(int(x) for x in m.group(1).split(".")) if m else (0,)


def _cmp(a, b):
    n = max(len(a), len(b))
    a, b = a + (0,) * (n - len(a)), b + (0,) * (n - len(b))
    return (a > b) - (a < b)


def _fallback_satisfies(version, spec):
    have = _num(version)
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        m = re.match(r"^(~=|===|==|!=|<=|>=|<|>)\s*(.+)$", clause)
        if not m:
            continue
        op, want_s = m.groups()
        if op in ("==", "!=") and want_s.endswith(".*"):
            prefix = _num(want_s[:-2])
            same = have[: len(prefix)] + (0,) * max(0, len(prefix) - len(have)) == prefix
            if same != (op == "=="):
                return False
            continue
        want = _num(want_s)
        c = _cmp(have, want)
        if op == "~=":
            prefix = want[:-1] if len(want) > 1 else want
            if c < 0 or have[: len(prefix)] != prefix:
                return False
        elif not {"==": c == 0, "===": c == 0, "!=": c != 0, "<=": c <= 0,
                  ">=": c >= 0, "<": c < 0, ">": c > 0}[op]:
            return False
    return True


def satisfies(version, spec):
    if not spec:
        return True
    if _PkgSpecifierSet is not None:
        try:
            return _PkgSpecifierSet(spec).contains(_PkgVersion(version), prereleases=True)
        except Exception:  # noqa: BLE001 - odd version strings: use the numeric compare
            pass
    return _fallback_satisfies(version, spec)


# ----------------------------------------------------------------------------- plan / install

def plan(reqs):
    """Split requirements into (to_install, missing_torch_family, torch_pins); prints a status line each."""
    to_install, missing_torch, pins = [], [], []
    for r in reqs:
        have = installed_version(r.name)
        if r.key in TORCH_FAMILY:
            if have is None:
                missing_torch.append(r)
                _say(f"MISSING {r.name} (not installed by this script)")
            else:
                pins.append(f"{r.key}=={have}")
                _say(f"skip    {r.name} {have} (torch family is never touched; wanted {r.spec or 'any'})")
        elif have is None:
            to_install.append(r)
            _say(f"missing {r.name} ({r.spec or 'any version'})")
        elif not satisfies(have, r.spec):
            to_install.append(r)
            _say(f"too old {r.name} {have} (needs {r.spec})")
        else:
            _say(f"ok      {r.name} {have}")
    # Whatever the requirements say, pin any installed torch-family package so pip never replaces it.
    for name in TORCH_FAMILY:
        have = installed_version(name)
        if have is not None and not any(p.startswith(name + "==") for p in pins):
            pins.append(f"{name}=={have}")
    return to_install, missing_torch, pins


def pip_command(to_install, constraints_path):
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"]
    if constraints_path:
        cmd += ["-c", constraints_path]
    return cmd + [r.line for r in to_install]


def show(cmd):
    """The command as one line a user can paste into sh or cmd.exe (specifiers like >= quoted)."""
    return " ".join(f'"{a}"' if re.search(r"[\s<>|&;()*?$^]", a) else a for a in cmd)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="install.py", description="Install ComfyUI-DomainStudio's missing dependencies.")
    ap.add_argument("--dry-run", action="store_true", help="print the pip command, run nothing")
    ap.add_argument("--requirements", default=os.path.join(_HERE, "requirements.txt"), help="requirements file")
    args = ap.parse_args(argv)

    try:
        reqs = read_requirements(args.requirements)
    except (OSError, ValueError) as e:
        _say(f"ERROR: cannot read requirements from {args.requirements}: {e}")
        return 2

    if installed_version("torch") is None:
        _say("ERROR: PyTorch (torch) is not installed in this Python (" + sys.executable + "). " + TORCH_HELP)
        return 3

    to_install, missing_torch, pins = plan(reqs)
    if missing_torch:
        names = ", ".join(r.name for r in missing_torch)
        _say(f"ERROR: {names} missing. Install them together with torch, matching its build. " + TORCH_HELP)
        return 3
    if not to_install:
        _say("all requirements satisfied, nothing to install")
        return 0

    names = ", ".join(r.name for r in to_install)
    if args.dry_run:
        cmd = pip_command(to_install, "<constraints.txt>" if pins else None)
        _say(f"would install: {names}")
        _say("would run: " + show(cmd))
        if pins:
            _say("with <constraints.txt> = " + "; ".join(pins))
        return 0

    cfile = None
    try:
        if pins:
            fd, cfile = tempfile.mkstemp(prefix="domainstudio-constraints-", suffix=".txt")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write("\n".join(pins) + "\n")
        cmd = pip_command(to_install, cfile)
        _say(f"installing: {names}")
        _say("running: " + show(cmd))
        try:
            rc = subprocess.call(cmd)
        except OSError as e:
            _say(f"ERROR: could not start pip for {names}: {e}")
            return 1
    finally:
        if cfile:
            try:
                os.remove(cfile)
            except OSError:
                pass
    if rc != 0:
        _say(
            f"ERROR: pip failed (exit code {rc}) installing: {names}. See pip's output above; "
            f"you can retry by hand with: {sys.executable} -m pip install "
            + show([r.line for r in to_install])
        )
        return rc if 0 < rc < 256 else 1
    _say(f"installed: {names}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
elif __name__ == "builtins":  # exec()-ed by an old A1111 launch: don't parse its argv, don't exit it
    main([])
