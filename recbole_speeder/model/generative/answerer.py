"""Speeder's generative mode (``predict_mode: generate``): the LLM reads N candidates and answers with one.

The prompt continues the one Speeder already builds (instruction prefix, history blocks, suffix) with
``<generate_candidates_text> [A][item] [B][item] ... <generate_answer_text>`` (``prompt.PromptBuilder``); an item is
its MRC soft token(s), or its text tokens with ``item_repr: text`` (there the list is LLaRA-style, ``| title |
title``, and the answer is a title plus an end token). In MRC mode the answer is, with ``generate_answer: item``,
the item's own token of a vocabulary extended by the catalogue, its output embedding the item's score-mode vector,
and ``generate_copy: bias`` adds a learned bonus to the items the prompt lists; with ``label``, the candidate's label
token. Training: the true next item and N-1 negatives per row (``sampling.py``), language-model loss on the answer
tokens only, plus the score-mode loss read at the history's end of the same forward
(``generate_score_loss_weight``). With ``train_all_positions`` a training row is a window of the tiling training
set: the score-mode loss trains every position of it, as in score mode, and the answer is its last target's (one
answer per window instead of one per target: the candidate list, ~45 tokens, is what an answer costs).

Decoders (``decoding.py``): ``constrained`` takes the argmax over the N candidates (label- or item-token logits at
the answer position; in text mode each title's log-likelihood), so every answer is valid; ``free`` takes the argmax
over every word and item (item answers), or greedy-decodes text and parses it (``generate_validity``), and an
answer that names no candidate is invalid. Only the logits that are needed are computed.

RecBole reaches the model through ``predict`` (one row per (user, candidate): its sampled evaluation repeats a
user's row once per candidate, all in one batch) and ``full_sort_predict``; both return scores its evaluator
ranks. ``predict`` regroups the rows by history, shows each user its own N rows as the candidate list (in an
order seeded by the user id, so the true item has no fixed label) and returns each candidate's answer score.
``full_sort_predict`` lists the top-N items of the score-mode head. A free answer puts its candidate first
(score 1, the rest by their first answer token's log-prob); an invalid one gives all ``-inf``, which
``SpeederTrainer`` turns into a miss at every cut-off and the ``VHR``/``ValidRatio``/``HR`` metrics count as
not valid (``evaluation/metrics.py``).
"""

from __future__ import annotations

import math
from functools import partial
from logging import getLogger
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from recbole_speeder.config.choices import GENERATE_LABELS
from recbole_speeder.errors import UsageError
from recbole_speeder.evaluation.protocol import candidate_count, check_list_batches
from recbole_speeder.model.generative.decoding import (
    greedy,
    label_named,
    mark_answers,
    named_candidate,
    normalise_answer,
    title_scores,
)
from recbole_speeder.model.generative.sampling import TrainingCandidates, listing_order
from recbole_speeder.model.prompt import Prompt, PromptBuilder, text_token_ids
from recbole_speeder.model.runtime import Runtime, history_groups
from recbole_speeder.model.scoring import ScoreHead

LABEL_SETS = dict(zip(GENERATE_LABELS, ([chr(ord("A") + i) for i in range(26)], [str(i + 1) for i in range(99)]),
                      strict=True))


class Speeder(Protocol):
    """What the answerer uses of the Speeder model it answers for (``model/speeder.py``)."""

    ITEM_ID: str
    USER_ID: str
    POS_ITEM_ID: str
    n_items: int
    train_all_positions: bool
    llm: nn.Module
    prompt: PromptBuilder
    runtime: Runtime
    head: ScoreHead

    def inputs(self, interaction) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]: ...
    def item_tokens(self) -> torch.Tensor: ...
    def item_vectors(self, item_tokens: torch.Tensor) -> torch.Tensor: ...
    def history_prompt(self, item_seq, item_seq_len, timestamps, item_tokens: torch.Tensor) -> Prompt: ...
    def forward(self, item_seq, item_seq_len, timestamps=None, item_tokens=None) -> torch.Tensor: ...
    def score_loss(self, states, item_seq, item_seq_len, targets, item_tokens) -> torch.Tensor: ...


class GenerativeAnswerer(nn.Module):
    """Builds candidate prompts, trains the answer and decodes it, for the Speeder model passed to each call.

    Holds token ids (buffers), the training sampler and the copy bias (``generate_copy: bias``, trained with the
    head); the model is an argument, never a submodule.
    """

    def __init__(self, config, dataset, tokenizer, vocabulary: int):
        super().__init__()
        self.item_repr = config["item_repr"]
        self.decoder = config["generate_decoder"]
        # MRC mode answers with a label or an item token; text mode with a title. A copy bonus is for item answers.
        self.answer = config["generate_answer"] if self.item_repr == "mrc" else "title"
        self.n_candidates = int(config["generate_candidates"])
        self.score_loss_weight = float(config["generate_score_loss_weight"])
        self.title_score = config["generate_title_score"]
        self.validity = config["generate_validity"]
        self.seed = int(config["seed"])
        self.tokenizer = tokenizer
        self._check(config)
        n_eval = [n for n in (candidate_count(config, p) for p in ("valid", "test")) if n is not None]
        self.max_candidates = max([self.n_candidates, *n_eval])
        self.max_new_tokens = (
            int(config["generate_max_new_tokens"]) if self.item_repr == "mrc"
            else int(config["max_item_text_tokens"]) + 1
        )

        self.register_buffer("header_ids", text_token_ids(tokenizer, config["generate_candidates_text"]), False)
        self.register_buffer("cue_ids", text_token_ids(tokenizer, config["generate_answer_text"]), False)
        labels = LABEL_SETS[config["generate_labels"]][: self.max_candidates]
        if self.item_repr == "mrc":
            self.register_buffer("label_ids", self._single_tokens(labels, config["generate_labels"]), False)
            self.labels = {label.casefold(): i for i, label in enumerate(labels)}
        separator = text_token_ids(tokenizer, config["generate_separator"])
        if self.item_repr == "text" and separator.numel() != 1:
            raise UsageError(f"generate_separator '{config['generate_separator']}' must be one token of the backbone")
        self.separator_id = int(separator[0]) if separator.numel() else None
        self.end_id = next(
            (t for t in (tokenizer.eos_token_id, tokenizer.sep_token_id, self.separator_id) if t is not None), None
        )

        sampling = config["generate_train_sampling"] or (config["test_neg_sample_args"] or {}).get("distribution")
        weights = None
        if sampling == "popularity":
            weights = torch.bincount(dataset.inter_feat[dataset.iid_field], minlength=dataset.item_num).double()
            weights[0] = 0
        self.training_candidates = TrainingCandidates(self.n_candidates, dataset.item_num, self.seed, weights)
        # Starts at log(vocabulary + catalogue size), where the N listed items together hold about N/(N+1) of the
        # answer mass: Adam moves it by about the learning rate per step, and a CPU run has a few hundred steps.
        copies = self.answer == "item" and config["generate_copy"] == "bias"
        self.copy_bias = nn.Parameter(torch.tensor(math.log(vocabulary + dataset.item_num - 1))) if copies else None
        self.generated_tokens = 0
        getLogger().info(
            f"generative mode: {self.n_candidates} candidates per training prompt "
            f"({'popularity' if weights is not None else 'uniform'} negatives), {self.decoder} decoder, "
            f"{self.answer} answers" + (" with a copy bias" if copies else "")
        )

    # ------------------------------------------------------------------ checks
    def _check(self, config) -> None:
        """What depends on the evaluation lists; each key's own values were checked with the config."""
        if self.validity == "llara" and self.item_repr == "mrc":
            raise UsageError("generate_validity: llara finds candidate titles in the answer: it needs item_repr: text")
        check_list_batches(config)
        for phase in ("valid", "test"):
            n = candidate_count(config, phase)
            if n is not None and n != self.n_candidates:
                getLogger().warning(
                    f"{phase} lists {n} candidates but training prompts list generate_candidates={self.n_candidates}"
                )

    def _single_tokens(self, labels: list[str], name: str) -> torch.Tensor:
        ids = [self.tokenizer(f" {label}", add_special_tokens=False)["input_ids"] for label in labels]
        if len(labels) < self.max_candidates:
            raise UsageError(
                f"generate_labels: {name} has {len(labels)} labels but the protocol lists {self.max_candidates} "
                "candidates: use fewer candidates or generate_labels: numbers"
            )
        if any(len(i) != 1 for i in ids) or len({i[0] for i in ids}) != len(ids):
            raise UsageError(f"generate_labels: {name} are not single, distinct tokens of this backbone: use letters")
        return torch.tensor([i[0] for i in ids], dtype=torch.long)

    # ------------------------------------------------------------------ prompt and answer vocabulary
    def _prompt(self, model: Speeder, item_seq, item_seq_len, timestamps, item_tokens, candidates, answer_ids=None,
                answer_len=None) -> Prompt:
        """The whole prompt after the prefix: the history as Speeder builds it, then the candidate section."""
        if answer_ids is None:
            answer_ids = torch.zeros(len(candidates), 0, dtype=torch.long, device=candidates.device)
            answer_len = torch.zeros(len(candidates), dtype=torch.long, device=candidates.device)
        if self.item_repr == "mrc":
            lead = self.label_ids[: candidates.shape[1]].expand_as(candidates)
        else:
            lead = torch.full_like(candidates, self.separator_id)
        history = model.history_prompt(item_seq, item_seq_len, timestamps, item_tokens)
        return model.prompt.with_candidates(model.llm.get_input_embeddings(), history, item_seq_len, candidates,
                                            item_tokens, self.header_ids, lead, self.cue_ids, answer_ids, answer_len)

    def _answer_tokens(self, model: Speeder, items: torch.Tensor, listed_at: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The answer naming ``items`` (listed at slots ``listed_at``), as token ids ``[B, T]`` and lengths: its item
        token, its label, or its text + end token."""
        if self.answer == "item":
            return self._item_token_ids(model, items).unsqueeze(1), torch.ones_like(items)
        if self.answer == "label":
            return self.label_ids[listed_at].unsqueeze(1), torch.ones_like(items)
        text_ids, text_len = model.prompt.item_text_ids, model.prompt.item_text_len
        length = text_len[items]
        ids = torch.cat([text_ids[items, : int(length.max())], torch.zeros_like(items).unsqueeze(1)], dim=1)
        ids = ids.scatter(1, length.unsqueeze(1), torch.full_like(length.unsqueeze(1), self.end_id))
        return ids, length + 1

    @staticmethod
    def _lm_logits(model: Speeder, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """LM-head logits of ``hidden [..., d]``, for ``token_ids`` only when given (the tied head's rows)."""
        head = model.llm.get_output_embeddings()
        weight = head.weight if token_ids is None else head.weight[token_ids]
        bias = getattr(head, "bias", None)
        if bias is not None and token_ids is not None:
            bias = bias[token_ids]
        return F.linear(hidden.to(weight.dtype), weight, bias).float()

    @staticmethod
    def _item_token_ids(model: Speeder, items: torch.Tensor) -> torch.Tensor:
        """Token id of each item in the vocabulary extended by the catalogue (``generate_answer: item``): the
        text vocabulary's ids first, then one token per real item (1..n-1) in item order."""
        return model.llm.get_output_embeddings().weight.shape[0] + items - 1

    def _answer_logits(self, model: Speeder, hidden: torch.Tensor, item_tokens: torch.Tensor,
                       candidates: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits of answer states ``hidden [R, d]``: the text vocabulary's, and with item answers every
        catalogue item's after them, whose output embedding is its score-mode vector read through the score head,
        so one softmax chooses between words and items; the items listed (``candidates [R, N]``) get the copy bias."""
        logits = self._lm_logits(model, hidden)
        if self.answer != "item":
            return logits
        items = (model.head.users(hidden) @ model.item_vectors(item_tokens)[1:].T).float()
        if self.copy_bias is not None:
            copy = self.copy_bias.float().expand(len(hidden), candidates.shape[1])
            items = items.scatter_add(1, candidates - 1, copy)
        return torch.cat([logits, items], dim=-1)

    # ------------------------------------------------------------------ training
    def loss(self, model: Speeder, interaction) -> torch.Tensor:
        """LM loss on the answer naming the true item among N candidates (+ the weighted score-mode loss).

        One forward gives both: the score-mode states are read in the history, before the candidate section, which
        causal attention keeps them from seeing. With ``train_all_positions`` they are read after every history
        item (a window of the tiling training set, as in score mode), and the answer is the window's last target's.
        """
        item_seq, item_seq_len, timestamps = model.inputs(interaction)
        targets = interaction[model.POS_ITEM_ID]
        candidates, listed_at = self.training_candidates(targets)
        item_tokens = model.item_tokens()
        answer, answer_len = self._answer_tokens(model, targets, listed_at)
        teacher = answer[:, :-1] if answer.shape[1] > 1 else answer[:, :0]
        prompt = self._prompt(
            model, item_seq, item_seq_len, timestamps, item_tokens, candidates, teacher, answer_len - 1
        )
        steps = torch.arange(answer.shape[1], device=answer.device)
        reads = (prompt.cue_end.unsqueeze(1) + steps).minimum((prompt.lengths - 1).unsqueeze(1))
        if self.score_loss_weight:
            history = prompt.item_end if model.train_all_positions else prompt.last.unsqueeze(1)
            reads = torch.cat([reads, history], dim=1)
        states = model.runtime.hidden_states(prompt, reads)
        real = steps < answer_len.unsqueeze(1)
        with model.runtime.autocast():  # training logits, as score mode's: the full vocabulary at every answer token
            # item answers are one token: the copy's rows are the batch's
            logits = self._answer_logits(model, states[:, : len(steps)][real], item_tokens, candidates)
        loss = F.cross_entropy(logits, answer[real])
        if self.score_loss_weight:
            history_states = states[:, len(steps) :]
            if not model.train_all_positions:
                history_states = history_states[:, 0]
            score = model.score_loss(history_states, item_seq, item_seq_len, targets, item_tokens)
            loss = loss + self.score_loss_weight * score
        return loss

    # ------------------------------------------------------------------ answers
    def answer_scores(self, model: Speeder, item_seq, item_seq_len, timestamps, candidates: torch.Tensor
                      ) -> torch.Tensor:
        """Scores ``[B, N]`` of the listed candidates (listing order): see the module docstring."""
        item_tokens = model.item_tokens()
        prompt = self._prompt(model, item_seq, item_seq_len, timestamps, item_tokens, candidates)
        if self.answer in ("item", "label") and (self.decoder == "constrained" or self.answer == "item"):
            last = model.runtime.hidden_states(prompt, prompt.cue_end.unsqueeze(1))[:, 0]
            if self.answer == "label":
                return self._lm_logits(model, last, self.label_ids[: candidates.shape[1]]).log_softmax(dim=-1)
            return self._item_answer_scores(model, last, item_tokens, candidates)
        state = model.runtime.start_decoding(prompt)
        first = self._lm_logits(model, state.last).log_softmax(dim=-1)
        lm_logits = partial(self._lm_logits, model)
        if self.decoder == "constrained":
            answers = partial(self._answer_tokens, model)
            return title_scores(model.runtime, lm_logits, answers, state, candidates, first, self.title_score)
        first_ids = self.label_ids[: candidates.shape[1]].expand_as(candidates) if self.item_repr == "mrc" else (
            model.prompt.item_text_ids[candidates, 0])
        scores = first.gather(1, first_ids)
        stops = torch.tensor([t for t in (self.end_id, self.separator_id) if t is not None], device=first.device)
        answers, generated = greedy(model.runtime, lm_logits, state, first.argmax(dim=-1), stops, self.max_new_tokens)
        self.generated_tokens += generated
        return mark_answers(scores, self._parse(model, answers, candidates))

    def _parse(self, model: Speeder, answers: list[list[int]], candidates: torch.Tensor) -> torch.Tensor:
        """Listing slot each free answer names, or -1 when it names none."""
        choice = []
        for row, listed in zip(answers, candidates.tolist(), strict=True):
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            if self.item_repr == "mrc":
                choice.append(label_named(text, self.labels, len(listed)))
            else:
                titles = [normalise_answer(model.prompt.item_text(self.tokenizer, item)) for item in listed]
                choice.append(named_candidate(normalise_answer(text), titles, self.validity))
        return torch.tensor(choice, device=candidates.device)

    def _item_answer_scores(self, model: Speeder, last: torch.Tensor, item_tokens: torch.Tensor,
                            candidates: torch.Tensor) -> torch.Tensor:
        """Item answers: the candidates' item-token log-probs at the answer position. Constrained: the argmax over
        them. Free: the argmax over the whole extended vocabulary (every word and every catalogue item) is the
        answer, valid only when it is a listed candidate's item token."""
        logprobs = self._answer_logits(model, last, item_tokens, candidates).log_softmax(dim=-1)
        listed = self._item_token_ids(model, candidates)
        scores = logprobs.gather(1, listed)
        if self.decoder == "constrained":
            return scores
        self.generated_tokens += len(candidates)
        named = listed == logprobs.argmax(dim=-1, keepdim=True)
        choice = torch.where(named.any(dim=1), named.long().argmax(dim=1), -1)
        return mark_answers(scores, choice)

    # ------------------------------------------------------------------ RecBole API
    def predict(self, model: Speeder, interaction) -> torch.Tensor:
        """One score per (user, candidate) row; each user's rows are its candidate list."""
        item_seq, item_seq_len, timestamps = model.inputs(interaction)
        items = interaction[model.ITEM_ID]
        users = interaction[model.USER_ID] if model.USER_ID in interaction else torch.zeros_like(items)
        groups = history_groups(users, item_seq, item_seq_len)
        sizes = torch.bincount(groups)
        n = int(sizes[0])
        if bool((sizes != n).any()) or n > self.max_candidates:
            raise UsageError(
                "predict_mode: generate needs every user's candidates in one predict batch, as many per user "
                f"as the protocol lists (got {sizes.unique().tolist()}): check eval_batch_size and eval_args.mode"
            )
        rows = torch.argsort(groups, stable=True).view(-1, n)
        rows = rows.gather(1, listing_order(users[rows[:, 0]], n, self.seed))
        head = rows[:, 0]
        stamps = timestamps[head] if timestamps is not None else None
        scores = self.answer_scores(model, item_seq[head], item_seq_len[head], stamps, items[rows])
        out = torch.empty(len(items), device=scores.device)
        out[rows.flatten()] = scores.flatten()
        return out

    def full_sort_predict(self, model: Speeder, interaction) -> torch.Tensor:
        """Full ranking: the score-mode head lists its top-N items, the LLM answers among them; -inf elsewhere."""
        item_seq, item_seq_len, timestamps = model.inputs(interaction)
        item_tokens = model.item_tokens()
        retrieval = model.forward(item_seq, item_seq_len, timestamps, item_tokens) @ model.item_vectors(item_tokens).T
        retrieval[:, 0] = float("-inf")
        n = min(self.n_candidates, model.n_items - 1)
        candidates = retrieval.topk(n, dim=1).indices
        users = interaction[model.USER_ID] if model.USER_ID in interaction else torch.zeros_like(item_seq_len)
        candidates = candidates.gather(1, listing_order(users, n, self.seed))
        scores = self.answer_scores(model, item_seq, item_seq_len, timestamps, candidates)
        return torch.full_like(retrieval, float("-inf")).scatter(1, candidates, scores)
