"""Summarize a step trace (`SPLITFUSE_STEP_TRACE=file splitfuse serve ...`): where each step's
time goes on the host and the device, how far ahead each step was queued, and garbage-collector
pauses.

    python bench/trace_report.py /tmp/steps.jsonl [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "mean": statistics.mean(values) if values else float("nan"),
        "p50": pct(values, 50),
        "p90": pct(values, 90),
        "p99": pct(values, 99),
        "max": max(values, default=float("nan")),
    }


def report(records: list[dict]) -> dict[str, dict[str, float]]:
    steps = [r for r in records if "seqs" in r and "start" in r]
    gcs = [r for r in records if "gc" in r]
    out: dict[str, dict[str, float]] = {}
    if not steps:
        return out
    wall = steps[-1]["end"] - steps[0]["start"]
    device = sum(r.get("device_ms", 0.0) for r in steps) / 1e3
    out["run"] = {
        "steps": len(steps),
        "seconds": wall,
        "steps_per_s": len(steps) / wall,
        "device_busy_frac": device / wall if wall else float("nan"),
        "tokens_per_step": statistics.mean(r["tokens"] for r in steps),
        "seqs_per_step": statistics.mean(r["seqs"] for r in steps),
        # Scheduled while the step before ran, before its tokens reached the host.
        "ahead_steps": sum(bool(r.get("ahead")) for r in steps),
    }
    for kind in ("decode", "mixed", "eager"):
        chosen = [r for r in steps if r.get("kind") == kind]
        out[f"{kind}_launch_ms"] = summary([(r["launched"] - r["start"]) * 1e3 for r in chosen])
        # CPU time the GPU thread spent launching: far below the wall time means it waited
        # (for the GIL, or on the device).
        out[f"{kind}_launch_cpu_ms"] = summary([r["launch_cpu_ms"] for r in chosen])
        out[f"{kind}_host_ms"] = summary([(r["end"] - r["start"]) * 1e3 for r in chosen])
        out[f"{kind}_device_ms"] = summary([r["device_ms"] for r in chosen if "device_ms" in r])
        out[f"{kind}_tokens"] = summary([float(r["tokens"]) for r in chosen])
    pairs = list(itertools.pairwise(steps))
    # How long before a step's tokens reached the host the next step was on the device's queue
    # (a step scheduled ahead is launched first); below zero, the device waited for the host
    # at least that long between the two.
    out["queued_ahead_ms"] = summary([(a["end"] - b["launched"]) * 1e3 for a, b in pairs])
    out["result_handoff_ms"] = summary([(r["result"] - r["end"]) * 1e3 for r in steps])
    # After a result the loop first waits for the launch of the step queued behind it.
    out["next_launch_wait_ms"] = summary([(r["update_start"] - r["result"]) * 1e3 for r in steps])
    out["update_ms"] = summary([(r["done"] - r["update_start"]) * 1e3 for r in steps])
    out["schedule_ms"] = summary([r["schedule_ms"] for r in steps])
    out["submit_to_start_ms"] = summary([(r["start"] - r["submit"]) * 1e3 for r in steps])
    out["process_ms"] = summary([r["process_ms"] for r in steps if "process_ms" in r])
    for gen in (0, 1, 2):
        pauses = [r["ms"] for r in gcs if r["gc"] == gen]
        out[f"gc{gen}_ms"] = {**summary(pauses), "total": sum(pauses)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    records = [json.loads(line) for line in Path(args.trace).read_text().splitlines() if line]
    result = report(records)
    for name, values in result.items():
        cells = "  ".join(
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()
        )
        print(f"{name:22s} {cells}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
