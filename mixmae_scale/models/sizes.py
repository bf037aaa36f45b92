"""Published and toolkit-internal model shapes.

B, L and H follow MixMAE's Swin/W14 table; `tiny` is this toolkit's own few-million-parameter model
for the CPU demo and tests (96 px, so the final grid is 3x3 cells of 32 px).
"""

from __future__ import annotations

ARCH_FIELDS = ("embed_dim", "depths", "num_heads", "window_size", "decoder_dim", "decoder_depth",
               "decoder_heads")

SIZES: dict[str, dict] = {
    "tiny": dict(embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=[12, 12, 6, 3],
                 decoder_dim=128, decoder_depth=2, decoder_heads=4),
    "base": dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=[14, 14, 14, 7],
                 decoder_dim=512, decoder_depth=8, decoder_heads=16),
    "large": dict(embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48],
                  window_size=[14, 14, 14, 7], decoder_dim=512, decoder_depth=8, decoder_heads=16),
    "huge": dict(embed_dim=352, depths=[2, 2, 18, 2], num_heads=[11, 22, 44, 88],
                 window_size=[14, 14, 14, 7], decoder_dim=512, decoder_depth=8, decoder_heads=16),
}
