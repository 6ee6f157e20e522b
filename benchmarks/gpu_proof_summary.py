"""The JSON summary of one benchmarks/gpu_proof.sh stage: its steps (seconds, rc, verdict), the test counts and
failures from the JUnit XML files, and one verdict for the stage. Also prints it as a short table.

verdict per step: ok (rc 0), failed, incomplete (cut short by the stage budget: rc 124/130/137), skipped (no time
left to start it). The stage is "ok" when every step is ok, "incomplete" when none failed but one ran out of time
or was skipped, else "failed"."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import xml.etree.ElementTree as ET

OUT_OF_TIME = {"124", "130", "137"}


def read_steps(path: str) -> list[dict]:
    steps = []
    if os.path.exists(path):
        for line in open(path, encoding="utf-8"):
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 4:
                continue
            name, seconds, rc, log = parts[:4]
            verdict = ("skipped" if rc == "skipped" else "ok" if rc == "0" else
                       "incomplete" if rc in OUT_OF_TIME else "failed")
            steps.append({"name": name, "seconds": int(seconds), "rc": rc, "verdict": verdict,
                          "log": os.path.basename(log)})
    return steps


def read_junit(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "seconds": 0.0}
    failures, slowest = [], []
    for suite in suites:
        counts["seconds"] += float(suite.get("time", 0) or 0)
        for case in suite.iter("testcase"):
            counts["tests"] += 1
            test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
            slowest.append((float(case.get("time", 0) or 0), test_id))
            kinds = {child.tag for child in case}
            if "failure" in kinds or "error" in kinds:
                counts["failed" if "failure" in kinds else "errors"] += 1
                node = case.find("failure") if "failure" in kinds else case.find("error")
                failures.append({"test": test_id, "kind": node.tag, "message": (node.get("message") or "")[:300]})
            elif "skipped" in kinds:
                counts["skipped"] += 1
            else:
                counts["passed"] += 1
    counts["seconds"] = round(counts["seconds"], 1)
    slowest.sort(reverse=True)
    return {"file": os.path.basename(path), **counts, "failures": failures,
            "slowest": [{"test": t, "seconds": round(s, 2)} for s, t in slowest[:10]]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--stage", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--steps", required=True)
    p.add_argument("--budget", type=int, required=True)
    p.add_argument("--seconds", type=int, required=True)
    p.add_argument("--junit", nargs="*", default=[])
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    steps = read_steps(a.steps)
    tests = [t for t in (read_junit(j) for j in a.junit) if t]
    verdicts = {s["verdict"] for s in steps}
    failed_tests = sum(t["failed"] + t["errors"] for t in tests)
    verdict = ("failed" if "failed" in verdicts or failed_tests else
               "incomplete" if verdicts & {"incomplete", "skipped"} else "ok")
    summary = {"stage": a.stage, "verdict": verdict, "device": a.device, "seconds": a.seconds, "budget_s": a.budget,
               "commit": os.environ.get("FNF_COMMIT", "unknown"), "python": platform.python_version(),
               "steps": steps, "tests": tests}
    try:
        import torch
        summary["torch"] = torch.__version__
        summary["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - the summary must be written whatever is broken
        pass
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    print(f"\n== gpu_proof {a.stage} [{a.device}]: {verdict.upper()} in {a.seconds} s (budget {a.budget} s)")
    for s in steps:
        print(f"   {s['verdict']:<10} {s['seconds']:>5} s  {s['name']}")
    for t in tests:
        print(f"   {t['file']}: {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
              f"{t['skipped']} skipped ({t['seconds']} s)")
        for fail in t["failures"][:20]:
            print(f"     {fail['kind'].upper()} {fail['test']}: {fail['message'][:160]}")
    print(f"   summary: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
