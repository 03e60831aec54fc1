"""Print a private apt source list for an older Debian suite, from this machine's own.

    python3 scripts/autobahn/apt_sources.py SUITE

Autobahn|TestSuite runs on Python 2.7, which Debian last shipped in bullseye.
The build downloads those packages with a private apt configuration; the
archive it reads from is the one this machine is already configured with
(``/etc/apt/sources.list`` and ``sources.list.d``, both formats), so nothing
here names a mirror. Only the suite names change: ``<codename>`` becomes
SUITE and ``<codename>-security`` becomes ``SUITE-security``.
"""

from __future__ import annotations

import glob
import re
import sys

KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def codename() -> str:
    """This machine's Debian codename, from /etc/os-release."""
    with open("/etc/os-release") as f:
        for line in f:
            if line.startswith("VERSION_CODENAME="):
                return line.split("=", 1)[1].strip().strip('"')
    sys.exit("apt_sources: no VERSION_CODENAME in /etc/os-release")


def entries() -> list[tuple[str, list[str]]]:
    """(URI, suites) of every enabled ``deb`` source, one-line and deb822 formats."""
    found: list[tuple[str, list[str]]] = []
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            continue
        for raw in text.splitlines():
            words = re.sub(r"\[[^]]*\]", " ", raw.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                found.append((words[1], [words[2]]))
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        with open(path) as f:
            text = f.read()
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, list[str]] = {}
            for raw in stanza.splitlines():
                if raw.startswith("#") or ":" not in raw:
                    continue
                key, value = raw.split(":", 1)
                fields[key.strip().lower()] = value.split()
            if "deb" in fields.get("types", []) and fields.get("enabled", ["yes"])[0] != "no":
                found.extend((uri, fields.get("suites", [])) for uri in fields.get("uris", []))
    return found


def main() -> None:
    suite = sys.argv[1]
    mine = codename()
    archive: dict[str, str] = {}  # "" or "-security" -> URI
    for uri, suites in entries():
        for suffix in ("", "-security"):
            if mine + suffix in suites:
                archive.setdefault(suffix, uri.rstrip("/"))
    if "" not in archive:
        sys.exit(f"apt_sources: no configured Debian archive for {mine}")
    for suffix, uri in sorted(archive.items()):
        print(f"deb [signed-by={KEYRING}] {uri} {suite}{suffix} main")


if __name__ == "__main__":
    main()
