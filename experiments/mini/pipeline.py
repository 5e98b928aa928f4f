"""The miniature paper, end to end on a CPU: task -> tokenizer -> SFT'd M -> M's answers -> pairs
built the paper's four ways -> TFRecords -> preference training -> accuracy (M, the aligned model and
the positive control, experiments/mini/model.py), contrastiveness, Figure-4 plots and results.md.
M, its answers, the pairs and the positive control are cached in `<workdir>/../mini_cache/` and
shared by every cell.
"""

from __future__ import annotations

import json
import math
import pathlib
import random
import time

from apo_jax.data import steps
from apo_jax.data.anchor import anchor_pair
from apo_jax.data.clair.stats import ches_stats, pair_stats, table
from apo_jax.data.generate import generate_with_model, prompt_ids
from apo_jax.data.jsonl import read_jsonl, write_jsonl
from apo_jax.data.preprocess import preprocess
from apo_jax.data.steps import SCDPO_TEMPERATURE, scdpo_starts, step_pair
from apo_jax.data.tfrecords import read_records, rewrite_records
from apo_jax.data.token_weights import add_weights
from apo_jax.data.tokenize import chat_kwargs
from apo_jax.train.edit import edit_checkpoint
from experiments.mini import model, task
from experiments.mini.model import say

PAIR_LENGTH = 96  # prompt + the longest answer of any stand-in (the stronger model's, 49 tokens)
DATA_KINDS = ("clair", "on_policy_judge", "off_policy_judge", "stronger_preferred", "clair_steps", "anchor")
SAMPLED_KINDS = ("scdpo",)  # kinds that sample M again (built only for their own cells)


def scdpo_pairs(cache, m_dir, prompts, answers, name, seed) -> list[dict]:
    """Step-Controlled DPO pairs (apo_jax.data.steps): M's correct answers (the gold solution where M
    has none) cut at a random step and continued by M at a temperature rising per line (the paper's
    Mistral schedule); two tries each, the first with a wrong final answer is the rejected answer."""
    correct = {a["index"]: a for a in answers if task.is_correct(prompts[a["index"]], a["response"])}
    correct = [
        correct.get(i, {"prompt": p["prompt"], "response": task.gold_answer(p), "index": i})
        for i, p in enumerate(prompts)
    ]
    starts = scdpo_starts(correct, random.Random(seed))
    out = cache / f"{name}.jsonl"
    rows = [{"prompt": s["prompt"], "prefix": s["prefix"], "start": j} for j, s in enumerate(starts)]
    generate_with_model(
        rows,
        out,
        m_dir,
        samples=2,
        max_tokens=model.MAX_TOKENS,
        batch_size=64,
        progress=False,
        seed=seed,
        **SCDPO_TEMPERATURE,
    )
    continuations = read_jsonl(out)
    pairs = steps.scdpo_pairs(
        starts, continuations, lambda st, text: task.is_correct(prompts[st["index"]], text)
    )
    return [{k: p[k] for k in ("prompt", "prefix", "chosen", "rejected", "step", "ends_turn")} for p in pairs]


def _clair(p, m0, m1, rng, keep_ties) -> list[dict]:
    """CLAIR: the minimal revision of M's first answer over that answer (none when nothing is wrong)."""
    revised = task.revise(p, m0)
    return [{"prompt": p["prompt"], "chosen": revised, "rejected": m0}] if revised != m0 else []


def _clair_steps(p, m0, m1, rng, keep_ties) -> list[dict]:
    """Step-DPO: the first wrong step of M's answer vs its revision, after the right ones."""
    revised = task.revise(p, m0)
    pair = step_pair(p["prompt"], m0, revised) if revised != m0 else None
    return [pair] if pair is not None else []


def _anchor(p, m0, m1, rng, keep_ties) -> list[dict]:
    """apo_jax.data.anchor over M's two judged samples, the gold solution as anchor."""
    pair = anchor_pair(
        p["prompt"], [m0, m1], [task.is_correct(p, m0), task.is_correct(p, m1)], anchor=task.gold_answer(p)
    )
    return [pair] if pair is not None else []


def _stronger_preferred(p, m0, m1, rng, keep_ties) -> list[dict]:
    return [{"prompt": p["prompt"], "chosen": task.stronger_answer(p), "rejected": m0}]


def _judged(a, b, p, keep_ties) -> list[dict]:
    """The task's checker as the judge: the correct answer over the wrong one; a tie kept if asked."""
    ca, cb = task.is_correct(p, a), task.is_correct(p, b)
    if ca != cb:
        chosen, rejected = (a, b) if ca else (b, a)
        return [{"prompt": p["prompt"], "chosen": chosen, "rejected": rejected, "is_tie": False}]
    return [{"prompt": p["prompt"], "chosen": a, "rejected": b, "is_tie": True}] if keep_ties else []


def _on_policy_judge(p, m0, m1, rng, keep_ties) -> list[dict]:
    return _judged(m0, m1, p, keep_ties)


def _off_policy_judge(p, m0, m1, rng, keep_ties) -> list[dict]:
    """Two other LLMs' answers (two of task.OTHER_MODELS, drawn per prompt), judged."""
    first, second = rng.sample(sorted(task.OTHER_MODELS), 2)
    return _judged(
        task.other_model_answer(p, rng, first), task.other_model_answer(p, rng, second), p, keep_ties
    )


# data kind -> pairs of one prompt from M's two samples (m0, m1) and the stand-in models
PAIR_BUILDERS = {
    "clair": _clair,
    "clair_steps": _clair_steps,
    "anchor": _anchor,
    "stronger_preferred": _stronger_preferred,
    "on_policy_judge": _on_policy_judge,
    "off_policy_judge": _off_policy_judge,
}


def build_pairs(kind: str, prompts, answers, seed: int, keep_ties: bool) -> list[dict]:
    """Pairs of one kind from M's answers (two samples per prompt) and the stand-in models."""
    rng, build = random.Random(seed), PAIR_BUILDERS[kind]
    by = {}
    for a in answers:
        by.setdefault(a["index"], {})[a["sample"]] = a["response"]
    return [
        pair
        for i, p in enumerate(prompts)
        for pair in build(p, by[i][0], by[i].get(1, by[i][0]), rng, keep_ties)
    ]


def _probes(cache, workdir, kind, prompts, pairs_path, tok, seed) -> str:
    """Learning-dynamics probes (data.probes): 32 training pairs of this cell (its chosen and rejected
    answers), and for 32 training problems a rephrased right answer (the stronger model's style)
    against another model's answer: fixed responses whose log-probs are logged over training."""
    rng = random.Random(seed + 11)
    train = read_jsonl(pairs_path)[:32]
    rephrase = [
        {
            "prompt": p["prompt"],
            "chosen": task.stronger_answer(p),
            "rejected": task.other_model_answer(p, rng),
        }
        for p in prompts[:32]
    ]
    sets = {}
    for name, rows in (("train_pairs", train), ("rephrased", rephrase)):
        out = workdir / f"probe_{name}"
        preprocess(
            str(write_jsonl(cache / f"probe_{kind}_{name}.jsonl", rows)),
            out,
            tok,
            max_length=PAIR_LENGTH,
            as_chat=True,
        )
        sets[name] = str(out)
    return ",".join(f"{k}={v}" for k, v in sets.items())


TOKEN_WEIGHTED = ("tis_dpo", "tis_dpo_kl", "mask_dpo", "d2po")  # losses whose records need token weights


def _token_weights(config, kind, train_dir, pairs_path, prompts, tok) -> pathlib.Path:
    """Records with per-token weights for a token-weighted loss (apo_jax.data.token_weights):
    Mask-DPO's from the scorer's line labels; TIS-DPO's from two contrastive models, M trained briefly
    with DPO on the pairs (π⁺) and on the reversed pairs (π⁻); D²PO's decay."""
    name, workdir = config.loss.name, pathlib.Path(config.workdir)
    out = workdir / f"records_train_{name}"
    if name == "d2po":
        return add_weights(train_dir, out, method="d2po")
    if name == "mask_dpo":
        by_prompt = {p["prompt"]: p for p in prompts}
        rows = read_jsonl(pairs_path)
        for r in rows:
            if "prefix" in r:
                raise ValueError(f"mask_dpo labels whole answers; {kind} pairs are single steps")
            problem = by_prompt[r["prompt"]]
            r["chosen_labels"] = task.line_labels(problem, r["chosen"])
            r["rejected_labels"] = task.line_labels(problem, r["rejected"])
        labeled = write_jsonl(workdir / f"pairs_{kind}_labeled.jsonl", rows)
        return add_weights(train_dir, out, method="mask", pairs=labeled, tokenizer=tok)
    records, meta = read_records(train_dir)
    swapped = [dict(r, chosen_ids=r["rejected_ids"], rejected_ids=r["chosen_ids"]) for r in records]
    data = {
        "plus": train_dir,
        "minus": rewrite_records(swapped, meta, workdir / "records_reversed", {}, tool="experiments.mini"),
    }
    models = {}
    for side, path in data.items():
        cfg = config.copy_and_resolve_references()
        cfg.workdir, cfg.data.train = str(workdir / f"tis_{side}"), str(path)
        cfg.data.eval, cfg.data.probes = "", ""
        cfg.loss.name, cfg.train.steps, cfg.train.export_hf = "sigmoid", config.experiment.tis_steps, True
        say(f"TIS-DPO: training the contrastive model π_{side} ({cfg.train.steps} DPO steps)")
        model.train_to_the_end(cfg)
        models[side] = workdir / f"tis_{side}" / "hf"
    return add_weights(
        train_dir,
        out,
        method="tis",
        plus_model=models["plus"],
        minus_model=models["minus"],
        transform=config.experiment.tis_transform,
    )


def _plot(workdir: pathlib.Path, title: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(workdir / "metrics.jsonl")
    ev = [r for r in rows if "eval/logps/chosen" in r]
    if not ev:
        return []
    steps = [r["step"] for r in ev]
    probes = sorted({k.split("/")[1] for k in ev[-1] if k.startswith("probe/")})
    fig, axes = plt.subplots(1, 2 + bool(probes), figsize=(9 + 4.5 * bool(probes), 3.4))
    if probes:  # learning dynamics: fixed responses' log-likelihood over training
        for name, color in zip(probes, ("tab:green", "tab:purple", "tab:orange"), strict=False):
            for side, style in (("chosen", "-"), ("rejected", "--")):
                axes[2].plot(
                    steps,
                    [r[f"probe/{name}/logps/{side}"] for r in ev],
                    style,
                    color=color,
                    label=f"{name}: {side}",
                )
        axes[2].set_xlabel("step")
        axes[2].set_title("probes: log-likelihood")
        axes[2].legend(fontsize=7)
    for ax, key, label in (
        (axes[0], "logps", "log-likelihood"),
        (axes[1], "rewards", "reward (β·log-ratio)"),
    ):
        ax.plot(steps, [r[f"eval/{key}/chosen"] for r in ev], label="chosen (winning)", color="tab:blue")
        ax.plot(steps, [r[f"eval/{key}/rejected"] for r in ev], label="rejected (losing)", color="tab:red")
        ax.set_xlabel("step")
        ax.set_title(f"held-out {label}")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(workdir / "figure4.png", dpi=110)
    plt.close(fig)
    return ["figure4.png"]


def _datasets(config, cache, m_dir, prompts, answers) -> tuple[dict, dict]:
    """Every kind of pairs from M's answers ({kind: pairs file}) and their contrastiveness."""
    mini, kind = config.experiment, config.experiment.data
    keep_ties = config.loss.name == "todo"
    contrast, paths = {}, {}
    for k in DATA_KINDS + ((kind,) if kind in SAMPLED_KINDS else ()):
        if k == "scdpo":
            pairs = scdpo_pairs(cache, m_dir, prompts, answers, "scdpo_train", mini.seed)
        else:
            pairs = build_pairs(k, prompts, answers, mini.seed, keep_ties)
        paths[k] = write_jsonl(cache / f"pairs_{k}{'_ties' if keep_ties else ''}.jsonl", pairs)
        contrast[k] = pair_stats([(p["chosen"], p["rejected"]) for p in pairs]) if pairs else None
        if pairs and mini.get("ches_drop", 0.0) and "prefix" not in pairs[0]:  # whole answers only
            usable = [(p["chosen"], p["rejected"], p["prompt"]) for p in pairs if p["rejected"]]
            contrast[k] |= ches_stats(m_dir, usable, as_chat=True)  # how alike M finds each pair
    if contrast[kind] is None:
        raise ValueError(
            f"the miniature built no {kind} pairs: M is always right or always wrong; train M more"
        )
    return paths, contrast


def row_length(tok, rows) -> int:
    """The shortest row length (a multiple of 16) that holds every pair of `rows` whole: the chat-
    templated prompt, any prefix, the longer answer and the end-of-turn token. Rows no longer than
    needed make the cheap cells (CLAIR's answers are M-sized) cheaper than the long ones (the
    stronger model's)."""
    kwargs = chat_kwargs(tok)
    longest_prompt = max(len(prompt_ids(tok, {"prompt": p}, kwargs)) for p in {r["prompt"] for r in rows})
    answers = [r.get("prefix", "") + r[k] for r in rows for k in ("chosen", "rejected")]
    longest_answer = max(len(ids) for ids in tok(answers, add_special_tokens=False)["input_ids"])
    return -(-(longest_prompt + longest_answer + 2) // 16) * 16


def _records(config, cache, m_dir, tok, paths, eval_prompts, eval_answers) -> dict:
    """The cell's training and held-out records (TFRecords), and M: the config changes that train on
    them."""
    mini, kind = config.experiment, config.experiment.data
    workdir = pathlib.Path(config.workdir)
    train_dir, eval_dir = workdir / "records_train", workdir / "records_eval"
    ches = {"ches_model": str(m_dir), "ches_drop": mini.ches_drop} if mini.get("ches_drop", 0.0) else {}
    if ches:
        say(f"leaving out the {mini.ches_drop:.0%} of {kind} pairs with the highest CHES under M")
    if kind == "scdpo":
        eval_pairs = scdpo_pairs(cache, m_dir, eval_prompts, eval_answers, "scdpo_eval", mini.seed + 9)
    else:
        eval_pairs = build_pairs(kind, eval_prompts, eval_answers, mini.seed + 9, config.loss.name == "todo")
    length = row_length(tok, read_jsonl(paths[kind]) + eval_pairs)
    preprocess(str(paths[kind]), train_dir, tok, max_length=length, as_chat=True, **ches)
    preprocess(
        str(write_jsonl(cache / f"eval_{kind}.jsonl", eval_pairs)),
        eval_dir,
        tok,
        max_length=length,
        as_chat=True,
    )
    return {
        "model.path": str(m_dir),
        "model.preset": "",
        "data.train": str(train_dir),
        "data.eval": str(eval_dir),
    }


def _align(cell, cache, m_dir, paths, prompts, tok) -> dict:
    """The cell's method: preference training of M (or ProFS's edit); the result, with the method's
    name as `loss`, lands in `hf/`. `cell`: the config training M on the cell's records."""
    mini, kind, workdir = cell.experiment, cell.experiment.data, pathlib.Path(cell.workdir)
    train = cell.data.train
    if cell.loss.name in TOKEN_WEIGHTED:
        train = str(_token_weights(cell, kind, pathlib.Path(train), paths[kind], prompts, tok))
    probes = _probes(cache, workdir, kind, prompts, paths[kind], tok, mini.seed)
    if mini.get("method", "") == "profs":  # a training-free edit of M instead of preference training
        say(f"editing M with ProFS from {kind} pairs (layers {mini.profs_layers}, rank {mini.profs_rank})")
        edit_checkpoint(m_dir, train, workdir / "hf", layers=mini.profs_layers, rank=mini.profs_rank)
        return {"status": "edited", "loss": "profs"}
    say(f"training {cell.loss.name} on {kind} pairs for {cell.train.steps} steps (seed {cell.train.seed})")
    run_cfg = model.overridden(cell, {"data.train": train, "data.probes": probes})
    return model.train_to_the_end(run_cfg) | {"loss": cell.loss.name}


def _results_md(summary: dict, contrast: dict, n_eval: int, mini, plots) -> str:
    kind, loss, acc = summary["data"], summary["loss"], summary["accuracy"]
    rows = (
        ("M (before)", "before"),
        (f"after {kind} × {loss} (seed {summary['seed']})", "after"),
        (
            "positive control: M + SFT on the CLAIR revisions of its training answers (the same steps)",
            "control",
        ),
    )
    gain = {m: acc["after"][m] - acc["before"][m] for m in ("greedy", "sampled")}
    se = {m: math.hypot(acc["after"][f"{m}_se"], acc["before"][f"{m}_se"]) for m in gain}
    md = [
        f"# Miniature: {kind} × {loss}\n",
        f"Held-out accuracy on {n_eval} {summary['eval_set']} problems (exact final answer; half two-step, "
        "half three-step; the same problems at every seed), ± one standard error over problems:\n",
        f"| model | greedy | sampled ({mini.eval_samples} per problem, temperature {mini.temperature}) |",
        "|---|---|---|",
        *(
            f"| {label} | {acc[k]['greedy']:.3f} ± {acc[k]['greedy_se']:.3f} | "
            f"{acc[k]['sampled']:.3f} ± {acc[k]['sampled_se']:.3f} |"
            for label, k in rows
        ),
        "",
        "After − before: "
        + ", ".join(
            f"{gain[m]:+.3f} {m} ({gain[m] / se[m]:+.1f} standard errors)" if se[m] else f"{gain[m]:+.3f} {m}"
            for m in gain
        )
        + ".",
        "By step count (greedy, two-step / three-step): "
        + "; ".join(
            f"{label.split(' (')[0]} {acc[k]['greedy_2_steps']:.3f} / {acc[k]['greedy_3_steps']:.3f}"
            for label, k in rows
        )
        + ".\n",
        f"Epochs over the {kind} pairs: {summary['epochs']} ({summary['steps']} steps × "
        f"{summary['batch_size']} pairs, learning rate {summary['lr']:g}).\n",
        "The positive control shows how far a training signal the pairs hold can move M in as many steps.\n",
        "## Contrastiveness (Jaccard: higher is more contrastive; Levenshtein: lower is)\n",
        "```\n" + table({k: v for k, v in contrast.items() if v}) + "\n```\n",
        "".join(
            f"({k}: no pairs, M's two answers were always equally right or wrong)\n"
            for k, v in contrast.items()
            if v is None
        ),
        "## Final held-out metrics\n",
        "".join(f"- {k}: {v:.4f}\n" for k, v in summary["final_eval"].items() if k.startswith("eval/")),
        *(f"\n![Figure 4]({p})\n" for p in plots),
    ]
    return "\n".join(md)


def run(config) -> dict:
    """The miniature for one grid cell (`config.experiment.data` × `config.loss.name`)."""
    started = time.time()
    mini, kind = config.experiment, config.experiment.data
    workdir = pathlib.Path(config.workdir)
    m_cache, cache = model.caches(workdir, mini)
    workdir.mkdir(parents=True, exist_ok=True)
    tok = model.tokenizer(m_cache, mini.seed)
    say(f"task: chained one-digit arithmetic, one step per line; tokenizer with {len(tok)} tokens")
    m_dir = model.sft_model(m_cache, tok, mini, config)
    train_prompts, eval_prompts = model.problem_sets(mini)
    say(
        f"sampling M's answers for {len(train_prompts)} + {len(eval_prompts)} prompts (two each, "
        f"temperature {mini.temperature})"
    )
    answers = model.sample(cache, m_dir, train_prompts, "answers_train", 2, mini.temperature, mini.seed)
    eval_answers = model.sample(
        cache, m_dir, eval_prompts, "answers_eval", 2, mini.temperature, mini.seed + 1
    )
    paths, contrast = _datasets(config, cache, m_dir, train_prompts, answers)
    say("contrastiveness of the datasets:\n" + table({k: v for k, v in contrast.items() if v}))
    records = _records(config, cache, m_dir, tok, paths, eval_prompts, eval_answers)
    control = model.positive_control(cache, m_dir, tok, train_prompts, answers, config)
    steps = config.train.steps
    if mini.get("epochs", 0.0):  # equal data: as many passes over each dataset, not as many steps
        steps = max(1, round(mini.epochs * contrast[kind]["pairs"] / config.train.batch_size))
        say(f"{mini.epochs:g} epochs of {contrast[kind]['pairs']} pairs: {steps} steps")
    cell = model.overridden(config, records | {"train.steps": steps})
    result = _align(cell, cache, m_dir, paths, train_prompts, tok)
    say(
        f"scoring held-out accuracy (greedy, and {mini.eval_samples} samples at temperature "
        f"{mini.temperature}) of M, the positive control and the aligned model"
    )
    after_dir = workdir / "hf"
    tok.save_pretrained(after_dir)
    for f in ("acc_after", "acc_after_sampled"):
        (workdir / f"{f}.jsonl").unlink(missing_ok=True)
    acc = {
        "before": model.evaluate(m_dir, eval_prompts, cache, "acc_before", mini),
        "control": model.evaluate(control, eval_prompts, control.parent, "acc", mini),
        "after": model.evaluate(after_dir, eval_prompts, workdir, "acc_after", mini),
    }
    metrics = workdir / "metrics.jsonl"
    plots = _plot(workdir, f"{kind} × {result['loss']}") if metrics.exists() else []
    rows = read_jsonl(metrics) if metrics.exists() else []
    final_eval = next((r for r in reversed(rows) if any(k.startswith("eval/") for k in r)), {})
    summary = {
        "data": kind,
        "loss": result["loss"],
        "seed": mini.seed,
        "train_seed": config.train.seed,
        "code": model.code_version(),
        "m": str(m_dir),
        "eval_set": mini.get("eval_set", "test"),
        # what pairs the cells: the scored problems (the same for every seed) and the settings
        "problems": model.key([p["prompt"] for p in eval_prompts]),
        "lr": config.optimizer.lr,
        "beta": config.loss.beta,
        "steps": steps,
        "batch_size": config.train.batch_size,
        "epochs": round(steps * config.train.batch_size / contrast[kind]["pairs"], 3),
        "accuracy": acc,
        "contrastiveness": contrast,
        "final_eval": final_eval,
        "seconds": round(time.time() - started, 1),
        "status": result["status"],
    }
    (workdir / "results.json").write_text(json.dumps(summary, indent=2))
    (workdir / "results.md").write_text(_results_md(summary, contrast, len(eval_prompts), mini, plots))
    b, a, c = acc["before"], acc["after"], acc["control"]
    say(
        f"done in {summary['seconds']}s: accuracy {b['greedy']:.3f} -> {a['greedy']:.3f} greedy, "
        f"{b['sampled']:.3f} -> {a['sampled']:.3f} sampled (positive control {c['greedy']:.3f} / "
        f"{c['sampled']:.3f}); see {workdir / 'results.md'}"
    )
    return summary
