"""Preference data -> tokenized TFRecord shards + metadata.json, offline, once.

    python -m apo_jax.data.preprocess --input pairs.jsonl --tokenizer Meta-Llama-3-8B-Instruct \\
        --output data/clair --max-length 1024

`--input`: a .jsonl/.json or .parquet file, a `save_to_disk` directory, or a Hugging Face
dataset directory or cached hub name (read offline). `--tokenizer`: a directory with the
tokenizer files (a checkpoint directory works). The output is written to a temporary directory
and renamed when complete, so an interrupted run leaves nothing half-written: run it again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys
import time

import numpy as np

from apo_jax import cli, outputs
from apo_jax.data import formats
from apo_jax.data.ches import ches_scores
from apo_jax.data.tfrecords import (
    PAIRED_FIELDS,
    SCHEMA_VERSION,
    UNPAIRED_FIELDS,
    max_token_id,
    write_shards,
)
from apo_jax.data.tokenize import chat_kwargs, tokenize_example, tokenizer_fingerprint, truncate
from apo_jax.models import load_tokenizer

TOOL = "apo_jax.data.preprocess"
HISTOGRAM_BINS = (0, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 2**31 - 1)


def source_fingerprint(source: str) -> str:
    """sha256 of the source file, of every file of a source directory, or of a hub name."""
    path = pathlib.Path(source)
    h = hashlib.sha256()
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.rglob("*") if p.is_file())
        if path.is_dir()
        else []
    )
    if not files:
        h.update(f"name:{source}".encode())
    for f in files:
        h.update(str(f.relative_to(path.parent if path.is_file() else path)).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _histogram(lengths: list[int]) -> list[int]:
    return (
        np.histogram(lengths, bins=HISTOGRAM_BINS)[0].tolist() if lengths else [0] * (len(HISTOGRAM_BINS) - 1)
    )


def build_records(examples, tokenizer, *, max_length, max_prompt_length, unpaired, kl_block, kwargs):
    """Tokenized, truncated records plus the counts that go into metadata.json."""
    counts = {"dropped_prompt_too_long": 0, "prefix_mismatch": 0}
    truncated = {"prompt": 0, "chosen": 0, "rejected": 0}
    lengths = {"prompt": [], "chosen": [], "rejected": []}
    records, sources = [], []
    for index, example in examples:
        t, info = truncate(tokenize_example(tokenizer, example, kwargs), max_length, max_prompt_length)
        counts["prefix_mismatch"] += t.prefix_mismatch
        if info.dropped:
            counts["dropped_prompt_too_long"] += 1
            continue
        for key in truncated:
            truncated[key] += getattr(info, f"{key}_truncated")
        lengths["prompt"].append(len(t.prompt_ids))
        lengths["chosen"].append(len(t.chosen_ids))
        record = {"prompt_ids": t.prompt_ids, "source_index": index}
        if unpaired:
            record |= {"completion_ids": t.chosen_ids, "label": int(example.label)}
        else:
            lengths["rejected"].append(len(t.rejected_ids))
            record |= {"chosen_ids": t.chosen_ids, "rejected_ids": t.rejected_ids}
        for key, value in example.extras.items():
            record[key] = int(value) if key in ("is_tie", "timestamp") else float(value)
        records.append(record)
        sources.append(index)
    if unpaired:  # KTO's mismatched pairs: completion of the next example within each block
        for start in range(0, len(records), kl_block):
            block = records[start : start + kl_block]
            for i, record in enumerate(block):
                record["kl_completion_ids"] = block[(i + 1) % len(block)]["completion_ids"]
    histogram = {"bins": list(HISTOGRAM_BINS), **{k: _histogram(v) for k, v in lengths.items() if v}}
    return records, counts, truncated, histogram


def preprocess(
    source: str,
    out_dir: str | pathlib.Path,
    tokenizer,
    *,
    split: str = "train",
    max_length: int | None = 1024,
    max_prompt_length: int | None = None,
    unpaired: bool = False,
    kl_block: int = 8,
    num_shards: int | None = None,
    chat_template_kwargs: dict | None = None,
    rows_per_shard: int = 10_000,
    as_chat: bool = False,
    ches_model: str | None = None,
    ches_drop: float = 0.0,
    overwrite: bool = False,
) -> dict:
    """Reads, normalizes, tokenizes and writes `out_dir`; returns the metadata it wrote.

    With `ches_model` (a Hugging Face Llama sharing the tokenizer) and `ches_drop` in (0, 1), the
    `ches_drop` fraction of pairs with the highest CHES under that model is left out (likelihood
    displacement, apo_jax.data.ches). An existing `out_dir` is replaced only when this tool wrote it,
    or with `overwrite` (apo_jax.outputs)."""
    started = time.time()
    check_lengths(max_length, max_prompt_length, kl_block=kl_block, num_shards=num_shards)
    check_ches(ches_model, ches_drop, unpaired)
    out_dir = outputs.check_output(out_dir, TOOL, overwrite=overwrite, inputs=[source])  # before the work
    examples, report = formats.read_examples(source, unpaired=unpaired, split=split, chat=as_chat)
    kwargs = chat_kwargs(tokenizer, chat_template_kwargs)
    records, counts, truncated, histogram = build_records(
        examples,
        tokenizer,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        unpaired=unpaired,
        kl_block=kl_block,
        kwargs=kwargs,
    )
    if not records:
        why = f"{report.rows} read, {report.skipped} malformed"
        if counts["dropped_prompt_too_long"]:
            why += f", {counts['dropped_prompt_too_long']} dropped: prompt alone >= --max-length {max_length}"
        first = f"; first problem: {report.errors[0]}" if report.errors else ""
        raise ValueError(f"{source}: no usable rows ({why}){first}")
    ches = None
    if ches_model:
        records, ches = _drop_high_ches(records, ches_model, ches_drop)
    if not unpaired:  # identical tokens (as written, or cut so) give the pair no gradient at all
        counts["identical_pairs"] = sum(r["chosen_ids"] == r["rejected_ids"] for r in records)
    num_shards = num_shards or max(1, -(-len(records) // rows_per_shard))
    with outputs.replacing(out_dir, TOOL, overwrite=overwrite, inputs=[source]) as tmp:
        meta = _metadata(
            records,
            write_shards(records, tmp, num_shards),
            report,
            counts,
            truncated,
            histogram,
            tokenizer,
            kwargs,
            ches,
            source=source,
            split=split,
            unpaired=unpaired,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            kl_block=kl_block,
            started=started,
        )
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _drop_high_ches(records: list[dict], ches_model, ches_drop: float) -> tuple[list[dict], dict]:
    """The records without the `ches_drop` fraction of highest CHES under `ches_model`, and a report."""
    scores = ches_scores(ches_model, records)
    drop = int(round(ches_drop * len(records)))
    keep = sorted(np.argsort(scores, kind="stable")[: len(records) - drop])
    report = {
        "model": str(ches_model),
        "drop_fraction": ches_drop,
        "dropped": drop,
        "threshold": float(np.sort(scores)[len(records) - drop - 1]) if drop else None,
    }
    return [records[i] for i in keep], report


def check_ches(ches_model, ches_drop: float, unpaired: bool) -> None:
    """The CHES filter's settings, before any row is read: both or neither, a fraction of pairs."""
    if ches_drop and not ches_model:
        raise ValueError(f"--ches-drop {ches_drop} needs --ches-model (the model that scores the pairs)")
    if ches_model and unpaired:
        raise ValueError("--ches-model scores pairs: it does not apply to --unpaired rows")
    if ches_model and not 0 < ches_drop < 1:
        raise ValueError(f"--ches-drop {ches_drop}: give the fraction in (0, 1) of pairs to leave out")


def check_lengths(max_length, max_prompt_length, **positive) -> None:
    """The length settings, before any row is read: positive, and a prompt budget below the total."""
    for flag, value in {
        "--max-length": max_length,
        "--max-prompt-length": max_prompt_length,
        **{"--" + k.replace("_", "-"): v for k, v in positive.items()},
    }.items():
        if value is not None and value <= 0:
            raise ValueError(f"{flag} {value}: must be a positive number of tokens (or left out)")
    if max_length and max_prompt_length and max_prompt_length >= max_length:
        raise ValueError(
            f"--max-prompt-length {max_prompt_length} must be below --max-length {max_length}: "
            "the answers need tokens too"
        )


def _metadata(
    records,
    shards,
    report,
    counts,
    truncated,
    histogram,
    tokenizer,
    kwargs,
    ches,
    *,
    source,
    split,
    unpaired,
    max_length,
    max_prompt_length,
    kl_block,
    started,
) -> dict:
    fields = set().union(*(r.keys() for r in records))
    return {
        "schema_version": SCHEMA_VERSION,
        "written_by": TOOL,
        "kind": "unpaired" if unpaired else "paired",
        "fields": sorted(fields),
        "required_fields": list(UNPAIRED_FIELDS if unpaired else PAIRED_FIELDS),
        "rows": {
            "read": report.rows,
            "skipped_malformed": report.skipped,
            **counts,
            "written": len(records),
        },
        "truncated": truncated,
        "length_histogram": histogram,
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "kl_block": kl_block if unpaired else None,
        "max_token_id": max_token_id(records),  # for reading; the trainer checks the records themselves
        "tokenizer": {
            "name_or_path": getattr(tokenizer, "name_or_path", None),
            "fingerprint": tokenizer_fingerprint(tokenizer),
            "vocab_size": len(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "chat_template_kwargs": kwargs,
        "source": {"path": str(source), "split": split, "fingerprint": source_fingerprint(str(source))},
        "shards": shards,
        "errors": report.errors,
        "ches_filter": ches,
        "seconds": round(time.time() - started, 2),
    }


def summary(meta: dict) -> str:
    """The printed summary: what was read, kept, cut and dropped, and why."""
    r, t = meta["rows"], meta["truncated"]
    lines = [
        f"rows read {r['read']}: written {r['written']}, skipped (malformed) {r['skipped_malformed']}, "
        f"dropped (prompt alone >= max_length {meta['max_length']}) {r['dropped_prompt_too_long']}",
        f"truncated to max_length: chosen {t['chosen']}, rejected {t['rejected']}; prompts cut to "
        f"max_prompt_length: {t['prompt']}",
        f"prompt/completion boundary not a token boundary (completion starts at the common prefix, "
        f"as in TRL): {r['prefix_mismatch']}",
    ]
    if "identical_pairs" in r:
        lines.append(f"chosen identical to rejected (no preference signal): {r['identical_pairs']}")
    hist = meta["length_histogram"]
    edges = hist["bins"]
    labels = [
        f"<{edges[i + 1]}" if edges[i + 1] < 2**31 - 1 else f">={edges[i]}" for i in range(len(edges) - 1)
    ]
    for key in ("prompt", "chosen", "rejected"):
        if key in hist:
            cells = ", ".join(f"{lab}: {n}" for lab, n in zip(labels, hist[key], strict=True) if n)
            lines.append(f"{key} tokens: {cells}")
    if meta.get("ches_filter"):
        c = meta["ches_filter"]
        lines.append(f"dropped (highest CHES under {c['model']}, {c['drop_fraction']:.0%}): {c['dropped']}")
    lines += [f"  {e}" for e in meta["errors"][:5]]
    if r["skipped_malformed"] > 5:
        lines.append(f"  ... {r['skipped_malformed'] - 5} more malformed rows (first 20 in metadata.json)")
    files = ", ".join(s["file"] for s in meta["shards"])
    lines.append(f"wrote {len(meta['shards'])} shard(s): {files}")
    return "\n".join(lines)


@cli.command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m apo_jax.data.preprocess", description=__doc__.split("\n")[0])
    p.add_argument(
        "--input", required=True, help=".jsonl/.parquet file, dataset directory or cached hub name"
    )
    p.add_argument("--output", required=True, help="directory for the shards and metadata.json")
    p.add_argument("--tokenizer", required=True, help="directory with the tokenizer (and chat template)")
    p.add_argument("--split", default="train")
    p.add_argument(
        "--max-length", type=int, default=1024, help="prompt+completion tokens kept (TRL default 1024)"
    )
    p.add_argument("--max-prompt-length", type=int, default=None, help="keep the last N prompt tokens")
    p.add_argument("--unpaired", action="store_true", help="rows are prompt/completion/label (KTO)")
    p.add_argument("--kl-block", type=int, default=8, help="KTO mismatched-pair block size")
    p.add_argument("--num-shards", type=int, default=None)
    p.add_argument("--as-chat", action="store_true", help="frame string rows as user/assistant turns")
    p.add_argument(
        "--chat-template-kwargs", type=json.loads, default=None, help='JSON, e.g. {"date_string": "..."}'
    )
    p.add_argument("--ches-model", default=None, help="a Llama (same tokenizer) to score pairs by CHES")
    p.add_argument("--ches-drop", type=float, default=0.0, help="with --ches-model: fraction left out")
    p.add_argument("--overwrite", action="store_true", help="replace --output even if another tool wrote it")
    args = p.parse_args(argv)

    tokenizer = load_tokenizer(args.tokenizer)
    meta = preprocess(
        args.input,
        args.output,
        tokenizer,
        split=args.split,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        unpaired=args.unpaired,
        kl_block=args.kl_block,
        num_shards=args.num_shards,
        chat_template_kwargs=args.chat_template_kwargs,
        as_chat=args.as_chat,
        ches_model=args.ches_model,
        ches_drop=args.ches_drop,
        overwrite=args.overwrite,
    )
    print(summary(meta))
    identical, written = meta["rows"].get("identical_pairs"), meta["rows"]["written"]
    if identical:
        print(
            f"warning: {identical} of {written} pairs have chosen identical to rejected: they carry no "
            "preference signal (metadata.json rows.identical_pairs)",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
