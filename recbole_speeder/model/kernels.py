"""Backbone kernels the runtime chooses (``runtime.py``): each computes what the decoder computes, faster.

- ``decode_at``: the last decoder layer computes only the hidden states that are read;
- ``store_frozen_linears_in``: the frozen decoder weights kept in the autocast dtype, cast once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Cache
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, rotate_half


def store_frozen_linears_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Keep the frozen linear weights of the decoder layers in the autocast ``dtype``.

    Autocast caches its casts only for weights that train, so it recasts every frozen weight at every call: a copy
    of the weights per backbone call, in time and in memory (docs/performance.md). Under autocast the
    result is bit-identical (the same rounding, done once); these layers then run only under autocast, as the model
    calls them. Embeddings, norms and the LM head keep their dtype; LoRA adapters train and are left alone.
    """
    decoder_layers = model.get_decoder().layers.modules()
    for layer in [m for m in decoder_layers if isinstance(m, nn.Linear) and not m.weight.requires_grad]:
        layer.weight.data = layer.weight.data.to(dtype)
        if layer.bias is not None:
            layer.bias.data = layer.bias.data.to(dtype)


def reads_only_supported(decoder: nn.Module) -> bool:
    """Whether ``decode_at`` can run this decoder: Llama-family layers (SmolLM2, the tiny-random test backbone)."""
    return all(type(layer) is LlamaDecoderLayer for layer in decoder.layers)


def decode_at(
    decoder: nn.Module,
    embeds: torch.Tensor,
    cache: Cache | None,
    reads: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The decoder's final hidden states at slots ``reads [B, R]`` of ``embeds [B, N, d]`` only, ``[B, R, d]``.

    What a prompt's forward needs from its last layer is the states that are read (the prompt's end, the answer
    positions) and every slot's keys/values (later slots and a decoding cache attend to them). So every layer but
    the last runs as the decoder runs it, and the last one computes keys/values at every slot and its queries,
    attention output and MLP at the reads only: the same states for about half the work of a 2-layer decoder on
    a prompt read at one slot. ``cache`` (a prefix's keys/values, or empty) is extended by all ``N`` slots.
    ``attention_mask`` is what the decoder itself would be given: None (causal), a 2D padding mask
    ``[B, past + N]``, or a prepared 4D mask ``[B, 1 or heads, N, past + N]`` (SPAE's item-distance bias); every
    layer applies it as the decoder does, the last one at the reads' rows only, so the states are the full
    decoder's under any mask.
    """
    past = cache.get_seq_length() if cache is not None else 0
    positions = torch.arange(past, past + embeds.shape[1], device=embeds.device).unsqueeze(0)
    mask = create_causal_mask(
        config=decoder.config, inputs_embeds=embeds, attention_mask=attention_mask, cache=cache, position_ids=positions
    )
    rope = decoder.rotary_emb(embeds, position_ids=positions)
    *layers, last = decoder.layers[: decoder.config.num_hidden_layers]
    hidden = embeds
    for layer in layers:
        hidden = layer(
            hidden, attention_mask=mask, position_ids=positions, cache=cache, use_cache=cache is not None,
            position_embeddings=rope,
        )
    return decoder.norm(_last_layer_at(last, hidden, reads, rope, cache, past, mask))


def _last_layer_at(layer, hidden, reads, rope, cache, past: int, mask: torch.Tensor | None) -> torch.Tensor:
    """``LlamaDecoderLayer.forward`` with keys/values from every slot and everything else at ``reads`` only;
    ``mask`` is the layers' prepared 4D mask ``[B or 1, 1 or heads, N, K]`` (boolean or additive), or None (causal)."""
    attn, (batch, n_slots, width) = layer.self_attn, hidden.shape
    at_reads = reads.unsqueeze(-1)
    normed = layer.input_layernorm(hidden)
    query = attn.q_proj(normed.gather(1, at_reads.expand(-1, -1, width)))
    query = query.view(batch, reads.shape[1], -1, attn.head_dim).transpose(1, 2)
    key = attn.k_proj(normed).view(batch, n_slots, -1, attn.head_dim).transpose(1, 2)
    value = attn.v_proj(normed).view(batch, n_slots, -1, attn.head_dim).transpose(1, 2)
    cos, sin = (part.expand(batch, -1, -1) for part in rope)
    cos_q, sin_q = (part.gather(1, at_reads.expand(-1, -1, part.shape[-1])).unsqueeze(1) for part in (cos, sin))
    query = query * cos_q + rotate_half(query) * sin_q
    key = key * cos.unsqueeze(1) + rotate_half(key) * sin.unsqueeze(1)
    if cache is not None:
        key, value = cache.update(key, value, attn.layer_idx)
    if mask is None:
        visible = torch.arange(key.shape[2], device=reads.device) <= (past + reads).unsqueeze(-1)  # causal, [B, R, K]
        rows = visible.unsqueeze(1)
    else:  # the rows of the reads, as the full layer would apply them
        mask = mask[..., : key.shape[2]].expand(batch, -1, -1, -1)
        rows = mask.gather(2, at_reads.unsqueeze(1).expand(-1, mask.shape[1], -1, mask.shape[3]))
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=rows, dropout_p=attn.attention_dropout if attn.training else 0.0,
        scale=attn.scaling, enable_gqa=attn.num_key_value_groups > 1,
    )
    out = attn.o_proj(out.transpose(1, 2).reshape(batch, reads.shape[1], -1))
    hidden = hidden.gather(1, at_reads.expand(-1, -1, width)) + out
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))
