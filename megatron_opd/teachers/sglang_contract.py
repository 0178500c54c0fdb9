"""Load SGLang's own HTTP contract module (`sglang/api/v1/api_types.py`) without importing sglang.

The module is generated from SGLang's protobuf schema and imports only `msgspec`, so it loads on
its own from the pinned wheel. Tests decode every request our client sends and every response
our server returns with its `GenerateRequest` / `GenerateResponse` classes: conformance is
checked against SGLang's code, not against our reading of it.

Where the wheel is looked for, in order: $OPD_SGLANG_API_TYPES (the .py file itself),
$OPD_SGLANG_WHEEL (a wheel file or a directory holding one), then `<repo>/.whl/`. Get it with

    pip download --no-deps sglang==0.5.23 -d .whl
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import zipfile
from pathlib import Path
from types import ModuleType

PINNED = "0.5.23"
MEMBER = "sglang/api/v1/api_types.py"
FETCH_HINT = f"pip download --no-deps sglang=={PINNED} -d .whl"


def find_api_types() -> Path | None:
    """The api_types.py file (extracted from the wheel when needed), or None."""
    explicit = os.environ.get("OPD_SGLANG_API_TYPES")
    if explicit:
        return Path(explicit)
    from megatron_opd.teachers.launch import REPO_ROOT

    candidates = [Path(os.environ["OPD_SGLANG_WHEEL"])] if os.environ.get("OPD_SGLANG_WHEEL") else []
    candidates.append(REPO_ROOT / ".whl")
    for cand in candidates:
        wheels = [cand] if cand.is_file() else sorted(cand.glob(f"sglang-{PINNED}-*.whl")) if cand.is_dir() else []
        for wheel in wheels:
            out = Path(tempfile.gettempdir()) / f"opd-sglang-{PINNED}-api_types.py"
            if not out.is_file():
                with zipfile.ZipFile(wheel) as zf:
                    tmp = out.with_suffix(f".{os.getpid()}.tmp")
                    tmp.write_bytes(zf.read(MEMBER))
                    os.replace(tmp, out)
            return out
    return None


def load_contract() -> ModuleType:
    """SGLang's api_types module; raises FileNotFoundError with the command that fetches it."""
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


def load_contract_or_skip() -> ModuleType:
    """For tests: the contract module, or a pytest skip naming the fetch command.

    With OPD_REQUIRE_SGLANG_CONTRACT=1 (CI) a missing wheel is a failure, not a skip.
    """
    try:
        return load_contract()
    except FileNotFoundError:
        if os.environ.get("OPD_REQUIRE_SGLANG_CONTRACT") == "1":
            raise
        import pytest

        pytest.skip(f"SGLang contract module unavailable; {FETCH_HINT}")
