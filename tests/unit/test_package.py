"""Packaging invariants: platform/ must not shadow the stdlib, and `import mmfusion` stays light."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_platform_is_stdlib_even_from_repo_root():
    assert not (REPO / "platform" / "__init__.py").exists()
    # run from the repo root, where a `platform` package would shadow the standard library first
    path = _run("import platform, sysconfig; print(platform.__file__); print(platform.python_version())")
    file, version = path.splitlines()
    assert Path(file).parent == Path(_run("import sysconfig; print(sysconfig.get_paths()['stdlib'])"))
    assert version == ".".join(map(str, sys.version_info[:3]))


def test_import_mmfusion_does_not_import_ray_or_torch():
    loaded = _run(
        "import sys, mmfusion, mmfusion.config, mmfusion.cli; "
        "print(' '.join(m for m in ('ray', 'torch') if m in sys.modules))"
    )
    assert loaded == ""


def test_console_script_help():
    exe = Path(sys.executable).parent / "mmfusion"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("config", "data", "model"):
        assert cmd in out.stdout
