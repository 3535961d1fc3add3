"""Benchmark files as users have them: Hugging Face parquet copies and VLMEvalKit TSV files.

Layouts follow eval-datasets.md section 1:

- parquet (lmms-lab style): ``<dir>/<split>-NNNNN-of-MMMMM[-hash].parquet`` under ``data/`` or a
  config folder; image columns are ``{bytes, path}`` structs (a null struct is "no image").
  Read with pyarrow (the ``eval`` extra); image bytes stay in the Arrow buffers and are decoded
  only when a prompt needs them.
- TSV (VLMEvalKit ``$LMUData/<NAME>.tsv``): ``index``, ``image`` = base64 of the encoded file; an
  ``image`` cell of at most 64 characters is the ``index`` of the row whose image it reuses; a cell
  starting with ``[`` is a Python-literal list of base64 images; rows with an empty image are
  dropped, as VLMEvalKit does. Read with the csv module (pandas is not a dependency): every
  cell stays a string; ``""`` is the missing value (see :func:`cell`).
- JSONL (the demo tasks): one object per line, ``image`` a path relative to the file's folder.

Every error names the file, and the row or column at fault.
"""

import ast
import base64
import binascii
import csv
import io
import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from dsvl2.errors import InputError


class ImageRef:
    """An image not decoded yet: encoded bytes, a base64 string, a file path or a loader function.

    :meth:`load` decodes to RGB (alpha dropped without compositing, palette/grey expanded, as
    lmms-eval's ``.convert("RGB")`` and VLMEvalKit's decoder); an undecodable image raises
    :class:`InputError` naming ``where`` (file and row).
    """

    def __init__(self, source: bytes | str | Path | Callable[[], bytes], where: str) -> None:
        self.source = source
        self.where = where
        self._size: tuple[int, int] | None = None

    def _open(self) -> Image.Image:
        src = self.source
        try:
            if callable(src):
                src = src()
            if isinstance(src, Path):
                return Image.open(src)
            if isinstance(src, str):
                src = base64.b64decode(src, validate=False)
            if not src:
                raise ValueError("empty image data")
            return Image.open(io.BytesIO(src))
        except (OSError, ValueError, binascii.Error, Image.DecompressionBombError) as exc:
            raise InputError(f"{self.where}: image cannot be decoded: {exc}") from exc

    def load(self) -> Image.Image:
        """The fully decoded RGB image (a new object each call)."""
        img = self._open()
        try:
            with img:
                rgb = img.convert("RGB")
        except (OSError, ValueError, SyntaxError) as exc:
            raise InputError(f"{self.where}: image cannot be decoded: {exc}") from exc
        self._size = rgb.size
        return rgb

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), read from the file header only (cached)."""
        if self._size is None:
            with self._open() as img:
                self._size = img.size
        return self._size


@dataclass
class Table:
    """Rows of one benchmark file (or shard set) as dicts, with the source named for errors."""

    source: str
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    kind: str = "parquet"  # "parquet" | "tsv" | "jsonl"

    def require(self, *names: str) -> None:
        """Raise naming the file and the first missing column."""
        for name in names:
            if name not in self.columns:
                raise InputError(f"{self.source}: missing column {name!r} (columns: {', '.join(self.columns)})")

    def has(self, name: str) -> bool:
        return name in self.columns

    def where(self, i: int) -> str:
        """``file row n`` (n: 0-based data row of the file, plus ``index=`` when the row has one)."""
        row = self.rows[i]
        index = row.get("index")
        return f"{self.source} row {row.get('_row', i)}" + (f" (index={index})" if index not in (None, "") else "")


def cell(value: Any) -> Any:
    """A cell's value, None when missing: null, ``""`` and the text ``nan`` (how the MMBench hint
    and empty option cells come). Other pandas NA spellings (``None``, ``NA``) stay text: they
    are real option texts, which pandas' defaults in VLMEvalKit would wrongly drop."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, str) and value.strip().lower() in ("", "nan"):
        return None
    return value


def string_list(value: Any, where: str) -> list[str]:
    """A list of answers: a list stays one; a ``[...]`` Python-literal string is evaluated (as
    VLMEvalKit does for list answers); any other value is a one-element list."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    text = str(value)
    if text.startswith("[") and text.endswith("]"):
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return [text]
        if isinstance(parsed, (list, tuple)):
            return [str(v) for v in parsed]
    return [text]


# ----------------------------------------------------------------------------- parquet


def find_parquet(path: Path, patterns: Sequence[str]) -> list[Path]:
    """Files matching the first pattern (a glob relative to ``path``) that matches anything."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError(f"data not found: {path}")
    for pattern in patterns:
        files = sorted(p for p in path.glob(pattern) if p.is_file())
        if files:
            return files
    raise InputError(f"{path}: no parquet file matches any of {', '.join(patterns)}")


def _arrow_bytes(array: Any, i: int) -> bytes:
    return array[i].as_py()


def read_parquet(files: Sequence[Path], columns: Sequence[str] | None = None) -> Table:
    """Concatenate parquet shards. Image structs become :class:`ImageRef` (None for a null struct)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise InputError("reading parquet needs pyarrow: pip install 'dsvl2[eval]'") from exc
    import pyarrow as pa

    source = str(files[0]) if len(files) == 1 else f"{files[0].parent}/{files[0].name} (+{len(files) - 1} shards)"
    table = Table(source=source, columns=[], kind="parquet")
    for file in files:
        try:
            data = pq.read_table(file, columns=list(columns) if columns is not None else None)
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"{file}: cannot read parquet: {exc}") from exc
        if not table.columns:
            table.columns = list(data.column_names)
        elif set(data.column_names) != set(table.columns):
            raise InputError(f"{file}: columns {data.column_names} differ from the first shard's {table.columns}")
        images = {}  # column -> (bytes array, per-row "has an image")
        for name in data.column_names:
            typ = data.schema.field(name).type
            if pa.types.is_struct(typ) and typ.get_field_index("bytes") >= 0:
                structs = data.column(name).combine_chunks()
                blobs = structs.field("bytes")
                present = [s and b for s, b in zip(structs.is_valid().to_pylist(), blobs.is_valid().to_pylist())]
                images[name] = (blobs, present)
        rows = data.drop_columns(list(images)).to_pylist()
        base = len(table.rows)
        for i, row in enumerate(rows):
            for name, (blobs, present) in images.items():
                where = f"{file} row {i} column {name!r}"
                row[name] = ImageRef(lambda a=blobs, k=i: _arrow_bytes(a, k), where) if present[i] else None
            row["_row"] = base + i
        table.rows += rows
    return table


# ----------------------------------------------------------------------------- TSV


def read_tsv(path: Path, image_columns: Iterable[str] = ("image",)) -> Table:
    """A VLMEvalKit TSV: header row, tab-separated, default CSV quoting (as ``pd.read_csv``)."""
    if not path.is_file():
        raise InputError(f"data file not found: {path}")
    csv.field_size_limit(sys.maxsize)  # base64 images are megabytes long
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        try:
            header = next(reader)
        except StopIteration:
            raise InputError(f"{path}: empty file (no header row)") from None
        except csv.Error as exc:
            raise InputError(f"{path}: not a TSV file: {exc}") from exc
        table = Table(source=str(path), columns=header, kind="tsv")
        try:
            for n, values in enumerate(reader):
                if len(values) != len(header):
                    raise InputError(f"{path} line {reader.line_num}: {len(values)} cells, header has {len(header)}")
                row = dict(zip(header, values))
                row["_row"] = n
                table.rows.append(row)
        except csv.Error as exc:
            raise InputError(f"{path} line {reader.line_num}: {exc}") from exc
    for name in image_columns:
        if name in table.columns:
            _resolve_tsv_images(table, name)
    return table


def _resolve_tsv_images(table: Table, column: str) -> None:
    """Turn base64 cells into ImageRefs: follow ``index`` references, split list literals, drop
    rows without an image."""
    by_index = {str(r.get("index")): r[column] for r in table.rows if len(r[column]) > 64}
    kept = []
    for i, row in enumerate(table.rows):
        value = row[column].strip()
        if not value:
            continue
        where = f"{table.where(i)} column {column!r}"
        if len(value) <= 64:
            if value not in by_index:
                raise InputError(f"{where}: image refers to index {value!r}, which has no image")
            value = by_index[value].strip()
        if value.startswith("["):
            try:
                items = ast.literal_eval(value)
            except (ValueError, SyntaxError) as exc:
                raise InputError(f"{where}: image list cannot be parsed: {exc}") from exc
            row[column] = [ImageRef(v, f"{where} item {k}") for k, v in enumerate(items)]
        else:
            row[column] = ImageRef(value, where)
        kept.append(row)
    table.rows = kept


# ----------------------------------------------------------------------------- JSONL


def read_jsonl(path: Path, image_column: str = "image") -> Table:
    """One JSON object per line; ``image`` (a path relative to the file's folder) -> ImageRef."""
    if not path.is_file():
        raise InputError(f"data file not found: {path}")
    table = Table(source=str(path), columns=[], kind="jsonl")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path} line {n}: not JSON: {exc}") from exc
            if not isinstance(row, dict):
                raise InputError(f"{path} line {n}: expected a JSON object")
            for key in row:
                if key not in table.columns:
                    table.columns.append(key)
            if isinstance(row.get(image_column), str):
                image = path.parent / row[image_column]
                if not image.is_file():
                    raise InputError(f"{path} line {n}: image file not found: {image}")
                row[image_column] = ImageRef(image, f"{path} line {n} ({image})")
            row["_row"] = n
            table.rows.append(row)
    return table


def open_table(path: str | Path, parquet_patterns: Sequence[str], image_columns: Iterable[str] = ("image",)) -> Table:
    """Read ``path`` by its kind: ``.tsv``, ``.jsonl``, a ``.parquet`` file or a parquet folder."""
    path = Path(path)
    if path.suffix == ".tsv":
        return read_tsv(path, image_columns)
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    if path.is_file() and path.suffix != ".parquet":
        raise InputError(f"{path}: expected a .tsv, .jsonl or .parquet file, or a folder of parquet shards")
    return read_parquet(find_parquet(path, parquet_patterns))
