"""Preference data: formats in, offline tokenization to TFRecords, exact resumable batches out.

TensorFlow and datasets are imported lazily, where a function needs them.
"""

from apo_jax.data.formats import Pair, RowError, Unpaired, normalize_pair, normalize_unpaired, read_examples
from apo_jax.data.layouts import LAYOUTS, sequence_logps
from apo_jax.data.reader import PreferenceReader
from apo_jax.data.tokenize import tokenize_example, truncate

__all__ = [
    "LAYOUTS",
    "Pair",
    "PreferenceReader",
    "RowError",
    "Unpaired",
    "normalize_pair",
    "normalize_unpaired",
    "read_examples",
    "sequence_logps",
    "tokenize_example",
    "truncate",
]
