"""Every ```python block of the README runs as written, each in an empty folder, so the README's
examples cannot rot. A block that loads "Meta-Llama-3-8B-Instruct" finds a tiny Llama saved under that
name in its folder (a user has the real checkpoint there)."""

from __future__ import annotations

import pathlib
import re
import runpy
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHECKPOINT = "Meta-Llama-3-8B-Instruct"


def python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    fences = re.finditer(r"^( *)```python\n(.*?)^\1```", text, re.S | re.M)
    return [textwrap.dedent(m.group(2)) for m in fences]


BLOCKS = python_blocks()


def test_the_readme_has_its_python_blocks():
    assert len(BLOCKS) >= 3  # losses, models, train: a broken fence pattern would find none


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs_as_written(index, tmp_path, monkeypatch, tiny_tokenizer):
    block = BLOCKS[index]
    if CHECKPOINT in block:
        import helpers

        helpers.tiny_hf_llama(tmp_path / CHECKPOINT, vocab_size=len(tiny_tokenizer), tokenizer=tiny_tokenizer)
    monkeypatch.chdir(tmp_path)
    script = tmp_path / f"readme_block_{index}.py"
    script.write_text(block)
    runpy.run_path(str(script), run_name="__main__")
    if CHECKPOINT in block and "to_hf" in block:  # the export loads in transformers as it is
        import transformers

        transformers.LlamaForCausalLM.from_pretrained(tmp_path / "exported")
