"""InternVL3 (transformers' ``InternVLForConditionalGeneration``): a video is a sequence of frames, each one
448x448 tile (``vision_config.image_size``) that the ViT, the 2x2 pixel shuffle and the projector turn into 256
tokens; the prompt has a line per frame, ``Frame{i}: <img><IMG_CONTEXT>...</img>``, as transformers' processor
writes it; positions are 1-D (the Qwen2.5 language model's RoPE).

Frame parallelism: frames are independent, so each rank encodes its contiguous run of frames (``temporal_range``
with one frame a step) and the projected features are all-gathered in order.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..comm import gather_rows, group_rank_size
from ..integrations.qwen_vision import temporal_range, temporal_shares
from ..video import plan_video
from .base import VideoFamily, patched

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InternVLFamily(VideoFamily):
    model_types = ("internvl",)
    label = "InternVL3"
    default_video_settings = dict(fps=2.0, max_frames=768, image_mean=list(IMAGENET_MEAN),
                                  image_std=list(IMAGENET_STD))

    @classmethod
    def model_class(cls):
        from transformers import InternVLForConditionalGeneration

        return InternVLForConditionalGeneration

    # ---- the frame and its tokens ---------------------------------------------------------------------------------
    @property
    def frame_size(self) -> int:
        height, width = self.config.vision_config.image_size
        if height != width:
            raise ValueError(f"InternVL frames are square tiles; this vision tower takes {height}x{width}")
        return height

    frames_per_step = 1  # a temporal step of the plan is one frame

    @property
    def tokens_per_frame(self) -> int:
        patches = self.frame_size // self.config.vision_config.patch_size[0]
        return round((patches * self.config.downsample_ratio) ** 2)

    def _token(self, name: str, default: str) -> str:
        return getattr(self.tokenizer, name, None) or default

    @property
    def feature_token_id(self) -> int:
        return self.config.image_token_id

    def placeholder(self) -> str:
        return self._token("video_token", "<video>")

    def video_text(self, grid_thw: torch.Tensor, step_times) -> str:
        context = self.tokenizer.convert_ids_to_tokens(self.config.image_token_id)
        start, end = self._token("start_image_token", "<img>"), self._token("end_image_token", "</img>")
        return "\n".join(f"Frame{i + 1}: {start}{context}{end}" for i in range(int(grid_thw[0, 0])))

    def group_tokens(self, grid_thw: torch.Tensor) -> Tuple[int, int]:
        return int(grid_thw[0, 0]), self.tokens_per_frame

    # ---- frames ---------------------------------------------------------------------------------------------------
    def plan(self, video, settings: dict, fps: Optional[float] = None, max_frames: Optional[int] = None):
        """Frames sampled as for the Qwen families, each resized to one square tile. In the plan a "patch" is the
        whole tile and a temporal step one frame, so ``video_pixels`` gives one row ``[3 * S * S]`` per frame and
        ``plan.grid_thw`` is ``(frames, 1, 1)``."""
        size = self.frame_size
        return plan_video(video, fps=fps if fps is not None else settings.get("fps"),
                          max_frames=max_frames if max_frames is not None else settings.get("max_frames"),
                          min_pixels=size * size, max_pixels=size * size, patch_size=size, temporal_patch_size=1,
                          merge_size=1, image_mean=settings["image_mean"], image_std=settings["image_std"])

    modality, pixel_key = "image", "pixel_values"  # transformers' InternVL takes a video's frames as images

    def prompt_kwargs(self, inputs: dict, device=None) -> dict:
        return dict(input_ids=inputs["input_ids"].to(device))

    def model_pixels(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.view(-1, 3, self.frame_size, self.frame_size)

    def encode_for_model(self, pixels: torch.Tensor, prompt: dict):
        return self.model.model.get_image_features(pixel_values=pixels, return_dict=True)

    def encode_pixels(self, pixels: torch.Tensor, grid_thw: torch.Tensor, group=None) -> List[torch.Tensor]:
        frames = int(grid_thw[:, 0].sum())
        return [frame_parallel_images(self.model.model.get_image_features, pixels, frames, group)
                .pooler_output.flatten(0, 1)]

    def encode_steps(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> List[torch.Tensor]:
        return [self.model.model.get_image_features(pixel_values=pixels).pooler_output.flatten(0, 1)]

    def vision_patches_per_step(self, plan) -> int:
        return (self.frame_size // self.config.vision_config.patch_size[0]) ** 2  # ViT patches of one tile

    def vision_modules(self) -> List[torch.nn.Module]:
        return [self.model.model.vision_tower, self.model.model.multi_modal_projector]

    def vision_parallel(self, group, input_ids):
        """``get_image_features`` split over ``group`` by frames (``frame_parallel_images``); the frame count comes
        from the prompt's image tokens."""
        inner = self.model.model
        get_features = inner.get_image_features
        frames = int((input_ids == self.feature_token_id).sum()) // self.tokens_per_frame

        def parallel(pixel_values, **kwargs):
            return frame_parallel_images(get_features, pixel_values, frames, group, **kwargs)

        return patched(inner, "get_image_features", parallel)


def frame_parallel_images(get_image_features, pixel_values: torch.Tensor, frames: int, group=None, **kwargs):
    """``get_image_features(pixel_values)`` (InternVL's vision tower, pixel shuffle and projector) with the frames
    split over the ranks of ``group``: each rank encodes its ``temporal_range`` of the ``frames`` and the features
    ``[frames, tokens, D]`` are all-gathered into the output's ``pooler_output``. ``pixel_values`` holds every frame
    or this rank's. Differentiable (``comm.gather_rows``)."""
    rank, world = group_rank_size(group)
    if frames < world:
        raise ValueError(f"frame-parallel vision over {world} ranks needs at least {world} frames, got {frames}")
    first, stop = temporal_range(frames, rank, world)
    if pixel_values.shape[0] not in (frames, stop - first):
        raise ValueError(f"pixel_values has {pixel_values.shape[0]} frames; the video has {frames}, of which rank "
                         f"{rank} of {world} encodes {stop - first}")
    if world == 1:
        return get_image_features(pixel_values=pixel_values, **kwargs)
    own = pixel_values if pixel_values.shape[0] == stop - first else pixel_values[first:stop]
    out = get_image_features(pixel_values=own, **kwargs)
    tokens = out.pooler_output.shape[1]
    counts = [n * tokens for n in temporal_shares(frames, world)]
    out.pooler_output = gather_rows(out.pooler_output.flatten(0, 1), counts, group).view(frames, tokens, -1)
    return out
