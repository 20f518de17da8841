"""Training and evaluation prompts: reading problem files, building prompts, drawing batches.

A problem file is JSON Lines (one object per line) or Parquet, one record per problem, in
DeepScaleR's layout: a problem text under `DataConfig.problem_key` and its reference answer
under `DataConfig.answer_key`. `PromptDataset` turns the records into tokenized `Problem`s;
`DataCursor` decides which problems each step draws, reproducibly and resumably.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from siri.checks import as_int
from siri.errors import UserError
from siri.config import DataConfig

logger = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)

# Prompts are tokenized in chunks of this many: a fast tokenizer batches in Rust, and a
# chunk bounds the memory of the encodings held at once on a data set of 10^5 problems.
_TOKENIZE_CHUNK = 1024


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _numbered_lines(path: str, handle) -> Iterator[tuple[int, str]]:
    number = 0
    try:
        for number, line in enumerate(handle, start=1):
            yield number, line
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text after line {number} ({error.reason})") from None


def _iter_records(path: str) -> Iterator[tuple[str, dict]]:
    """(location, record) pairs of a problem file; `location` is "line N" or "row N" (1-based),
    what an error message points the user to."""
    suffix = _suffix(path)
    if suffix in JSONL_SUFFIXES:
        with open(path, encoding="utf-8") as handle:
            for number, line in _numbered_lines(path, handle):
                if not line.strip():
                    continue  # a trailing newline or a blank separator line is not a record
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise UserError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
                if not isinstance(record, dict):
                    raise UserError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
                yield f"line {number}", record
    elif suffix in PARQUET_SUFFIXES:
        try:
            import pyarrow.parquet as pq
        except ImportError as error:
            raise ImportError(
                f"reading {path!r} needs the 'pyarrow' package (pip install pyarrow); "
                "or convert the file to JSON Lines"
            ) from error
        # Row groups one at a time: a large file never sits in memory twice (Arrow + Python).
        try:
            parquet = pq.ParquetFile(path)
        except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
            raise UserError(f"{path}: not a readable Parquet file ({error})") from None
        number = 0
        for group in range(parquet.num_row_groups):
            for record in parquet.read_row_group(group).to_pylist():
                number += 1
                yield f"row {number}", record
    else:
        raise UserError(
            f"path {path!r}: unsupported file type {suffix or '(none)'!r}; "
            f"expected one of {list(JSONL_SUFFIXES + PARQUET_SUFFIXES)}"
        )


def load_records(path: str | os.PathLike) -> list[dict]:
    """All records of a `.jsonl` or `.parquet` file, as a list of dicts.

    Blank lines of a JSON Lines file are skipped; any other line must hold one JSON object.
    Parquet needs `pyarrow` (imported only when a Parquet file is read).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"path {path!r} is not a file")
    return [record for _, record in _iter_records(path)]


@dataclass(frozen=True)
class Problem:
    """One prompt for RL or evaluation.

    `index` is the problem's position in its data set (`dataset[p.index] is p`), unique within
    it; `prompt_ids` are the tokens the rollout engine is given, `prompt_text` the string they
    were tokenized from, `answer` the reference answer, `source` the stem of the file it came
    from.
    """

    index: int
    prompt_ids: list[int]
    prompt_text: str
    answer: str
    source: str


def _answer_text(value, where: str, key: str) -> str:
    # Some data sets store numeric answers as numbers; the reward compares strings.
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise UserError(f"{where}: field {key!r} must be a string or a number, got {type(value).__name__}")


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


class PromptDataset:
    """Tokenized prompts from problem files, in file order; `len(ds)` and `ds[i] -> Problem`.

    Each prompt is `problem + " " + cfg.instruction` (just the problem when the instruction is
    empty), wrapped in the tokenizer's chat template as one user turn with the generation
    prompt when `cfg.use_chat_template` and the tokenizer has a template, and tokenized.
    Prompts longer than `cfg.max_prompt_length` tokens are dropped; `num_dropped` counts them.

    Args:
        files: paths of `.jsonl` / `.parquet` files (a single path is taken as one file).
        tokenizer: a Hugging Face tokenizer.
        cfg: the `DataConfig` (keys, instruction, chat template switch, length limit).
    """

    def __init__(self, files: Sequence[str | os.PathLike] | str | os.PathLike, tokenizer, cfg: DataConfig) -> None:
        if isinstance(files, (str, os.PathLike)):
            files = [files]
        files = [os.fspath(f) for f in files]
        if not files:
            raise UserError("files: give at least one .jsonl or .parquet file")
        for path in files:
            if not os.path.isfile(path):
                raise UserError(f"files: {path!r} is not a file")
        if cfg.max_prompt_length <= 0:
            raise UserError(f"cfg.max_prompt_length must be > 0, got {cfg.max_prompt_length!r}")

        self.cfg = cfg
        self.files = files
        self.use_chat_template = cfg.use_chat_template and _has_chat_template(tokenizer)
        if cfg.use_chat_template and not self.use_chat_template:
            warnings.warn("data.use_chat_template is set but the tokenizer has no chat template: "
                          "prompts are the raw text", stacklevel=2)

        texts, answers, sources = [], [], []
        for path in files:
            source = os.path.splitext(os.path.basename(path))[0]
            for location, record in _iter_records(path):
                where = f"{path}, {location}"
                for key in (cfg.problem_key, cfg.answer_key):
                    if key not in record or record[key] is None:
                        raise UserError(f"{where}: missing field {key!r} (present: {sorted(record)})")
                problem = record[cfg.problem_key]
                if not isinstance(problem, str):
                    raise UserError(f"{where}: field {cfg.problem_key!r} must be a string, "
                                     f"got {type(problem).__name__}")
                texts.append(self._prompt_text(problem, tokenizer))
                answers.append(_answer_text(record[cfg.answer_key], where, cfg.answer_key))
                sources.append(source)

        ids = self._tokenize(texts, tokenizer)
        self.problems: list[Problem] = []
        self.num_dropped = 0
        for text, prompt_ids, answer, source in zip(texts, ids, answers, sources):
            if len(prompt_ids) > cfg.max_prompt_length:
                self.num_dropped += 1
                continue
            self.problems.append(Problem(index=len(self.problems), prompt_ids=prompt_ids, prompt_text=text,
                                         answer=answer, source=source))
        if self.num_dropped:
            logger.warning("dropped %d of %d prompts longer than data.max_prompt_length=%d tokens (%s)",
                           self.num_dropped, len(texts), cfg.max_prompt_length, ", ".join(files))

    def _prompt_text(self, problem: str, tokenizer) -> str:
        content = f"{problem} {self.cfg.instruction}" if self.cfg.instruction else problem
        if not self.use_chat_template:
            return content
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)

    def _tokenize(self, texts: list[str], tokenizer) -> list[list[int]]:
        # A chat template writes its own BOS and role markers; letting the tokenizer add
        # special tokens again would double the BOS (vLLM and TRL tokenize templated text
        # the same way). Raw text gets the tokenizer's usual special tokens.
        add_special_tokens = not self.use_chat_template
        ids: list[list[int]] = []
        for start in range(0, len(texts), _TOKENIZE_CHUNK):
            chunk = texts[start:start + _TOKENIZE_CHUNK]
            ids.extend(list(row) for row in tokenizer(chunk, add_special_tokens=add_special_tokens)["input_ids"])
        return ids

    def __len__(self) -> int:
        return len(self.problems)

    def __getitem__(self, index: int) -> Problem:
        return self.problems[index]

    def __iter__(self) -> Iterator[Problem]:
        return iter(self.problems)


class DataCursor:
    """Which data set items each step draws: epoch after epoch of a permutation.

    The permutation of epoch e is derived from (seed, e) alone, so the order is reproducible
    without storing it, and `state_dict()` (epoch, position) is enough for a resumed run to
    draw exactly what the uninterrupted run would have. A draw that runs past the end of an
    epoch continues with the next epoch's permutation; every item is drawn exactly once per
    epoch. With `shuffle=False` every epoch is 0, 1, ..., num_items - 1.

    Note that a draw crossing an epoch boundary (or asking for more than `num_items`) can hold
    the same item twice, once from each epoch.
    """

    def __init__(self, num_items: int, seed: int = 0, shuffle: bool = True) -> None:
        self.num_items = as_int("num_items", num_items, minimum=1)
        self.seed = as_int("seed", seed, minimum=None)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.position = 0
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            if self.shuffle:
                # SeedSequence mixes (seed, epoch) into independent streams: neighbouring seeds
                # or epochs give unrelated orders, and the global RNGs are never touched.
                # SeedSequence takes non-negative entropy; the modulus maps a negative seed.
                rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed % 2**64, epoch])))
                self._order = rng.permutation(self.num_items)
            else:
                self._order = np.arange(self.num_items)
            self._order_epoch = epoch
        return self._order

    def next_indices(self, n: int) -> list[int]:
        """The next `n` item indices, advancing the cursor (across epochs when needed)."""
        n = as_int("n", n, minimum=0)
        drawn: list[int] = []
        while len(drawn) < n:
            order = self._permutation(self.epoch)
            take = min(n - len(drawn), self.num_items - self.position)
            drawn.extend(order[self.position:self.position + take].tolist())
            self.position += take
            if self.position == self.num_items:  # keep the state canonical: never "at the end"
                self.epoch += 1
                self.position = 0
        return drawn

    def state_dict(self) -> dict:
        """A JSON-serialisable snapshot: the permutation itself is re-derived on load."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_items": self.num_items,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; it must come from a cursor over the same data and seed."""
        if not isinstance(state, dict):
            raise ValueError(f"state must be a dict from DataCursor.state_dict(), got {type(state).__name__}")
        missing = [k for k in ("epoch", "position", "seed", "num_items") if k not in state]
        if missing:
            raise ValueError(f"state lacks {missing}")
        for key, mine in (("num_items", self.num_items), ("seed", self.seed), ("shuffle", self.shuffle)):
            if key in state and state[key] != mine:
                raise ValueError(
                    f"state[{key!r}] is {state[key]!r} but this cursor has {mine!r}: the checkpoint comes from "
                    "a run over different data or with a different seed"
                )
        epoch, position = state["epoch"], state["position"]
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"state['epoch'] must be a non-negative integer, got {epoch!r}")
        if not isinstance(position, int) or not 0 <= position <= self.num_items:
            raise ValueError(f"state['position'] must be an integer in [0, {self.num_items}], got {position!r}")
        self.epoch, self.position = epoch, position
        if self.position == self.num_items:
            self.epoch, self.position = self.epoch + 1, 0
