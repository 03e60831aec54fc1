"""A plain, non-editable install ships every module and the demo page."""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
from pathlib import Path

from tests.support.servers import ROOT


def source_copy(destination: Path) -> Path:
    """The checkout's files as git knows them (tracked, or new and not ignored),
    without a stale ``build/`` or egg-info that could supply what setup.cfg omits."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, check=True, capture_output=True, timeout=60,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def test_non_editable_install_finds_the_demo_page(tmp_path: Path) -> None:
    target = tmp_path / "site"
    source = source_copy(tmp_path / "source")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--target", str(target), str(source)],
        check=True, capture_output=True, timeout=300,
    )
    assert (target / "wsserver" / "static" / "index.html").is_file()
    # Run from elsewhere so the checkout cannot be found by accident.
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "from wsserver.edge.app import static_dir; print(static_dir())"
    )
    found = subprocess.run(
        [sys.executable, "-c", probe, str(target)], cwd=tmp_path, check=True,
        capture_output=True, text=True, timeout=60,
    ).stdout.strip()
    assert Path(found) == target / "wsserver" / "static"
    assert not (target / "tests").exists()
    # Every module of the checkout is installed and imports from the install
    # (a subpackage missing from setup.cfg's list broke 'pip install .').
    modules = sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for path in (ROOT / "wsserver").rglob("*.py")
        if path.name != "__main__.py"
    )
    # -S: no .pth files, so the development venv's editable-install finder
    # cannot supply what the install lacks; site-packages is added by hand.
    probe = (
        "import importlib, sys; sys.path[:0] = sys.argv[1].split(':'); "
        "[importlib.import_module(m.removesuffix('.__init__')) for m in sys.argv[2:]]; "
        "import wsserver; print(wsserver.__file__)"
    )
    path = ":".join([str(target), *site.getsitepackages()])
    imported = subprocess.run(
        [sys.executable, "-S", "-c", probe, path, *modules], cwd=tmp_path,
        capture_output=True, text=True, timeout=60,
    )
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == str(target / "wsserver" / "__init__.py")
