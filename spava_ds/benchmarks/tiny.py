"""The project's tiny random-weight checkpoints: Qwen2.5-VL (the engine's embedded default model), and
Qwen3-VL, InternVL3 and Qwen2 (text) ones for the tests of every model family.

    python launch/make_tiny_model.py                       # -> spava_ds/assets/tiny-qwen2.5-vl/
    python launch/make_tiny_model.py --out /tmp/tiny       # anywhere else
    python launch/make_tiny_model.py --family qwen3_vl --out /tmp/tiny-qwen3-vl     # qwen3_vl, internvl, qwen2
    python launch/make_tiny_model.py --preset small --out runs/small-init   # a trainable starting point (below)

Deterministic: the tokenizer is a byte-level BPE trained in-process on the fixed corpus below and every weight is
drawn from one seeded generator, so running it again rewrites byte-identical weights (a test checks this). No
download. The model is small enough for CPU tests yet keeps the features that matter to Spava: grouped-query
attention (4 query heads, 2 KV heads), 3-D M-RoPE, the windowed vision tower with a full-attention block and the 2x2
patch merger. Weights are random, so answers are gibberish; the outputs are only compared between attention modes.

``--preset small`` writes a larger random-init model meant to be *trained* from scratch (launch/finetune.py on the
synthetic tasks of spava_ds.tasks): same tokenizer and video settings, text hidden 256 x 4 layers (4 query heads,
2 KV heads, head_dim 64), vision hidden 128 x 4 blocks (two of them full attention), about 3.8M parameters, with a
GPT-2 style initialisation (std 0.02, residual output projections scaled by 1/sqrt(2 * layers)) stored in fp32.
The default (``--preset tiny``) output is unchanged.

``--family`` (default ``qwen2_5_vl``) picks the architecture of a tiny checkpoint (made in about a second, a few MB;
the tests make them in a temporary folder): ``qwen3_vl`` (interleaved M-RoPE, timestamps in the chat prompt,
DeepStack from two vision layers), ``internvl`` (112x112 tiles, 16 tokens a frame after the pixel shuffle) and
``qwen2`` and ``llama`` (text only). Their language models have 12 query and 6 KV heads (head_dim 16), so every
exact mode, Ulysses included, runs on 1, 2 or 3 processes.
"""

from __future__ import annotations

import json
import os

import torch

from ..video import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

SEED = 20260121
VOCAB_SIZE = 1000
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

# Small pixel budget so CPU runs stay fast: frames land between 112x112 and 224x224 (16 to 64 LLM tokens per
# temporal patch of two frames).
VIDEO_SETTINGS = {
    "min_pixels": 112 * 112,
    "max_pixels": 224 * 224,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "fps": 2.0,
    "max_frames": 64,
    "image_mean": list(OPENAI_CLIP_MEAN),
    "image_std": list(OPENAI_CLIP_STD),
}

# ChatML, as Qwen2.5-VL formats conversations; a video item becomes one <|video_pad|> that the engine expands to the
# video's token count.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message.role != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message.role + '\\n' }}"
    "{% if message.content is string %}{{ message.content }}"
    "{% else %}{% for item in message.content %}"
    "{% if item.type == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif item.type == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item.type == 'text' %}{{ item.text }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Training text for the tokenizer: plain English about videos and questions, written for this script.
CORPUS = """
The video opens on a quiet street at dawn. A red car turns the corner, slows down near the bakery and stops.
A woman in a blue coat steps out, looks at her watch and walks into the shop. Two minutes later she comes back
with a paper bag and a cup of coffee. The camera follows the car as it drives past the park, where a man is
throwing a ball for a brown dog. The dog runs across the grass, catches the ball and brings it back.
What colour is the car? The car is red. How many people are in the park? There is one man with his dog.
Where does the woman go? She goes into the bakery and buys bread and coffee.

In the second scene a teacher stands in front of a whiteboard. She writes three numbers: 12, 45 and 78. The
students copy them into their notebooks. One student raises his hand and asks why the sum is 135. The teacher
smiles and explains the rule step by step. Later the class watches a short film about the ocean: whales swim
under the surface, birds fly over the waves and a small boat moves slowly towards the island.
Question: what does the teacher write on the board? Answer: she writes three numbers and explains their sum.

A kitchen, filmed from above. Someone cuts onions, tomatoes and green peppers on a wooden board, then puts them
in a hot pan with oil. The vegetables turn soft and golden. Rice is added, then water, then a pinch of salt.
After twenty minutes the pot is taken off the stove. The cook tastes the rice, adds pepper and serves it on
white plates. The video ends with a close view of the steaming food on the table.
Describe the cooking steps. First the vegetables are cut, then they are fried, then the rice is cooked.

The match starts in the evening under bright lights. The players in yellow shirts attack from the left side.
After eleven minutes the striker receives a long pass, runs past two defenders and scores. The crowd jumps and
sings. In the second half the team in white shirts presses harder and almost scores twice, but the goalkeeper
saves both shots. The final whistle blows and the score stays one to nothing.
Who won the game? The team in yellow won by one goal. When was the goal scored? In the eleventh minute.

A nature documentary shows a forest through the seasons. In spring the trees are light green and birds build
nests. In summer a family of deer drinks from a stream. In autumn the leaves turn orange, yellow and brown and
fall to the ground. In winter snow covers everything, and a fox walks alone between the silent trees, leaving
small tracks behind it. The narrator speaks about how animals prepare for the cold months.
Which animal walks in the snow? A fox walks in the snow. What happens in autumn? The leaves change colour.

The last clip is a screen recording. A user opens a text editor, types a short program, saves the file and runs
it. The terminal prints an error on line seven. The user scrolls up, finds a missing bracket, fixes it and runs
the program again. This time it prints the expected result: a table with four rows and three columns of values.
What was the problem? A bracket was missing. How was it fixed? The user added the bracket and ran it again.

Summarize the video in one sentence. Count the objects on the table. Is the light on or off at the end?
Which person speaks first, and what does she say? Explain what changes between the first and the last frame.
The answer is yes. The answer is no. I am not sure. There are five apples, two oranges and one large melon.
Long videos contain many frames, and each frame becomes many tokens; the model must find the few moments that
matter for the question, remember what happened before and after, and give a short, clear, correct answer.
"""


def build_tokenizer(extra_specials: dict | None = None, chat_template: str = CHAT_TEMPLATE):
    """Byte-level BPE trained on CORPUS, with Qwen's special tokens (and ``extra_specials``, name -> token, e.g.
    InternVL's image tokens), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    extra_specials = extra_specials or {}
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS + list(extra_specials.values()),
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.strip().splitlines(), trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=32768,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
                              **extra_specials})
    wrapped.chat_template = chat_template
    return wrapped


# Model sizes per preset. "tiny" is the embedded test model (its values must not change: a test compares the
# written checkpoint with the committed one); "small" is a trainable starting point for launch/finetune.py.
PRESETS = {
    "tiny": dict(
        text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2),
        # head_dim 32: the t/h/w sections of M-RoPE cover its 16 frequency pairs, in Qwen's 2:3:3 proportion
        mrope_section=[4, 6, 6],
        vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, fullatt_block_indexes=[1])),
    "small": dict(
        text=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2),
        mrope_section=[8, 12, 12],  # head_dim 64: 32 frequency pairs, 2:3:3 as above
        vision=dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=4, fullatt_block_indexes=[1, 3])),
}


def build_config(tokenizer, preset: str = "tiny"):
    from transformers import Qwen2_5_VLConfig

    sizes = PRESETS[preset]
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), **sizes["text"], max_position_embeddings=32768, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": sizes["mrope_section"]},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=True),
        vision_config=dict(
            **sizes["vision"], out_hidden_size=sizes["text"]["hidden_size"],
            patch_size=VIDEO_SETTINGS["patch_size"], temporal_patch_size=VIDEO_SETTINGS["temporal_patch_size"],
            spatial_merge_size=VIDEO_SETTINGS["merge_size"],
            # window 56 px = 2x2 merged tokens: a 224x224 frame has 16 windows; the fullatt blocks see the whole frame
            window_size=56, tokens_per_second=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=True, dtype="float32")


def chatml_template(video: str, image: str, default_system: str | None) -> str:
    """A ChatML chat template that writes ``video`` / ``image`` for those content items (as each family's own
    template does) and, when the first message is not a system one, ``default_system``."""
    system = ("{% if loop.first and message.role != 'system' %}"
              "{{ '<|im_start|>system\\n" + default_system + "<|im_end|>\\n' }}{% endif %}") if default_system else ""
    return ("{% for message in messages %}" + system +
            "{{ '<|im_start|>' + message.role + '\\n' }}"
            "{% if message.content is string %}{{ message.content }}"
            "{% else %}{% for item in message.content %}"
            "{% if item.type == 'video' %}{{ '" + video + "' }}"
            "{% elif item.type == 'image' %}{{ '" + image + "' }}"
            "{% elif item.type == 'text' %}{{ item.text }}"
            "{% endif %}{% endfor %}{% endif %}"
            "{{ '<|im_end|>\\n' }}"
            "{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


INTERNVL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                   "video_token": "<video>"}
# The other families: tokenizer (extra special tokens, chat template as the family's own writes videos), video
# settings, and the config.
FAMILIES = {
    "qwen3_vl": dict(
        specials={}, template=chatml_template("<|vision_start|><|video_pad|><|vision_end|>",
                                              "<|vision_start|><|image_pad|><|vision_end|>", None),
        video=dict(min_pixels=128 * 128, max_pixels=256 * 256, patch_size=16, temporal_patch_size=2, merge_size=2,
                   fps=2.0, max_frames=64, image_mean=[0.5] * 3, image_std=[0.5] * 3)),
    "internvl": dict(
        specials=INTERNVL_TOKENS, template=chatml_template("<video>\\n", "<IMG_CONTEXT>\\n", None),
        video=dict(fps=2.0, max_frames=64, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])),
    "qwen2": dict(specials={}, template=chatml_template("", "", "You are a helpful assistant."), video=None),
    "llama": dict(specials={}, template=chatml_template("", "", "You are a helpful assistant."), video=None),
}
# 12 query and 6 KV heads: Ulysses splits them over 2 and 3 ranks
TEXT = dict(hidden_size=192, intermediate_size=256, num_hidden_layers=4, num_attention_heads=12, num_key_value_heads=6,
            max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True)


def build_family_config(family: str, tokenizer):
    """The tiny config of ``family`` (not Qwen2.5-VL: ``build_config``)."""
    from transformers import InternVLConfig, LlamaConfig, Qwen2Config, Qwen3VLConfig

    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    special = dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    text = dict(TEXT, vocab_size=len(tokenizer), **special)
    if family in ("qwen2", "llama"):
        config_class = Qwen2Config if family == "qwen2" else LlamaConfig
        return config_class(**text, rope_parameters={"rope_type": "default", "rope_theta": 1e6}, dtype="float32")
    if family == "qwen3_vl":
        # head_dim 16: 8 frequency pairs, interleaved as t, h, w (transformers' Qwen3-VL rotary)
        rope = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
        return Qwen3VLConfig(
            text_config=dict(text, head_dim=16, rope_parameters=rope),
            vision_config=dict(depth=3, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=192,
                               patch_size=16, temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16,
                               deepstack_visual_indexes=[0, 1]),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
            tie_word_embeddings=True, dtype="float32", **special)
    if family == "internvl":
        return InternVLConfig(
            vision_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                               image_size=[112, 112], patch_size=[14, 14]),
            text_config=dict(text, model_type="qwen2", rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
            image_token_id=tokenizer.convert_tokens_to_ids(INTERNVL_TOKENS["context_image_token"]),
            image_seq_length=16, downsample_ratio=0.5, tie_word_embeddings=True, dtype="float32")
    raise ValueError(f"unknown family {family!r}; choose from qwen2_5_vl, {', '.join(FAMILIES)}")


@torch.no_grad()
def init_weights(model, seed: int = SEED) -> None:
    """Draw every parameter from one generator, in name order, independently of transformers' own init (which can
    change between versions). Matrices get std 1/sqrt(fan_in), so activations keep unit scale and the attention
    logits have a spread near 1: attention is neither uniform (as with the usual std 0.02) nor one-hot. Norm
    weights are 1, biases small. Values are rounded to bfloat16, the dtype they are stored in."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if param.dim() == 1 and ("norm" in name or "ln_q" in name):
            values = torch.ones(param.shape)
        elif param.dim() == 1:
            values = 0.1 * torch.randn(param.shape, generator=gen)
        else:
            values = torch.randn(param.shape, generator=gen) / param[0].numel() ** 0.5
        param.copy_(values.to(torch.bfloat16).to(param.dtype))


@torch.no_grad()
def init_trainable(model, seed: int = SEED) -> None:
    """A GPT-2 style initialisation for training from scratch, drawn from one generator in name order: matrices and
    embeddings std 0.02, the projections that write into a residual stream (attention output, MLP down) std
    0.02 / sqrt(2 * layers) of their tower, biases 0, norm weights 1."""
    gen = torch.Generator().manual_seed(seed)
    depth = {"visual": model.config.vision_config.depth, "language": model.config.text_config.num_hidden_layers}
    for name, param in sorted(model.named_parameters()):
        if param.dim() == 1:
            values = torch.ones(param.shape) if ("norm" in name or "ln_q" in name) else torch.zeros(param.shape)
        else:
            std = 0.02
            if name.endswith(("o_proj.weight", "down_proj.weight", "attn.proj.weight")):
                tower = "visual" if ".visual." in name else "language"
                std /= (2 * depth[tower]) ** 0.5
            values = std * torch.randn(param.shape, generator=gen)
        param.copy_(values.to(param.dtype))


def write_checkpoint(out_dir: str, seed: int = SEED, preset: str = "tiny", family: str = "qwen2_5_vl") -> str:
    from transformers import Qwen2_5_VLForConditionalGeneration

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {tuple(PRESETS)}")
    if family != "qwen2_5_vl":
        if preset != "tiny":
            raise ValueError(f"--preset {preset} is a Qwen2.5-VL preset; --family {family} has the tiny one only")
        return write_family_checkpoint(out_dir, family, seed)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = build_tokenizer()
    config = build_config(tokenizer, preset)
    model = Qwen2_5_VLForConditionalGeneration(config)
    (init_weights if preset == "tiny" else init_trainable)(model, seed)
    _save(model, tokenizer, out_dir, torch.bfloat16 if preset == "tiny" else torch.float32)

    # Video settings: ours for the engine, and the same budget in Hugging Face's processor files so that
    # AutoProcessor / Qwen2VLVideoProcessor.from_pretrained read it too where torchvision is available.
    common = {k: VIDEO_SETTINGS[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean",
                                             "image_std")}
    _write_json(out_dir, {
        "spava_ds.json": VIDEO_SETTINGS,
        "preprocessor_config.json": {
            "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
            "min_pixels": VIDEO_SETTINGS["min_pixels"], "max_pixels": VIDEO_SETTINGS["max_pixels"], **common},
        "video_preprocessor_config.json": {
            "video_processor_type": "Qwen2VLVideoProcessor", "processor_class": "Qwen2_5_VLProcessor",
            "size": {"shortest_edge": VIDEO_SETTINGS["min_pixels"], "longest_edge": VIDEO_SETTINGS["max_pixels"]},
            "do_sample_frames": False, "cap_pixels_per_frame": False, **common},
    })
    return out_dir


def write_family_checkpoint(out_dir: str, family: str, seed: int = SEED) -> str:
    """A tiny random checkpoint of another family (``FAMILIES``): config, bf16-valued weights, tokenizer with the
    family's special tokens and chat template, and ``spava_ds.json`` (video settings)."""
    from transformers import AutoModelForCausalLM, InternVLForConditionalGeneration, Qwen3VLForConditionalGeneration

    spec = FAMILIES.get(family)
    if spec is None:
        raise ValueError(f"unknown family {family!r}; choose from qwen2_5_vl, {', '.join(FAMILIES)}")
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = build_tokenizer(spec["specials"], spec["template"])
    config = build_family_config(family, tokenizer)
    model_class = {"qwen3_vl": Qwen3VLForConditionalGeneration, "internvl": InternVLForConditionalGeneration}.get(
        family, AutoModelForCausalLM)
    model = model_class.from_config(config) if model_class is AutoModelForCausalLM else model_class(config)
    init_weights(model, seed)
    _save(model, tokenizer, out_dir, torch.bfloat16)
    if spec["video"]:
        _write_json(out_dir, {"spava_ds.json": spec["video"]})
    return out_dir


def _save(model, tokenizer, out_dir: str, store: torch.dtype) -> None:
    """save_pretrained of the model (greedy generation config, EOS <|im_end|> or <|endoftext|>) and the tokenizer;
    the weights rewritten in ``store`` (bf16 halves a committed file; config.json keeps dtype float32, so
    from_pretrained loads an fp32 model unless asked otherwise)."""
    from safetensors.torch import load_file, save_file
    from transformers import GenerationConfig

    text = model.config.get_text_config()
    model.generation_config = GenerationConfig(
        bos_token_id=text.bos_token_id, pad_token_id=text.pad_token_id,
        eos_token_id=[text.eos_token_id, text.bos_token_id], do_sample=False)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    weights_file = os.path.join(out_dir, "model.safetensors")
    state = {k: v.to(store).contiguous() for k, v in sorted(load_file(weights_file).items())}
    save_file(state, weights_file, metadata={"format": "pt"})
    os.chmod(weights_file, 0o644)  # save_file leaves it owner-only


def _write_json(out_dir: str, files: dict) -> None:
    for name, content in files.items():
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2)
            f.write("\n")
