"""A plain, non-editable install ships the demo page inside the package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_non_editable_install_finds_the_demo_page(tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--target", str(target), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    assert (target / "wsserver" / "static" / "index.html").is_file()
    # Run from elsewhere so the checkout cannot be found by accident.
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "from wsserver.app import static_dir; print(static_dir())"
    )
    found = subprocess.run(
        [sys.executable, "-c", probe, str(target)], cwd=tmp_path, check=True,
        capture_output=True, text=True, timeout=60,
    ).stdout.strip()
    assert Path(found) == target / "wsserver" / "static"
    assert not (target / "tests").exists()
