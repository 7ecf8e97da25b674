"""MRC, Multimodal Representation Compression: a Mixture of Modality Experts.

Each item's text embedding, image embedding and learned ID embedding go through one expert per modality
into ``mrc_tokens`` soft tokens in the LLM's embedding space; a router mixes the experts per item with a
softmax over the modalities that item has (a missing image is masked out, not zero-filled). The same
tokens are the item's input tokens and its output embedding, so scoring every item is one matmul.
"""

from __future__ import annotations

import torch
from torch import nn

from recbole_speeder.config.choices import MODALITIES

ID_INIT_STD = 0.02


class FeatureExpert(nn.Module):
    """MLP from a frozen feature vector to ``n_tokens`` soft tokens."""

    def __init__(self, in_dim: int, hidden: int, d_model: int, n_tokens: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(in_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, n_tokens * d_model),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


class IdExpert(nn.Module):
    """Learned item-ID embedding of ``id_dim`` widened to ``n_tokens`` soft tokens.

    A narrow table plus one projection keeps the ID signal's size (and every checkpoint) small on large
    catalogues: 12k items x 64 instead of 12k items x 576 for SmolLM2. ``initial`` rows (``id_init: text``)
    replace the random start of the items that have them. ``sparse`` gives the table row-sparse gradients
    (``lazy_id_update``), so an optimizer step can skip the rows a batch did not use.
    """

    def __init__(self, n_items: int, id_dim: int, d_model: int, n_tokens: int,
                 initial: tuple[torch.Tensor, torch.Tensor] | None = None, sparse: bool = False):
        super().__init__()
        self.embedding = nn.Embedding(n_items, id_dim, padding_idx=0, sparse=sparse)
        nn.init.normal_(self.embedding.weight, std=ID_INIT_STD)
        if initial is not None:
            rows, values = initial
            with torch.no_grad():
                self.embedding.weight[rows] = values
        self.proj = nn.Linear(id_dim, n_tokens * d_model)

    def forward(self, item_ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embedding(item_ids))


def principal_components(features: torch.Tensor, present: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, values)``: the ``present`` items' coordinates on the top ``dim`` principal components of their
    ``features``, scaled to the random table's spread, so only the geometry differs from ``id_init: random`` (the
    text-initialised ID table of LLM-ESR and "The Elephant in the Room")."""
    rows = present.nonzero().squeeze(1)
    present_features = features[rows].double()
    centred = present_features - present_features.mean(dim=0)
    _, _, components = torch.linalg.svd(centred, full_matrices=False)
    width = min(dim, components.shape[0])
    values = torch.zeros(len(rows), dim, dtype=torch.float64)
    values[:, :width] = centred @ components[:width].T
    return rows, (values * (ID_INIT_STD / values[:, :width].std())).float()


class MixtureOfModalityExperts(nn.Module):
    """Per-item soft tokens ``[..., n_tokens, d_model]`` from the modalities that are active and present.

    ``features`` maps a modality to ``(embedding [n_items, D], mask [n_items])`` aligned to RecBole ids;
    they are kept as non-persistent buffers, so checkpoints hold only the learned parts.
    """

    def __init__(
        self,
        features: dict[str, tuple[torch.Tensor, torch.Tensor]],
        n_items: int,
        d_model: int,
        n_tokens: int = 1,
        expert_hidden: int = 256,
        router: str = "learned",
        modalities: tuple[str, ...] = MODALITIES,
        token_scale: float = 1.0,
        dropout: float = 0.1,
        id_dim: int = 64,
        id_init: str = "auto",
        id_sparse_grad: bool = False,
    ):
        super().__init__()
        missing = [m for m in modalities if m != "id" and m not in features]
        if missing:
            raise ValueError(f"modalities {missing} are configured but the dataset has no features for them")
        self.modalities = tuple(modalities)
        self.n_tokens, self.d_model, self.router = n_tokens, d_model, router
        self.experts = nn.ModuleDict()
        self.has_any = {}  # a modality no item has (images of a text-only dataset) is never computed
        # id_init auto: the ID table starts from the text features wherever there are any
        has_text = "text" in modalities and bool(features["text"][1].any())
        id_from_text = id_init == "text" or (id_init == "auto" and has_text)
        for name in self.modalities:
            if name == "id":
                mask = torch.ones(n_items, dtype=torch.bool)
                mask[0] = False  # the padding item
                initial = principal_components(*features["text"], id_dim) if id_from_text else None
                self.experts[name] = IdExpert(n_items, id_dim, d_model, n_tokens, initial, id_sparse_grad)
            else:
                embedding, mask = features[name]
                self.register_buffer(f"{name}_features", embedding.float(), persistent=False)
                self.experts[name] = FeatureExpert(embedding.shape[1], expert_hidden, d_model, n_tokens, dropout)
            self.register_buffer(f"{name}_mask", mask.bool(), persistent=False)
            self.has_any[name] = bool(mask.any())
        self.router_score = nn.Linear(d_model, 1)
        self.modality_bias = nn.Parameter(torch.zeros(len(self.modalities)))
        # LayerNorm gain starts at the LLM's own token-embedding scale, so soft tokens look like tokens.
        self.out_norm = nn.LayerNorm(d_model)
        nn.init.constant_(self.out_norm.weight, token_scale)
        self.active = set(self.modalities)

    def set_active(self, modalities: list[str] | tuple[str, ...]) -> None:
        """Restrict the mixture to some modalities (MPO stages); the others get zero weight."""
        unknown = set(modalities) - set(self.modalities)
        if unknown:
            raise ValueError(f"modalities {sorted(unknown)} are not configured; configured: {self.modalities}")
        self.active = set(modalities)

    def _available(self, item_ids: torch.Tensor) -> torch.Tensor:
        """Bool ``[..., M]``: modality m is active and present for the item (never for padding id 0)."""
        columns = []
        for name in self.modalities:
            if name not in self.active:
                present = torch.zeros_like(item_ids, dtype=torch.bool)
            else:
                present = getattr(self, f"{name}_mask")[item_ids]
            columns.append(present)
        return torch.stack(columns, dim=-1)

    def _expert(self, name: str, item_ids: torch.Tensor) -> torch.Tensor:
        if name == "id":
            return self.experts[name](item_ids)
        return self.experts[name](getattr(self, f"{name}_features")[item_ids])

    def forward(self, item_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft tokens ``[..., n_tokens, d_model]`` and router weights ``[..., M]`` for ``item_ids``.

        Only live experts run (active, and present for some item): the others would get zero weight anyway.
        """
        available = self._available(item_ids)
        live = [i for i, name in enumerate(self.modalities) if name in self.active and self.has_any[name]]
        outputs = [self._expert(self.modalities[i], item_ids) for i in live]  # each [..., k*d]
        if self.router == "learned" and outputs:
            pooled = [out.view(*out.shape[:-1], self.n_tokens, self.d_model).mean(-2) for out in outputs]
            logits = torch.cat([self.router_score(p) for p in pooled], dim=-1) + self.modality_bias[live]
        else:
            logits = torch.zeros((*item_ids.shape, len(live)), device=item_ids.device)
        live_weights = torch.softmax(logits.masked_fill(~available[..., live], float("-inf")), dim=-1)
        live_weights = torch.nan_to_num(live_weights, nan=0.0)  # an item with no available modality gets no signal
        terms = [live_weights[..., j : j + 1] * out for j, out in enumerate(outputs)]
        if terms:
            mixed = sum(terms[1:], terms[0])
        else:
            mixed = torch.zeros((*item_ids.shape, self.n_tokens * self.d_model), device=item_ids.device)
        index = torch.tensor(live, dtype=torch.long, device=item_ids.device)
        weights = torch.zeros(available.shape, device=item_ids.device).index_copy(-1, index, live_weights.float())
        tokens = self.out_norm(mixed.view(*item_ids.shape, self.n_tokens, self.d_model))
        return tokens, weights

    @torch.no_grad()
    def router_weights(self, item_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-modality mixture weights of each item, for analysis."""
        _, weights = self(item_ids)
        return {name: weights[..., i] for i, name in enumerate(self.modalities)}
