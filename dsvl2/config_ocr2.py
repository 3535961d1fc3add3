"""DeepSeek-OCR 2 configuration: its official VL2-style ``config.json`` as frozen dataclasses.

DeepSeek-OCR 2 (deepseek-ai/DeepSeek-OCR-2) keeps ``model_type: "deepseek_vl_v2"`` and a Tiny-shaped
DeepSeekMoE decoder (:class:`~dsvl2.config.LanguageConfig`, unchanged), and replaces the vision side
("deepencoderv2"): a SAM ViT-B encoder with windowed + global attention, a conv neck and two stride-2
convs, then a Qwen2-0.5B-shaped "decoder as encoder" with learned queries, a linear projector and one
view separator. Its file names the encoder widths under ``vision_config.width``:
``{"sam_vit_b": {width, layers, heads, global_attn_indexes, downsample_channels}, "qwen2-0-5b": {dim}}``.

Every dimension the official code hard-codes (``deepencoderv2/sam_vary_sdpa.py``, ``qwen2_d2e.py``,
``deepseek_ocr2.py``) is an explicit field here whose default is the hard-coded value, so the released
file loads as is and small test checkpoints can shrink any of them. Two official values are
inconsistent and resolved as the official *code* does: ``downsample_channels[1]`` says 1024 while the
code's last conv outputs the query encoder's width (896); we use the encoder width and only check
``downsample_channels[0]``. The official file repeats the language keys at its top level (its class
extends ``DeepseekV2Config``); they are accepted when they agree with ``language_config``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import _METADATA_KEYS, LanguageConfig, _build
from .errors import ConfigError

MODEL_NAME = "deepencoderv2"


def conv_out(grid: int) -> int:
    """Side after the two 3x3 stride-2 pad-1 convs (``net_2``, ``net_3``): ceil(ceil(g/2)/2)."""
    return math.ceil(math.ceil(grid / 2) / 2)


@dataclass(frozen=True)
class SamConfig:
    """``vision_config.width.sam_vit_b`` plus what ``build_sam_vit_b`` hard-codes."""

    width: int = 768
    layers: int = 12
    heads: int = 12
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    downsample_channels: tuple[int, ...] = (512, 1024)  # [1] unused: net_3 outputs the encoder width
    patch_size: int = 16
    window_size: int = 14
    mlp_ratio: float = 4.0
    neck_channels: int = 256  # ``out_chans`` / ``prompt_embed_dim``

    def __post_init__(self) -> None:
        object.__setattr__(self, "global_attn_indexes", tuple(int(i) for i in self.global_attn_indexes))
        object.__setattr__(self, "downsample_channels", tuple(int(i) for i in self.downsample_channels))
        if self.width % self.heads:
            raise ConfigError(f"sam_vit_b: width {self.width} not divisible by heads {self.heads}")
        if any(not 0 <= i < self.layers for i in self.global_attn_indexes):
            raise ConfigError(f"sam_vit_b.global_attn_indexes {self.global_attn_indexes} outside 0..{self.layers - 1}")
        if not self.downsample_channels:
            raise ConfigError("sam_vit_b.downsample_channels must name at least net_2's channels")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclass(frozen=True)
class QueryEncoderConfig:
    """``vision_config.width["qwen2-0-5b"]`` plus what ``build_qwen2_decoder_as_encoder`` hard-codes."""

    dim: int = 896
    layers: int = 24
    heads: int = 14
    kv_heads: int = 2
    intermediate_size: int = 4864
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0

    def __post_init__(self) -> None:
        if self.dim % self.heads or self.heads % self.kv_heads:
            raise ConfigError(f"qwen2-0-5b: dim {self.dim}, heads {self.heads}, kv_heads {self.kv_heads} do not divide")
        if (self.dim // self.heads) % 2:
            raise ConfigError(f"qwen2-0-5b: head dim {self.dim // self.heads} must be even (RoPE)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


@dataclass(frozen=True)
class OCR2VisionConfig:
    """``vision_config``: the global view (``image_size``) and local tiles (``tile_size``) share one encoder."""

    model_name: str = MODEL_NAME
    image_size: int = 1024  # BASE_SIZE: the padded global view
    tile_size: int = 768  # IMAGE_SIZE: local tiles
    mlp_ratio: float = 3.7362  # in the released file; unused by deepencoderv2
    sam: SamConfig = field(default_factory=SamConfig)
    encoder: QueryEncoderConfig = field(default_factory=QueryEncoderConfig)

    def __post_init__(self) -> None:
        if self.model_name != MODEL_NAME:
            raise ConfigError(f"vision_config.model_name {self.model_name!r}: expected {MODEL_NAME!r}")
        p = self.sam.patch_size
        if self.image_size % p or self.tile_size % p:
            raise ConfigError(f"vision_config: image_size {self.image_size} and tile_size {self.tile_size} "
                              f"must be multiples of the SAM patch size {p}")
        if self.global_queries == self.local_queries:
            raise ConfigError("vision_config: the global view and the tiles need different query counts")

    @property
    def global_grid(self) -> int:
        """Side of the global view's query grid (16 for 1024 px)."""
        return conv_out(self.image_size // self.sam.patch_size)

    @property
    def local_grid(self) -> int:
        """Side of one tile's query grid (12 for 768 px)."""
        return conv_out(self.tile_size // self.sam.patch_size)

    @property
    def global_queries(self) -> int:
        return self.global_grid ** 2

    @property
    def local_queries(self) -> int:
        return self.local_grid ** 2

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> "OCR2VisionConfig":
        data = {k: v for k, v in data.items() if k != "model_type"}
        width = data.pop("width", None)
        if not isinstance(width, dict) or set(width) != {"sam_vit_b", "qwen2-0-5b"}:
            raise ConfigError(f"{where}: vision_config.width must hold exactly 'sam_vit_b' and 'qwen2-0-5b'")
        sam = _build(SamConfig, width["sam_vit_b"], f"{where}: vision_config.width.sam_vit_b")
        enc = _build(QueryEncoderConfig, width["qwen2-0-5b"], f"{where}: vision_config.width.qwen2-0-5b")
        return _build(cls, {**data, "sam": sam, "encoder": enc}, f"{where}: vision_config")

    def to_dict(self) -> dict[str, Any]:
        sam = dataclasses.asdict(self.sam)
        sam["global_attn_indexes"] = list(self.sam.global_attn_indexes)
        sam["downsample_channels"] = list(self.sam.downsample_channels)
        return {"model_type": "vision", "model_name": self.model_name, "image_size": self.image_size,
                "tile_size": self.tile_size, "mlp_ratio": self.mlp_ratio,
                "width": {"sam_vit_b": sam, "qwen2-0-5b": dataclasses.asdict(self.encoder)}}


@dataclass(frozen=True)
class LinearProjectorConfig:
    """``projector_config`` of type ``linear``: one ``nn.Linear(input_dim, n_embed)``."""

    projector_type: str = "linear"
    input_dim: int = 896
    n_embed: int = 1280

    def __post_init__(self) -> None:
        if self.projector_type != "linear":
            raise ConfigError(f"projector_config.projector_type {self.projector_type!r}: DeepSeek-OCR 2 uses 'linear'")


# The released language model (Tiny's structure, 8192 positions): the default of OCR2Config.
OCR2_TINY_LANGUAGE = LanguageConfig(
    vocab_size=129280, hidden_size=1280, intermediate_size=6848, moe_intermediate_size=896,
    num_hidden_layers=12, num_attention_heads=10, num_key_value_heads=10, use_mla=False,
    kv_lora_rank=None, q_lora_rank=None, qk_nope_head_dim=0, qk_rope_head_dim=0, v_head_dim=0,
    n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
    topk_method="greedy", n_group=1, topk_group=1, max_position_embeddings=8192,
    bos_token_id=0, eos_token_id=1)


@dataclass(frozen=True)
class OCR2Config:
    """The whole DeepSeek-OCR 2 model; :func:`read_config` tells it from a DeepSeek-VL2 file."""

    vision_config: OCR2VisionConfig = field(default_factory=OCR2VisionConfig)
    projector_config: LinearProjectorConfig = field(default_factory=LinearProjectorConfig)
    language_config: LanguageConfig = field(default_factory=lambda: OCR2_TINY_LANGUAGE)
    tile_tag: str = "2D"
    global_view_pos: str = "head"  # stored by the released file; the official layout ignores it
    candidate_resolutions: tuple[tuple[int, int], ...] = ((1024, 1024),)  # "placeholder no use" officially

    def __post_init__(self) -> None:
        if self.tile_tag != "2D":
            raise ConfigError(f"tile_tag {self.tile_tag!r}: only '2D' is used by DeepSeek-OCR 2")
        if self.projector_config.input_dim != self.vision_config.encoder.dim:
            raise ConfigError(f"projector_config.input_dim {self.projector_config.input_dim} != the query "
                              f"encoder width (vision_config.width.qwen2-0-5b.dim) {self.vision_config.encoder.dim}")
        if self.projector_config.n_embed != self.language_config.hidden_size:
            raise ConfigError(f"projector_config.n_embed {self.projector_config.n_embed} != "
                              f"language_config.hidden_size {self.language_config.hidden_size}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config.json") -> "OCR2Config":
        data = dict(data)
        for key in ("vision_config", "projector_config", "language_config"):
            if not isinstance(data.get(key), dict):
                raise ConfigError(f"{where}: missing or malformed '{key}'")
        lang = _build(LanguageConfig, data.pop("language_config"), f"{where}: language_config")
        lang_names = {f.name for f in dataclasses.fields(LanguageConfig)}
        for key in sorted(k for k in list(data) if k in lang_names):
            value = data.pop(key)
            if value != getattr(lang, key):
                raise ConfigError(f"{where}: top-level {key} = {value!r} disagrees with language_config "
                                  f"({getattr(lang, key)!r})")
        vision = OCR2VisionConfig.from_dict(data.pop("vision_config"), where)
        proj = _build(LinearProjectorConfig, {k: v for k, v in data.pop("projector_config").items()
                                              if k != "model_type"}, f"{where}: projector_config")
        if "candidate_resolutions" in data:
            data["candidate_resolutions"] = tuple(tuple(int(v) for v in r) for r in data["candidate_resolutions"])
        return _build(cls, {**data, "vision_config": vision, "projector_config": proj, "language_config": lang},
                      where)

    def to_dict(self) -> dict[str, Any]:
        return {
            "architectures": ["DeepseekOCR2ForCausalLM"],
            "model_type": "deepseek_vl_v2",
            "tile_tag": self.tile_tag,
            "global_view_pos": self.global_view_pos,
            "candidate_resolutions": [list(r) for r in self.candidate_resolutions],
            "torch_dtype": "bfloat16",
            "vision_config": self.vision_config.to_dict(),
            "projector_config": {"model_type": "mlp_projector", **dataclasses.asdict(self.projector_config)},
            "language_config": {"model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"],
                                **dataclasses.asdict(self.language_config)},
        }

    def save(self, directory: str | Path) -> None:
        Path(directory, "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def is_ocr2(data: dict[str, Any]) -> bool:
    """Whether a parsed ``config.json`` describes DeepSeek-OCR 2 (its vision model is deepencoderv2)."""
    vision = data.get("vision_config")
    return isinstance(vision, dict) and vision.get("model_name") == MODEL_NAME


def read_config(path: str | Path):
    """The config of a model directory (or its ``config.json``): :class:`OCR2Config` or ``DSVL2Config``."""
    from .config import DSVL2Config

    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a JSON object")
    if is_ocr2(data):
        return OCR2Config.from_dict(data, where=str(path))
    return DSVL2Config.from_dict(data, where=str(path))


OCR2_PRESETS: dict[str, OCR2Config] = {"ocr2": OCR2Config()}  # the released model
