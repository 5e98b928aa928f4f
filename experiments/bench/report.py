"""The report: the machine, the table, the ratios against TRL and their agreement."""

from __future__ import annotations

import datetime
import importlib.util
import math
import os
import pathlib
import platform
import subprocess

import jax


def machine() -> dict:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=pathlib.Path(__file__).parent,
    ).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit or "unknown",
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
    }


def table(results: list[dict]) -> str:
    def f(x):
        if isinstance(x, float):
            return f"{x:.4g}"
        return str(x)

    lines = []
    for part in dict.fromkeys(r["part"] for r in results):
        rows = [r for r in results if r["part"] == part]
        keys = list(dict.fromkeys(k for r in rows for k in r if k != "part"))
        lines.append(f"## {part}")
        lines.append("| " + " | ".join(keys) + " |")
        lines.append("|" + "---|" * len(keys))
        lines += ["| " + " | ".join(f(r.get(k, "")) for k in keys) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def ratios(results: list[dict]) -> dict:
    steps = [r for r in results if r["part"] == "step" and "error" not in r]

    def pick(impl, reference, layout="padded", gc=None):
        for r in steps:
            if (
                r["impl"] == impl
                and r["reference"] == reference
                and r["layout"].startswith(layout)
                and (gc is None or r.get("gradient_checkpointing") == gc)
            ):
                return r
        return None

    out = {}
    for ref in ("frozen", "precomputed"):
        ours = pick("apo_jax", ref)
        for gc in (False, True):
            theirs = pick("trl", ref, gc=gc)
            if ours and theirs:
                key = f"tokens/s apo_jax ÷ TRL ({ref} reference, TRL checkpointing {'on' if gc else 'off'})"
                out[key] = ours["tokens_per_s"] / theirs["tokens_per_s"]
    a, b = pick("apo_jax", "precomputed"), pick("apo_jax", "frozen")
    if a and b:
        out["apo_jax step time: precomputed ÷ online reference"] = a["median_s"] / b["median_s"]
    padded = pick("apo_jax", "precomputed", "padded")
    for layout in ("packed", "prompt_shared"):
        other = pick("apo_jax", "precomputed", layout)
        if padded and other and other is not padded:
            out[f"tokens/s {layout} ÷ padded (precomputed reference)"] = (
                other["tokens_per_s"] / padded["tokens_per_s"]
            )
    trl_best = [r for r in steps if r["impl"] == "trl"]
    if a and trl_best:
        best = max(trl_best, key=lambda r: r["tokens_per_s"])
        out["tokens/s best apo_jax ÷ best TRL"] = (
            max(r["tokens_per_s"] for r in steps if r["impl"] == "apo_jax") / best["tokens_per_s"]
        )
    for r in results:
        if r["part"] == "sampling" and r.get("impl") == "transformers":
            ours = [o for o in results if o["part"] == "sampling" and o.get("impl") == "apo_jax"]
            ours = [o for o in ours if o["batch"] == r["batch"]]
            if ours:
                key = f"sampling tokens/s apo_jax ÷ transformers generate ({r['model']}, batch {r['batch']})"
                out[key] = ours[0]["tokens_per_s"] / r["tokens_per_s"]
    return out


def missing_modules(*modules: str) -> str:
    """The first of `modules` that cannot be imported ("" if all can): the TRL side needs the test extra."""
    return next((m for m in modules if importlib.util.find_spec(m) is None), "")


def agreement(results: list[dict], rtol: float) -> list[str]:
    """apo_jax and TRL on the same weights and batch: step-0 log-probs and the loss after one update."""
    steps = [r for r in results if r["part"] == "step" and r["layout"].startswith("padded")]
    ours = [r for r in steps if r["impl"] == "apo_jax"]
    problems = []
    for t in (r for r in steps if r["impl"] == "trl"):
        o = next((r for r in ours if r["reference"] == t["reference"]), None)
        if o is None:
            continue
        where = f"({t['reference']} reference, TRL gradient checkpointing {t['gradient_checkpointing']})"
        for key in ("step0_logps_chosen", "step0_logps_rejected", "step0_loss", "step1_loss"):
            if not math.isclose(o[key], t[key], rel_tol=rtol, abs_tol=rtol):
                problems.append(f"{key}: apo_jax {o[key]:.6g} vs TRL {t[key]:.6g} {where}")
        # the first update itself: how much it lowered the loss, to 2% (rounding alone would hide it)
        ours_d, trl_d = o["step1_loss"] - o["step0_loss"], t["step1_loss"] - t["step0_loss"]
        if not math.isclose(ours_d, trl_d, rel_tol=0.02, abs_tol=10 * rtol * abs(o["step0_loss"]) * 1e-2):
            problems.append(
                f"loss change of the first update: apo_jax {ours_d:.6g} vs TRL {trl_d:.6g} {where}"
            )
    return problems
