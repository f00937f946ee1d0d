"""Time to first token of the inference engine: Spava (and ring) on W GPUs against dense attention on one GPU.

A model of a published shape (``SHAPES``: Qwen2.5-VL-3B/7B, InternVL3-2B, Qwen3-VL-8B) with random bf16 weights
answers a question about a synthetic video. Time to first token = frame-parallel vision encoder + language-model
prefill + first token, median of ``--iters`` runs after a warm-up. Dense runs on rank 0 alone with the same model
and the same (fused) vision attention, so the comparison is like for like. Run under torchrun, one process per GPU:

    torchrun --standalone --nproc_per_node 2 launch/bench_engine.py --model-shape 3b --frames 64
    python launch/bench_engine.py --tiny           # CPU smoke test of the code path (the tiny checkpoint)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from spava_ds import SpavaConfig, comm, entry  # noqa: E402
from spava_ds.engine import GenerationConfig, SpavaEngine  # noqa: E402

# Shapes of the published checkpoints (text: language model; vision: tower), random weights. The family picks the
# transformers class (spava_ds.models); the special tokens come from the tiny tokenizer of the family.
QWEN25_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                     temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                     fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
SHAPES = {
    "3b": dict(family="qwen2_5_vl", vision=QWEN25_VISION, text=dict(
        num_hidden_layers=36, hidden_size=2048, num_attention_heads=16, num_key_value_heads=2, intermediate_size=11008,
        vocab_size=151936, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})),
    "7b": dict(family="qwen2_5_vl", vision=QWEN25_VISION, text=dict(
        num_hidden_layers=28, hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944,
        vocab_size=152064, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})),
    # InternVL3-2B: InternViT-300M (448x448 tiles, 256 tokens a frame) + Qwen2.5-1.5B
    "internvl3-2b": dict(family="internvl", vision=dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, image_size=[448, 448],
        patch_size=[14, 14]), text=dict(
        num_hidden_layers=28, hidden_size=1536, num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960,
        vocab_size=151674, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # Qwen3-VL-8B: 27-block ViT with DeepStack taps at 8, 16, 24 + Qwen3-8B (interleaved M-RoPE)
    "qwen3-vl-8b": dict(family="qwen3_vl", vision=dict(
        depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16, temporal_patch_size=2,
        spatial_merge_size=2, num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]), text=dict(
        num_hidden_layers=36, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        intermediate_size=12288, vocab_size=151936,
        rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                         "mrope_interleaved": True})),
}


def shape_tokenizer(shape: str):
    """The tiny tokenizer of the shape's family (its special tokens and chat template): prompts only need these."""
    import make_tiny_model

    spec = make_tiny_model.FAMILIES.get(SHAPES[shape]["family"])
    if spec is None:  # Qwen2.5-VL: the embedded checkpoint's tokenizer
        return make_tiny_model.build_tokenizer()
    return make_tiny_model.build_tokenizer(spec["specials"], spec["template"])


def build_config(shape: str, tokenizer):
    """The transformers config of ``shape`` (``SHAPES``) with the tokenizer's special token ids."""
    from transformers import InternVLConfig, Qwen2_5_VLConfig, Qwen3VLConfig

    spec = SHAPES[shape]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ("<|video_pad|>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>", "<|endoftext|>")}
    text = dict(spec["text"], max_position_embeddings=262144, rms_norm_eps=1e-6, eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    if spec["family"] == "internvl":
        return InternVLConfig(vision_config=spec["vision"], text_config=dict(text, model_type="qwen2"),
                              image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=256,
                              downsample_ratio=0.5, tie_word_embeddings=False)
    config_class = Qwen3VLConfig if spec["family"] == "qwen3_vl" else Qwen2_5_VLConfig
    return config_class(text_config=text, vision_config=dict(spec["vision"], out_hidden_size=text["hidden_size"]),
                        video_token_id=ids["<|video_pad|>"], image_token_id=ids["<|image_pad|>"],
                        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                        eos_token_id=ids["<|im_end|>"])


def build_model(shape: str, tokenizer, device):
    """A random-weight model of ``shape`` in bf16: built on the meta device, then materialised on ``device`` and
    initialised there by transformers' own ``initialize_weights`` (normal weights, unit norms, the rotary buffers);
    no initialisation loop on the CPU. Its language model runs ``attn_implementation="spava"``."""
    from spava_ds.integrations.transformers import spava_attn_implementation
    from spava_ds.models import family_class

    config = build_config(shape, tokenizer)
    model_class = family_class(config.model_type).model_class()
    with torch.device("meta"):
        model = model_class._from_config(config, dtype=torch.bfloat16,
                                         attn_implementation=spava_attn_implementation(config))
    model.to_empty(device=device)
    with torch.no_grad():
        model.initialize_weights()
    model.tie_weights()
    return model.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-shape", choices=sorted(SHAPES), default="3b")
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--modes", nargs="+", default=["spava", "ring"])
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="the embedded tiny checkpoint on CPU (a smoke test)")
    entry.add_arguments(p)
    return entry.run_main(bench, p.parse_args(argv))


def bench(args) -> None:
    """Time to first token of each mode and of dense on rank 0; rank 0 prints the table."""
    from spava_ds.assets import tiny_model_dir
    from spava_ds.video import write_synthetic_video

    rank, world = entry.init_distributed(args)
    if args.tiny:
        base = SpavaEngine.from_pretrained(tiny_model_dir())
        model, card, tokenizer = base.model, "CPU", base.tokenizer
        settings = base.settings
    else:
        device = torch.device("cuda", torch.cuda.current_device())
        tokenizer = shape_tokenizer(args.model_shape)
        model = build_model(args.model_shape, tokenizer, device)
        card = torch.cuda.get_device_name(device)
        pixels = args.width * args.height  # keep the video's resolution (rounded to multiples of 28)
        settings = dict(min_pixels=pixels, max_pixels=int(pixels * 1.05), fps=2, max_frames=args.frames)
    folder = tempfile.TemporaryDirectory(prefix="spava_bench_")  # removed when bench returns
    video = write_synthetic_video(os.path.join(folder.name, "bench.mp4"), num_frames=args.frames,
                                  width=args.width, height=args.height, fps=2, seed=0)
    question = "What is written in the frame where the red square appears?"

    def time_engine(config, group) -> tuple:
        engine = SpavaEngine(model, tokenizer, config, group, settings)
        inputs = engine.video_inputs(video, question, fps=2, max_frames=args.frames)
        engine.generate(inputs, GenerationConfig(max_new_tokens=1))  # warm-up (compiles kernels)
        times = [engine.generate(inputs, GenerationConfig(max_new_tokens=1)).prefill_seconds
                 for _ in range(args.iters)]
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        return statistics.median(times), inputs["context_len"], peak

    rows = []
    for mode in args.modes:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        seconds, context, peak = time_engine(SpavaConfig(mode=mode), None)
        rows.append((f"{mode}, {world} GPU(s)" if not args.tiny else f"{mode}, {world} process(es)", seconds, peak))
    if world > 1:
        dist.barrier()
    if rank == 0:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        seconds, context, peak = time_engine(SpavaConfig(mode="dense"), comm.SELF)
        rows.insert(0, ("dense, 1 GPU" if not args.tiny else "dense, 1 process", seconds, peak))
        dense = rows[0][1]
        model_name = "the tiny checkpoint" if args.tiny else f"{args.model_shape}-shaped random bf16 weights"
        print(f"\n# {card}; {model_name}; {args.frames} frames at "
              f"{args.width}x{args.height}; {context} context tokens; {time.strftime('%Y-%m-%d')}")
        print("| method | time to first token (s) | speedup vs dense | peak GPU memory (GiB, rank 0) |")
        print("|---|---|---|---|")
        for name, sec, peak in rows:
            print(f"| {name} | {sec:.3f} | {dense / sec:.2f}x | {peak:.1f} |")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
