"""Hugging Face hub names (`bert-base-uncased`, `org/name@revision`) -> a local directory.

Resolved through `huggingface_hub` into its cache (`HF_HUB_CACHE` / `HF_HOME`): the cached
snapshot first (works offline), else a download of the files a BERT needs (config, tokenizer,
safetensors weights; `pytorch_model.bin` only when the repository has no safetensors, read later
by the weights-only path). An existing directory is returned as it is.
"""

from __future__ import annotations

import os
import re

from encoder_jax import errors

CONFIG_PATTERNS = ["config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "tokenizer.model"]
SAFETENSORS_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
BIN_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(@[\w./-]+)?$")


def split_id(name: str) -> tuple[str, str | None]:
    """'org/name@rev' -> ('org/name', 'rev'); no '@': revision None (the default branch)."""
    repo, _, revision = name.partition("@")
    return repo, revision or None


def _snapshot(repo: str, revision: str | None, patterns: list[str], offline: bool) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(repo, revision=revision, allow_patterns=patterns,
                             local_files_only=offline)


def has_weights(directory: str) -> bool:
    return any(n.endswith((".safetensors", ".bin")) for n in os.listdir(directory))


def resolve(name: str, field: str = "init_from_hf") -> str:
    """A local directory for `name`: the directory itself, or the hub snapshot of that id."""
    if os.path.isdir(name):
        return name
    if not HUB_ID.match(name) or name.startswith((".", "/")) or os.sep + os.sep in name:
        raise errors.MissingFileError(f"{field}={name!r} is neither a directory nor a Hugging Face hub id "
                                      f"(like 'bert-base-uncased' or 'org/name@revision')")
    repo, revision = split_id(name)
    failures = []
    for offline in (True, False):
        try:
            directory = _snapshot(repo, revision, CONFIG_PATTERNS + SAFETENSORS_PATTERNS, offline)
            if not has_weights(directory):  # a repository with .bin weights only
                directory = _snapshot(repo, revision, CONFIG_PATTERNS + BIN_PATTERNS, offline)
            if os.path.isfile(os.path.join(directory, "config.json")):
                return directory
            failures.append(f"snapshot {directory} has no config.json")
        except Exception as e:  # offline cache miss, no network, unknown repository, bad revision
            failures.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    raise errors.MissingFileError(
        f"{field}={name!r}: not in the local Hugging Face cache and the hub could not provide it "
        f"({failures[-1]}); download it where there is network (huggingface-cli download {repo}) "
        f"and pass its directory instead")
