"""Model FLOPs of the Qwen2.5-VL vision tower, for the benchmarks' TFLOP/s and MFU (2 FLOPs per multiply-add).

Forward only; what counts:

* ``linear``: the patch embedding and every block's qkv, output, gate, up and down projections, 2 x weights x patches;
* ``window_attention``: QK^T and PV of the windowed blocks, 4 x hidden x (patches per window)^2 summed over the
  windows (transformers' ``get_vision_window_index``: ``window_size`` pixels a side, the last window of a row or
  column cut short by the frame's edge);
* ``full_attention``: the same for the full-attention blocks (``fullatt_block_indexes``), whose attention spans one
  temporal step (rows x columns patches) at a time;
* ``merger``: its two linear layers on the merged tokens (``spatial_merge_size``^2 patches each).

Biases, norms, activations and the rotary embedding are not counted.
"""

from __future__ import annotations

from typing import Dict, Sequence


def _sum_of_squares_of_windows(length: int, window: int) -> int:
    """Sum over the windows along one side of ``length`` merged tokens of (tokens in the window)^2."""
    full, rest = divmod(length, window)
    return full * window ** 2 + rest ** 2


def vision_tower_flops(vision_config, grid_thw: Sequence[Sequence[int]]) -> Dict[str, int]:
    """Forward FLOPs of a Qwen2.5-VL vision tower (``vision_config``) on images/videos of ``grid_thw`` (rows of
    temporal steps, patch rows, patch columns; a tensor or lists), by part (see the module docstring) and ``total``."""
    v = vision_config
    hidden, merge = v.hidden_size, v.spatial_merge_size
    unit = merge * merge                              # patches per merged token
    window = v.window_size // merge // v.patch_size   # merged tokens per window side
    patches = window_pairs = step_pairs = 0           # query-key pairs of one windowed / one full block
    grids = grid_thw.tolist() if hasattr(grid_thw, "tolist") else grid_thw
    for steps, rows, cols in ((int(t), int(h), int(w)) for t, h, w in grids):
        patches += steps * rows * cols
        step_pairs += steps * (rows * cols) ** 2
        window_pairs += steps * unit ** 2 * _sum_of_squares_of_windows(rows // merge, window) \
            * _sum_of_squares_of_windows(cols // merge, window)
    full = len(v.fullatt_block_indexes)
    embed = v.in_channels * v.temporal_patch_size * v.patch_size ** 2 * hidden
    per_block = 4 * hidden * hidden + 3 * hidden * v.intermediate_size
    width = unit * hidden                             # the merger's input: the patches of a merged token side by side
    out = dict(linear=2 * patches * (embed + v.depth * per_block),
               window_attention=4 * hidden * (v.depth - full) * window_pairs,
               full_attention=4 * hidden * full * step_pairs,
               merger=2 * (patches // unit) * (width * width + width * v.out_hidden_size))
    out["total"] = sum(out.values())
    return out
