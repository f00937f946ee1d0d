"""Qwen2.5-VL and Qwen3-VL: a video is temporal steps of 2 frames cut into 14 (16) pixel patches; the vision tower
runs frame-parallel by temporal steps (``integrations/qwen_vision.py``).

* Qwen2.5-VL: one ``<|video_pad|>`` run for the whole video; M-RoPE positions with absolute time
  (``second_per_grid_ts``).
* Qwen3-VL: the processor writes each step as ``<t seconds><|vision_start|> pads <|vision_end|>`` (the time as text);
  interleaved M-RoPE positions (the temporal index only counts the steps); DeepStack: the features of three vision
  layers are added to the hidden states of the visual tokens after the first decoder layers, so every rank adds the
  rows of its own visual tokens.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ..integrations.qwen_vision import (enable_fused_vision_attention, frame_parallel_forward, tower_grid_kwargs,
                                       vision_fields)
from ..video import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, plan_video
from .base import Shard, VideoFamily, patched, visual_slots


class Qwen2_5_VLFamily(VideoFamily):
    model_types = ("qwen2_5_vl",)
    label = "Qwen2.5-VL"
    default_video_settings = dict(min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28, fps=2.0, max_frames=768,
                                  image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD))

    @classmethod
    def model_class(cls):
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    @property
    def feature_token_id(self) -> int:
        return self.config.video_token_id

    @property
    def frames_per_step(self) -> int:
        return self.config.vision_config.temporal_patch_size

    @property
    def video_end_id(self) -> int:
        return self.config.vision_end_token_id  # Qwen3-VL: the template's outer one, after every step's own

    def placeholder(self) -> str:
        return self.tokenizer.convert_ids_to_tokens(self.config.video_token_id)

    def video_text(self, grid_thw, step_times) -> str:
        return self.placeholder()

    def group_tokens(self, grid_thw: torch.Tensor) -> Tuple[int, int]:
        return 1, int(grid_thw.prod()) // self.config.vision_config.spatial_merge_size ** 2

    def positions(self, input_ids: torch.Tensor, video_grid_thw: Optional[torch.Tensor] = None,
                  second_per_grid_t: Optional[float] = None) -> torch.Tensor:
        """3-row M-RoPE positions ``[3, 1, S]`` (transformers' ``get_rope_index``; the video tokens marked as video)."""
        mm_types = (input_ids == self.config.video_token_id).int() * 2
        times = None if second_per_grid_t is None else torch.tensor([second_per_grid_t])
        positions, _ = self.model.model.get_rope_index(input_ids, mm_types, video_grid_thw=video_grid_thw,
                                                       second_per_grid_ts=times)
        return positions

    def plan(self, video, settings: dict, fps: Optional[float] = None, max_frames: Optional[int] = None):
        vcfg = self.config.vision_config
        return plan_video(video, fps=fps if fps is not None else settings.get("fps"),
                          max_frames=max_frames if max_frames is not None else settings.get("max_frames"),
                          min_pixels=settings["min_pixels"], max_pixels=settings["max_pixels"],
                          patch_size=vcfg.patch_size, temporal_patch_size=vcfg.temporal_patch_size,
                          merge_size=vcfg.spatial_merge_size, image_mean=settings["image_mean"],
                          image_std=settings["image_std"])

    def prompt_kwargs(self, inputs: dict, device=None) -> dict:
        ids = inputs["input_ids"].to(device)
        out = dict(input_ids=ids, mm_token_type_ids=(ids == self.config.video_token_id).int() * 2)
        if "video_grid_thw" in inputs:
            out["video_grid_thw"] = inputs["video_grid_thw"].to(device)
            if type(self) is Qwen2_5_VLFamily:
                out["second_per_grid_ts"] = torch.tensor([inputs["second_per_grid_t"]], device=device)
        return out

    def encode_for_model(self, pixels: torch.Tensor, prompt: dict):
        return self.model.model.get_video_features(pixel_values_videos=pixels, video_grid_thw=prompt["video_grid_thw"],
                                                   return_dict=True)

    def encode_pixels(self, pixels: torch.Tensor, grid_thw: torch.Tensor, group=None) -> List[torch.Tensor]:
        visual = self.model.model.visual
        return vision_fields(frame_parallel_forward(visual, pixels, grid_thw, group, visual.config))

    def encode_steps(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> List[torch.Tensor]:
        visual = self.model.model.visual   # the grid's metadata cached on the device: no device->host read
        return vision_fields(visual(pixels, **tower_grid_kwargs(visual, grid_thw, pixels.device)))

    def vision_modules(self) -> List[torch.nn.Module]:
        return [self.model.model.visual]  # the ViT and its merger

    def fuse_vision_attention(self) -> None:
        enable_fused_vision_attention(self.model)

    def vision_parallel(self, group, input_ids):
        """The vision tower's forward split over ``group`` by temporal steps (``frame_parallel_forward``): each
        rank encodes its own steps of the pixels it is given (all rows, or its own)."""
        visual = self.model.model.visual
        forward = visual.forward

        def parallel(hidden_states, grid_thw=None, **kwargs):
            return frame_parallel_forward(forward, hidden_states, grid_thw, group, visual.config, **kwargs)

        return patched(visual, "forward", parallel)


class Qwen3VLFamily(Qwen2_5_VLFamily):
    model_types = ("qwen3_vl",)
    label = "Qwen3-VL"
    decoder_inputs = ("visual_pos_masks", "deepstack_visual_embeds")
    default_video_settings = dict(min_pixels=128 * 32 * 32, max_pixels=768 * 32 * 32, fps=2.0, max_frames=768,
                                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])

    @classmethod
    def model_class(cls):
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration

    def video_text(self, grid_thw: torch.Tensor, step_times: Optional[Sequence[float]]) -> str:
        """Each temporal step as the processor writes it: its time (the mean of its frames' times), then its own
        ``<|vision_start|> pads <|vision_end|>`` (one pad here)."""
        steps = int(grid_thw[0, 0])
        if step_times is None or len(step_times) != steps:
            raise ValueError(f"Qwen3-VL writes the time of each of the video's {steps} temporal steps in the prompt: "
                             f"pass step_times (got {None if step_times is None else len(step_times)})")
        start, end = (self.tokenizer.convert_ids_to_tokens(t) for t in
                      (self.config.vision_start_token_id, self.config.vision_end_token_id))
        return "".join(f"<{t:.1f} seconds>{start}{self.placeholder()}{end}" for t in step_times)

    def group_tokens(self, grid_thw: torch.Tensor) -> Tuple[int, int]:
        t, h, w = (int(v) for v in grid_thw[0])
        return t, h * w // self.config.vision_config.spatial_merge_size ** 2

    def positions(self, input_ids: torch.Tensor, video_grid_thw: Optional[torch.Tensor] = None,
                  second_per_grid_t: Optional[float] = None) -> torch.Tensor:
        """3-row positions ``[3, 1, S]`` for interleaved M-RoPE (``get_rope_index``: each step is its own grid)."""
        mm_types = (input_ids == self.config.video_token_id).int() * 2
        positions, _ = self.model.model.get_rope_index(input_ids, mm_types, video_grid_thw=video_grid_thw)
        return positions

    def decoder_extras(self, fields: List[torch.Tensor], slots) -> dict:
        return _deepstack(fields[1:], slots)

    def shard_decoder_kwargs(self, kwargs: dict, shard: Shard) -> dict:
        mask, features = kwargs.get("visual_pos_masks"), kwargs.get("deepstack_visual_embeds")
        if mask is None or features is None:
            return kwargs
        return dict(kwargs, **_deepstack(features, visual_slots(mask, shard)))


def _deepstack(features: List[torch.Tensor], slots) -> dict:
    """DeepStack's decoder arguments for this rank's tokens: the mask of its visual tokens and their rows of each
    tapped vision layer's features."""
    local, rows = slots
    device = features[0].device if features else local.device
    return dict(visual_pos_masks=local.to(device), deepstack_visual_embeds=[f[rows.to(f.device)] for f in features])
