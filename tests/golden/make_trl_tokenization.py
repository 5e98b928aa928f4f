"""Generates tests/golden/trl_tokenization.json: TRL 1.16's own tokenization of the sample pairs.

    pip install trl==1.16.0   # beside the test extra
    python tests/golden/make_trl_tokenization.py

Runs `DPOTrainer._prepare_dataset` (prompt extraction, EOS, chat-template tokenization, the
drop of over-long prompts) and `DataCollatorForPreference` (keep_start truncation) with
apo_jax.data.tiny.tiny_tokenizer, on tests/data/clair_pairs_hybrid_format.jsonl given to TRL in
the layouts TRL reads correctly: conversational with an explicit prompt (the hybrid rows with
their repeated user turn stripped) and standard strings.
"""

from __future__ import annotations

import json
import pathlib
import types

from datasets import Dataset
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer

from apo_jax.data.tiny import tiny_tokenizer
from apo_jax.data.tokenize import tokenizer_fingerprint

HERE = pathlib.Path(__file__).parent
MAX_LENGTH = 512  # drops the 4 longest prompts, truncates the rest


def rows():
    raw = [json.loads(line) for line in (HERE.parent / "data" / "clair_pairs_hybrid_format.jsonl").open()]
    conversational = [
        {"prompt": r["chosen"][:1], "chosen": r["chosen"][1:], "rejected": r["rejected"][1:], "row": i}
        for i, r in enumerate(raw)
    ]
    standard = [
        {
            "prompt": r["prompt"] + "\n",
            "chosen": r["chosen"][1]["content"],
            "rejected": r["rejected"][1]["content"],
            "row": i,
        }
        for i, r in enumerate(raw)
    ]
    return {"conversational": conversational, "standard": standard}


def main():
    tok = tiny_tokenizer()
    trainer = object.__new__(DPOTrainer)
    trainer._tokenizer = tok
    out = {"tokenizer_fingerprint": tokenizer_fingerprint(tok), "max_length": MAX_LENGTH, "cases": {}}
    for layout, data in rows().items():
        args = types.SimpleNamespace(
            dataset_num_proc=None, max_length=MAX_LENGTH, truncation_mode="keep_start"
        )
        ds = DPOTrainer._prepare_dataset(trainer, Dataset.from_list(data), tok, args, "train")
        kept = [dict(ex) for ex in ds]
        collated = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=MAX_LENGTH)(
            [{k: ex[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for ex in kept]
        )
        n = len(kept)
        ids, attn, comp = (collated[k].tolist() for k in ("input_ids", "attention_mask", "completion_mask"))
        out["cases"][layout] = {
            "rows": data,
            "kept": [ex["row"] for ex in kept],
            "prompt_ids": [ex["prompt_ids"] for ex in kept],
            "chosen_ids": [ex["chosen_ids"] for ex in kept],
            "rejected_ids": [ex["rejected_ids"] for ex in kept],
            "chosen_input_ids": [x[: sum(a)] for x, a in zip(ids[:n], attn[:n], strict=True)],
            "chosen_loss_mask": [c[: sum(a)] for c, a in zip(comp[:n], attn[:n], strict=True)],
            "rejected_input_ids": [x[: sum(a)] for x, a in zip(ids[n:], attn[n:], strict=True)],
            "rejected_loss_mask": [c[: sum(a)] for c, a in zip(comp[n:], attn[n:], strict=True)],
        }
    (HERE / "trl_tokenization.json").write_text(json.dumps(out) + "\n")
    print({k: len(v["kept"]) for k, v in out["cases"].items()}, "rows kept of", len(rows()["standard"]))


if __name__ == "__main__":
    main()
