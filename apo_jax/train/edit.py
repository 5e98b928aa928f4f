"""ProFS: a training-free edit that projects a preference direction out of the MLP outputs.

"Model Editing as a Robust and Denoised variant of DPO" (Uppaal et al., arXiv 2405.13967;
Uppaal/detox-edit `detox.py`). For each layer l, with E+_l and E-_l the [N, D] mean hidden states
(over each answer's tokens, at the output of layer l) of the preferred and dispreferred answers:

    P_l = (E+_l - E-_l) / 2
    P_l <- P_l (I - mu mu^T)           mu: the top right singular vector of E+_l (centering)
    Q_l = V_k^T V_k                     V_k: the top-k right singular vectors of P_l
    W_down,l <- W_down,l (I - Q_l)      for l in [lowest, highest): the MLP's output projection

    python -m apo_jax.train.edit --model DIR --pairs data/records --output edited/ --layers 10:24 --rank 2

`--pairs` is a record directory written by `python -m apo_jax.data.preprocess`; the first
`--max-pairs` pairs (default 500, the paper's) are embedded. The edited model is written as a
Hugging Face directory. It edits one parameter by name (`layers/mlp/down_proj`), the one place outside
`models/` that does: ProFS needs preference records, so it sits above `data/`, in `train/`.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from apo_jax import cli, outputs, sharding
from apo_jax.data import layouts
from apo_jax.data.tfrecords import read_records
from apo_jax.models import from_hf, load_tokenizer, to_hf
from apo_jax.models.llama import hidden_states

TOOL = "apo_jax.train.edit"


def mean_embeddings(model, params, batch) -> dict[str, jax.Array]:
    """{"chosen", "rejected"}: [L, b, D] per-layer outputs averaged over each answer's tokens (jittable)."""
    out = {}
    for side in ("chosen", "rejected"):
        ids, attention = batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"]
        _, per_layer = hidden_states(model, params, ids, attention, return_hidden=True)
        mask = jnp.asarray(batch[f"{side}_loss_mask"], jnp.float32)
        total = jnp.einsum("lbtd,bt->lbd", per_layer.astype(jnp.float32), mask)
        out[side] = total / jnp.maximum(mask.sum(-1), 1.0)[None, :, None]
    return out


def projection(
    preferred: np.ndarray, dispreferred: np.ndarray, rank: int, *, center: bool = True
) -> np.ndarray:
    """ProFS's [D, D] projector onto the top-`rank` directions of the preference matrix of one layer."""
    p = (preferred.astype(np.float64) - dispreferred.astype(np.float64)) / 2
    if center:
        mu = np.linalg.svd(preferred.astype(np.float64), full_matrices=False)[2][0]
        p = p - np.outer(p @ mu, mu)
    v = np.linalg.svd(p, full_matrices=False)[2][:rank]
    return v.T @ v


def profs_edit(params, embeddings: dict[str, np.ndarray], layers: range, rank: int, *, center: bool = True):
    """The edited params (a new tree: only `layers`' MLP down-projection kernels change) and the
    projectors {layer: [D, D]}."""
    kernel = params["layers"]["mlp"]["down_proj"]["kernel"]  # [L, F, D]: y = x @ W
    new = np.asarray(kernel, np.float64).copy()
    projectors = {}
    for layer in layers:
        q = projection(embeddings["chosen"][layer], embeddings["rejected"][layer], rank, center=center)
        projectors[layer] = q
        new[layer] = new[layer] @ (np.eye(q.shape[0]) - q)
    edited = jax.tree.map(lambda x: x, params)  # new containers, the same arrays
    edited["layers"]["mlp"]["down_proj"]["kernel"] = jnp.asarray(new, kernel.dtype)
    return edited, projectors


def edit_checkpoint(
    model_dir,
    records_dir,
    output,
    *,
    layers: str | None = None,
    rank: int = 2,
    max_pairs: int = 500,
    batch_size: int = 8,
    center: bool = True,
    overwrite: bool = False,
) -> dict:
    """Reads a Hugging Face Llama and preprocessed pairs, writes the ProFS-edited model and `edit.json`
    (what was done); an existing `output` is replaced only if this tool wrote it, or with `overwrite`."""
    for flag, value in (("--rank", rank), ("--max-pairs", max_pairs)):
        if value < 1:  # as a slice bound, -1 keeps all but one direction (or pair) and 0 none
            raise ValueError(f"{flag} {value}: must be at least 1")
    where = {"overwrite": overwrite, "inputs": [model_dir, records_dir], "manifest_name": "edit.json"}
    outputs.check_output(output, TOOL, **where)  # before the work
    model, params = from_hf(model_dir)
    n_layers = model.config.num_hidden_layers
    lo, hi = (int(x) for x in layers.split(":")) if layers else (n_layers // 2, n_layers)
    if not 0 <= lo < hi <= n_layers:
        raise ValueError(f"--layers {lo}:{hi} is not a range within the model's {n_layers} layers")
    records, meta = read_records(records_dir)
    if meta.get("kind") != "paired":
        raise ValueError(f"{records_dir}: ProFS needs paired records (chosen and rejected)")
    records = records[:max_pairs]
    if len(records) <= rank:
        raise ValueError(f"{records_dir}: {len(records)} pairs cannot give {rank} directions")
    embed = jax.jit(sharding.on_mesh(lambda p, b: mean_embeddings(model, p, b), sharding.mesh_of(params)))
    parts = {"chosen": [], "rejected": []}
    for batch, n in layouts.padded_batches(records, batch_size):
        out = embed(params, batch)
        for side in parts:
            parts[side].append(np.asarray(out[side])[:, :n])
    embeddings = {side: np.concatenate(v, axis=1) for side, v in parts.items()}  # [L, N, D]
    edited, projectors = profs_edit(params, embeddings, range(lo, hi), rank, center=center)
    tokenizer = None
    try:
        tokenizer = load_tokenizer(model_dir)
    except (OSError, ValueError):
        pass
    summary = {"layers": [lo, hi], "rank": rank, "pairs": len(records), "output": str(output)}
    with outputs.replacing(output, TOOL, **where) as tmp:
        to_hf(model, edited, tmp, tokenizer=tokenizer)
        files = [p.name for p in tmp.iterdir()]
        manifest = outputs.manifest(TOOL, files, model=str(model_dir), pairs_from=str(records_dir), **summary)
        (tmp / "edit.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return summary


@cli.command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m apo_jax.train.edit", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a Hugging Face Llama directory")
    p.add_argument("--pairs", required=True, help="records written by apo_jax.data.preprocess")
    p.add_argument("--output", required=True, help="where the edited Hugging Face model goes")
    p.add_argument(
        "--layers", default=None, help="LOW:HIGH, the layers whose MLP output is edited (default: upper half)"
    )
    p.add_argument("--rank", type=int, default=2, help="directions removed per layer (ProFS k)")
    p.add_argument("--max-pairs", type=int, default=500)
    p.add_argument(
        "--no-center", action="store_true", help="skip removing the preferred embeddings' top direction"
    )
    p.add_argument("--overwrite", action="store_true", help="replace --output even if another tool wrote it")
    args = p.parse_args(argv)
    summary = edit_checkpoint(
        args.model,
        args.pairs,
        args.output,
        layers=args.layers,
        rank=args.rank,
        max_pairs=args.max_pairs,
        center=not args.no_center,
        overwrite=args.overwrite,
    )
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
