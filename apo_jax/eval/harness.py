"""lm-evaluation-harness on apo_jax's models, without converting them: the `apo_jax` model type.

    python -m apo_jax.eval.harness --model_args path=workdirs/x/hf --batch_size 16 --tasks gsm8k,ifeval
    # any lm_eval CLI flag; `--model apo_jax` is implied. Or in Python:
    import lm_eval, apo_jax.eval.harness   # registers "apo_jax"
    lm_eval.simple_evaluate(model="apo_jax", model_args="path=workdirs/x/hf", tasks=["hellaswag"])

Log-likelihoods run on the chunked log-probs (`models.token_logps`, no [B, T, V] array) and
generation on the KV-cache sampler (`models.generate`), jitted over padded buckets and sharded over
a mesh (`data`, `fsdp`, `tensor` in model_args; default: every device on data). Tokenization,
the empty-context prefix, left truncation to `max_length`, rolling windows and stop sequences are
lm-eval's own (`TemplateLM`, its utils), the same as its `hf` model, so the numbers compare with
`--model hf` on the exported checkpoint. `lm_eval` itself is an optional dependency:
`pip install -e ".[lm-eval]"`. (lm-eval has no plugin discovery for model types, hence the
`python -m apo_jax.eval.harness` entry point, which is lm-eval's CLI with this model registered.)
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from apo_jax import cli, models, sharding

_BUCKET = 64  # padded lengths are multiples of this: few shapes, few compiles


def _bucket(n: int, limit: int) -> int:
    return min(-(-n // _BUCKET) * _BUCKET, limit)


@register_model("apo_jax")
class ApoJaxLM(TemplateLM):
    """An apo_jax model (a Hugging Face directory: an exported run's `hf/`) as an lm-eval `LM`."""

    def __init__(
        self,
        path: str,
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        dtype: str = "float32",
        add_bos_token: bool | None = None,
        data: int = -1,
        fsdp: int = 1,
        tensor: int = 1,
        chunk_size: int = 256,
        **_,
    ):
        super().__init__()
        self.mesh = sharding.make_mesh(data=int(data), fsdp=int(fsdp), tensor=int(tensor))
        self.model, self.params = models.from_hf(path, dtype=dtype, mesh=self.mesh)
        self.tokenizer = models.load_tokenizer(path)
        self.batch_size = 8 if batch_size == "auto" else int(batch_size)
        rows = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self.batch_size = -(-self.batch_size // rows) * rows  # whole rows per device
        self._max_length = int(max_length) if max_length else self.model.config.max_position_embeddings
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        model, chunk = self.model, int(chunk_size)

        def score(params, ids, mask, loss_mask):
            out = models.token_logps(model, params, ids, mask, loss_mask, chunk_size=chunk, with_greedy=True)
            return out["logps"], jnp.all(out["greedy"] | (loss_mask == 0), axis=-1)

        self._score = jax.jit(sharding.on_mesh(score, self.mesh))

    # --- what TemplateLM asks for, as lm-eval's HFLM answers it ---------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id if bos is None else bos

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **_):
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
        kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        bos = self.tokenizer.decode(self.prefix_token_id)
        if add_special_tokens is None and bos and string.startswith(bos):
            kwargs = {"add_special_tokens": False}
        ids = self.tokenizer.encode(string, **kwargs)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # --- scoring ---------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether every continuation token is the argmax), the
        context left-truncated so that context + continuation fit `max_length` + 1 tokens (HFLM's)."""
        seqs = []
        for _, context_enc, continuation_enc in requests:
            whole = (context_enc + continuation_enc)[-(self.max_length + 1) :]
            seqs.append((whole, min(len(continuation_enc), len(whole) - 1)))
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))  # similar lengths batch together
        results: list = [None] * len(seqs)
        bar = cli.progress_bar(total=len(seqs), disable=disable_tqdm, desc="apo_jax loglikelihood")
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            T = _bucket(max(len(seqs[i][0]) for i in idx), self.max_length + 1)
            ids = np.full((self.batch_size, T), self.prefix_token_id, np.int32)
            mask, loss_mask = np.zeros_like(ids), np.zeros_like(ids)
            for row, i in enumerate(idx):  # right-padded rows; the continuation is each row's tail
                whole, n_cont = seqs[i]
                ids[row, : len(whole)], mask[row, : len(whole)] = whole, 1
                loss_mask[row, len(whole) - n_cont : len(whole)] = 1
            batch = sharding.to_global({"ids": ids, "mask": mask, "loss": loss_mask}, self.mesh)
            logps, greedy = self._score(self.params, batch["ids"], batch["mask"], batch["loss"])
            logps, greedy = np.asarray(logps), np.asarray(greedy)
            for row, i in enumerate(idx):
                results[i] = (float(logps[row]), bool(greedy[row]))
                if requests[i][0] is not None:  # rolling windows are not cached as requests (HFLM's rule)
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
            bar.update(len(idx))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The whole string's log-likelihood in disjoint windows of `max_length` (lm-eval's windows)."""
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owners.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owners, scores, strict=True):
            totals[i] += logp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation ------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample and a temperature) continuations, cut at the first stop
        sequence (the EOS string included, as HFLM does); contexts left-truncated to leave room for
        `max_gen_toks` new tokens."""
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):  # the same generation settings batch together
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out: list = [None] * len(requests)
        bar = cli.progress_bar(total=len(requests), disable=disable_tqdm, desc="apo_jax generate_until")
        for members in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), self._max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            new = int(kwargs.pop("max_gen_toks"))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            for start in range(0, len(members), self.batch_size):
                idx = members[start : start + self.batch_size]
                encoded = [
                    self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - new) for i in idx
                ]
                P = _bucket(max(len(e) for e in encoded), self.max_length - new)
                ids = np.full((self.batch_size, P), self.prefix_token_id, np.int32)
                mask = np.zeros_like(ids)
                mask[:, -1] = 1  # padding rows: one token, never read
                for row, e in enumerate(encoded):  # left-padded prompts
                    ids[row, P - len(e) :], mask[row, P - len(e) :] = e, 1
                batch = sharding.to_global({"ids": ids, "mask": mask}, self.mesh)
                gen = models.generate(
                    self.model,
                    self.params,
                    batch["ids"],
                    batch["mask"],
                    max_new_tokens=new,
                    temperature=temperature,
                    top_p=float(kwargs.get("top_p", 1.0) or 1.0),
                    rng=jax.random.key(int(kwargs.get("seed", 0) or 0)),
                )
                tokens, lengths = np.asarray(gen["tokens"]), np.asarray(gen["lengths"])
                for row, i in enumerate(idx):
                    text = self.tok_decode(tokens[row, : lengths[row]].tolist())
                    out[i] = postprocess_generated_text(text, until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
                bar.update(len(idx))
        bar.close()
        return out


def _checkpoint_path(argv: list[str]) -> str | None:
    """The `path` in `--model_args` (`k=v,k=v`, several `k=v`, or JSON) when the model is apo_jax:
    checked before lm-eval spends seconds indexing its tasks."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--model", default="apo_jax")
    p.add_argument("--model_args", "-a", nargs="+", default=[])
    p.add_argument("-h", "--help", action="store_true")
    known, _ = p.parse_known_args(argv)
    if known.model != "apo_jax" or known.help or argv[:1] in (["ls"], ["validate"]):
        return None
    try:
        args = json.loads(known.model_args[0]) if known.model_args else {}
    except json.JSONDecodeError:
        args = dict(kv.split("=", 1) for item in known.model_args for kv in item.split(",") if "=" in kv)
    if not isinstance(args, dict) or not args.get("path"):
        raise cli.UserError("--model_args needs path=DIR, a Hugging Face directory (e.g. a run's hf/)")
    return str(args["path"])


@cli.command
def main(argv=None) -> int:
    """lm-eval's command line with the `apo_jax` model registered (`--model apo_jax` by default)."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    path = _checkpoint_path(argv)
    if path is not None:
        models.read_config(path)  # a wrong path is one line now, not a traceback after the task index
    if "--model" not in argv:
        argv = ["--model", "apo_jax", *argv]
    sys.argv = [sys.argv[0], *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
