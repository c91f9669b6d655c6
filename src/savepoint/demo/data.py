"""The demo's data: the shipped corpus cut into fixed-length token blocks, and a resumable loader.

>>> blocks = token_blocks(tok, load_corpus(), seq_len=64)
>>> train, held_out = split_blocks(blocks, eval_fraction=0.05)
>>> loader = resumable_loader(train, batch_size=16, seed=0)
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerBase


class TokenBlocks(Dataset[torch.Tensor]):
    """A map-style dataset over the rows of a `[n_blocks, seq_len]` tensor of token ids."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.blocks[index]


def token_blocks(tokenizer: PreTrainedTokenizerBase, text: str, *, seq_len: int) -> torch.Tensor:
    """Tokenize `text` paragraph by paragraph (each ends with EOS) and cut the stream into rows.

    The stream's tail that does not fill a whole row is dropped, so every row is `seq_len` long and
    no padding or attention mask is needed.
    """
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    ids: list[int] = []
    for encoded in tokenizer(paragraphs, add_special_tokens=False, verbose=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    n_blocks = len(ids) // seq_len
    if n_blocks == 0:
        raise ValueError(f"text is too short for one block of {seq_len} tokens ({len(ids)} tokens)")
    return torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


def split_blocks(blocks: torch.Tensor, *, eval_fraction: float = 0.05) -> tuple[TokenBlocks, torch.Tensor]:
    """Training dataset and held-out rows: the last `eval_fraction` of the corpus is never trained on."""
    n_eval = max(1, round(blocks.shape[0] * eval_fraction))
    return TokenBlocks(blocks[:-n_eval]), blocks[-n_eval:]


def resumable_loader(dataset: Dataset[torch.Tensor], *, batch_size: int, seed: int) -> StatefulDataLoader:
    """A shuffling `StatefulDataLoader`, set up the way most training scripts do it.

    Its position (and shuffle order, across epochs) comes back exactly through savepoint's
    `stateful=`; savepoint.formats.stateful explains the torchdata quirks that it corrects. The
    seeded generator keeps the shuffle away from torch's global RNG, which dropout draws from.
    """
    return StatefulDataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,  # equal batch shapes: every step costs the same and losses are comparable
        generator=torch.Generator().manual_seed(seed),
    )


def eval_batches(held_out: torch.Tensor, *, batch_size: int) -> list[torch.Tensor]:
    """The held-out rows in fixed batches (no shuffling, no RNG)."""
    return list(held_out.split(batch_size))
