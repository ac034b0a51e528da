"""CLIP tokenisation: transformers' framework-free `CLIPTokenizer`, padded to the context length.

    tokenizer = load_tokenizer("path/to/stable-diffusion")     # or a folder with vocab.json
    ids = tokenize(tokenizer, ["a red apple", "a cat"])        # (2, 77) int32

Prompts longer than the context are truncated (the end-of-text token kept last) with a warning
that quotes the dropped words, as diffusers' pipelines do.
"""
from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxdiff.errors import JaxdiffError

_FILES = ("vocab.json", "merges.txt")
_TOKENIZER_LOCK = threading.Lock()


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than the text encoder's context and was cut."""


def load_tokenizer(folder: str | os.PathLike, subfolder: str | None = "tokenizer"):
    """transformers' `CLIPTokenizer` from `folder` (vocab.json + merges.txt, or tokenizer.json),
    or from `folder/subfolder` of a pipeline."""
    from transformers import CLIPTokenizer

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise JaxdiffError(f"tokenizer folder {root} does not exist")
    candidates = [root] + ([root / subfolder] if subfolder else [])
    for path in candidates:
        if all((path / f).is_file() for f in _FILES) or (path / "tokenizer.json").is_file():
            try:
                return CLIPTokenizer.from_pretrained(str(path))
            except (OSError, ValueError, KeyError) as e:
                raise JaxdiffError(f"cannot read the CLIP tokenizer in {path}: {e}") from None
    where = " or ".join(str(p) for p in candidates)
    raise JaxdiffError(f"no CLIP tokenizer (vocab.json and merges.txt) in {where}")


def tokenize(tokenizer, prompts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
    """Token ids `(len(prompts), max_length)` int32: start token, BPE tokens, end token, padding
    with the tokenizer's pad token. `max_length` defaults to the tokenizer's `model_max_length`
    (77 for CLIP)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise JaxdiffError("prompts must be a non-empty list of strings")
    length = int(max_length or tokenizer.model_max_length)
    if length < 2 or length > 100_000:
        raise JaxdiffError(f"max_length {length} is not a usable context length; pass max_length=77 for CLIP")
    with _TOKENIZER_LOCK:
        # One call, no padding or truncation: the fast tokenizer keeps its padding/truncation
        # settings as mutable state, so two threads calling it with different settings (the
        # caption loader tokenizes in worker threads) would get each other's. We cut and pad here.
        full = tokenizer(prompts, padding=False, truncation=False, verbose=False)["input_ids"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = np.full((len(prompts), length), pad_id, dtype=np.int32)
    for row, (prompt, ids) in enumerate(zip(prompts, full)):
        ids = list(ids)
        if len(ids) > length:
            with _TOKENIZER_LOCK:
                dropped = tokenizer.decode(ids[length - 1:-1])
            warnings.warn(
                f"the prompt {_short(prompt)!r} has {len(ids)} tokens; the text encoder takes "
                f"{length}, so this part was truncated: {_short(dropped, 200)!r}",
                PromptTruncatedWarning, stacklevel=2)
            ids = ids[: length - 1] + ids[-1:]      # keep the end-of-text token last
        if getattr(tokenizer, "padding_side", "right") == "left":
            out[row, length - len(ids):] = ids
        else:
            out[row, : len(ids)] = ids
    return out


def _short(text: str, n: int = 60) -> str:
    """`text` with its middle elided to about `n` characters."""
    return text if len(text) <= n else text[: n // 2 - 2] + " ... " + text[-(n // 2 - 3):]
