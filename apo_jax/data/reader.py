"""The reader: exact, resumable global batches that do not depend on the number of processes.

Every epoch, all record indices are permuted with a generator seeded by (seed, epoch). The batch at
cursor (epoch, r) is rows [r, r + G) of that permutation; process p of P reads its contiguous slice
[r + pG/P, r + (p+1)G/P). The cursor counts rows, not batches, so it is the whole state whatever the
batch size: saved with the train state, it resumes on the very next row, on any number of processes,
and a resume at another batch size neither replays nor skips a row. A last partial batch of an
epoch is dropped, so every step has the same shape. Prefetch to the device is the trainer's job.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import numpy as np

from apo_jax.cli import UserError
from apo_jax.data import layouts
from apo_jax.data.layouts import EXTRA_KEYS
from apo_jax.data.tfrecords import max_token_id, read_records


@dataclasses.dataclass
class ReaderState:
    epoch: int = 0
    row: int = 0  # the first row of the next global batch, in the epoch's permutation


class PreferenceReader:
    """Host batches for this process, in a configured layout, from a preprocessed directory.

    Args:
      data_dir: output of `python -m apo_jax.data.preprocess`, or a list of records (tests).
      global_batch_size: G, pairs per global batch (all processes together).
      seed: the shuffle seed.
      layout: "padded", "packed" or "prompt_shared" (see apo_jax.data.layouts).
      length: row length T (default: the preprocessing max_length; prompt_shared needs more).
      process_index, process_count: default `jax.process_index()` / `jax.process_count()`.
      pad_id: the id written into padding (masked out everywhere).
      packed_rows: rows per packed batch (default 2·G/P).
      bucket: with the padded layout, each global batch's rows are padded only to its longest
        sequence rounded up to a multiple of `bucket` (at most `length`), not to `length`: a few
        shapes (each compiles once), far less padding where lengths vary. 0: always `length`.
      grad_accum: A, micro-batches per global batch: micro-batch k is rows k::A (the train step's
        split). Packed and prompt-shared rows are built per micro-batch and interleaved, so each
        micro-batch's rows hold its own pairs whole.
    """

    def __init__(
        self,
        data_dir,
        *,
        global_batch_size: int,
        seed: int = 0,
        layout: str = "padded",
        length: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        pad_id: int = 0,
        packed_rows: int | None = None,
        grad_accum: int = 1,
        bucket: int = 0,
    ):
        if isinstance(data_dir, str | pathlib.Path):
            self.records, self.metadata = read_records(data_dir)
        else:
            self.records, self.metadata = list(data_dir), {}
        if process_index is None or process_count is None:
            import jax

            process_index, process_count = jax.process_index(), jax.process_count()
        if global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size={global_batch_size} is not divisible by {process_count} processes"
            )
        if len(self.records) < global_batch_size:
            where = f"{data_dir}: its " if isinstance(data_dir, str | pathlib.Path) else ""
            raise ValueError(
                f"{where}{len(self.records)} records cannot fill one global batch of {global_batch_size} "
                "(train.batch_size)"
            )
        if layout not in layouts.LAYOUTS:
            raise ValueError(f"unknown batch layout {layout!r}; use one of {layouts.LAYOUTS}")
        self.G, self.seed, self.layout = global_batch_size, seed, layout
        self.length = length or self.metadata.get("max_length")
        if self.length is None:
            raise ValueError("give the row length (no preprocessing max_length to default to)")
        if (global_batch_size // process_count) % grad_accum:
            raise ValueError(
                f"global_batch_size={global_batch_size} over {process_count} processes does not split into "
                f"{grad_accum} micro-batches"
            )
        if packed_rows and packed_rows % grad_accum:
            raise ValueError(f"packed_rows={packed_rows} does not split into {grad_accum} micro-batches")
        self.p, self.P, self.pad_id, self.packed_rows = process_index, process_count, pad_id, packed_rows
        self.A = grad_accum
        if bucket and layout != "padded":
            raise ValueError(f"bucketed row lengths are for the padded layout, not {layout!r}")
        self.bucket = bucket
        self.state = ReaderState()
        self.origin = (0, ReaderState())  # (step, cursor): where `cursor(step)` counts from

    @property
    def steps_per_epoch(self) -> int:
        return len(self.records) // self.G

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.records))

    def global_indices(self, epoch: int, step: int) -> np.ndarray:
        """The G record indices of global batch `step` of `epoch` (from the epoch's start)."""
        return self._rows(ReaderState(epoch, step * self.G))

    def _rows(self, at: ReaderState) -> np.ndarray:
        return self.permutation(at.epoch)[at.row : at.row + self.G]

    def batch(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        """This process's part of global batch `step` of `epoch`, in the layout."""
        return self.batch_at(ReaderState(epoch, step * self.G))

    def batch_at(self, at: ReaderState) -> dict[str, np.ndarray]:
        """This process's part of the global batch at cursor `at`, in the layout."""
        local = self.G // self.P
        rows = self._rows(at)
        records = [self.records[i] for i in rows[self.p * local : (self.p + 1) * local]]
        if self.layout == "padded" or self.A == 1:
            return self._build(records, self.packed_rows, self._length(rows))
        rows = self.packed_rows // self.A if self.packed_rows else None
        parts = [self._build(records[k :: self.A], rows) for k in range(self.A)]
        # element j·A + k is micro-batch k's element j: the step's rows k::A give micro-batch k back
        return {
            key: np.stack([p[key] for p in parts], 1).reshape(-1, *parts[0][key].shape[1:])
            for key in parts[0]
        }

    def _length(self, rows) -> int:
        """The row length of the global batch of `rows` (the same on every process)."""
        if not self.bucket:
            return self.length
        longest = max(
            len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"]))
            for r in (self.records[i] for i in rows)
        )
        return min(self.length, -(-longest // self.bucket) * self.bucket)

    def _build(self, records, rows, length: int | None = None) -> dict[str, np.ndarray]:
        length = length or self.length
        out = layouts.build(self.layout, records, length, pad_id=self.pad_id, rows=rows)
        for key in ("chosen_index", "rejected_index"):  # rows of this process's slice -> global rows
            if key in out:
                out[key][:, 0] += self.p * out["input_ids"].shape[0]
        return out

    def advance(self, at: ReaderState, steps: int) -> ReaderState:
        """The cursor `steps` global batches after `at`: a batch that would run past the epoch's
        last full batch starts the next epoch instead."""
        left = (len(self.records) - at.row) // self.G  # batches still in at's epoch
        if steps < left:
            return ReaderState(at.epoch, at.row + steps * self.G)
        epochs, steps = divmod(steps - left, self.steps_per_epoch)
        return ReaderState(at.epoch + 1 + epochs, steps * self.G)

    def resume(self, step: int, at: dict) -> None:
        """Counts steps from a saved cursor: global batch `step` is read at `at` (a `state_dict`,
        which may come from a run at another batch size)."""
        self.origin = (step, self._state(at))

    def cursor(self, step: int) -> ReaderState:
        """Where global batch number `step` (from the start of training) lies."""
        origin_step, origin = self.origin
        if step < origin_step:
            raise ValueError(f"step {step} lies before the resumed cursor's step {origin_step}")
        return self.advance(origin, step - origin_step)

    def batches_from(self, step: int):
        """This process's batches for steps `step`, `step + 1`, ...: the cursor follows the step."""
        while True:
            c = self.cursor(step)
            self.state = c
            yield self.batch_at(c)
            step += 1

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.state.row + self.G > len(self.records):
            self.state = ReaderState(self.state.epoch + 1, 0)
        out = self.batch_at(self.state)
        self.state = self.advance(self.state, 1)
        return out

    def state_dict(self) -> dict[str, int]:
        """The cursor, to save beside the train state."""
        return dataclasses.asdict(self.state)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.state = self._state(state)

    def _state(self, saved: dict) -> ReaderState:
        """A saved cursor; one from before cursors counted rows ({"epoch", "step"}) counted batches
        of this reader's size (a batch-size change was refused then)."""
        row = saved["row"] if "row" in saved else int(saved["step"]) * self.G
        return ReaderState(int(saved["epoch"]), int(row))


# --- what the records must hold for a run (checked once they are open, before anything compiles) ---


class DataError(UserError, ValueError):
    """Records that cannot serve the run: token ids beyond the model's vocabulary, a column the loss
    needs, the loss's kind, or no preference signal at all; the message names the records."""


def check_records(
    path, records: list[dict], metadata: dict, *, vocab_size: int, loss=None, preference=True, signal=True
) -> None:
    """The checks below, for the records at `path` read by a run of `loss` (None: SFT); `signal`:
    training data (held-out sets may hold ties and equal answers)."""
    check_vocab(path, records, metadata, vocab_size)
    if loss is not None:
        check_against_data(path, loss, metadata, preference=preference)
        if signal:
            check_signal(path, records, loss)


def check_vocab(path, records: list[dict], metadata: dict, vocab_size: int) -> None:
    """Token ids of the records must index the model's embedding: a larger id reads out of bounds
    (NaN, or silently another token's row) instead of failing."""
    top = max_token_id(records)  # the records themselves: metadata may predate an edit
    if top >= vocab_size:
        tok = metadata.get("tokenizer", {})
        raise DataError(
            f"{path}: token id {top} is beyond the model's vocabulary of {vocab_size}; the records were "
            f"tokenized with {tok.get('name_or_path')!r} (vocabulary {tok.get('vocab_size', '?')}), another "
            "tokenizer than the model's: preprocess them with the model's tokenizer"
        )


def check_against_data(path, loss, metadata: dict, *, preference: bool = True) -> None:
    """Batch fields the loss needs must be in the records at `path`, and the loss's kind (paired or
    unpaired) theirs (`preference`: a preference run; SFT reads either)."""
    fields = set(metadata.get("fields", ()))
    rename = {batch_key: column for column, batch_key in EXTRA_KEYS.items()}  # batch key -> records column
    for need in loss.needs:
        if need in rename and rename[need] not in fields:
            raise DataError(
                f"loss {loss.name!r} needs the batch field {need!r}, but the records in {path} "
                f"have no {rename[need]!r} column"
            )
    unpaired = metadata.get("kind") == "unpaired"
    if preference and unpaired != (loss.kind == "unpaired"):
        raise DataError(
            f"loss {loss.name!r} is {loss.kind} but the records in {path} are {metadata.get('kind')}"
        )


def check_signal(path, records: list[dict], loss) -> None:
    """Pairs that carry no preference: ties, for a loss that cannot use them (it would train each as
    chosen over rejected), and pairs whose two answers are the same tokens (no gradient between
    them). Data that is all of them is refused; some of them are counted on stderr."""
    if loss.kind != "paired":
        return
    n = len(records)
    ties = 0 if "is_tie" in loss.needs else sum(bool(r.get("is_tie", 0)) for r in records)
    same = sum(np.array_equal(r["chosen_ids"], r["rejected_ids"]) for r in records)
    if ties == n:
        raise DataError(
            f"data.train={path}: every one of its {n} pairs is a tie (is_tie), but loss {loss.name!r} "
            "cannot use ties and would train each as a preference: use a loss made for ties (todo) or "
            "leave the ties out of the pairs"
        )
    if same == n:
        raise DataError(
            f"data.train={path}: in every one of its {n} pairs chosen and rejected are the same tokens: "
            "there is no preference to learn"
        )
    if ties:
        print(
            f"warning: data.train={path}: {ties} of {n} pairs are ties (is_tie) that loss {loss.name!r} "
            "trains as preferences",
            file=sys.stderr,
        )
    if same:
        print(
            f"warning: data.train={path}: {same} of {n} pairs have chosen == rejected (no signal)",
            file=sys.stderr,
        )
