"""A stack of identical layers, run unrolled (`layers_0`, `layers_1`, ...) or as one `nn.scan`.

Scanning compiles one layer instead of N (fast compiles for 40-layer towers) and stacks the
parameters along a leading `layers` axis; `blip_jax.models.layout` converts between the two
layouts so a checkpoint written in one can be used in the other. With `remat_policy` each layer is
rematerialised in the backward pass.

A layer is called as `layer(x, *args, cache) -> (x, new_cache)`: `args` are the same for every
layer (masks, encoder states), `cache` is this layer's decoding cache or None. A block with an
`index` field is told its layer number (unrolled only: scanned layers must be identical). Scanned caches keep
the batch as their leading axis and the layer axis second, so generation can reorder beams
with a gather on axis 0 whatever the layout.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import linen as nn

REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class LayerStack(nn.Module):
    block: Any  # an nn.Module class
    block_args: Any  # dict of the block's attributes
    num_layers: int
    scan: bool = False
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, x, *args, cache=None):
        block = self.block
        if self.remat_policy != "none":
            block = nn.remat(block, policy=REMAT[self.remat_policy], prevent_cse=not self.scan)
        if self.scan:
            scanned = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast,) * len(args) + (1,),
                out_axes=1,
                length=self.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            return scanned(**self.block_args, name="layers")(x, *args, cache)
        new_cache = [] if cache is not None else None
        numbered = "index" in getattr(self.block, "__dataclass_fields__", {})
        for i in range(self.num_layers):
            x, layer_cache = block(**self.block_args, **({"index": i} if numbered else {}), name=f"layers_{i}")(
                x, *args, None if cache is None else cache[i]
            )
            if cache is not None:
                new_cache.append(layer_cache)
        return x, new_cache
