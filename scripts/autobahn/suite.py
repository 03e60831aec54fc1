"""The fuzzingclient's spec file, and the verdict on its report.

    python scripts/autobahn/suite.py spec URL OUTDIR --cases PATS --exclude PATS [--hostname H]
    python scripts/autobahn/suite.py report OUTDIR [--max-non-strict N] [--min-cases N]

``spec`` prints the JSON that ``wstest -m fuzzingclient -s`` reads. ``report``
reads OUTDIR/index.json (and each case's own report for the reason), prints
the counts by outcome and one line per FAILED and NON-STRICT case, and exits
1 when any case FAILED, when more than N are NON-STRICT, or when fewer cases
ran than expected (a suite that stopped early must not pass).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

ORDER = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"]


def patterns(text: str) -> list[str]:
    """Comma-separated case patterns, as wstest takes them ("9.*", "7.1.5")."""
    return [p.strip() for p in text.split(",") if p.strip()]


def spec(args: argparse.Namespace) -> int:
    server: dict[str, str] = {"agent": args.agent, "url": args.url}
    if args.hostname:
        # wstest then verifies the certificate against the default trust
        # store, which SSL_CERT_FILE replaces (conformance.sh --cafile).
        server["hostname"] = args.hostname
    print(json.dumps({
        # failByDrop off: a server may drop the TCP connection right after its
        # close frame (RFC 6455 section 7.1.1 lets the server close first).
        "options": {"failByDrop": False},
        "outdir": os.path.abspath(args.outdir),
        "servers": [server],
        "cases": patterns(args.cases),
        "exclude-cases": patterns(args.exclude),
        "exclude-agent-cases": {},
    }, indent=2))
    return 0


def case_key(case_id: str) -> tuple[int, ...]:
    return tuple(int(part) for part in case_id.split("."))


def reason(outdir: str, row: dict[str, object]) -> str:
    """What the case's own report says went wrong, on one line."""
    path = os.path.join(outdir, str(row.get("reportfile", "")))
    try:
        with open(path) as f:
            detail = json.load(f)
    except (OSError, ValueError):
        return "(no case report)"
    bits = [" ".join(str(detail.get("result", "")).split())[:100]]
    if detail.get("behaviorClose") not in ("OK", "INFORMATIONAL"):
        bits.append(f"close {detail.get('behaviorClose')}: "
                    + " ".join(str(detail.get("resultClose", "")).split())[:80])
    bits.append(f"server close code {detail.get('remoteCloseCode')}")
    return "; ".join(bits)


def report(args: argparse.Namespace) -> int:
    with open(os.path.join(args.outdir, "index.json")) as f:
        index = json.load(f)
    rows = {case: row for agent in index.values() for case, row in agent.items()}
    counts = collections.Counter(str(row["behavior"]) for row in rows.values())
    for behavior in ("FAILED", "NON-STRICT"):
        for case in sorted((c for c, r in rows.items() if r["behavior"] == behavior), key=case_key):
            print(f"  {behavior:<10} {case:<9} {reason(args.outdir, rows[case])}")
    summary = ", ".join(f"{b} {counts[b]}" for b in ORDER + sorted(set(counts) - set(ORDER))
                        if counts[b])
    print(f"conformance: {len(rows)} cases: {summary}")
    problems = []
    if counts["FAILED"]:
        problems.append(f"{counts['FAILED']} FAILED")
    if counts["NON-STRICT"] > args.max_non_strict:
        problems.append(f"{counts['NON-STRICT']} NON-STRICT (at most {args.max_non_strict})")
    if len(rows) < args.min_cases:
        problems.append(f"only {len(rows)} cases ran (expected at least {args.min_cases})")
    if problems:
        print("conformance: FAILED: " + "; ".join(problems))
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("spec")
    p.add_argument("url")
    p.add_argument("outdir")
    p.add_argument("--agent", default="wsserver")
    p.add_argument("--cases", default="*")
    p.add_argument("--exclude", default="")
    p.add_argument("--hostname", default="")
    p.set_defaults(run=spec)
    r = sub.add_parser("report")
    r.add_argument("outdir")
    r.add_argument("--max-non-strict", type=int, default=0)
    r.add_argument("--min-cases", type=int, default=1)
    r.set_defaults(run=report)
    args = parser.parse_args()
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
