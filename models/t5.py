"""T5's encoder and tokenizer, written here so that encoding a prompt does not import transformers (seconds of
start-up for a 2-layer encoder that runs in milliseconds).

    model = load_t5_encoder(folder, dtype=torch.float32)   # a transformers T5 folder: config.json + weights
    tokenizer = T5Tokenizer(folder / "tokenizer.json")     # the `tokenizers` file transformers writes and reads
    ids = tokenizer(["a red circle"], padding="max_length", max_length=120, truncation=True, return_tensors="pt")
    features = model(input_ids=ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state  # (N, L, D)

Parameter names are transformers' T5EncoderModel's (shared, encoder.block.N.layer.0.SelfAttention.q, ...), so
its folders load as they are; the features equal T5EncoderModel's (tests/test_text_and_vae.py). Weights may be a
single or sharded safetensors or PyTorch file, of T5EncoderModel or of a whole T5 (the decoder is not read).
"""

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn


@dataclass
class T5Config:
    """The fields of a transformers T5 config.json that the encoder uses."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"   # gated-gelu (T5 v1.1) | relu (the original T5) | gated-relu | gelu

    @classmethod
    def from_json(cls, path: Path) -> "T5Config":
        data = json.loads(Path(path).read_text())
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        return self.feed_forward_proj.removeprefix("gated-")


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation, written out as T5 v1.1's "gated-gelu" ("gelu_new") is (same rounding)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS = {"gelu": gelu_tanh, "relu": nn.functional.relu}


def empty_embedding(num: int, width: int) -> nn.Embedding:
    """An embedding whose weights are left for loading (its random init would, on the meta device, import
    torch._dynamo: a second of start-up)."""
    return nn.Embedding(num, width, _weight=torch.empty(num, width))


class T5LayerNorm(nn.Module):
    """RMS norm without a mean or bias, computed in float32: weight * x / sqrt(mean(x^2) + eps)."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)  # (N, L, 1)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def relative_position_buckets(length: int, num_buckets: int, max_distance: int, device) -> torch.Tensor:
    """(L, L) bucket of key position j relative to query position i, both directions (T5's encoder): half the
    buckets per direction, exact for small distances, logarithmic up to max_distance."""
    position = torch.arange(length, device=device)
    relative = position[None, :] - position[:, None]  # (L, L): j - i
    half = num_buckets // 2
    buckets = (relative > 0).long() * half
    distance = relative.abs()
    exact = half // 2
    log_bucket = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact)
                          * (half - exact)).long()
    log_bucket = torch.minimum(log_bucket, torch.full_like(log_bucket, half - 1))
    return buckets + torch.where(distance < exact, distance, log_bucket)


class T5Attention(nn.Module):
    """Multi-head self-attention without score scaling (T5 folds it into the weights); the first layer owns the
    relative position bias that every layer adds."""

    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        self.num_buckets, self.max_distance = cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        if has_bias:
            self.relative_attention_bias = empty_embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def position_bias(self, length: int, device) -> torch.Tensor:
        """(1, H, L, L) from the learned bias of each relative-position bucket."""
        buckets = relative_position_buckets(length, self.num_buckets, self.max_distance, device)  # (L, L)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # (1, H, L, L)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (N, L, D); bias (N or 1, H, L, L): position bias plus the padding mask's large negative values."""
        n, length, _ = x.shape
        q, k, v = (proj(x).view(n, length, self.heads, self.d_kv).transpose(1, 2)
                   for proj in (self.q, self.k, self.v))  # (N, H, L, d_kv) each
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # (N, H, L, d_kv)
        out = out.transpose(1, 2).reshape(n, length, self.heads * self.d_kv)  # (N, L, H*d_kv)
        return self.o(out)  # (N, L, D)


class T5FeedForward(nn.Module):
    """wo(act(wi_0 x) * wi_1 x) for the gated variants (T5 v1.1), wo(act(wi x)) otherwise."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation]
        if cfg.gated:
            self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        else:
            self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if hasattr(self, "wi_0") else self.act(self.wi(x))  # (N, L, d_ff)
        if h.dtype != self.wo.weight.dtype and self.wo.weight.dtype.is_floating_point:
            h = h.to(self.wo.weight.dtype)
        return self.wo(h)  # (N, L, D)


class T5SelfAttentionLayer(nn.Module):
    """x + attention(norm(x)): layer.0 of a block."""

    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5FeedForwardLayer(nn.Module):
    """x + feed_forward(norm(x)): layer.1 of a block."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5FeedForward(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


def clamp_half(x: torch.Tensor) -> torch.Tensor:
    """fp16 activations of T5 overflow: keep them finite, as transformers does."""
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(x.dtype).max - 1000
        x = x.clamp(-limit, limit)
    return x


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5SelfAttentionLayer(cfg, has_bias), T5FeedForwardLayer(cfg)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = clamp_half(self.layer[0](x, bias))  # (N, L, D)
        return clamp_half(self.layer[1](x))  # (N, L, D)


class T5Stack(nn.Module):
    """The encoder stack: blocks (the first owns the position bias) and a final norm."""

    def __init__(self, cfg: T5Config, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.block = nn.ModuleList([T5Block(cfg, has_bias=i == 0) for i in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5Output(NamedTuple):
    last_hidden_state: torch.Tensor  # (N, L, D)


class T5Encoder(nn.Module):
    """T5's encoder: token ids (N, L) and attention mask (N, L) -> features (N, L, d_model). Built to receive
    weights (load_t5_encoder): its embeddings start uninitialised."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.config = cfg
        self.shared = empty_embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg, self.shared)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> T5Output:
        x = self.shared(input_ids)  # (N, L, D)
        n, length = input_ids.shape
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(length, x.device).to(x.dtype)  # (1,H,L,L)
        if attention_mask is not None:  # padding keys get the dtype's most negative value
            keep = attention_mask[:, None, None, :].bool()  # (N, 1, 1, L)
            bias = torch.where(keep, bias, torch.finfo(x.dtype).min)  # (N, H, L, L)
        for block in self.encoder.block:
            x = block(x, bias)  # (N, L, D)
        return T5Output(self.encoder.final_layer_norm(x))


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def read_t5_weights(folder: Path) -> dict[str, torch.Tensor] | None:
    """The encoder's tensors of a transformers folder (single or sharded, safetensors or PyTorch); None when the
    folder has no weights in a layout read here."""
    files = []
    for name in WEIGHT_FILES:
        index = folder / f"{name}.index.json"
        if (folder / name).is_file():
            files = [folder / name]
        elif index.is_file():
            files = [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        if files:
            break
    if not files:
        return None
    state = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                state.update({k: f.get_tensor(k) for k in f.keys() if k == "shared.weight" or k.startswith("encoder.")})
        else:
            weights = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            state.update({k: v for k, v in weights.items() if k == "shared.weight" or k.startswith("encoder.")})
    return state


def load_t5_encoder(folder: Path, dtype: torch.dtype) -> T5Encoder | None:
    """The encoder of a transformers T5 folder in `dtype`, in eval mode; None when its weights are in no layout
    read here. A tensor missing from the file, or one the encoder does not have, is an error naming it."""
    state = read_t5_weights(folder)
    if state is None:
        return None
    state.setdefault("shared.weight", state.get("encoder.embed_tokens.weight"))
    state.pop("encoder.embed_tokens.weight", None)  # the same tensor as shared.weight (tied)
    with torch.device("meta"):
        model = T5Encoder(T5Config.from_json(folder / "config.json"))
    expected = {k for k in model.state_dict() if k != "encoder.embed_tokens.weight"}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{folder}: the T5 weights do not fit its config.json: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    model.encoder.embed_tokens = model.shared  # tied again after assign replaced the parameter
    return model.eval()


class Encoded(NamedTuple):
    input_ids: list | torch.Tensor        # (N, L) token ids
    attention_mask: list | torch.Tensor   # (N, L) 1 = token, 0 = padding


class T5Tokenizer:
    """The `tokenizers` tokenizer of a T5 folder's tokenizer.json, called like transformers' tokenizers:
    tokenizer(texts, padding="max_length", max_length=L, truncation=True, return_tensors="pt")."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_file(str(path))
        self.unk_token_id = self.backend.token_to_id("<unk>")
        self.pad_token_id = self.backend.token_to_id("<pad>") or 0

    def _configure(self, padding: bool | str = False, max_length: int | None = None, truncation: bool = False):
        """The backend's padding and truncation for one call (it keeps them as state)."""
        backend = self.backend
        backend.no_truncation()
        backend.no_padding()
        if truncation and max_length is not None:
            backend.enable_truncation(max_length)
        if padding == "max_length" and max_length is not None:
            backend.enable_padding(length=max_length, pad_id=self.pad_token_id, pad_token="<pad>")
        return backend

    def tokenize(self, text: str) -> list[str]:
        """The pieces of a text (no end-of-sequence token)."""
        return self._configure().encode(text, add_special_tokens=False).tokens

    def __call__(self, texts: str | list[str], padding: bool | str = False, max_length: int | None = None,
                 truncation: bool = False, return_tensors: str | None = None) -> Encoded:
        single = isinstance(texts, str)
        backend = self._configure(padding, max_length, truncation)
        encodings = backend.encode_batch([texts] if single else list(texts))
        ids = [e.ids for e in encodings]
        mask = [e.attention_mask for e in encodings]
        if return_tensors == "pt":
            return Encoded(torch.tensor(ids), torch.tensor(mask))
        return Encoded(ids[0], mask[0]) if single else Encoded(ids, mask)
