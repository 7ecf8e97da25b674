"""Turning a generative prompt's states into answers: greedy decoding, parsing free text into a listed candidate,
scoring each candidate's title, and the score rows RecBole's evaluator ranks."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from recbole_speeder.model.runtime import Decoding, Runtime


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


def label_named(text: str, labels: dict[str, int], n: int) -> int:
    """Slot of the candidate whose label a free MRC-mode answer starts with, or -1."""
    word = re.match(r"\W*(\w+)", text)
    slot = labels.get(word.group(1).casefold(), -1) if word else -1
    return slot if slot < n else -1


def mark_answers(scores: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """A free answer's candidate first (score 1, above every log-prob), the rest by ``scores``; a row whose answer
    names no candidate (``choice`` -1) all ``-inf``: a miss."""
    rows = torch.arange(len(choice), device=choice.device)
    scores[rows[choice >= 0], choice[choice >= 0]] = 1.0
    scores[choice < 0] = float("-inf")
    return scores


def greedy(
    runtime: Runtime,
    lm_logits: Callable[[torch.Tensor], torch.Tensor],
    state: Decoding,
    first: torch.Tensor,
    stops: torch.Tensor,
    max_new_tokens: int,
) -> tuple[list[list[int]], int]:
    """Greedy continuation from ``first`` tokens; each row stops at a ``stops`` token. Returns each row's tokens
    before its stop and the number of tokens generated."""
    tokens, done = [first], torch.isin(first, stops)
    for _ in range(1, max_new_tokens):
        if bool(done.all()):
            break
        hidden = runtime.extend(state, tokens[-1].unsqueeze(1))
        step = lm_logits(hidden[:, -1]).argmax(dim=-1)
        tokens.append(step)
        done = done | torch.isin(step, stops)
    answers, generated = [], 0
    for row in torch.stack(tokens, dim=1).tolist():
        end = next((i for i, t in enumerate(row) if t in stops.tolist()), None)
        generated += len(row) if end is None else end + 1
        answers.append(row if end is None else row[:end])
    return answers, generated


def title_scores(
    runtime: Runtime,
    lm_logits: Callable[[torch.Tensor], torch.Tensor],
    answer_tokens: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    state: Decoding,
    candidates: torch.Tensor,
    first: torch.Tensor,
    reduce: str,
) -> torch.Tensor:
    """Text mode, constrained: each candidate's answer (title + end, ``answer_tokens``) log-likelihood after its
    user's prompt, the ``mean`` or ``sum`` over its tokens; one user at a time."""
    batch, n = candidates.shape
    scores = torch.empty(batch, n, device=candidates.device)
    for row in range(batch):
        answer, length = answer_tokens(candidates[row])
        logprob = first[row, answer[:, 0]]
        per_token = logprob.unsqueeze(1).expand(-1, answer.shape[1]).clone()
        if answer.shape[1] > 1:
            hidden = runtime.extend(runtime.fork(state, row, n), answer[:, :-1])
            later = torch.arange(1, answer.shape[1], device=answer.device) < length.unsqueeze(1)
            following = lm_logits(hidden[later]).log_softmax(dim=-1)
            per_token[:, 1:][later] = following.gather(1, answer[:, 1:][later].unsqueeze(1)).squeeze(1)
        real = torch.arange(answer.shape[1], device=answer.device) < length.unsqueeze(1)
        total = (per_token * real).sum(dim=1)
        scores[row] = total / length if reduce == "mean" else total
    return scores
