"""Document masking computes each document of a packed row exactly as it would be alone, at any offset in the row.

RoPE makes q.k depend only on the distance between two positions, so with the mask cutting attention at document
boundaries, restarting positions at each document (a `document_positions` switch) would change nothing but
rounding: seen here, at offsets up to 2005, the same 1e-7 either way. No such switch exists for that reason."""
from __future__ import annotations

import torch

from pretrain.model import FLAVORS, Transformer, init_model


def test_a_packed_document_equals_the_document_alone():
    args = FLAVORS["debug"].replace(vocab_size=256)
    model = Transformer(args)
    init_model(model, args, seed=4)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 256, (n,), generator=g) for n in (5, 300, 7)]
    packed = torch.cat(docs)[None]  # (1, 312): the last document starts at position 305
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        logits = model(packed, doc_ids=doc_ids)[0]
        unmasked = model(packed)[0]
        alone = [model(d[None])[0] for d in docs]
    start = 0
    for d, ref in zip(docs, alone):
        torch.testing.assert_close(logits[start:start + len(d)], ref, atol=1e-5, rtol=1e-5)
        start += len(d)
    # the control: without the mask the later documents see the earlier ones
    assert not torch.allclose(unmasked[-7:], alone[-1], atol=1e-3)
