"""rlatent's own KV caches, and the attention function that reads them.

Hugging Face models compute attention through a registry of functions
(`transformers.AttentionInterface`) chosen by `config._attn_implementation`.
rlatent registers one more, `rlatent`; while `LatentModel.trunk` runs with one
of the states below, every attention layer hands its query, key and value to
that state, which keeps the keys and values its own way and attends:

- `PassCache`, for the recurrent training forward. Each pass's new positions
  come *packed*, all rows one after the other in a batch-1 sequence (no padding
  in the linear layers); the state keeps every pass's keys and values as they
  were computed (nothing is copied into a growing cache) and attends row by
  row: it gathers each row's queries and its keys so far into a
  (rows, heads, new, seen) layout (`RowLayout`), runs SDPA with grouped-query
  attention (no repeated K/V) and packs the result back. With autograd on, a
  thin pass's attention runs under activation checkpointing, so it keeps no
  copy of the cache for its backward (`PassCache.keep_limit`): every pass's K/V
  is held once, whatever the number of passes. Gradients flow to every pass's
  keys and values.
- `SlotCache`, for the sampler: one preallocated buffer per layer of shape
  (slots, kv heads, capacity, head dim), written in place at each row's own
  positions, so a row's keys sit at their position index and attention needs
  only `key position <= query position` as its mask. Prompts are prefilled
  packed into any free slots (identical prompts computed once).

`unsupported(backbone)` says why a model cannot use this (no attention-function
registry, logit soft-capping, attention sinks, non-attention layers); callers
then fall back to Hugging Face's own caches.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

ATTENTION = "rlatent"
"""The name under which rlatent's attention function is registered with transformers."""

_active: "KVState | None" = None


class KVState:
    """What `LatentModel.trunk` runs the model against: it receives every attention call."""

    calls = 0

    def attend(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float, dropout: float) -> torch.Tensor:
        """(B, H, C, d) query, (B, kvH, C, d) key and value of the new positions -> (B, C, H, d)."""
        raise NotImplementedError


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
               **kwargs) -> tuple[torch.Tensor, None]:
    state = _active
    if state is None:
        raise RuntimeError("rlatent attention called outside LatentModel.trunk(cache=<an rlatent KV state>)")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("rlatent attention supports neither logit soft-capping nor attention sinks")
    state.calls += 1
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return state.attend(module, query, key, value, scale, dropout), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, _attention)


_register()


def attention_modules(backbone: nn.Module) -> list[nn.Module]:
    """The self-attention layers of a Hugging Face backbone (modules with a `layer_idx` named *Attention)."""
    return [m for m in backbone.modules()
            if type(m).__name__.endswith("Attention") and isinstance(getattr(m, "layer_idx", None), int)]


def unsupported(backbone: nn.Module) -> str | None:
    """Why this backbone cannot run on rlatent's KV states, or None when it can."""
    config = getattr(backbone, "config", None)
    if config is None or not getattr(type(backbone), "_supports_attention_backend", False):
        return f"{type(backbone).__name__} does not take attention functions"
    modules = attention_modules(backbone)
    layers = getattr(config, "num_hidden_layers", None)
    if not modules or (layers is not None and len(modules) != layers):
        return f"{type(backbone).__name__}: not every layer is a self-attention layer rlatent can find"
    if len({m.layer_idx for m in modules}) != len(modules):
        return f"{type(backbone).__name__}: attention layers share a layer index"
    for m in modules:
        cfg = getattr(m, "config", config)
        if getattr(cfg, "attn_logit_softcapping", None) or getattr(m, "sinks", None) is not None:
            return f"{type(m).__name__}: logit soft-capping or attention sinks"
        if not getattr(m, "is_causal", True) or not getattr(cfg, "is_causal", True):
            return f"{type(m).__name__}: not causal"
    return None


@contextlib.contextmanager
def attending(configs: list, state: KVState, expected_calls: int) -> Iterator[None]:
    """Route the attention of the models configured by `configs` to `state` for the duration; checks that every
    one of the `expected_calls` attention layers went through it."""
    global _active
    if _active is not None:
        raise RuntimeError("an rlatent KV state is already active (nested trunk calls)")
    saved = [c._attn_implementation_internal for c in configs]
    for c in configs:
        c._attn_implementation_internal = ATTENTION
    _active, state.calls = state, 0
    try:
        yield
    finally:
        _active = None
        for c, value in zip(configs, saved):
            c._attn_implementation_internal = value
    if state.calls != expected_calls:
        raise RuntimeError(f"{state.calls} of {expected_calls} attention layers ran through rlatent's KV state")


# ---- the per-row layout of packed positions ------------------------------------------------------


@dataclass
class RowLayout:
    """How one call's packed positions (rows one after another) map to a per-row attention.

    Row b's new positions are `start[b] .. end[b]-1`; its keys are positions `0 .. end[b]-1`, found in the
    concatenation of all packed keys so far at `key_index[b, j]`. Padding queries attend to key 0 only (no
    fully masked row, so no NaN in the backward); their outputs are dropped by `out_index`.
    """

    query_index: torch.Tensor  # (B, C) packed index of row b's c-th new position (0 for padding)
    query_positions: torch.Tensor  # (B, C) its position in the row (0 for padding)
    key_index: torch.Tensor  # (B, L) index of row b's key at position j among all packed keys so far
    mask: torch.Tensor  # (B, 1, C, L) bool: key j is visible to query c
    out_index: torch.Tensor  # (N,) b * C + c of each packed position, in packed order

    @staticmethod
    def build(start: torch.Tensor, end: torch.Tensor, location: torch.Tensor, device: torch.device) -> "RowLayout":
        """`start`, `end` (B,): each row's new positions; `location` (B, >= max end): packed index of every
        position among all packed keys (this call's included). CPU tensors in, `device` tensors out."""
        sizes = end - start
        rows, width = sizes.shape[0], int(sizes.max())
        offsets = sizes.cumsum(0) - sizes
        column = torch.arange(width)
        valid = column[None, :] < sizes[:, None]
        query_index = torch.where(valid, offsets[:, None] + column[None, :], 0)
        query_positions = torch.where(valid, start[:, None] + column[None, :], 0)
        length = int(end.max())
        key = torch.arange(length)
        seen = key[None, :] < end[:, None]  # (B, L)
        key_index = torch.where(seen, location[:, :length], 0)
        mask = (key[None, None, :] <= query_positions[:, :, None]) & seen[:, None, :]
        mask[:, :, 0] |= ~valid  # padding queries see key 0
        out_index = (torch.arange(rows)[:, None] * width + column[None, :])[valid]
        return RowLayout(*(t.to(device, non_blocking=True) for t in
                           (query_index, query_positions, key_index, mask[:, None], out_index)))

    def visible(self, window: int | None) -> torch.Tensor:
        """The mask, restricted to a sliding window when the layer has one."""
        if window is None:
            return self.mask
        key = torch.arange(self.mask.shape[-1], device=self.mask.device)
        return self.mask & (key[None, None, None, :] > (self.query_positions[:, None, :, None] - window))


def _row_attention(layout: RowLayout, chunks: int, scaling: float, dropout: float, window: int | None,
                   query: torch.Tensor, *kv: torch.Tensor) -> torch.Tensor:
    """Packed (H, N, d) queries and `chunks` packed key chunks then as many value chunks, each (kvH, n, d)
    -> (N, H, d): every row attends to its own keys only."""
    keys = kv[0] if chunks == 1 else torch.cat(kv[:chunks], 1)
    values = kv[chunks] if chunks == 1 else torch.cat(kv[chunks:], 1)
    q = query[:, layout.query_index].transpose(0, 1)  # (B, H, C, d)
    k = keys[:, layout.key_index].transpose(0, 1)  # (B, kvH, L, d)
    v = values[:, layout.key_index].transpose(0, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.visible(window), dropout_p=dropout,
                                         scale=scaling, enable_gqa=q.shape[1] != k.shape[1])
    out = out.transpose(1, 2).reshape(-1, out.shape[1], out.shape[3])  # (B * C, H, d)
    return out.index_select(0, layout.out_index)


# ---- the training forward's cache ------------------------------------------------------------------


class PassCache(KVState):
    """Keys and values of every pass of the recurrent forward, packed, as computed (see the module docstring).

    Before each pass call `next_pass(layout)`; the model then runs on that pass's packed positions (batch 1).
    With autograd on, a pass whose attention would keep more gathered K/V for its backward than `keep_limit`
    hidden-size vectors per new position recomputes its attention in the backward instead (one attention
    forward more). Thin passes (a latent wave: one position per row against the whole row so far) are the
    ones recomputed, so memory does not grow with passes x context; wide passes (the prompt and long
    language stretches) keep theirs, at most `keep_limit` vectors per position, a few percent of a layer's
    activations. `keep_limit=0` recomputes every pass's attention.
    """

    def __init__(self, keep_limit: float = 2.0):
        self.keep_limit = keep_limit
        self.keys: dict[int, list[torch.Tensor]] = {}
        self.values: dict[int, list[torch.Tensor]] = {}
        self.layout: RowLayout | None = None
        self.passes = 0

    def next_pass(self, layout: RowLayout) -> None:
        self.layout = layout
        self.passes += 1

    def attend(self, module, query, key, value, scaling, dropout):
        keys = self.keys.setdefault(module.layer_idx, [])
        values = self.values.setdefault(module.layer_idx, [])
        if len(keys) != self.passes - 1:
            raise RuntimeError("PassCache: a layer ran twice in one pass (is the model's gradient checkpointing on?)")
        keys.append(key[0])
        values.append(value[0])
        attend = functools.partial(_row_attention, self.layout, len(keys), scaling, dropout,
                                   getattr(module, "sliding_window", None))
        inputs = (query[0], *keys, *values)
        rows, seen = self.layout.key_index.shape
        kept = rows * seen * 2 * key.shape[1] * key.shape[3]  # the gathered K and V a plain backward keeps
        heavy = kept > self.keep_limit * query.shape[2] * query.shape[1] * query.shape[3]
        if heavy and torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
            out = checkpoint(attend, *inputs, use_reentrant=False, preserve_rng_state=dropout > 0)
        else:
            out = attend(*inputs)
        return out[None]  # (1, N, H, d)


# ---- the sampler's cache ------------------------------------------------------------------------------


class SlotCache(KVState):
    """Preallocated keys and values for `slots` rows of up to `capacity` positions, written in place.

    A row's key at position j sits in column j of its slot, so a query at position p sees columns `0..p`.
    Two kinds of call: `prefill` (packed prompts into chosen slots; identical prompts computed once and
    written to every slot that asked for them) and `decode` (one new position for each of slots `0..count-1`,
    attending to the first `length` columns).
    """

    def __init__(self, slots: int, capacity: int):
        self.slots, self.capacity = slots, capacity
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self._call: tuple = ()

    def prefill(self, layout: RowLayout, source: torch.Tensor, slot: torch.Tensor, position: torch.Tensor) -> None:
        """The next call computes packed prompts laid out by `layout`; packed key `source[i]` is written to
        column `position[i]` of slot `slot[i]`."""
        self._call = ("prefill", layout, source, slot, position)

    def decode(self, count: int, positions: torch.Tensor, length: int) -> None:
        """The next call computes one position for each of slots `0..count-1`, at `positions` (count,)."""
        column = torch.arange(length, device=positions.device)
        self._call = ("decode", count, positions, length,
                      (column[None, :] <= positions[:, None])[:, None, None, :], column)

    def _buffers(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.keys:
            shape = (self.slots, like.shape[-3], self.capacity, like.shape[-1])
            self.keys[layer] = like.new_zeros(shape)
            self.values[layer] = like.new_zeros(shape)
        return self.keys[layer], self.values[layer]

    def attend(self, module, query, key, value, scaling, dropout):
        keys, values = self._buffers(module.layer_idx, key)
        window = getattr(module, "sliding_window", None)
        if self._call[0] == "prefill":
            _, layout, source, slot, position = self._call
            keys[slot, :, position] = key[0][:, source].transpose(0, 1)
            values[slot, :, position] = value[0][:, source].transpose(0, 1)
            return _row_attention(layout, 1, scaling, dropout, window, query[0], key[0], value[0])[None]
        _, count, positions, length, mask, column = self._call
        rows = torch.arange(count, device=positions.device)
        keys[rows, :, positions] = key[:, :, 0]
        values[rows, :, positions] = value[:, :, 0]
        if window is not None:
            mask = mask & (column[None, None, None, :] > (positions[:, None, None, None] - window))
        out = F.scaled_dot_product_attention(query, keys[:count, :, :length], values[:count, :, :length],
                                             attn_mask=mask, dropout_p=dropout, scale=scaling,
                                             enable_gqa=query.shape[1] != keys.shape[1])
        return out.transpose(1, 2)  # (count, 1, H, d)

    def move(self, destination: torch.Tensor, source: torch.Tensor, length: int) -> None:
        """Copy slots `source` to slots `destination` (the first `length` columns)."""
        for buffers in (self.keys, self.values):
            for layer, buffer in buffers.items():
                buffer[destination, :, :length] = buffer[source, :, :length]
