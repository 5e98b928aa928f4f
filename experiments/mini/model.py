"""The miniature's M and how it is scored: the tokenizer, M (a small Llama SFT'd on the task's careless
teacher), its sampled answers, the held-out problems, exact-match accuracy with standard errors, and
the positive control (M SFT'd on the CLAIR revisions of its own answers).

Everything is cached under `<workdir>/../mini_cache/<key of M_FIELDS>/`: the tokenizer and M once,
M's answers, its scores and the positive control once per `ANSWER_FIELDS` in a subfolder. Both keys
include `code_version()`, a hash of the source the cached stages run (apo_jax, experiments/mini and
the grid config), so a change of code never reuses an older stage's output.

`experiment.seed` varies the whole pipeline: the tokenizer's corpus, M's initialisation and SFT data,
the training problems, M's sampled answers (so the pairs), the stand-in models and the evaluation
sampling. The scored problems (test and validation) do not depend on it: every cell and seed is scored
on the same problems, so cells can be compared paired by seed and problem (apo_jax.eval.stats).
"""

from __future__ import annotations

import functools
import hashlib
import json
import pathlib
import random
import shutil
import time

from apo_jax import models, train
from apo_jax.data import tiny
from apo_jax.data.generate import generate_with_model
from apo_jax.data.jsonl import read_jsonl, write_jsonl
from apo_jax.data.preprocess import preprocess
from apo_jax.eval.judge import exact_match
from apo_jax.models import load_tokenizer
from experiments.mini import task

SFT_SEED = 2  # M's SFT problems are task.draw("sft", sft_examples, SFT_SEED + seed)
TRAIN_SEED = 3  # the training problems are task.draw("train", train_prompts, TRAIN_SEED + seed)
TEST_SEED, VALIDATION_SEED = 1000, 2000  # the scored sets: fixed, whatever experiment.seed
MAX_TOKENS = 40  # a generated answer: the longest teacher answer is 30 tokens
SFT_LENGTH = 64  # prompt (about 30 tokens) + M's answer
M_FIELDS = ("seed", "hidden_size", "layers", "sft_examples", "sft_steps", "careless")  # what defines M
# what defines M's answers, the pairs built from them and M's own accuracy: shared by every cell
ANSWER_FIELDS = (*M_FIELDS, "train_prompts", "eval_prompts", "eval_set", "temperature", "eval_samples")
_START = time.time()
_ROOT = pathlib.Path(__file__).resolve().parents[2]


class Stopped(Exception):
    """A stage's training stopped before its last step (SIGTERM: checkpoint saved): the pipeline and
    its sweep stop too, and the same command resumes them."""


def train_to_the_end(cfg) -> dict:
    """`train.run(cfg)`, raising Stopped when it was preempted: nothing downstream may score a model
    whose training did not finish (the miniature's and the real-model pipelines, their sweeps)."""
    result = train.run(cfg)
    if result["status"] != "done":
        raise Stopped(
            f"{cfg.workdir}: training {result['status']} at step {result['step']} (checkpoint saved); "
            "run the same command again to resume"
        )
    return result


def overridden(config, changes: dict):
    """A copy of `config` with `changes` ({"group.key": value}) applied: the caller's config stays as
    it was (the experiments compose configs, they do not mutate the one they were given)."""
    out = config.copy_and_resolve_references()
    for dotted, value in changes.items():
        group, _, name = dotted.rpartition(".")
        (out[group] if group else out)[name] = value
    return out


def key(fields) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]


SOURCES = ("apo_jax", "experiments/mini", "experiments/configs/grid.py")  # what the miniature runs


@functools.cache
def code_version(sources: tuple[str, ...] = SOURCES) -> str:
    """A hash of the source files a pipeline's stages run (paths and contents; by default the
    miniature's: the apo_jax package, experiments/mini and the grid's config). Part of every cache
    key and of every results.json."""
    h = hashlib.sha256()
    for folder in sources:
        for path in sorted((_ROOT / folder).rglob("*.py")) if (_ROOT / folder).is_dir() else [_ROOT / folder]:
            h.update(str(path.relative_to(_ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def caches(workdir, mini) -> tuple[pathlib.Path, pathlib.Path]:
    """(M's folder, its answers' folder) in `<workdir>/../mini_cache/`, created; keyed by the fields
    that define them and by the code version."""
    fields = {k: mini.get(k, "test") for k in ANSWER_FIELDS} | {"code": code_version()}
    m_cache = (
        pathlib.Path(workdir).absolute().parent
        / "mini_cache"
        / key({k: fields[k] for k in (*M_FIELDS, "code")})
    )
    cache = m_cache / key(fields)
    cache.mkdir(parents=True, exist_ok=True)
    return m_cache, cache


def say(msg: str) -> None:
    minutes, seconds = divmod(int(time.time() - _START), 60)
    print(f"[mini {minutes}:{seconds:02d}] {msg}", flush=True)


def tokenizer(cache: pathlib.Path, seed: int):
    """A byte-level BPE tokenizer trained on the task's texts (every style of answer), saved once."""
    path = cache / "tokenizer"
    if not (path / "tokenizer.json").exists():
        rng, corpus = random.Random(seed), []
        for p in task.problems(400, seed + 1):
            corpus += [p["prompt"], task.teacher_answer(p, rng, 0.5), task.stronger_answer(p)]
            corpus += [task.other_model_answer(p, rng, name) for name in task.OTHER_MODELS]
        tiny.tiny_tokenizer(vocab_size=384, corpus=corpus).save_pretrained(path)
    return load_tokenizer(path)


def _sft(rows, folder: pathlib.Path, start, tok, *, steps, batch_size, optimizer, base_config):
    """`start` fine-tuned (SFT) on the rows' answers; the result, with the tokenizer, in `folder/hf`."""
    folder.mkdir(parents=True, exist_ok=True)
    records = folder / "records"
    preprocess(
        str(
            write_jsonl(
                folder / "sft.jsonl",
                [{"prompt": r["prompt"], "chosen": r["answer"], "rejected": r["answer"]} for r in rows],
            )
        ),
        records,
        tok,
        max_length=SFT_LENGTH,
        as_chat=True,
    )
    cfg = train.default_config()
    cfg.workdir, cfg.model.path, cfg.data.train = str(folder / "run"), str(start), str(records)
    cfg.train.mode, cfg.train.steps, cfg.train.batch_size = "sft", steps, batch_size
    cfg.optimizer.update(optimizer)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = base_config.mesh.data, 1, 1
    cfg.train.progress = base_config.train.progress
    train_to_the_end(cfg)
    shutil.copytree(folder / "run" / "hf", folder / "hf")
    tok.save_pretrained(folder / "hf")
    return folder / "hf"


def sft_model(cache, tok, mini, base_config) -> pathlib.Path:
    """M: a Llama of the configured size, initialised by the project's own JAX code, fine-tuned on
    the teacher's answers (it knows the arithmetic and slips at carries in `mini.careless` of its
    answers), so M's errors are a learned habit."""
    out = cache / "m" / "hf"
    if (out / "config.json").exists():
        return out
    say(
        f"training M: SFT on {mini.sft_examples} teacher answers ({mini.careless:.0%} careless) "
        f"for {mini.sft_steps} steps"
    )
    config = models.preset(
        "tiny",
        vocab_size=len(tok),
        hidden_size=mini.hidden_size,
        intermediate_size=4 * mini.hidden_size,
        num_hidden_layers=mini.layers,
    )
    model = models.Llama(config)
    start = models.to_hf(model, models.init_params(model, mini.seed), cache / "m" / "init", tokenizer=tok)
    rng = random.Random(mini.seed + 5)
    rows = [
        {"prompt": p["prompt"], "answer": task.teacher_answer(p, rng, mini.careless)}
        for p in task.draw("sft", mini.sft_examples, SFT_SEED + mini.seed)
    ]
    optimizer = {"lr": 3e-3, "schedule": "cosine", "warmup_steps": min(20, mini.sft_steps // 5)}
    return _sft(
        rows,
        cache / "m",
        start,
        tok,
        steps=mini.sft_steps,
        batch_size=32,
        optimizer=optimizer,
        base_config=base_config,
    )


def problem_sets(mini) -> tuple[list[dict], list[dict]]:
    """(training problems, scored problems): the scored set is `mini.eval_set`, "test" (the default)
    or "validation" (hyperparameter selection, experiments/select.py), `eval_prompts` distinct
    problems stratified by step count and the same for every seed. The four splits (SFT, training,
    validation, test) are disjoint by construction (task.split_of); asserted here."""
    eval_set = mini.get("eval_set", "test")
    if eval_set not in ("test", "validation"):
        raise ValueError(f"experiment.eval_set={eval_set!r}: use 'test' or 'validation'")

    def size(name, default):  # the scored set's configured size; the other one's is drawn to check it
        return mini["eval_prompts"] if name == eval_set else default

    sets = {
        "sft": task.draw("sft", mini["sft_examples"], SFT_SEED + mini["seed"]),
        "train": task.draw("train", mini["train_prompts"], TRAIN_SEED + mini["seed"]),
        "test": task.draw_distinct("test", size("test", 512), TEST_SEED),
        "validation": task.draw_distinct("validation", size("validation", 256), VALIDATION_SEED),
    }
    prompts = {name: {p["prompt"] for p in rows} for name, rows in sets.items()}
    for a in sets:
        for b in sets:
            if a < b and prompts[a] & prompts[b]:
                raise AssertionError(
                    f"the {a} and {b} problems overlap: {sorted(prompts[a] & prompts[b])[:3]}"
                )
    return sets["train"], sets[eval_set]


def sample(folder, model_dir, prompts, name, samples, temperature, seed=0) -> list[dict]:
    """`samples` answers of a model to each prompt (`folder/name.jsonl`; finished rows are kept),
    sampled with `seed`."""
    out = folder / f"{name}.jsonl"
    rows = [{"prompt": p["prompt"], "index": i} for i, p in enumerate(prompts)]
    generate_with_model(
        rows,
        out,
        model_dir,
        samples=samples,
        max_tokens=MAX_TOKENS,
        temperature=temperature,
        batch_size=128,
        progress=False,
        seed=seed,
    )
    return read_jsonl(out)


def accuracy(model_dir, prompts, folder, name, samples=1, temperature=0.0, seed=0) -> dict:
    """Exact-match accuracy through apo_jax.eval.judge's exact mode (the judged modes' interface, with
    the task's verifiable answer in place of a judge): greedy, or the mean over `samples` samples;
    `accuracy`, its standard error over prompts `stderr`, and `correct`, per prompt the 0/1 of each
    sample."""
    answers = sample(folder, model_dir, prompts, name, samples, temperature, seed)
    return exact_match([{"prompt": p["prompt"], "answer": task.solve(p)[-1][3]} for p in prompts], answers)


def evaluate(model_dir, prompts, folder, name, mini) -> dict:
    """Held-out accuracy of one model: greedy, and `mini.eval_samples` samples per problem at
    `mini.temperature` (M's own sampling temperature, seeded by experiment.seed), each with its
    standard error over problems; per problem, the greedy answer's correctness (`greedy_correct`) and
    each sample's (`sampled_correct`); and accuracy by the problems' step count."""
    greedy = accuracy(model_dir, prompts, folder, name)
    sampled = accuracy(
        model_dir, prompts, folder, f"{name}_sampled", mini.eval_samples, mini.temperature, mini.seed + 7
    )
    out = {
        "greedy": greedy["accuracy"],
        "greedy_se": greedy["stderr"],
        "sampled": sampled["accuracy"],
        "sampled_se": sampled["stderr"],
    }
    for steps in sorted({len(p["ops"]) for p in prompts}):
        picked = [i for i, p in enumerate(prompts) if len(p["ops"]) == steps]
        for m, result in (("greedy", greedy), ("sampled", sampled)):
            scores = [sum(result["correct"][i]) / len(result["correct"][i]) for i in picked]
            out[f"{m}_{steps}_steps"] = sum(scores) / len(scores)
    out["greedy_correct"] = "".join(str(c[0]) for c in greedy["correct"])
    out["sampled_correct"] = ["".join(map(str, c)) for c in sampled["correct"]]
    return out


def positive_control(cache, m_dir, tok, prompts, answers, config) -> pathlib.Path:
    """The positive control: M fine-tuned (SFT) on the CLAIR revisions of its own first answers to
    the training problems (a right answer is its own revision), with the preference stage's
    optimizer, steps and batch size. The revisions are the signal CLAIR's chosen answers hold: if
    this does not raise M's accuracy, the testbed cannot judge the objectives."""
    opt, steps, batch = config.optimizer, config.train.steps, config.train.batch_size
    folder = cache / f"control_{key([opt.lr, opt.schedule, opt.warmup_steps, steps, batch])}"
    if (folder / "hf" / "config.json").exists():
        return folder / "hf"
    first = {a["index"]: a["response"] for a in answers if a["sample"] == 0}
    rows = [{"prompt": p["prompt"], "answer": task.revise(p, first[i])} for i, p in enumerate(prompts)]
    say(
        f"positive control: SFT of M on the CLAIR revisions of its {len(rows)} training answers, "
        f"{steps} steps"
    )
    return _sft(
        rows, folder, m_dir, tok, steps=steps, batch_size=batch, optimizer=opt.to_dict(), base_config=config
    )
