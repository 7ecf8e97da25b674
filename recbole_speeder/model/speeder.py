r"""Speeder: an efficient multimodal-LLM sequential recommender as a RecBole ``SequentialRecommender``.

Zhong et al., 2025, "A Remarkably Efficient Paradigm to Multimodal Large Language Models for Sequential
Recommendation". Each history item enters the LLM as ``mrc_tokens`` soft tokens from MRC (``mrc.py``) instead of
a long text description, with SPAE's position cues added (``spae.py``); MPO's stages live in the trainer
(``trainer/mpo.py``). The prompt is ``prefix + item blocks + suffix`` (``prompt.py``); the LLM's last hidden state
goes through a head to a user vector, and an item's score is its similarity to that item's own MRC tokens
(``scoring.py``), so ranking every item is one matmul. ``item_repr: text`` gives each history item as its text
tokens instead: the slow "MLLM with text descriptions" baseline, same model otherwise. ``predict_mode: generate``
answers with one of N listed candidates instead (``generative/``). How fast the backbone runs is the runtime's
business (``runtime.py``), never this file's.
"""

from __future__ import annotations

from logging import getLogger

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from torch import nn

from recbole_speeder.data.item_features import build_item_features, item_texts
from recbole_speeder.errors import UsageError
from recbole_speeder.model.backbone import input_token_scale, load_backbone
from recbole_speeder.model.generative import GenerativeAnswerer
from recbole_speeder.model.mrc import MixtureOfModalityExperts
from recbole_speeder.model.prompt import Prompt, PromptBuilder
from recbole_speeder.model.runtime import Runtime, distinct_histories, outside_inference_mode
from recbole_speeder.model.scoring import ScoreHead, SharedNegatives, next_item_targets, sampled_softmax_loss
from recbole_speeder.model.spae import SequentialPositionAwareness


class Speeder(SequentialRecommender):
    input_type = InputType.POINTWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.train_all_positions = bool(config["train_all_positions"])
        self.item_chunk_size = int(config["item_chunk_size"])

        # backbone: a causal LM, frozen, with LoRA adapters
        self.llm, self.tokenizer = load_backbone(config)
        embeddings = self.llm.get_input_embeddings()
        self.d_model = d_model = embeddings.embedding_dim

        # MRC: each item's text, image and ID signals -> mrc_tokens soft tokens
        texts = item_texts(dataset, list(config["item_text_fields"] or []))
        self.mrc = MixtureOfModalityExperts(
            build_item_features(config, dataset, texts),
            n_items=self.n_items,
            d_model=d_model,
            n_tokens=config["mrc_tokens"],
            expert_hidden=config["expert_hidden"],
            router=config["router"],
            modalities=tuple(config["modalities"]),
            token_scale=input_token_scale(embeddings),
            dropout=config["mrc_dropout"],
            id_dim=config["id_embedding_dim"],
            id_init=config["id_init"],
            id_sparse_grad=self._lazy_id_update(config),
        )

        # SPAE: absolute index and time gap on the item tokens, item distance as an attention bias
        self.time_list_field = f"{config['TIME_FIELD']}{config['LIST_SUFFIX']}"
        has_time = self.time_list_field in dataset.field2type
        if config["spae_time"] and not has_time:
            getLogger().warning("spae_time is on but the dataset has no time field: time-gap cue disabled")
        self.spae = SequentialPositionAwareness(
            d_model,
            self.max_seq_length,
            n_heads=self.llm.config.num_attention_heads,
            absolute=config["spae_absolute"],
            relative=config["spae_relative"],
            time=config["spae_time"] and has_time,
            n_time_buckets=config["spae_time_buckets"],
            time_unit=config["spae_time_unit"],
        )
        attention = self.llm.config._attn_implementation
        if self.spae.distance_bias is not None and attention not in ("eager", "sdpa"):
            raise UsageError(f"spae_relative biases attention through its mask: use eager or sdpa, not {attention}")

        # the prompt around the history, and the head that reads the user vector from its last state
        self.prompt = PromptBuilder(config, self.tokenizer, self.max_seq_length, texts)
        self.history_dropout = nn.Dropout(config["history_dropout"])
        self.head = ScoreHead(d_model, config["head_dropout"], config["similarity"], float(config["temperature"]))
        self.loss_fct = nn.CrossEntropyLoss()
        # sampled_softmax_negatives: train against shared negatives instead of every item (catalogues of millions)
        self.negatives = None
        if config["sampled_softmax_negatives"]:
            self.negatives = SharedNegatives(int(config["sampled_softmax_negatives"]),
                                             config["sampled_softmax_distribution"], dataset.item_train_counts)
        self.runtime = Runtime(config, self.llm, self.prompt, self.spae)
        # predict_mode: generate lists N candidates in the prompt and answers with one of them
        self.generative = None
        if config["predict_mode"] == "generate":
            vocabulary = self.llm.get_output_embeddings().weight.shape[0]
            self.generative = GenerativeAnswerer(config, dataset, self.tokenizer, vocabulary)

    @staticmethod
    def _lazy_id_update(config) -> bool:
        """Row-sparse ID-table gradients under the sampled softmax (``lazy_id_update``), in one process only:
        NCCL all-reduces no sparse gradients, so DDP keeps the table dense."""
        wanted = bool(config["sampled_softmax_negatives"]) and bool(config["lazy_id_update"])
        if wanted and torch.distributed.is_initialized():
            getLogger().info("lazy_id_update: off under DDP (sparse gradients are not all-reduced); dense Adam")
            return False
        return wanted

    # ------------------------------------------------------------------ MPO's handles
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parts by name, so MPO stages can switch them: mrc, spae, head (with the generative answer's
        copy bias), lora."""
        return {
            "mrc": list(self.mrc.parameters()),
            "spae": list(self.spae.parameters()),
            "head": [*self.head.parameters(), *(self.generative.parameters() if self.generative else [])],
            "lora": [p for n, p in self.llm.named_parameters() if "lora_" in n],
        }

    def set_modalities(self, modalities: list[str]) -> None:
        """The modalities MRC mixes (an MPO stage's); the others get zero weight."""
        self.mrc.set_active(modalities)
        self.runtime.drop_caches()

    def train(self, mode: bool = True):
        self.runtime.drop_caches()  # the weights may change between a train and an eval phase
        return super().train(mode)

    # ------------------------------------------------------------------ items, prompt, users
    def item_tokens(self) -> torch.Tensor:
        """MRC tokens of every item ``[n_items, k, d]``, in chunks of ``item_chunk_size``; once per evaluation."""

        def every_item() -> torch.Tensor:
            ids = torch.arange(self.n_items, device=self.prompt.prefix_ids.device)
            with self.runtime.autocast():
                return torch.cat([self.mrc(chunk)[0] for chunk in ids.split(self.item_chunk_size)]).float()

        return self.runtime.cached("item_tokens", every_item, keep=not self.training)

    def item_vectors(self, item_tokens: torch.Tensor) -> torch.Tensor:
        """Output vector of every item ``[n_items, d]``; once per evaluation for the cached item tokens."""
        kept = self.runtime.holds("item_tokens", item_tokens)
        return self.runtime.cached("item_vectors", lambda: self.head.items(item_tokens), keep=kept)

    def inputs(self, interaction) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A batch's histories ``[B, L]``, their lengths and time stamps (None without a time field)."""
        timestamps = interaction[self.time_list_field] if self.time_list_field in interaction else None
        return interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], timestamps

    def history_prompt(self, item_seq, item_seq_len, timestamps, item_tokens: torch.Tensor) -> Prompt:
        """The histories' prompts, SPAE's input cues added to every item's tokens, which ``history_dropout`` drops
        in training as SASRec drops its input embeddings (the prompt's text tokens are kept)."""
        prompt = self.prompt.history(self.llm.get_input_embeddings(), item_seq, item_seq_len, item_tokens)
        is_item = (prompt.token_item >= 0).unsqueeze(-1)
        cues = self.spae.at(item_seq_len, prompt.where[0], prompt.token_item.clamp(min=0), timestamps)
        if cues is not None:
            prompt.values = prompt.values + cues * is_item
        if self.training and self.history_dropout.p > 0:
            prompt.values = torch.where(is_item, self.history_dropout(prompt.values), prompt.values)
        return prompt

    def forward(
        self,
        item_seq: torch.Tensor,
        item_seq_len: torch.Tensor,
        timestamps: torch.Tensor | None = None,
        item_tokens: torch.Tensor | None = None,
        all_positions: bool = False,
    ) -> torch.Tensor:
        """User vectors: ``[B, d]`` for the next item, or ``[B, L, d]`` read after every history item."""
        item_tokens = self.item_tokens() if item_tokens is None else item_tokens
        return self.head.users(self._states(item_seq, item_seq_len, timestamps, item_tokens, all_positions))

    def _states(self, item_seq, item_seq_len, timestamps, item_tokens, all_positions: bool) -> torch.Tensor:
        """The backbone's states before the head, shaped like ``forward``'s output."""
        prompt = self.history_prompt(item_seq, item_seq_len, timestamps, item_tokens)
        reads = prompt.item_end if all_positions else prompt.last.unsqueeze(1)
        states = self.runtime.hidden_states(prompt, reads)
        return states if all_positions else states[:, 0]

    # ------------------------------------------------------------------ RecBole API
    def calculate_loss(self, interaction) -> torch.Tensor:
        if self.generative is not None:
            return self.generative.loss(self, interaction)
        item_seq, item_seq_len, timestamps = self.inputs(interaction)
        if self.negatives is not None:
            return self._sampled_loss(item_seq, item_seq_len, timestamps, interaction[self.POS_ITEM_ID])
        item_tokens = self.item_tokens()
        states = self._states(item_seq, item_seq_len, timestamps, item_tokens, self.train_all_positions)
        return self.score_loss(states, item_seq, item_seq_len, interaction[self.POS_ITEM_ID], item_tokens)

    def score_loss(self, states, item_seq, item_seq_len, targets, item_tokens) -> torch.Tensor:
        """Full-softmax next-item loss of states read at the history's end ``[B, d]``, or after every history item
        ``[B, L, d]`` (all-position training); the generative loss adds it too (``generate_score_loss_weight``)."""
        if states.dim() == 3:  # position t predicts the item after it; the last one predicts the row's target
            next_items, valid = next_item_targets(item_seq, item_seq_len, targets)
            states, targets = states[valid], next_items[valid]  # the head runs on real positions only
        users = self.head.users(states)
        # Logits over the real items 1..n-1 (the padding item 0 is never a target): the softmax over all items with
        # item 0 at -inf, without its column. The softmax tolerates bf16 logits.
        with self.runtime.autocast():
            logits = (users @ self.item_vectors(item_tokens)[1:].T).float()
        return self.loss_fct(logits, targets - 1)

    def _sampled_loss(self, item_seq, item_seq_len, timestamps, targets) -> torch.Tensor:
        """The sampled softmax (``sampled_softmax_negatives``): MRC computes the tokens of the items this step
        touches only (histories, targets, shared negatives), so a step costs the same whatever the catalogue."""
        negatives = self.negatives.draw(item_seq.device)
        touched = torch.cat([item_seq.flatten(), targets, negatives]).unique()  # sorted: rows by searchsorted
        with self.runtime.autocast():
            tokens = self.mrc(touched)[0].float()
        # soft tokens enter the prompt by their row of ``tokens``; text mode reads items by their ids
        seq = torch.searchsorted(touched, item_seq) if self.prompt.item_repr == "mrc" else item_seq
        states = self._states(seq, item_seq_len, timestamps, tokens, self.train_all_positions)
        if states.dim() == 3:  # position t predicts the item after it; the last one predicts the row's target
            next_items, valid = next_item_targets(item_seq, item_seq_len, targets)
            states, targets = states[valid], next_items[valid]
        users, vectors = self.head.users(states), self.head.items(tokens)
        log_q = self.negatives.log_q.to(users.device)
        with self.runtime.autocast():
            positives = vectors[torch.searchsorted(touched, targets)]
            return sampled_softmax_loss(users, positives, vectors[torch.searchsorted(touched, negatives)], targets,
                                        negatives, log_q)

    def predict(self, interaction) -> torch.Tensor:
        if self.generative is not None:
            return self.generative.predict(self, interaction)
        item_seq, item_seq_len, timestamps = self.inputs(interaction)
        with self.runtime.scoring(warm=lambda: self.item_vectors(self.item_tokens())):
            # sampled evaluation repeats a user's row per candidate: one prompt per distinct history
            user_ids = interaction[self.USER_ID] if self.USER_ID in interaction else torch.zeros_like(item_seq_len)
            head, groups = distinct_histories(user_ids, item_seq, item_seq_len)
            stamps = timestamps[head] if timestamps is not None else None
            users = self.forward(item_seq[head], item_seq_len[head], stamps)[groups]
            items = self.item_vectors(self.item_tokens())[interaction[self.ITEM_ID]]
            scores = (users * items).sum(dim=-1)
        return outside_inference_mode(scores)

    def full_sort_predict(self, interaction) -> torch.Tensor:
        if self.generative is not None:
            return self.generative.full_sort_predict(self, interaction)
        users, items = self.full_sort_factors(interaction)
        return outside_inference_mode(users @ items.T)

    @staticmethod
    def ranks_by_similarity(config) -> bool:
        """Whether scores are user-item similarities (``predict_mode: score``), so evaluation may rank without a
        ``[users x items]`` matrix (``evaluation/ranking.py``); read from the config, since the evaluation batch is
        sized from it before the model is built."""
        return config["predict_mode"] == "score"

    def full_sort_factors(self, interaction) -> tuple[torch.Tensor, torch.Tensor]:
        """User vectors ``[B, d]`` and every item's output vector ``[n_items, d]``: full ranking scores their
        product."""
        with self.runtime.scoring(warm=lambda: self.item_vectors(self.item_tokens())):
            return self.forward(*self.inputs(interaction)), self.item_vectors(self.item_tokens())

    # ------------------------------------------------------------------ cost
    def token_counts(self) -> tuple[int, int]:
        """Prompt tokens read (the prefix included) and answer tokens generated, since the model was built."""
        return self.prompt.stats["tokens"], self.generative.generated_tokens if self.generative else 0

    def mean_prompt_tokens(self) -> float:
        """Mean prompt length (prefix + history + suffix tokens) over every prompt built."""
        return self.prompt.stats["tokens"] / max(self.prompt.stats["samples"], 1)
