"""The summary of bench/device_check.sh: $OUT/device_check.json and $OUT/device_check.md.

It gathers what the steps left: each step's exit status and seconds (steps.tsv), the kernel
tests' counts (JUnit XML), bench/kernel.py's rates (kernel.json), the training run's
results, pictures and host syncs per step (its log lines `syncs_per_step=...`, written under
FGDIST_SYNC_DEBUG=warn on CUDA; absent on the CPU), and bench/step_time.py's table of the
backbones (backbones.md)."""

from __future__ import annotations

import argparse
import json
import re
import statistics
import xml.etree.ElementTree as ET
from pathlib import Path

SYNCS = re.compile(r"\bsyncs_per_step=([0-9.e+-]+)")
SYNC_PLACES = re.compile(r"host syncs in training steps, by place: (.*)")


def steps(work: Path) -> list[dict]:
    rows = [line.split("\t") for line in (work / "steps.tsv").read_text().splitlines() if line]
    return [{"step": name, "rc": int(rc), "seconds": int(sec)} for name, rc, sec in rows]


def kernel_tests(work: Path) -> dict:
    path = work / "kernel_tests.xml"
    if not path.is_file():
        return {"error": f"{path.name} missing"}
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def kernel_rates(out: Path) -> dict:
    path = out / "kernel.json"
    if not path.is_file():
        return {"error": f"{path.name} missing"}
    data = json.loads(path.read_text())
    keep = ("n_local", "groups", "impl", "time_ms", "fwd_ms", "tflops", "fwd_tflops", "bwd_tflops")
    keep += ("tflops_of_matmul", "fwd_tflops_of_matmul", "bwd_tflops_of_matmul", "speedup_vs_masked_dense", "skipped")
    return {
        "machine": data["meta"]["machine"],
        "bf16_matmul_tflops": data["meta"].get("bf16_matmul_tflops"),
        "cases": [{k: r[k] for k in keep if k in r} for r in data["results"]],
    }


def training(out: Path, work: Path) -> dict:
    log = (work / "logs" / "train.log").read_text() if (work / "logs" / "train.log").is_file() else ""
    syncs = [float(v) for v in SYNCS.findall(log)]
    places = SYNC_PLACES.findall(log)
    results = out / "train_results.json"
    pictures = sorted(p.name for p in (work / "runs" / "device_check" / "pictures").glob("*.png"))
    return {
        "results": json.loads(results.read_text())["metrics"] if results.is_file() else None,
        "pictures": pictures,
        "syncs_per_step": {"logged": len(syncs), "median": statistics.median(syncs), "max": max(syncs)}
        if syncs
        else None,
        "sync_places": places[-1] if places else None,
    }


def markdown(summary: dict) -> str:
    lines = [f"# Device check ({'dry run, CPU' if summary['dry_run'] else 'GPU'})", ""]
    lines += ["| step | exit | seconds |", "|---|---|---|"]
    lines += [f"| {s['step']} | {s['rc']} | {s['seconds']} |" for s in summary["steps"]]
    lines += ["", f"Kernel tests: {summary['kernel_tests']}", ""]
    rates = summary["kernel"]
    if "cases" in rates:
        lines += [
            f"Kernel benchmark on {rates['machine']}; bf16 matmul {rates['bf16_matmul_tflops'] or '-'} TFLOP/s",
            "",
        ]
        lines += ["| n_local | groups | impl | ms | TFLOP/s fwd / bwd / both | of matmul fwd / bwd / both |"]
        lines += ["|---|---|---|---|---|---|"]
        for c in rates["cases"]:
            if "skipped" in c:
                lines.append(f"| {c['n_local']:,} | {c['groups']} | {c['impl']} | skipped: {c['skipped']} | | |")
                continue
            tf = " / ".join(f"{c.get(k, 0):.2f}" for k in ("fwd_tflops", "bwd_tflops", "tflops"))
            frac = " / ".join(
                f"{c[k]:.0%}" if k in c else "-"
                for k in ("fwd_tflops_of_matmul", "bwd_tflops_of_matmul", "tflops_of_matmul")
            )
            lines.append(f"| {c['n_local']:,} | {c['groups']} | {c['impl']} | {c['time_ms']:.2f} | {tf} | {frac} |")
    train = summary["training"]
    lines += ["", f"Training: pictures {train['pictures']}; host syncs per training step {train['syncs_per_step']}"]
    if train["sync_places"]:
        lines.append(f"Where: {train['sync_places']}")
    if train["results"]:
        lines += ["", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in train["results"].items()]
    lines += ["", "## Backbones", "", summary["backbones"] or "backbones.md missing (the backbones step failed)"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--dry-run", type=int, default=0)
    args = p.parse_args(argv)
    summary = {
        "dry_run": bool(args.dry_run),
        "steps": steps(args.work),
        "kernel_tests": kernel_tests(args.work),
        "kernel": kernel_rates(args.out),
        "training": training(args.out, args.work),
        "backbones": (args.out / "backbones.md").read_text() if (args.out / "backbones.md").is_file() else None,
    }
    (args.out / "device_check.json").write_text(json.dumps(summary, indent=1))
    (args.out / "device_check.md").write_text(markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
