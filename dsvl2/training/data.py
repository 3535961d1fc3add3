"""Training data: JSONL conversations -> tokenised samples -> packed, padded batches.

File format: one JSON object per line, in the official chat format (spec §6.3, §9.1)::

    {"id": "optional string",
     "messages": [{"role": "user", "content": "<image>\\nWhat is this?", "images": ["img/a.png"]},
                  {"role": "assistant", "content": "<|ref|>a cat<|/ref|><|det|>[[10, 20, 500, 600]]<|/det|>"}],
     "images": ["img/a.png"]}

- ``role`` is ``system`` (first message only), ``user`` or ``assistant``; after an optional system
  message, user and assistant turns alternate, starting with a user turn and ending with a
  non-empty assistant turn (the only tokens that get a loss).
- Each ``<image>`` in a user turn's content is one image. Images are listed either per user
  message (``"images"`` of that message, in placeholder order) or once at the top level (in the
  order of the placeholders across the conversation), never both. Paths are relative to the JSONL
  file (absolute paths also work).
- Grounding answers use the official tokens: ``<|ref|>…<|/ref|><|det|>[[x1, y1, x2, y2]]<|/det|>``
  with 0-999 coordinates; the processor appends the EOS after every assistant turn.
- Blank lines are not rows. Any other line that is not a valid row is a :class:`BadRow` (file,
  line, reason): fatal with ``on_error="raise"``, returned and counted with ``on_error="skip"``.

Labels come from :class:`~dsvl2.processing.processor.Processor` with ``mask_prompt=True``
(``-100`` on system/user tokens and image positions, assistant tokens and their EOS kept, §6.4).

Packing: :func:`pack` puts whole samples into rows of at most ``max_length`` tokens (best fit,
never splitting a sample). Inside a row, ``position_ids`` restart at 0 for each sample and
``seq_ids`` numbers the samples 0, 1, 2…; the training loop must restrict attention to
``seq_ids[q] == seq_ids[k]`` (and causal), which :func:`block_causal_mask` builds. The label of each
sample's first token (BOS) is set to ``-100`` so the shifted loss never asks a sample to predict
the next sample's first token. Images of a row are concatenated in order, so the model's splice
(§4.3) fills each sample's ``<image>`` positions with its own tiles.

Batches (:func:`collate`) are right-padded: the explicit ``position_ids`` and ``seq_ids`` make the
side irrelevant to the model, and pad positions get ``attention_mask`` 0, ``seq_ids`` -1 and
label -100. Images are zero-padded per row to ``(B, max_tiles, 3, S, S)`` with zero crop rows (§5.7).
"""

import bisect
import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from dsvl2.errors import DSVL2Error, InputError

if TYPE_CHECKING:
    from dsvl2.processing.processor import Processor

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"
ROW_KEYS = {"id", "messages", "images"}
MESSAGE_KEYS = {"role", "content", "images"}


@dataclass(frozen=True)
class BadRow:
    """A line of a JSONL file that is not a valid training row, and why."""

    file: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass(frozen=True)
class Example:
    """A validated row: messages with image paths resolved and assigned to their user turns."""

    messages: tuple[dict[str, Any], ...]  # {"role", "content", "images": [absolute path str]}
    file: Path
    line: int
    id: str | None = None

    @property
    def source(self) -> str:
        return f"{self.file}:{self.line}"


class _RowError(Exception):
    """Why a row is bad; becomes a :class:`BadRow` with the file and line."""


def _check_paths(value: Any, where: str, base: Path) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise _RowError(f"{where} 'images' must be a list of path strings")
    resolved = []
    for rel in value:
        path = base / rel
        if not path.is_file():
            raise _RowError(f"image file not found: {rel} (looked for {path})")
        resolved.append(str(path))
    return resolved


def _parse_row(row: Any, base: Path) -> tuple[tuple[dict[str, Any], ...], str | None]:
    """Validate one decoded row; raise :class:`_RowError` with the first problem found."""
    if not isinstance(row, dict):
        raise _RowError(f"a row must be a JSON object, got {type(row).__name__}")
    unknown = sorted(set(row) - ROW_KEYS)
    if unknown:
        raise _RowError(f"unknown key(s) {unknown}; a row has {sorted(ROW_KEYS)}")
    row_id = row.get("id")
    if row_id is not None and not isinstance(row_id, str):
        raise _RowError("'id' must be a string")
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _RowError("missing 'messages' (a non-empty list of {role, content} objects)")
    parsed: list[dict[str, Any]] = []
    for k, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _RowError(f"message {k} must be an object")
        unknown = sorted(set(message) - MESSAGE_KEYS)
        if unknown:
            raise _RowError(f"message {k} has unknown key(s) {unknown}")
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant"):
            raise _RowError(f"message {k} role must be 'system', 'user' or 'assistant', got {role!r}")
        if not isinstance(content, str):
            raise _RowError(f"message {k} ({role}) needs a string 'content'")
        if role != "user" and (IMAGE_TOKEN in content or "images" in message):
            raise _RowError(f"message {k} ({role}) has an image; images belong to user turns")
        parsed.append({"role": role, "content": content, "images": message.get("images")})
    body = parsed[1:] if parsed[0]["role"] == "system" else parsed
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    roles = [m["role"] for m in body]
    if not body or roles != expected[: len(roles)] or roles[-1] != "assistant":
        raise _RowError(f"roles must be [system,] user, assistant, user, ..., assistant; got {roles}")
    if any(m["role"] == "assistant" and not m["content"].strip() for m in body):
        raise _RowError("an assistant message is empty: nothing to train on")

    per_message = any(m["images"] is not None for m in parsed)
    if per_message and "images" in row:
        raise _RowError("images are given both per message and at the top level; use one")
    counts = [m["content"].count(IMAGE_TOKEN) for m in parsed]
    if per_message:
        for k, (m, n) in enumerate(zip(parsed, counts)):
            m["images"] = _check_paths(m["images"] or [], f"message {k}", base)
            if len(m["images"]) != n:
                raise _RowError(f"message {k} has {n} {IMAGE_TOKEN} placeholder(s) "
                                f"but {len(m['images'])} image(s)")
    else:
        paths = _check_paths(row.get("images", []), "top-level", base)
        if len(paths) != sum(counts):
            raise _RowError(f"the messages have {sum(counts)} {IMAGE_TOKEN} placeholder(s) "
                            f"but {len(paths)} image(s) are listed")
        for m, n in zip(parsed, counts):
            m["images"], paths = paths[:n], paths[n:]
    return tuple(parsed), row_id


def load_jsonl(path: str | Path, *, on_error: Literal["raise", "skip"] = "raise"
               ) -> tuple[list[Example], list[BadRow]]:
    """Read and validate a conversation file (format in the module docstring).

    Returns the good examples and the bad rows. With ``on_error="raise"`` the first bad row raises
    :class:`InputError` naming ``file:line`` and the reason; with ``"skip"`` every bad row is
    returned so the caller can count and report them.
    """
    if on_error not in ("raise", "skip"):
        raise InputError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    try:
        lines = path.read_bytes().splitlines()
    except OSError as err:
        raise InputError(f"cannot read training data {path}: {err}") from err
    examples: list[Example] = []
    bad: list[BadRow] = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise _RowError(f"not UTF-8: {err}") from err
            except json.JSONDecodeError as err:
                raise _RowError(f"invalid JSON: {err.msg} (column {err.colno})") from err
            messages, row_id = _parse_row(row, path.parent)
        except _RowError as err:
            bad_row = BadRow(path, number, str(err))
            if on_error == "raise":
                raise InputError(str(bad_row)) from err
            bad.append(bad_row)
            continue
        examples.append(Example(messages, path, number, row_id))
    return examples, bad


@dataclass
class TokenizedSample:
    """One conversation as token ids, labels and image tiles, without a batch dimension."""

    input_ids: torch.Tensor  # (T,) int64
    labels: torch.Tensor  # (T,) int64, IGNORE_INDEX where there is no loss
    images_seq_mask: torch.Tensor  # (T,) bool
    images: torch.Tensor  # (N_tiles, 3, S, S) float32; N_tiles = sum(1 + nw * nh), may be 0
    images_spatial_crop: torch.Tensor  # (N_images, 2) int64 (nw, nh), may have 0 rows
    source: str  # "file:line" (or a caller's name) for error messages

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


class ConversationDataset:
    """Examples -> :class:`TokenizedSample` through the processor (images load on access)."""

    def __init__(self, examples: Sequence[Example], processor: "Processor", *,
                 mask_prompt: bool = True) -> None:
        self.examples = list(examples)
        self.processor = processor
        self.mask_prompt = mask_prompt

    @property
    def pad_id(self) -> int:
        return self.processor.tokenizer.pad_id

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> TokenizedSample:
        example = self.examples[index]
        conversation = [dict(m) for m in example.messages]
        try:
            batch = self.processor(conversation, inference=False, mask_prompt=self.mask_prompt)
        except DSVL2Error as err:
            raise InputError(f"{example.source}: {err}") from err
        crops = batch.images_spatial_crop[0]  # (max_images, 2); a zero row ends the list (§4.3)
        real = int((crops.prod(dim=-1) > 0).sum())
        crops = crops[:real]
        n_tiles = int((1 + crops.prod(dim=-1)).sum())
        return TokenizedSample(input_ids=batch.input_ids[0], labels=batch.labels[0],
                               images_seq_mask=batch.images_seq_mask[0].bool(),
                               images=batch.images[0, :n_tiles], images_spatial_crop=crops,
                               source=example.source)


@dataclass
class PackedSample:
    """Several samples concatenated into one row; see the module docstring for the conventions."""

    input_ids: torch.Tensor  # (L,) int64
    labels: torch.Tensor  # (L,) int64
    position_ids: torch.Tensor  # (L,) int64, restarting at 0 for each sample
    seq_ids: torch.Tensor  # (L,) int64, 0..k-1: which sample of the row each token belongs to
    images_seq_mask: torch.Tensor  # (L,) bool
    images: torch.Tensor  # (N_tiles, 3, S, S)
    images_spatial_crop: torch.Tensor  # (N_images, 2) int64
    sources: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def pack_indices(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit bin packing: each index goes to the fullest row it still fits in, else a new row.

    Deterministic, keeps every index exactly once, and keeps input order inside a row. A length
    above ``max_length`` raises :class:`InputError` (a sample is never split or dropped).
    """
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i, n in enumerate(lengths):
        if n > max_length:
            raise InputError(f"sample {i} has {n} tokens, more than max_length {max_length}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, row = free.pop(k)
        else:
            room, row = max_length, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, row))
    return rows


def concat(samples: Sequence[TokenizedSample]) -> PackedSample:
    """One packed row from the given samples, in order (no length check)."""
    labels = []
    for s in samples:
        lab = s.labels.clone()
        lab[0] = IGNORE_INDEX  # never predict a sample's BOS from the previous sample
        labels.append(lab)
    return PackedSample(
        input_ids=torch.cat([s.input_ids for s in samples]),
        labels=torch.cat(labels),
        position_ids=torch.cat([torch.arange(len(s)) for s in samples]),
        seq_ids=torch.cat([torch.full((len(s),), i, dtype=torch.long) for i, s in enumerate(samples)]),
        images_seq_mask=torch.cat([s.images_seq_mask for s in samples]),
        images=torch.cat([s.images for s in samples]),
        images_spatial_crop=torch.cat([s.images_spatial_crop for s in samples]),
        sources=tuple(s.source for s in samples),
    )


def pack(samples: Sequence[TokenizedSample], max_length: int) -> list[PackedSample]:
    """Greedy (best-fit) packing of whole samples into rows of at most ``max_length`` tokens."""
    for s in samples:
        if len(s) > max_length:
            raise InputError(f"{s.source}: the sample has {len(s)} tokens, more than "
                             f"max_length {max_length}; raise max_length or drop the row")
    groups = pack_indices([len(s) for s in samples], max_length)
    return [concat([samples[i] for i in group]) for group in groups]


@dataclass
class TrainBatch:
    """A right-padded batch of packed rows, ready for the model and the loss."""

    input_ids: torch.Tensor  # (B, T) int64, pad_id on padding
    attention_mask: torch.Tensor  # (B, T) bool, False on padding
    labels: torch.Tensor  # (B, T) int64, IGNORE_INDEX on padding
    position_ids: torch.Tensor  # (B, T) int64, 0 on padding
    seq_ids: torch.Tensor  # (B, T) int64, -1 on padding
    images: torch.Tensor  # (B, max_tiles, 3, S, S), zero-padded
    images_seq_mask: torch.Tensor  # (B, T) bool
    images_spatial_crop: torch.Tensor  # (B, max_images, 2) int64, zero rows pad

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "TrainBatch":
        """A copy on ``device``; ``dtype`` (e.g. bfloat16) applies to ``images`` only."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)}
        moved["images"] = moved["images"].to(dtype or self.images.dtype)
        return TrainBatch(**moved)


def collate(rows: Sequence[PackedSample | TokenizedSample], pad_id: int) -> TrainBatch:
    """Right-pad rows into a :class:`TrainBatch`; a plain sample counts as a row of one."""
    if not rows:
        raise InputError("collate needs at least one row")
    packed = [r if isinstance(r, PackedSample) else concat([r]) for r in rows]
    size = packed[0].images.shape[-1]
    batch, length = len(packed), max(len(r) for r in packed)
    max_tiles = max(1, max(r.images.shape[0] for r in packed))  # text-only: one zero tile (§4.3)
    max_images = max(1, max(r.images_spatial_crop.shape[0] for r in packed))
    out = TrainBatch(
        input_ids=torch.full((batch, length), pad_id, dtype=torch.long),
        attention_mask=torch.zeros((batch, length), dtype=torch.bool),
        labels=torch.full((batch, length), IGNORE_INDEX, dtype=torch.long),
        position_ids=torch.zeros((batch, length), dtype=torch.long),
        seq_ids=torch.full((batch, length), -1, dtype=torch.long),
        images=torch.zeros((batch, max_tiles, 3, size, size), dtype=packed[0].images.dtype),
        images_seq_mask=torch.zeros((batch, length), dtype=torch.bool),
        images_spatial_crop=torch.zeros((batch, max_images, 2), dtype=torch.long),
    )
    for b, r in enumerate(packed):
        n = len(r)
        out.input_ids[b, :n] = r.input_ids
        out.attention_mask[b, :n] = True
        out.labels[b, :n] = r.labels
        out.position_ids[b, :n] = r.position_ids
        out.seq_ids[b, :n] = r.seq_ids
        out.images_seq_mask[b, :n] = r.images_seq_mask
        out.images[b, : r.images.shape[0]] = r.images
        out.images_spatial_crop[b, : r.images_spatial_crop.shape[0]] = r.images_spatial_crop
    return out


def block_causal_mask(seq_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) seq_ids -> (B, 1, T, T) bool, True where query t may attend to key s.

    Allowed iff s <= t and ``seq_ids`` are equal. Padding (-1) attends only to padding, so no row is
    empty (no NaN from softmax) and no real token ever sees a pad; pad labels are -100 anyway.
    """
    T = seq_ids.shape[-1]
    causal = torch.ones((T, T), dtype=torch.bool, device=seq_ids.device).tril()  # (T, T)
    same = seq_ids[:, :, None] == seq_ids[:, None, :]  # (B, T, T)
    return (same & causal)[:, None]  # (B, 1, T, T)


# ---- mixtures: which samples make up optimizer step s ----------------------------------------------
class SampleSource:
    """What a mixture draws from: ``len()`` items, ``source[i]`` -> :class:`TokenizedSample`.

    A finite source (a :class:`ConversationDataset`) is read in a fresh seeded permutation every
    epoch. A generator of synthetic samples sets ``shuffle = False`` and a huge length: item ``i`` is
    already a function of ``i`` alone.
    """

    shuffle: bool = True

    def __len__(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def __getitem__(self, index: int) -> TokenizedSample:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True)
class StepPlan:
    """The samples of one optimizer step, as (source name, item index), for this process only."""

    step: int
    items: tuple[tuple[str, int], ...]
    counters: dict[str, int]  # draws per source after this step (the data position to resume from)


class Mixture:
    """Deterministic weighted mixture of named sources, resumable from a per-source draw counter.

    Step ``s`` draws ``batch_size`` source names with ``Random(f"{seed}/{s}")`` (weights from the
    stage); the k-th draw from a source takes its item ``perm_epoch[k % n]``. With ``world`` processes,
    every process computes the same global list and keeps its contiguous share, so 2 x (B/2) sees
    exactly the samples of 1 x B.
    """

    def __init__(self, sources: dict[str, Any], weights: dict[str, float], seed: int = 0) -> None:
        missing = sorted(set(weights) - set(sources))
        if missing:
            raise InputError(f"the stage's mixture names source(s) {missing} that were not given; "
                             f"available: {sorted(sources)}")
        self.names = [n for n in sorted(weights) if weights[n] > 0]
        for name in self.names:
            if len(sources[name]) == 0:
                raise InputError(f"data source {name!r} is empty")
        self.weights = [weights[n] for n in self.names]
        self.sources = sources
        self.seed = seed
        self._perms: dict[tuple[str, int], list[int]] = {}

    def _item(self, name: str, draw: int) -> int:
        source = self.sources[name]
        if not getattr(source, "shuffle", True):
            return draw % len(source)
        epoch, pos = divmod(draw, len(source))
        key = (name, epoch)
        if key not in self._perms:
            gen = torch.Generator().manual_seed(hash_seed(f"{self.seed}/{name}/{epoch}"))
            self._perms = {key: torch.randperm(len(source), generator=gen).tolist()}  # keep one epoch
        return self._perms[key][pos]

    def plan(self, step: int, batch_size: int, counters: dict[str, int], rank: int = 0,
             world: int = 1) -> StepPlan:
        """The items of ``step`` for process ``rank``; ``counters`` is the position before the step."""
        import random

        if batch_size % world:
            raise InputError(f"batch_size {batch_size} is not divisible by the {world} processes")
        counters = dict(counters)
        draws = random.Random(f"{self.seed}/{step}").choices(self.names, self.weights, k=batch_size)
        items = []
        for name in draws:
            k = counters.get(name, 0)
            counters[name] = k + 1
            items.append((name, self._item(name, k)))
        share = batch_size // world
        return StepPlan(step, tuple(items[rank * share:(rank + 1) * share]), counters)

    def batch(self, plan: StepPlan, max_length: int, pad_id: int) -> TrainBatch:
        """Tokenise, pack (best fit, ``max_length``) and pad the plan's samples."""
        samples = [self.sources[name][index] for name, index in plan.items]
        return collate(pack(samples, max_length), pad_id)


def hash_seed(text: str) -> int:
    """A stable 63-bit seed from a string (Python's ``hash`` is salted per process)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1
