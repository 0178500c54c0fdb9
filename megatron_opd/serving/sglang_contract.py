"""Load SGLang's own HTTP contract module (`sglang/api/v1/api_types.py`) without importing sglang.

The module is generated from SGLang's protobuf schema and imports only `msgspec`, so it loads on
its own from the pinned wheel. Tests decode every request our client sends and every response
our server returns with its `GenerateRequest` / `GenerateResponse` classes: conformance is
checked against SGLang's code, not against our reading of it.

Where the wheel is looked for, in order: $OPD_SGLANG_API_TYPES (the .py file itself),
$OPD_SGLANG_WHEEL (a wheel file or a directory holding one), then `<repo>/.whl/`. The tests fetch
it there when it is missing (`load_contract(fetch=True)`, i.e.

    pip download --no-deps sglang==0.5.23 -d .whl

), so conformance is never silently skipped.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Callable

PINNED = "0.5.23"
MEMBER = "sglang/api/v1/api_types.py"
FETCH_HINT = f"pip download --no-deps sglang=={PINNED} -d .whl"


def _wheel_member(member: str) -> Path | None:
    """A file of the pinned wheel, extracted once into the temp dir, or None without the wheel."""
    from megatron_opd.serving.launch import REPO_ROOT

    candidates = [Path(os.environ["OPD_SGLANG_WHEEL"])] if os.environ.get("OPD_SGLANG_WHEEL") else []
    candidates.append(REPO_ROOT / ".whl")
    for cand in candidates:
        wheels = [cand] if cand.is_file() else sorted(cand.glob(f"sglang-{PINNED}-*.whl")) if cand.is_dir() else []
        for wheel in wheels:
            out = Path(tempfile.gettempdir()) / f"opd-sglang-{PINNED}-{member.replace('/', '_')}"
            if not out.is_file():
                with zipfile.ZipFile(wheel) as zf:
                    tmp = out.with_suffix(f".{os.getpid()}.tmp")
                    tmp.write_bytes(zf.read(member))
                    os.replace(tmp, out)
            return out
    return None


def find_api_types() -> Path | None:
    """The api_types.py file (extracted from the wheel when needed), or None."""
    explicit = os.environ.get("OPD_SGLANG_API_TYPES")
    return Path(explicit) if explicit else _wheel_member(MEMBER)


def wheel_source(member: str) -> str:
    """The text of one file of the pinned wheel (what tests check field names against)."""
    path = _wheel_member(member)
    if path is None:
        raise FileNotFoundError(f"sglang=={PINNED} wheel not found; fetch it with: {FETCH_HINT}")
    return path.read_text()


IO_STRUCT = "sglang/srt/managers/io_struct.py"


def request_fields(class_name: str) -> dict[str, bool]:
    """{field: required} of a request struct in SGLang's internal `io_struct.py` (the weight-update
    requests have no api_types counterpart). Read with `ast`: the module imports half of SGLang."""
    import ast

    path = _wheel_member(IO_STRUCT)
    if path is None:
        raise FileNotFoundError(f"sglang=={PINNED} wheel not found; fetch it with: {FETCH_HINT}")
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return {
                s.target.id: s.value is None
                for s in node.body
                if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
            }
    raise KeyError(f"{class_name} is not in {IO_STRUCT} of sglang=={PINNED}")


SAMPLER = "sglang/srt/layers/sampler.py"


def wheel_function(member: str, name: str, namespace: dict) -> Callable:
    """A top-level function of the pinned wheel's `member`, compiled on its own (with `ast`) in
    `namespace`: how the tests run SGLang's own torch sampler without importing sglang."""
    import ast

    path = _wheel_member(member)
    if path is None:
        raise FileNotFoundError(f"sglang=={PINNED} wheel not found; fetch it with: {FETCH_HINT}")
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            node.decorator_list = []
            scope = dict(namespace)
            exec(compile(ast.Module(body=[node], type_ignores=[]), f"{member}:{name}", "exec"), scope)
            return scope[name]
    raise KeyError(f"{name} is not a function of {member} in sglang=={PINNED}")


def fetch_wheel(directory: Path) -> None:
    """Download the pinned wheel (no dependencies) from the package index into `directory`."""
    import subprocess

    directory.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", f"sglang=={PINNED}", "-d", str(directory)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise FileNotFoundError(
            f"could not download sglang=={PINNED} to read its contract module ({FETCH_HINT}):\n{done.stderr[-2000:]}"
        )


def load_contract(*, fetch: bool = False) -> ModuleType:
    """SGLang's api_types module. With `fetch`, a missing wheel is downloaded into <repo>/.whl first;
    otherwise a missing wheel raises FileNotFoundError with the command that fetches it."""
    path = find_api_types()
    if path is None and fetch:
        from megatron_opd.serving.launch import REPO_ROOT

        fetch_wheel(REPO_ROOT / ".whl")
        path = find_api_types()
    if path is None or not path.is_file():
        raise FileNotFoundError(f"sglang=={PINNED} wheel not found; fetch it with: {FETCH_HINT}")
    name = "sglang_api_types_contract"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # msgspec resolves the forward references through the module
    spec.loader.exec_module(module)
    return module
