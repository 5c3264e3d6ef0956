"""Branch costs of a .pt2 whose parameter is fed straight to a submodule (Perceiver latents into a
MultiheadAttention): `--prune` died with 'internal error: AssertionError: Expected gradient function to
be set' in torch's FlopCounterMode module tracker (trial finding)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from edgemm.frontends import load_model
from edgemm.prune.fastpath import mha_fastpath_off
from edgemm.prune.formats import prunable_module
from edgemm.prune.measure import branch_costs


class Latents(nn.Module):
    """Perceiver-style: latents cross-attend to patch and token embeddings, then self-attend."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, 4)
        self.tok = nn.Embedding(20, 16)
        self.pos = nn.Parameter(torch.randn(1, 4 + 3, 16))
        self.latents = nn.Parameter(torch.randn(1, 4, 16))
        self.xattn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.self_attn = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
        self.head = nn.Linear(16, 3)

    def forward(self, image, input_ids):
        ctx = torch.cat([self.patch(image).flatten(2).transpose(1, 2), self.tok(input_ids)], 1) + self.pos
        lat = self.latents.expand(image.shape[0], -1, -1)
        lat = lat + self.xattn(lat, ctx, ctx, need_weights=False)[0]
        return self.head(self.self_attn(lat).mean(1))


def test_branch_costs_of_a_pt2_feeding_a_parameter_to_a_submodule(tmp_path):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    feeds = {"image": rng.standard_normal((2, 3, 8, 8)).astype(np.float32),
             "input_ids": rng.integers(0, 20, (2, 3)).astype(np.int64)}
    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.export.export(Latents().eval(), tuple(torch.from_numpy(v) for v in feeds.values()),
                                  dynamic_shapes=({0: batch}, {0: batch}))
    torch.export.save(program, str(tmp_path / "m.pt2"))
    module = prunable_module(load_model(str(tmp_path / "m.pt2")))      # as `--prune` measures it
    with mha_fastpath_off():
        costs = branch_costs(module, ["image", "input_ids"], feeds,
                             {"vision": ["patch"], "text": ["tok"], "fusion": ["xattn", "self_attn", "head"]})
    assert costs["total"]["flops"] > 0 and costs["vision"]["params"] == 3 * 16 * 16 + 16
    assert all(p.requires_grad for p in module.parameters())      # put back as they were
