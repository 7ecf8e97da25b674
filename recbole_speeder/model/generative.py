"""Speeder's generative mode (``predict_mode: generate``): the LLM reads N candidates and answers with one.

The prompt continues the one Speeder already packs (instruction prefix, history blocks, suffix) with
``<generate_candidates_text> [A][item] [B][item] ... <generate_answer_text>``; an item is its MRC soft
token(s), or its text tokens with ``item_repr: text`` (there the list is LLaRA-style, ``; title ; title``, and
the answer is a title plus an end token). With ``generate_answer: item`` the answer is the item's own token of a
vocabulary extended by the catalogue, its output embedding the item's score-mode vector, and ``generate_copy`` adds
a pointer's score to the items the prompt lists (``CandidatePointer``). Training: the true next
item and N-1 negatives per row (drawn from a generator seeded by ``seed``, positions shuffled), language-model loss
on the answer tokens only, plus the score-mode loss read at the history's end of the same forward
(``generate_score_loss_weight``). With ``train_all_positions`` a training row is a window of the tiling training
set: the score-mode loss trains every position of it, as in score mode, and the answer is its last target's (one
answer per window instead of one per target: the candidate list, ~45 tokens, is what an answer costs).

Decoders: ``constrained`` takes the argmax over the N candidates (label- or item-token logits at the answer
position; in text mode each title's log-likelihood), so every answer is valid; ``free`` takes the argmax over every
word and item (item answers), or greedy-decodes text and parses it (``generate_validity``: the answer is a title,
or LLaRA's rule, exactly one title occurs in it), and an answer that names no candidate is invalid. Only the logits
that are needed are computed: label or answer positions, never the full vocabulary at every position.

RecBole reaches the model through ``predict`` (one row per (user, candidate): its sampled evaluation repeats a
user's row once per candidate, all in one batch) and ``full_sort_predict``; both return scores its evaluator
ranks. ``predict`` regroups the rows by history, shows each user its own N rows as the candidate list (in an
order seeded by the user id, so the true item has no fixed label) and returns each candidate's answer score.
``full_sort_predict`` lists the top-N items of the score-mode head. A free answer puts its candidate first
(score 1, the rest by their first answer token's log-prob); an invalid one gives all ``-inf``, which
``SpeederTrainer`` turns into a miss at every cut-off and the ``VHR``/``ValidRatio``/``HR`` metrics count as
not valid (``recbole_speeder/metrics.py``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from logging import getLogger

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from recbole_speeder.config_schema import GENERATE_LABELS
from recbole_speeder.errors import UsageError
from recbole_speeder.model.prompt import dense_batch, item_reads, pack_layout, slot_items, text_token_ids
from recbole_speeder.protocol import candidate_count, check_list_batches

LABEL_SETS = dict(zip(GENERATE_LABELS, ([chr(ord("A") + i) for i in range(26)], [str(i + 1) for i in range(99)]),
                      strict=True))
ORDER_SEED_STRIDE = 1_000_003


def history_groups(users: torch.Tensor, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
    """Group id per row: rows with the same user and history share one prompt."""
    key = torch.cat([users.unsqueeze(1), item_seq_len.unsqueeze(1), item_seq], dim=1)
    return torch.unique(key, dim=0, return_inverse=True)[1]


def distinct_histories(users, item_seq, item_seq_len) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first row of each distinct history, in row order; group id per row)``: RecBole's sampled evaluation
    repeats a user's row once per candidate, and one prompt per history is enough to score them all. Groups keep
    the rows' order, so a batch without repeats runs exactly as given (same floating-point sums)."""
    groups = history_groups(users, item_seq, item_seq_len)
    rows = torch.arange(len(groups), device=groups.device)
    first = torch.full((int(groups.max()) + 1,), len(groups), device=groups.device)
    first = first.scatter_reduce(0, groups, rows, reduce="amin")
    order = first.argsort()
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))
    return first[order], rank[groups]


def listing_order(keys: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """A permutation of ``n`` candidate slots per key (user id), the same for every model and run with ``seed``."""
    perms = [
        torch.randperm(n, generator=torch.Generator().manual_seed(seed * ORDER_SEED_STRIDE + key))
        for key in keys.tolist()
    ]
    return torch.stack(perms).to(keys.device)


def normalise_answer(text: str) -> str:
    """Case-folded words without punctuation: the form in which free answers are matched to candidates."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def named_candidate(answer: str, titles: list[str], rule: str) -> int:
    """Slot of the candidate a normalised free answer names among normalised ``titles``, or -1 (invalid).

    ``exact``: the answer is a candidate's title. ``llara`` (LLaRA's ``calculate_hr1``): exactly one candidate's
    title occurs in the answer. As there, every candidate whose title is a substring of the answer counts, so an
    answer holding a title that contains another candidate's title ("lip gloss set" with "lip gloss" also
    listed), or naming two candidates of one title, is invalid. An empty title never counts.
    """
    if rule == "exact":
        return titles.index(answer) if answer and answer in titles else -1
    named = [slot for slot, title in enumerate(titles) if title and title in answer]
    return named[0] if len(named) == 1 else -1


@dataclass
class _Prompt:
    """Candidate prompts after the instruction prefix, as their real tokens, and the slots read from them."""

    values: torch.Tensor  # [T, d] input embeddings of the real tokens
    where: tuple[torch.Tensor, torch.Tensor]  # their (row, slot)
    lengths: torch.Tensor  # [B] slots per prompt
    items: torch.Tensor  # [B, max(lengths)] history item of each slot (``prompt.slot_items``: SPAE's distance bias)
    item_end: torch.Tensor  # [B, L] slot of each history item's last token, -1 past the history (all positions)
    history_end: torch.Tensor  # [B] slot of the history's last token (score-mode readout of the row's target)
    cue_end: torch.Tensor  # [B] slot of the answer cue's last token: the answer's first token is read there
    candidate_end: torch.Tensor  # [B, N] slot of each listed candidate's last token (``generate_copy: pointer``)

    def dense(self) -> torch.Tensor:
        return dense_batch(self.values, self.where, len(self.lengths), int(self.lengths.max()))


@dataclass
class _Decoding:
    """A prompt already run through the LLM, ready to continue: cache, what its attention mask is built from (tokens
    after the prefix), next position, last state."""

    cache: DynamicCache
    items: torch.Tensor  # [B, slots] history item of each token (``prompt.slot_items``)
    valid: torch.Tensor  # [B, slots] True on real tokens
    next_position: torch.Tensor  # [B]
    last: torch.Tensor  # [B, d] hidden state of the prompt's last token


class CandidatePointer(nn.Module):
    """``generate_copy``: a score added to the answer logit of each item the prompt lists, as a pointer-generator
    network copies from its input. The item logits alone are one dot product with the answer state, which cannot
    favour N arbitrary items at once, so without it a free answer is the catalogue's top item, rarely a listed one.

    ``bias``: one learned bonus for every listed item. It starts at log(vocabulary + catalogue size), where the N
    listed items together hold about N/(N+1) of the answer mass: Adam moves it by about the learning rate per
    step, and a CPU run has a few hundred steps. ``pointer``: plus a bilinear match of the answer state with
    each candidate's own state in the prompt (its last token, which has read the history and the list before it);
    the match starts at zero, so training starts from ``bias``. A candidate listed twice gets both slots' scores.
    """

    def __init__(self, d_model: int, n_answer_tokens: int, kind: str):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(math.log(n_answer_tokens)))
        self.match = nn.Linear(d_model, d_model, bias=False) if kind == "pointer" else None
        if self.match is not None:
            nn.init.zeros_(self.match.weight)

    @property
    def reads_candidates(self) -> bool:
        return self.match is not None

    def forward(self, answer: torch.Tensor, n: int, candidate_states: torch.Tensor | None) -> torch.Tensor:
        """Scores ``[R, n]`` of answer states ``[R, d]`` for their ``n`` listed candidates (states ``[R, n, d]``)."""
        scores = self.bias.float().expand(len(answer), n)
        if self.match is None:
            return scores
        query = self.match(answer.float())
        return scores + (candidate_states.float() @ query.unsqueeze(-1)).squeeze(-1) / math.sqrt(query.shape[-1])


class GenerativeAnswerer(nn.Module):
    """Builds candidate prompts, trains the answer and decodes it, for the Speeder model passed to each call.

    Holds token ids (buffers), the training sampler and the pointer (``generate_copy``, trained with the head); the
    model is an argument, never a submodule.
    """

    def __init__(self, config, dataset, tokenizer, item_repr: str, d_model: int, vocabulary: int):
        super().__init__()
        self.decoder = config["generate_decoder"]
        self.answer = config["generate_answer"]
        self.copy = config["generate_copy"]
        self.item_repr = item_repr
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
            int(config["generate_max_new_tokens"]) if item_repr == "mrc" else int(config["max_item_text_tokens"]) + 1
        )

        self.register_buffer("header_ids", text_token_ids(tokenizer, config["generate_candidates_text"]), False)
        self.register_buffer("cue_ids", text_token_ids(tokenizer, config["generate_answer_text"]), False)
        labels = LABEL_SETS[config["generate_labels"]][: self.max_candidates]
        if item_repr == "mrc":
            self.register_buffer("label_ids", self._single_tokens(labels, config["generate_labels"]), False)
            self.labels = {label.casefold(): i for i, label in enumerate(labels)}
        separator = text_token_ids(tokenizer, config["generate_separator"])
        if item_repr == "text" and separator.numel() != 1:
            raise UsageError(f"generate_separator '{config['generate_separator']}' must be one token of the backbone")
        self.separator_id = int(separator[0]) if separator.numel() else None
        self.end_id = next(
            (t for t in (tokenizer.eos_token_id, tokenizer.sep_token_id, self.separator_id) if t is not None), None
        )

        self.n_items = dataset.item_num
        self.generator = torch.Generator().manual_seed(self.seed)
        sampling = config["generate_train_sampling"] or (config["test_neg_sample_args"] or {}).get("distribution")
        self.train_weights = None
        if sampling == "popularity":
            counts = torch.bincount(dataset.inter_feat[dataset.iid_field], minlength=dataset.item_num).double()
            counts[0] = 0
            self.train_weights = counts
        self.pointer = (
            CandidatePointer(d_model, vocabulary + dataset.item_num - 1, self.copy) if self.copy != "none" else None
        )
        self.generated_tokens = 0
        getLogger().info(
            f"generative mode: {self.n_candidates} candidates per training prompt "
            f"({'popularity' if self.train_weights is not None else 'uniform'} negatives), {self.decoder} decoder"
        )

    # ------------------------------------------------------------------ checks
    def _check(self, config) -> None:
        """What depends on the evaluation lists; each key's own values were checked with the config."""
        if self.validity == "llara" and self.item_repr == "mrc":
            raise UsageError("generate_validity: llara finds candidate titles in the answer: it needs item_repr: text")
        if self.answer == "item" and self.item_repr != "mrc":
            raise UsageError("generate_answer: item answers with an MRC item token: it needs item_repr: mrc")
        if self.copy != "none" and self.answer != "item":
            raise UsageError(f"generate_copy: {self.copy} scores listed item tokens: it needs generate_answer: item")
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

    # ------------------------------------------------------------------ prompt
    def _lead_ids(self, candidates: torch.Tensor) -> torch.Tensor:
        """Token before each candidate: its label, or the list separator in text mode."""
        if self.item_repr == "mrc":
            return self.label_ids[: candidates.shape[1]].expand_as(candidates)
        return torch.full_like(candidates, self.separator_id)

    def _section(self, model, candidates, item_tokens, answer_ids, answer_len) -> tuple[
        torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor
    ]:
        """``header, N candidate blocks, cue, answer`` per row: embeddings of its real tokens ``[T, d]``, their
        ``(row, slot)`` counted from the section's start, the section lengths and each block's last slot."""
        batch, n = candidates.shape
        n_header, n_cue = self.header_ids.numel(), self.cue_ids.numel()
        content = model.content_lengths(candidates, item_tokens, model.served_items)  # as served, in every stage
        blocks = torch.cat(
            [
                torch.full((batch, 1), n_header, device=candidates.device),
                1 + content,
                torch.full((batch, 1), n_cue, device=candidates.device),
                answer_len.unsqueeze(1),
            ],
            dim=1,
        )
        layout = pack_layout(blocks, 0)
        lengths = layout.last + 1
        real = torch.arange(layout.n_slots, device=lengths.device) < lengths.unsqueeze(1)
        rows, slots = real.nonzero(as_tuple=True)
        block, offset = layout.item_index[rows, slots], layout.offset[rows, slots]
        listed = (block - 1).clamp(0, n - 1)
        in_candidate = (block >= 1) & (block <= n)
        item = candidates[rows, listed]
        lead = self._lead_ids(candidates)[rows, listed]
        in_content = in_candidate & (offset >= 1)
        content_offset = (offset - 1).clamp(min=0)

        ids = torch.zeros_like(block)
        if n_header:
            ids = torch.where(block == 0, self.header_ids[offset.clamp(max=n_header - 1)], ids)
        if n_cue:
            ids = torch.where(block == n + 1, self.cue_ids[offset.clamp(max=n_cue - 1)], ids)
        if answer_ids.shape[1]:
            ids = torch.where(block == n + 2, answer_ids[rows, offset.clamp(max=answer_ids.shape[1] - 1)], ids)
        ids = torch.where(in_candidate & (offset == 0), lead, ids)
        values = model.slot_embeddings(ids, item, in_content, content_offset, item_tokens, model.served_items)
        return values, (rows, slots), lengths, layout.item_end

    def _prompt(self, model, item_seq, item_seq_len, timestamps, item_tokens, candidates, answer_ids=None,
                answer_len=None) -> _Prompt:
        """The whole prompt after the prefix: the history as Speeder packs it, then the candidate section."""
        values, (rows, slots), layout = model._prompt_tokens(item_seq, item_seq_len, timestamps, item_tokens)
        if answer_ids is None:
            answer_ids = torch.zeros(len(candidates), 0, dtype=torch.long, device=candidates.device)
            answer_len = torch.zeros(len(candidates), dtype=torch.long, device=candidates.device)
        section, (section_rows, section_slots), section_len, block_end = self._section(
            model, candidates, item_tokens, answer_ids, answer_len
        )
        n = candidates.shape[1]
        history_len = layout.last + 1
        model.prompt_token_stats["tokens"] += int((section_len - answer_len).sum())
        lengths = history_len + section_len
        return _Prompt(
            values=torch.cat([values, section]),
            where=(torch.cat([rows, section_rows]), torch.cat([slots, history_len[section_rows] + section_slots])),
            lengths=lengths,
            items=slot_items(layout, item_seq_len, int(lengths.max())),
            item_end=item_reads(layout, item_seq_len),
            history_end=layout.last,
            cue_end=history_len + block_end[:, n + 1],
            candidate_end=history_len.unsqueeze(1) + block_end[:, 1 : n + 1],
        )

    # ------------------------------------------------------------------ answers
    def _answer_tokens(self, model, items: torch.Tensor, listed_at: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The answer naming ``items``, as token ids ``[B, T]`` and lengths: its item token, its label, or its text +
        end token."""
        if self.answer == "item":
            return self._item_token_ids(model, items).unsqueeze(1), torch.ones_like(items)
        if self.item_repr == "mrc":
            return self.label_ids[listed_at].unsqueeze(1), torch.ones_like(items)
        length = model.item_text_len[items]
        ids = torch.cat([model.item_text_ids[items, : int(length.max())], torch.zeros_like(items).unsqueeze(1)], dim=1)
        ids = ids.scatter(1, length.unsqueeze(1), torch.full_like(length.unsqueeze(1), self.end_id))
        return ids, length + 1

    def _lm_logits(self, model, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """LM-head logits of ``hidden [..., d]``, for ``token_ids`` only when given (the tied head's rows)."""
        head = model.llm.get_output_embeddings()
        weight = head.weight if token_ids is None else head.weight[token_ids]
        bias = getattr(head, "bias", None)
        if bias is not None and token_ids is not None:
            bias = bias[token_ids]
        return F.linear(hidden.to(weight.dtype), weight, bias).float()

    @staticmethod
    def _item_token_ids(model, items: torch.Tensor) -> torch.Tensor:
        """Token id of each item in the vocabulary extended by the catalogue (``generate_answer: item``): the
        text vocabulary's ids first, then one token per real item (1..n-1) in item order."""
        return model.llm.get_output_embeddings().weight.shape[0] + items - 1

    def _answer_logits(
        self, model, hidden: torch.Tensor, item_tokens: torch.Tensor, candidates: torch.Tensor | None = None,
        candidate_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token logits of answer states ``hidden [R, d]``: the text vocabulary's, and with ``generate_answer:
        item`` every catalogue item's after them, whose output embedding is its score-mode vector read through the
        score head (``Speeder._user_vectors``), so one softmax chooses between words and items; with
        ``generate_copy``, the items listed (``candidates [R, N]``, their prompt states ``[R, N, d]``) get the
        pointer's score on top."""
        logits = self._lm_logits(model, hidden)
        if self.answer != "item":
            return logits
        items = (model._user_vectors(hidden) @ model._item_vectors(item_tokens)[1:].T).float()
        if self.pointer is not None:
            copy = self.pointer(hidden, candidates.shape[1], candidate_states)
            items = items.scatter_add(1, candidates - 1, copy)
        return torch.cat([logits, items], dim=-1)

    def _candidate_reads(self, prompt: _Prompt) -> torch.Tensor:
        """Slots read for the pointer's match: each candidate's last token, or none."""
        if self.pointer is not None and self.pointer.reads_candidates:
            return prompt.candidate_end
        return prompt.candidate_end[:, :0]

    # ------------------------------------------------------------------ training
    def _draw_items(self, count: int) -> torch.Tensor:
        if self.train_weights is not None:
            return torch.multinomial(self.train_weights, count, replacement=True, generator=self.generator)
        return torch.randint(1, self.n_items, (count,), generator=self.generator)

    def _training_candidates(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """True item + N-1 negatives per row, in a shuffled order; returns them and the true item's slot."""
        batch, n, target = len(targets), self.n_candidates, targets.cpu()
        negatives = self._draw_items(batch * (n - 1)).view(batch, n - 1)
        clash = negatives == target.unsqueeze(1)
        while clash.any():
            negatives[clash] = self._draw_items(int(clash.sum()))
            clash = negatives == target.unsqueeze(1)
        candidates = torch.cat([target.unsqueeze(1), negatives], dim=1)
        order = torch.rand(batch, n, generator=self.generator).argsort(dim=1)
        listed_at = (order == 0).long().argmax(dim=1)
        return candidates.gather(1, order).to(targets.device), listed_at.to(targets.device)

    def loss(self, model, interaction) -> torch.Tensor:
        """LM loss on the answer naming the true item among N candidates (+ the weighted score-mode loss).

        One forward gives both: the score-mode states are read in the history, before the candidate section, which
        causal attention keeps them from seeing. With ``train_all_positions`` they are read after every history
        item (a window of the tiling training set, as in score mode), and the answer is the window's last target's.
        """
        item_seq, item_seq_len, timestamps = model._inputs(interaction)
        targets = interaction[model.POS_ITEM_ID]
        candidates, listed_at = self._training_candidates(targets)
        item_tokens = model.item_tokens()
        answer, answer_len = self._answer_tokens(model, targets, listed_at)
        teacher = answer[:, :-1] if answer.shape[1] > 1 else answer[:, :0]
        prompt = self._prompt(
            model, item_seq, item_seq_len, timestamps, item_tokens, candidates, teacher, answer_len - 1
        )
        steps = torch.arange(answer.shape[1], device=answer.device)
        reads = (prompt.cue_end.unsqueeze(1) + steps).minimum((prompt.lengths - 1).unsqueeze(1))
        listed_reads = self._candidate_reads(prompt)
        reads = torch.cat([reads, listed_reads], dim=1)  # before the history's reads, whose trailing -1s are skipped
        if self.score_loss_weight:
            history = prompt.item_end if model.train_all_positions else prompt.history_end.unsqueeze(1)
            reads = torch.cat([reads, history], dim=1)
        states = model._hidden_states(prompt.values, prompt.where, prompt.lengths, reads, prompt.items)
        real = steps < answer_len.unsqueeze(1)
        n_read = len(steps) + listed_reads.shape[1]
        with model._autocast():  # training logits, as score mode's: the full vocabulary at every answer token
            logits = self._answer_logits(  # item answers are one token: the copy's rows are the batch's
                model, states[:, : len(steps)][real], item_tokens, candidates, states[:, len(steps) : n_read]
            )
        loss = F.cross_entropy(logits, answer[real])
        if self.score_loss_weight:
            history_states = states[:, n_read:]
            if not model.train_all_positions:
                history_states = history_states[:, 0]
            score = model._score_loss(history_states, item_seq, item_seq_len, targets, item_tokens)
            loss = loss + self.score_loss_weight * score
        return loss

    # ------------------------------------------------------------------ decoding
    def _prompt_forward(self, model, embeds: torch.Tensor, items: torch.Tensor, lengths: torch.Tensor) -> _Decoding:
        """Run right-padded prompts with their padding masked, keeping the cache to continue from each one's end."""
        batch, n_slots = embeds.shape[:2]
        n_prefix = model.prefix_ids.numel()
        cache = DynamicCache(config=model.llm.config)
        offset = n_prefix
        if n_prefix and model.prefix_cache:
            for layer, (keys, values) in enumerate(model._prefix_key_values()):
                cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), layer)
            offset = 0
        elif n_prefix:
            prefix = model.llm.get_input_embeddings()(model.prefix_ids).float().expand(batch, -1, -1)
            embeds = torch.cat([prefix, embeds], dim=1)
        real = torch.arange(n_slots, device=embeds.device) < lengths.unsqueeze(1)
        with model._autocast():  # the precision of the cached prefix and of every other backbone call
            last = model._decode_at(
                embeds.to(model.backbone_dtype),
                cache,
                (offset + lengths - 1).unsqueeze(1),
                model.backbone_mask(items, embeds.shape[1], real),
            )
        return _Decoding(cache, items, real, n_prefix + lengths, last[:, 0].float())

    def _continue(self, model, state: _Decoding, token_ids: torch.Tensor) -> torch.Tensor:
        """Feed ``token_ids [B, T]`` after each prompt's end; returns their hidden states ``[B, T, d]``."""
        steps = torch.arange(token_ids.shape[1], device=token_ids.device)
        # generated tokens come after the history, like the rest of the prompt's end: the same item index
        state.items = torch.cat([state.items, state.items[:, -1:].expand_as(token_ids)], dim=1)
        state.valid = torch.cat([state.valid, torch.ones_like(token_ids, dtype=torch.bool)], dim=1)
        with model._autocast():
            out = model.llm.get_decoder()(
                inputs_embeds=model.llm.get_input_embeddings()(token_ids),
                attention_mask=model.backbone_mask(state.items, token_ids.shape[1], state.valid),
                position_ids=state.next_position.unsqueeze(1) + steps,
                cache=state.cache,
                use_cache=True,
            )
        state.next_position = state.next_position + token_ids.shape[1]
        return out.last_hidden_state.float()

    def _greedy(self, model, state: _Decoding, first: torch.Tensor) -> list[list[int]]:
        """Greedy continuation from ``first`` tokens; each row stops at the end token or the list separator."""
        stops = torch.tensor([t for t in (self.end_id, self.separator_id) if t is not None], device=first.device)
        tokens, done = [first], torch.isin(first, stops)
        for _ in range(1, self.max_new_tokens):
            if bool(done.all()):
                break
            hidden = self._continue(model, state, tokens[-1].unsqueeze(1))
            step = self._lm_logits(model, hidden[:, -1]).argmax(dim=-1)
            tokens.append(step)
            done = done | torch.isin(step, stops)
        rows = torch.stack(tokens, dim=1).tolist()
        answers = []
        for row in rows:
            end = next((i for i, t in enumerate(row) if t in stops.tolist()), None)
            self.generated_tokens += len(row) if end is None else end + 1
            answers.append(row if end is None else row[:end])
        return answers

    def _parse(self, model, answers: list[list[int]], candidates: torch.Tensor) -> torch.Tensor:
        """Listing slot each free answer names, or -1 when it names none."""
        choice = []
        for row, listed in zip(answers, candidates.tolist(), strict=True):
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            if self.item_repr == "mrc":
                word = re.match(r"\W*(\w+)", text)
                slot = self.labels.get(word.group(1).casefold(), -1) if word else -1
                choice.append(slot if slot < len(listed) else -1)
            else:
                titles = [normalise_answer(self._title(model, item)) for item in listed]
                choice.append(named_candidate(normalise_answer(text), titles, self.validity))
        return torch.tensor(choice, device=candidates.device)

    def _title(self, model, item: int) -> str:
        return self.tokenizer.decode(model.item_text_ids[item, : model.item_text_len[item]], skip_special_tokens=True)

    def _title_scores(self, model, state: _Decoding, candidates: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """Text mode, constrained: each candidate's answer (title + end) log-likelihood, one user at a time."""
        batch, n = candidates.shape
        scores = torch.empty(batch, n, device=candidates.device)
        for row in range(batch):
            answer, length = self._answer_tokens(model, candidates[row], torch.zeros_like(candidates[row]))
            logprob = first[row, answer[:, 0]]
            per_token = logprob.unsqueeze(1).expand(-1, answer.shape[1]).clone()
            if answer.shape[1] > 1:
                user = _Decoding(DynamicCache(config=model.llm.config), state.items[row : row + 1].expand(n, -1),
                                 state.valid[row : row + 1].expand(n, -1), state.next_position[row : row + 1].expand(n),
                                 state.last[row : row + 1])
                for layer, cached in enumerate(state.cache.layers):
                    user.cache.update(cached.keys[row : row + 1].expand(n, -1, -1, -1),
                                      cached.values[row : row + 1].expand(n, -1, -1, -1), layer)
                hidden = self._continue(model, user, answer[:, :-1])
                later = torch.arange(1, answer.shape[1], device=answer.device) < length.unsqueeze(1)
                following = self._lm_logits(model, hidden[later]).log_softmax(dim=-1)
                per_token[:, 1:][later] = following.gather(1, answer[:, 1:][later].unsqueeze(1)).squeeze(1)
            real = torch.arange(answer.shape[1], device=answer.device) < length.unsqueeze(1)
            total = (per_token * real).sum(dim=1)
            scores[row] = total / length if self.title_score == "mean" else total
        return scores

    def _first_answer_ids(self, model, candidates: torch.Tensor) -> torch.Tensor:
        """First answer token of each candidate: its label, or the first token of its text."""
        if self.item_repr == "mrc":
            return self.label_ids[: candidates.shape[1]].expand_as(candidates)
        return model.item_text_ids[candidates, 0]

    def answer_scores(self, model, item_seq, item_seq_len, timestamps, candidates: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, N]`` of the listed candidates (listing order): see the module docstring."""
        item_tokens = model.item_tokens()
        prompt = self._prompt(model, item_seq, item_seq_len, timestamps, item_tokens, candidates)
        if self.item_repr == "mrc" and (self.decoder == "constrained" or self.answer == "item"):
            reads = torch.cat([prompt.cue_end.unsqueeze(1), self._candidate_reads(prompt)], dim=1)
            states = model._hidden_states(prompt.values, prompt.where, prompt.lengths, reads, prompt.items)
            if self.answer == "label":
                return self._lm_logits(model, states[:, 0], self.label_ids[: candidates.shape[1]]).log_softmax(dim=-1)
            return self._item_answer_scores(model, states[:, 0], item_tokens, candidates, states[:, 1:])
        state = self._prompt_forward(model, prompt.dense(), prompt.items, prompt.lengths)
        first = self._lm_logits(model, state.last).log_softmax(dim=-1)
        if self.decoder == "constrained":
            return self._title_scores(model, state, candidates, first)
        scores = first.gather(1, self._first_answer_ids(model, candidates))
        choice = self._parse(model, self._greedy(model, state, first.argmax(dim=-1)), candidates)
        return self._mark_answers(scores, choice)

    def _item_answer_scores(self, model, last: torch.Tensor, item_tokens: torch.Tensor, candidates: torch.Tensor,
                            candidate_states: torch.Tensor):
        """``generate_answer: item``: the candidates' item-token log-probs at the answer position. Constrained: the
        argmax over them. Free: the argmax over the whole extended vocabulary (every word and every catalogue item)
        is the answer, valid only when it is a listed candidate's item token."""
        logprobs = self._answer_logits(model, last, item_tokens, candidates, candidate_states).log_softmax(dim=-1)
        listed = self._item_token_ids(model, candidates)
        scores = logprobs.gather(1, listed)
        if self.decoder == "constrained":
            return scores
        self.generated_tokens += len(candidates)
        named = listed == logprobs.argmax(dim=-1, keepdim=True)
        choice = torch.where(named.any(dim=1), named.long().argmax(dim=1), -1)
        return self._mark_answers(scores, choice)

    @staticmethod
    def _mark_answers(scores: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """A free answer's candidate first (score 1, above every log-prob), the rest by ``scores``; a row whose
        answer names no candidate (``choice`` -1) all ``-inf``: a miss."""
        rows = torch.arange(len(choice), device=choice.device)
        scores[rows[choice >= 0], choice[choice >= 0]] = 1.0
        scores[choice < 0] = float("-inf")
        return scores

    # ------------------------------------------------------------------ RecBole API
    def predict(self, model, interaction) -> torch.Tensor:
        """One score per (user, candidate) row; each user's rows are its candidate list."""
        item_seq, item_seq_len, timestamps = model._inputs(interaction)
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

    def full_sort_predict(self, model, interaction) -> torch.Tensor:
        """Full ranking: the score-mode head lists its top-N items, the LLM answers among them; -inf elsewhere."""
        item_seq, item_seq_len, timestamps = model._inputs(interaction)
        item_tokens = model.item_tokens()
        retrieval = model.forward(item_seq, item_seq_len, timestamps, item_tokens) @ model._item_vectors(item_tokens).T
        retrieval[:, 0] = float("-inf")
        n = min(self.n_candidates, model.n_items - 1)
        candidates = retrieval.topk(n, dim=1).indices
        users = interaction[model.USER_ID] if model.USER_ID in interaction else torch.zeros_like(item_seq_len)
        candidates = candidates.gather(1, listing_order(users, n, self.seed))
        scores = self.answer_scores(model, item_seq, item_seq_len, timestamps, candidates)
        return torch.full_like(retrieval, float("-inf")).scatter(1, candidates, scores)
