"""The caption encoder: T5-v1.1-XXL's encoder (4096-dim features, 120 tokens), with an on-disk embedding cache.

    encoder = load_text_encoder(cfg.text_encoder, device="cuda")
    y, mask = encoder.encode(["a red circle on a blue square"])  # (N, 120, 4096) features, (N, 120) mask
    encoder.unload()                                               # low-memory recipe: encode, free T5, then sample

Weights are only read from disk (`local_files_only=True`): nothing here downloads.
"""

import contextlib
import gc
import hashlib
import html
import json
import logging
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from common.errors import UserError
from common.files import atomic_path
from common.safetensors_file import save_file
from models.config import TextEncoderConfig
from models.shipped import ShippedWeightsError, verify_shipped

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DOWNLOAD_HINT = ('hf download PixArt-alpha/PixArt-XL-2-1024-MS --include "text_encoder/*" "tokenizer/*" '
                 "--local-dir <folder>  (then set text_encoder.path to <folder>)")
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")
KNOWN_WORDS_FILE = "known_words.txt"  # optional, beside config.json: the words of the captions a model was trained on
_WORD = re.compile(r"[^\W\d_]+")


def words_of(text: str) -> set[str]:
    """The lower-case words (letters only) of a text."""
    return set(_WORD.findall(text.lower()))


class TextEncoderError(UserError):
    """A text encoder that cannot be found or loaded; the message names the path and how to get the weights."""




def parse_dtype(name: str, what: str = "dtype") -> torch.dtype:
    """'fp32' | 'bf16' | 'fp16' -> torch dtype; anything else is an error naming the valid choices."""
    if name not in DTYPES:
        raise UserError(f"unknown {what} {name!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def local_snapshot(path: str) -> Path | None:
    """An existing folder, or the local Hugging Face cache snapshot of hub id `path`; None when neither exists."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder.resolve()
    if folder.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1:
        return None  # a file, or clearly meant as a filesystem path: never look it up as a hub id
    from huggingface_hub import snapshot_download  # heavy libraries load when used, not on import
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(path, local_files_only=True))
    except (HFValidationError, LocalEntryNotFoundError, OSError):
        return None


def resolve_text_encoder(path: str) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) for a T5 folder, a pipeline root or a cached hub id; errors before loading."""
    try:
        verify_shipped(path)  # an encoder that lives in the repository: present and unchanged
    except ShippedWeightsError as e:
        raise TextEncoderError(str(e)) from e
    root = local_snapshot(path)
    if root is None:
        raise TextEncoderError(f"text encoder {path!r}: no such folder, and not a hub id in the local Hugging Face "
                               f"cache (nothing is downloaded). Get the weights with:\n  {DOWNLOAD_HINT}")
    if (root / "text_encoder" / "config.json").is_file():
        model_dir, tok_dir = root / "text_encoder", root / "tokenizer"
    elif (root / "config.json").is_file():
        model_dir = tok_dir = root
    else:
        raise TextEncoderError(f"text encoder {str(root)!r} has neither config.json (a T5 encoder folder) nor "
                               f"text_encoder/config.json (a pipeline root). Get the weights with:\n  {DOWNLOAD_HINT}")
    if not any((tok_dir / name).is_file() for name in TOKENIZER_FILES):
        raise TextEncoderError(f"no tokenizer in {str(tok_dir)!r} (expected one of {', '.join(TOKENIZER_FILES)}). "
                               f"Get it with:\n  {DOWNLOAD_HINT}")
    return model_dir, tok_dir


# ----------------------------------------------------------------------------------------------------------
# Caption cleaning: a hand-written subset of PixArt-alpha's clean_caption (no bs4 / ftfy)

_URL = re.compile(r"\b(?:https?://|www\.)\S+", re.IGNORECASE)
_TAG = re.compile(r"<[^<>]{1,200}>")
_MENTION = re.compile(r"(?<!\w)@[\w.-]+")
_JUNK = re.compile(r"[#®•©™|\\~*{}\[\]^<>]")
_REPEATED = re.compile(r"([!?.,;:\-_'\"])\1+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([!?.,;:])")


def clean_caption(text: str) -> str:
    """Unescape HTML entities, lower-case, drop URLs / HTML tags / @mentions / junk symbols, squeeze punctuation."""
    text = html.unescape(html.unescape(str(text))).strip().lower()
    text = text.replace("<person>", "person")
    text = _URL.sub(" ", text)
    text = _TAG.sub(" ", text)
    text = _MENTION.sub(" ", text)
    text = _JUNK.sub(" ", text)
    text = _REPEATED.sub(r"\1", text)  # "!!!" -> "!", "...." -> "."
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = " ".join(text.split())
    return text.strip(" \"'-_,:;")


# ----------------------------------------------------------------------------------------------------------
# The encoder

LISTED = 20  # words named in a warning; the rest are counted


def listing(words: list[str]) -> str:
    """'a, b, c' for at most LISTED words, then 'and N more' (a warning stays one short line)."""
    shown = ", ".join(words[:LISTED])
    return shown if len(words) <= LISTED else f"{shown} and {len(words) - LISTED} more"


def shorten(prompt: str, limit: int = 80) -> str:
    """repr() of a prompt, cut to `limit` characters."""
    return repr(prompt if len(prompt) <= limit else prompt[:limit - 3] + "...")


class T5TextEncoder:
    """A T5 encoder and its tokenizer: prompts -> (features (N, L, D), mask (N, L)), with an optional disk cache."""

    def __init__(self, model, tokenizer, cfg: TextEncoderConfig, identity: str, device: torch.device,
                 dtype: torch.dtype, known_words: frozenset[str] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.identity = identity  # what the features depend on besides the prompt; part of every cache key
        self.device = device
        self.dtype = dtype
        self._feature_dim = model.config.d_model
        self.cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else None
        self.known_words = known_words  # None: no vocabulary to check prompts against
        self.warned: set[str] = set()   # unknown words already named in a warning

    @property
    def feature_dim(self) -> int:
        """Width D of the features (4096 for T5-v1.1-XXL)."""
        return self._feature_dim

    @property
    def max_tokens(self) -> int:
        return self.cfg.max_tokens

    def unload(self) -> None:
        """Free the model (cached prompts still encode); for the encode-then-free low-memory recipe."""
        del self.model
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def cache_path(self, prompt: str) -> Path:
        """File of `prompt`'s cached embedding: sha256 of the encoder identity and the prompt."""
        key = hashlib.sha256(json.dumps([self.identity, prompt]).encode()).hexdigest()
        return self.cache_dir / f"{key}.safetensors"

    def encode(self, prompts: list[str], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (N, max_tokens, D) in the encoder dtype and attention mask (N, max_tokens) long."""
        if isinstance(prompts, str):
            raise TypeError("encode() takes a list of prompts, not a single string")
        if not prompts:
            raise ValueError("encode() needs at least one prompt")
        results: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(prompts)
        if self.cache_dir is not None:
            for i, prompt in enumerate(prompts):
                path = self.cache_path(prompt)
                if path.is_file():
                    hit = load_file(path, device=str(self.device))
                    results[i] = hit["features"], hit["mask"]
        misses = [i for i, r in enumerate(results) if r is None]
        for start in range(0, len(misses), batch_size):
            chunk = misses[start:start + batch_size]
            features, mask = self._encode_batch([prompts[i] for i in chunk])
            for j, i in enumerate(chunk):
                results[i] = features[j], mask[j]
                if self.cache_dir is not None:
                    self._store(prompts[i], features[j], mask[j])
        if self.cache_dir is not None:
            log.debug("caption cache: %d hits, %d misses", len(prompts) - len(misses), len(misses))
        features = torch.stack([f for f, _ in results]).to(self.device)  # (N, L, D)
        mask = torch.stack([m for _, m in results]).to(self.device)  # (N, L)
        return features, mask

    def _encode_batch(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize (pad to max_tokens, truncate with a warning) and run the encoder on one batch."""
        if self.model is None:
            raise RuntimeError("the text encoder was unloaded; only prompts already in the cache can be encoded")
        texts = [clean_caption(p) for p in prompts] if self.cfg.clean_captions else list(prompts)
        if self.known_words is not None:
            for prompt, text in zip(prompts, texts):
                unseen = sorted(set(self.unknown_words(text)) - self.warned)  # each unknown word is named once
                self.warned.update(unseen)
                if unseen:
                    log.warning("prompt %s has words this text encoder's model never saw in training: %s (they "
                                "will not steer the image; known words are listed in %s)", shorten(prompt),
                                listing(unseen), KNOWN_WORDS_FILE)
        L = self.cfg.max_tokens
        unk = getattr(self.tokenizer, "unk_token_id", None)
        for prompt, ids in zip(prompts, self.tokenizer(texts, truncation=False).input_ids):
            if self.known_words is None and unk is not None and unk in ids:
                log.warning("prompt %s has %d pieces the tokenizer does not know (emoji or other characters "
                            "outside its vocabulary): they become the unknown token", shorten(prompt), ids.count(unk))
            if len(ids) > L:
                log.warning("caption cut to %d tokens: dropped %d of %d tokens of %s", L, len(ids) - L, len(ids),
                            shorten(prompt))
        tokens = self.tokenizer(texts, padding="max_length", max_length=L, truncation=True, return_tensors="pt")
        ids = tokens.input_ids.to(self.device)  # (N, L)
        mask = tokens.attention_mask.to(self.device, torch.long)  # (N, L)
        with torch.no_grad():  # not inference_mode: the features feed modules that are trained
            features = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (N, L, D)
        return features.to(self.dtype), mask

    def unknown_words(self, text: str) -> list[str]:
        """Words of a (cleaned) prompt outside known_words.txt, and characters that are neither letters, digits,
        spaces nor ASCII punctuation (emoji, symbols: the tokenizer has no piece for them); [] without a word list."""
        if self.known_words is None:
            return []
        odd = {c for c in text if not (c.isalnum() or c.isspace() or (c.isascii() and c.isprintable()))}
        return sorted(words_of(text) - self.known_words) + sorted(odd)

    def _store(self, prompt: str, features: torch.Tensor, mask: torch.Tensor) -> None:
        """Write one prompt's (features (L, D), mask (L,)) atomically."""
        with atomic_path(self.cache_path(prompt)) as tmp:
            save_file({"features": features.contiguous().cpu(), "mask": mask.contiguous().cpu()}, tmp,
                      metadata={"prompt": prompt, "encoder": self.identity})


def _quantize_linear_int8(model, device: torch.device):
    """int8 weights (one scale per row) for every nn.Linear, through torchao; activations stay float. T5 runs once
    per prompt, so memory, not speed, is the point, and its activations' outliers make int8 activations risky."""
    from models.quantize import _require_torchao

    _require_torchao("int8 (text_encoder.load_in_8bit)")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, _name: isinstance(m, torch.nn.Linear), device=device)
    return model


def load_text_encoder(cfg: TextEncoderConfig, device: str | torch.device = "cpu") -> T5TextEncoder:
    """Load the T5 encoder and tokenizer named by cfg.path (local files only) onto `device`."""
    device = torch.device(device)
    dtype = parse_dtype(cfg.dtype, "text_encoder.dtype")
    if cfg.max_tokens < 1:
        raise UserError(f"text_encoder.max_tokens must be >= 1, got {cfg.max_tokens}")
    model_dir, tok_dir = resolve_text_encoder(cfg.path)
    if cfg.load_in_8bit and device.type not in ("cpu", "cuda"):
        raise TextEncoderError(f"text_encoder.load_in_8bit works on cuda or cpu, not {device.type}")
    # This project's T5 (models/t5.py) reads transformers' files without importing transformers (seconds of
    # start-up); transformers loads what it does not read (a tokenizer without tokenizer.json, other weight files).
    from models.t5 import T5Tokenizer, load_t5_encoder

    if (tok_dir / "tokenizer.json").is_file():
        tokenizer = T5Tokenizer(tok_dir / "tokenizer.json")
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    try:
        model = load_t5_encoder(model_dir, dtype)
    except (ValueError, OSError) as e:
        raise TextEncoderError(f"cannot load the T5 encoder of {str(model_dir)!r}: {e}") from e
    if model is None:
        from transformers import T5EncoderModel

        with _quiet_transformers():
            model = T5EncoderModel.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    model = model.eval().requires_grad_(False)
    if cfg.load_in_8bit:  # each Linear moves to the device and is quantised there, one at a time: T5-XXL's float
        model = _quantize_linear_int8(model, device)  # weights are never on the GPU all at once
    model = model.to(device)
    identity = json.dumps(dict(path=str(model_dir), max_tokens=cfg.max_tokens, clean=cfg.clean_captions,
                               dtype=cfg.dtype, int8=cfg.load_in_8bit), sort_keys=True)
    log.info("text encoder %s: d_model %d, %d tokens, %s%s", model_dir, model.config.d_model, cfg.max_tokens,
             cfg.dtype, ", int8" if cfg.load_in_8bit else "")
    known = model_dir / KNOWN_WORDS_FILE
    known_words = frozenset(known.read_text(encoding="utf-8").split()) if known.is_file() else None
    return T5TextEncoder(model, tokenizer, cfg, identity, device, dtype, known_words)


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' "Loading weights" bar off (it ignores --no-progress; this log says what loaded)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
