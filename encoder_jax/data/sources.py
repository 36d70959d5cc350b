"""Random-access data sources, all read through TFDS without TensorFlow (ArrayRecord).

Three kinds:
  * a TFDS catalog dataset by name (`tfds.data_source`, prepared once, when online);
  * the user's local files (txt / csv / tsv, optionally .gz) through `LocalFiles`,
    a TFDS builder whose preparation is cached under the TFDS data dir;
  * the built-in offline corpus (`python_docs`): English prose every Python
    installation carries, the standard library's documentation, written to a
    text file and then read through the same `LocalFiles` builder.

Every source yields dicts of Python values: str for text fields, int for labels.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import re
import sysconfig
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from encoder_jax import errors
from encoder_jax.data.files import checked_lines, read_documents, read_table  # noqa: F401 (re-exported)

FILE_FORMATS = ("lines", "paragraphs", "wikiextractor", "csv", "tsv")
BUILTIN_CORPORA = ("python_docs",)


def default_data_dir() -> str:
    """Where prepared datasets are cached: $ENCODER_JAX_DATA_DIR or ~/.cache/encoder_jax/tfds."""
    return os.environ.get("ENCODER_JAX_DATA_DIR",
                          os.path.join(os.path.expanduser("~"), ".cache", "encoder_jax", "tfds"))


DataError = errors.DataError  # bad input data; the message names the file or field

# ----------------------------------------------------------------------------- TFDS builder


@dataclasses.dataclass(frozen=True)
class LocalFilesSpec:
    """What to read from local files; its hash names the cached TFDS preparation."""

    splits: Mapping[str, Sequence[str]]  # split name -> file paths
    file_format: str = "lines"  # one of FILE_FORMATS, or "auto": inferred per file
    columns: Mapping[str, str | int] = dataclasses.field(default_factory=lambda: {"text": 0})
    int_fields: Sequence[str] = ()  # fields stored as int64 (e.g. "label")
    has_header: bool = False

    def fingerprint(self) -> str:
        stats = {split: [(os.path.abspath(p), os.path.getsize(p), int(os.path.getmtime(p)))
                         for p in paths] for split, paths in self.splits.items()}
        payload = json.dumps([stats, self.file_format, dict(self.columns), list(self.int_fields),
                              self.has_header], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def validate_files(spec: LocalFilesSpec) -> None:
    if spec.file_format not in FILE_FORMATS + ("auto",):
        raise DataError(f"data.format={spec.file_format!r}; valid: {list(FILE_FORMATS)}")
    for split, paths in spec.splits.items():
        if not paths:
            raise DataError(f"data.files.{split} is empty")
        for path in paths:
            if not os.path.isfile(path):
                raise errors.MissingFileError(f"data.files.{split}: {path!r} does not exist")
            if os.path.getsize(path) == 0:
                raise DataError(f"data.files.{split}: {path!r} is empty")


def _examples(spec: LocalFilesSpec, paths: Sequence[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    count = 0
    for file_index, path in enumerate(paths):
        file_format = infer_format([path]) if spec.file_format == "auto" else spec.file_format
        if file_format in ("csv", "tsv"):
            rows = read_table(path, "," if file_format == "csv" else "\t", spec.columns,
                              spec.has_header)
        else:
            rows = ({"text": doc} for doc in read_documents(path, file_format))
        for record_index, row in enumerate(rows):
            example = {}
            for field, value in row.items():
                if field in spec.int_fields:
                    try:
                        example[field] = int(value)
                    except ValueError:
                        raise DataError(f"data file {path!r} record {record_index + 1}: field "
                                        f"{field!r} is {value!r}, not an integer") from None
                else:
                    example[field] = value
            count += 1
            yield f"{file_index}:{record_index}", example
    if count == 0:
        raise DataError(f"data files {list(paths)} contain no records")


@functools.cache  # TFDS registers builder classes by name: define it once per process
def _local_files_builder_class():
    import tensorflow_datasets as tfds

    class LocalFiles(tfds.core.GeneratorBasedBuilder):
        """Local txt/csv/tsv(.gz) files as a TFDS dataset (ArrayRecord)."""

        VERSION = tfds.core.Version("1.0.0")

        def __init__(self, *, spec: LocalFilesSpec, **kwargs):
            self._spec = spec
            config = tfds.core.BuilderConfig(name=f"files_{spec.fingerprint()}")
            super().__init__(config=config, **kwargs)

        def _info(self):
            features = {field: (np.int64 if field in self._spec.int_fields else tfds.features.Text())
                        for field in self._spec.columns}
            return tfds.core.DatasetInfo(builder=self,
                                         features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(paths)
                    for split, paths in self._spec.splits.items()}

        def _generate_examples(self, paths):
            yield from _examples(self._spec, paths)

    return LocalFiles


class DecodedSource:
    """A random-access source that turns TFDS bytes into str (grain `RandomAccessDataSource`)."""

    def __init__(self, source, name: str):
        self._source = source
        self.name = name

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._source[index]
        return {k: (v.decode("utf-8") if isinstance(v, bytes) else
                    (int(v) if np.ndim(v) == 0 and np.issubdtype(np.asarray(v).dtype, np.integer) else v))
                for k, v in record.items()}

    def __repr__(self) -> str:
        return f"DecodedSource({self.name}, {len(self)} records)"


def local_files_sources(spec: LocalFilesSpec, data_dir: str | None = None) -> dict[str, DecodedSource]:
    """Prepares (once, cached by content fingerprint) and opens local files as sources."""
    import tensorflow_datasets as tfds

    validate_files(spec)
    tfds.disable_progress_bar()
    def builder():
        return _local_files_builder_class()(spec=spec, data_dir=data_dir or default_data_dir(),
                                            file_format="array_record")

    prepared = builder()
    try:
        prepared.download_and_prepare()
    except FileExistsError:  # another process (run, host) prepared the same files first
        prepared = builder()
    sources = prepared.as_data_source()
    # The fingerprint (paths, sizes, mtimes, options) makes the name a cache key for tokenizers.
    return {split: DecodedSource(sources[split], f"{split}:{','.join(spec.splits[split])}"
                                                 f"@{spec.fingerprint()}")
            for split in spec.splits}


def catalog_sources(name: str, splits: Mapping[str, str], data_dir: str | None = None
                    ) -> dict[str, DecodedSource]:
    """A TFDS catalog dataset (e.g. 'wiki40b/en'); `splits` maps our split -> TFDS split."""
    import tensorflow_datasets as tfds

    try:
        sources = {ours: tfds.data_source(name, split=theirs, data_dir=data_dir, download=True)
                   for ours, theirs in splits.items()}
    except Exception as e:  # registry lookups and downloads raise many types
        raise DataError(f"data.name={name!r} could not be loaded through TFDS "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        f"built-in choices: {list(BUILTIN_CORPORA)}, or set data.files") from None
    return {ours: DecodedSource(src, f"{name}:{splits[ours]}") for ours, src in sources.items()}


# ----------------------------------------------------------------------------- built-in corpus


def python_docs_documents() -> list[str]:
    """English prose from the running Python: its help topics and stdlib docstrings (sorted, deduped)."""
    import pydoc_data.topics

    docs = set(pydoc_data.topics.topics.values())
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "tkinter"}
    for path in sorted(root.rglob("*.py")):
        if skip.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    docs.add(doc)
    return sorted(docs)


def prose_paragraphs(doc: str, min_words: int = 8) -> list[str]:
    """A docstring's blank-line paragraphs as single lines, without code examples and short bits."""
    paragraphs, lines = [], []
    for line in doc.splitlines() + [""]:
        if line.strip():
            lines.append(line.strip())
        elif lines:
            paragraphs.append(lines)
            lines = []
    return [" ".join(p) for p in paragraphs
            if not p[0].startswith((">>>", "...", "$")) and len(" ".join(p).split()) >= min_words]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")


def prose_sentences(doc: str, min_words: int = 4) -> list[str]:
    """The sentences of a docstring's prose paragraphs."""
    return [s for p in prose_paragraphs(doc) for s in _SENTENCE_END.split(p)
            if len(s.split()) >= min_words]


def builtin_corpus_files(name: str, cache_dir: str, valid_fraction: float = 0.05) -> dict[str, str]:
    """Writes the built-in corpus once as paragraph files; returns {split: path}."""
    if name not in BUILTIN_CORPORA:
        raise DataError(f"data.name={name!r}; built-in corpora: {list(BUILTIN_CORPORA)}")
    docs = python_docs_documents()
    digest = hashlib.sha256(("sentences-v3\n" + "\n\n".join(docs)).encode()).hexdigest()[:12]
    out_dir = os.path.join(cache_dir, f"{name}_{digest}")
    paths = {split: os.path.join(out_dir, f"{split}.txt") for split in ("train", "validation")}
    if all(os.path.isfile(p) for p in paths.values()):
        return paths
    os.makedirs(out_dir, exist_ok=True)
    # One document per sentence: short documents let a small model pick up context within a
    # few minutes. Split by source docstring, so one docstring never straddles the splits.
    bucket = lambda d: int(hashlib.sha256(d.encode()).hexdigest(), 16) % 10_000
    held_out = [p for d in docs if bucket(d) < valid_fraction * 10_000 for p in prose_sentences(d)]
    train = [p for d in docs if bucket(d) >= valid_fraction * 10_000 for p in prose_sentences(d)]
    for split, split_docs in (("train", train), ("validation", held_out)):
        tmp = paths[split] + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n\n".join(split_docs) + "\n")
        os.replace(tmp, paths[split])
    return paths


# ----------------------------------------------------------------------------- from config


def expand_files(spec: str | None, field: str) -> list[str]:
    """'a.txt,b/*.gz' -> sorted existing paths; a pattern matching nothing is an error."""
    import glob

    if not spec:
        return []
    paths: list[str] = []
    for part in (p.strip() for p in str(spec).split(",")):
        if not part:
            continue
        matches = sorted(glob.glob(os.path.expanduser(part)))
        if not matches:
            raise errors.MissingFileError(f"{field}: {part!r} does not exist")
        paths.extend(matches)
    return paths


def infer_format(paths: Sequence[str]) -> str:
    """The first path's format: csv / tsv by extension; wikiextractor if it starts with <doc; else lines."""
    name = paths[0][:-3] if paths[0].endswith(".gz") else paths[0]
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".tsv"):
        return "tsv"
    head = next((line for line in checked_lines(paths[0]) if line.strip()), "")
    return "wikiextractor" if head.lstrip().startswith("<doc") else "lines"


def open_text_sources(data_cfg, cache_dir: str | None = None) -> dict[str, DecodedSource]:
    """{'train', 'validation'} sources of {'text': str} records as chosen by `config.data`.

    `data.files.train` set -> local files; else `data.name` is a built-in corpus or
    a TFDS catalog name. `data_cfg` is a `configs.TextDataConfig` (or its section).
    """
    from encoder_jax import configs

    data_cfg = configs.section(configs.TextDataConfig, data_cfg, "data")
    data_dir = data_cfg.data_dir or cache_dir or default_data_dir()
    train_files = expand_files(data_cfg.files.train, "data.files.train")
    if train_files:
        splits = {"train": train_files}
        valid_files = expand_files(data_cfg.files.validation, "data.files.validation")
        if not valid_files:
            raise DataError("data.files.validation is not set: give a held-out file for evaluation")
        splits["validation"] = valid_files
    elif data_cfg.name in BUILTIN_CORPORA:
        paths = builtin_corpus_files(data_cfg.name, os.path.join(data_dir, "builtin"))
        splits = {split: [path] for split, path in paths.items()}
    elif data_cfg.name:
        return catalog_sources(data_cfg.name, {"train": data_cfg.train_split,
                                               "validation": data_cfg.eval_split}, data_dir)
    else:
        raise DataError(f"set data.files.train or data.name (built-in: {list(BUILTIN_CORPORA)}, "
                        f"or a TFDS catalog name)")
    file_format = data_cfg.format or "auto"
    if not train_files:  # the built-in corpus is written as blank-line separated documents
        file_format = "paragraphs"
    # "auto" is resolved per file, so one corpus may mix a task's csv with Wikipedia text;
    # text_column applies to the csv/tsv files ("1,2": those cells joined by a space).
    columns = {"text": data_cfg.text_column}
    spec = LocalFilesSpec(splits=splits, file_format=file_format, columns=columns,
                          has_header=data_cfg.has_header)
    return local_files_sources(spec, data_dir)
