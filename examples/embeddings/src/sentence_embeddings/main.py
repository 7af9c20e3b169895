"""Sentence embeddings from a real model: MiniLM (sentence-transformers/all-MiniLM-L6-v2).

The tokenizer and the encoder are both injected from the ``minilm`` model of endpoint.toml:
the runtime downloads the snapshot from the hub once, loads it with ``AutoTokenizer`` and
``AutoModel`` (the annotated types), places the model on the request's device and keeps both
cached between requests. The function only does what sentence-transformers' MiniLM recipe
does after the encoder: mean pooling over the real tokens, then L2 normalisation, so the dot
product of two embeddings is their cosine similarity.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
import torch
from transformers import AutoModel, AutoTokenizer

from gen_worker import ModelRef, ModelRefSource, RequestContext, worker_function
from gen_worker.errors import ValidationError

#: More texts than this in one request are refused, so one caller cannot take all the memory.
MAX_TEXTS = 256
#: MiniLM was trained on sequences of up to 256 word pieces; longer texts are truncated.
MAX_TOKENS = 256


class Input(msgspec.Struct):
    texts: list[str]


class Output(msgspec.Struct):
    #: One unit-length vector per text, in the order of ``texts``.
    embeddings: list[list[float]]
    dim: int


@worker_function()
def embed(
    ctx: RequestContext,
    tokenizer: Annotated[AutoTokenizer, ModelRef(ModelRefSource.FIXED, "minilm")],
    model: Annotated[AutoModel, ModelRef(ModelRefSource.FIXED, "minilm")],
    payload: Input,
) -> Output:
    """Embed each text as a normalised 384-dimensional vector."""
    if not payload.texts:
        raise ValidationError(f"texts is empty; send between 1 and {MAX_TEXTS} strings")
    if len(payload.texts) > MAX_TEXTS:
        raise ValidationError(
            f"texts holds {len(payload.texts)} strings; send at most {MAX_TEXTS} per request"
        )
    batch = tokenizer(
        payload.texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
    ).to(model.device)
    with torch.inference_mode():
        tokens = model(**batch).last_hidden_state
    # Padding must not count towards the mean: weight each token by its attention mask.
    mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
    pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    vectors = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
    return Output(embeddings=vectors.cpu().tolist(), dim=vectors.shape[1])
