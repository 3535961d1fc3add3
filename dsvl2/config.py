"""Model configuration: the official DeepSeek-VL2 ``config.json`` as frozen dataclasses.

Field names are the official ones, so reading a released file is a lookup, not a translation
(spec §1). The released files are *sparse*: missing ``language_config`` keys take the defaults of
DeepSeek's bundled ``DeepseekV2Config`` (NOT upstream transformers', which would give vocab 32000 and
no MLA; spec P7). Unknown keys are errors that name the key; a handful of metadata keys that the
released and derived files carry (``architectures``, ``auto_map``, ``lm_head``...) are accepted and
ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

# Keys that appear in released / derived config files but carry no model structure.
_METADATA_KEYS = frozenset(
    {
        "architectures", "auto_map", "model_type", "torch_dtype", "transformers_version",
        "_name_or_path", "lm_head", "rm_head", "use_cache", "pad_token_id", "initializer_range",
        "_attn_implementation", "return_dict", "output_hidden_states", "output_attentions",
        "tie_word_embeddings_", "pretraining_tp", "ep_size", "use_checkpoint", "weight_init",
        "deterministic", "num_recomputing_layers", "select_layer", "select_feature",
    }
)


def _build(cls: type, data: dict[str, Any], where: str):
    """Instantiate dataclass ``cls`` from ``data``; unknown keys are errors naming ``where``."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in data if k not in names and k not in _METADATA_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} (known: {sorted(names)})")
    required = [
        f.name for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    missing = [k for k in required if k not in data]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}")
    kwargs = {k: v for k, v in data.items() if k in names}
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - guarded above
        raise ConfigError(f"{where}: {e}") from None


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP ViT (timm ``VisionTransformer`` as built by the official ``siglip_vit.py``)."""

    model_name: str = "siglip_so400m_patch14_384"
    image_size: int = 384
    patch_size: int = 14
    width: int = 1152
    layers: int = 27
    heads: int = 16
    mlp_ratio: float = 3.7362
    global_pool: str = "map"
    ignore_head: bool = True
    class_token: bool = False
    num_classes: int = 0

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ConfigError(f"vision_config: width {self.width} not divisible by heads {self.heads}")
        if self.class_token or not self.ignore_head:
            raise ConfigError("vision_config: only class_token=false, ignore_head=true is used by DeepSeek-VL2")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def grid(self) -> int:
        """Patches per side (27 for 384/14): the last image_size % patch_size pixels are dropped."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


@dataclass(frozen=True)
class ProjectorConfig:
    """``downsample_mlp_gelu`` projector (spec §3)."""

    n_embed: int = 1280
    projector_type: str = "downsample_mlp_gelu"
    input_dim: int = 1152
    depth: int = 2
    mlp_ratio: int = 1
    downsample_ratio: int = 2
    token_pooling: bool = False

    def __post_init__(self) -> None:
        if self.projector_type != "downsample_mlp_gelu":
            raise ConfigError(f"projector_config.projector_type {self.projector_type!r} is not used by DeepSeek-VL2")
        if self.depth != 2 or self.mlp_ratio != 1 or self.token_pooling:
            raise ConfigError("projector_config: DeepSeek-VL2 uses depth 2, mlp_ratio 1, token_pooling false")


@dataclass(frozen=True)
class LanguageConfig:
    """DeepSeekMoE language model. Defaults are those of DeepSeek's bundled ``DeepseekV2Config``."""

    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    n_shared_experts: int | None = None
    n_routed_experts: int | None = None
    routed_scaling_factor: float = 1.0
    kv_lora_rank: int | None = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "gready"  # sic: the bundled default; every released file sets it
    n_group: int | None = None
    topk_group: int | None = None
    num_experts_per_tok: int | None = None
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    bos_token_id: int = 100000
    eos_token_id: int = 100001
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    use_mla: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"language_config.{name} = {getattr(self, name)!r}: {why}")

        if self.hidden_act != "silu":
            raise bad("hidden_act", "only silu is used by DeepSeek-VL2")
        if self.rope_scaling is not None:
            raise bad("rope_scaling", "DeepSeek-VL2 uses plain RoPE (null); YaRN is not implemented")
        if self.q_lora_rank is not None:
            raise bad("q_lora_rank", "DeepSeek-VL2 checkpoints use null (no query compression)")
        if self.attention_bias:
            raise bad("attention_bias", "DeepSeek-VL2 uses false")
        if self.tie_word_embeddings:
            raise bad("tie_word_embeddings", "DeepSeek-VL2 uses false")
        if self.n_routed_experts is not None:
            if self.topk_method not in ("greedy", "noaux_tc"):
                raise bad("topk_method", "expected 'greedy' (tiny/small) or 'noaux_tc' (base)")
            if self.scoring_func not in ("softmax", "sigmoid"):
                raise bad("scoring_func", "expected 'softmax' or 'sigmoid'")
            if self.topk_method == "noaux_tc" and self.scoring_func != "sigmoid":
                raise bad("scoring_func", "noaux_tc routing needs sigmoid scores")
            if not self.num_experts_per_tok or self.num_experts_per_tok > self.n_routed_experts:
                raise bad("num_experts_per_tok", f"must be in 1..n_routed_experts ({self.n_routed_experts})")
            if self.n_group and self.n_routed_experts % self.n_group:
                raise bad("n_group", f"must divide n_routed_experts ({self.n_routed_experts})")
        if self.use_mla:
            if not self.kv_lora_rank:
                raise bad("kv_lora_rank", "MLA (use_mla=true) needs a latent rank")
            if self.qk_rope_head_dim % 2:
                raise bad("qk_rope_head_dim", "must be even")
        else:
            if self.hidden_size % self.num_attention_heads:
                raise bad("num_attention_heads", f"must divide hidden_size {self.hidden_size}")
            if self.num_key_value_heads != self.num_attention_heads:
                raise bad("num_key_value_heads", "grouped-query attention is not used by DeepSeek-VL2")

    @property
    def q_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def head_dim(self) -> int:
        """Per-head size of plain multi-head attention (Tiny): hidden / heads."""
        return self.hidden_size // self.num_attention_heads

    @property
    def softmax_scale(self) -> float:
        return self.q_head_dim ** -0.5 if self.use_mla else 1.0 / math.sqrt(self.head_dim)

    def is_moe_layer(self, index: int) -> bool:
        return (
            self.n_routed_experts is not None
            and index >= self.first_k_dense_replace
            and index % self.moe_layer_freq == 0
        )

    @property
    def cache_values_per_token(self) -> int:
        """Values stored per token and layer: latent + rope key (MLA) or K and V (MHA)."""
        if self.use_mla:
            return self.kv_lora_rank + self.qk_rope_head_dim  # type: ignore[operator]
        return 2 * self.hidden_size


@dataclass(frozen=True)
class DSVL2Config:
    """The whole model: ``vision_config``, ``projector_config``, ``language_config`` + layout keys."""

    vision_config: VisionConfig = field(default_factory=VisionConfig)
    projector_config: ProjectorConfig = field(default_factory=ProjectorConfig)
    language_config: LanguageConfig = field(default_factory=LanguageConfig)
    tile_tag: str = "2D"
    global_view_pos: str = "head"
    candidate_resolutions: tuple[tuple[int, int], ...] = ((384, 384),)

    def __post_init__(self) -> None:
        if self.tile_tag != "2D":
            raise ConfigError(f"tile_tag {self.tile_tag!r}: only '2D' is used by DeepSeek-VL2")
        if self.global_view_pos not in ("head", "tail"):
            raise ConfigError(f"global_view_pos {self.global_view_pos!r}: expected 'head' or 'tail'")
        if self.projector_config.input_dim != self.vision_config.width:
            raise ConfigError(
                f"projector_config.input_dim {self.projector_config.input_dim} != vision_config.width "
                f"{self.vision_config.width}"
            )
        if self.projector_config.n_embed != self.language_config.hidden_size:
            raise ConfigError(
                f"projector_config.n_embed {self.projector_config.n_embed} != language_config.hidden_size "
                f"{self.language_config.hidden_size}"
            )
        size = self.vision_config.image_size
        for w, h in self.candidate_resolutions:
            if w % size or h % size:
                raise ConfigError(f"candidate resolution {[w, h]} is not a multiple of image_size {size}")

    @property
    def grid(self) -> int:
        """Side of one tile's token grid after the 2x2 merge (14 for the released models)."""
        return math.ceil(self.vision_config.grid / self.projector_config.downsample_ratio)

    # ---- (de)serialisation -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config.json") -> "DSVL2Config":
        data = dict(data)
        if "tile_tag" not in data:
            raise ConfigError(f"{where}: missing 'tile_tag' (the official code default is unusable)")
        parts = {}
        for key, sub in (("vision_config", VisionConfig), ("projector_config", ProjectorConfig),
                         ("language_config", LanguageConfig)):
            if key not in data:
                raise ConfigError(f"{where}: missing '{key}'")
            if not isinstance(data[key], dict):
                raise ConfigError(f"{where}: '{key}' must be an object")
            parts[key] = _build(sub, data.pop(key), f"{where}: {key}")
        if "candidate_resolutions" in data:
            data["candidate_resolutions"] = tuple(tuple(int(v) for v in r) for r in data["candidate_resolutions"])
        return _build(cls, {**data, **parts}, where)

    @classmethod
    def from_hf_json(cls, path: str | Path) -> "DSVL2Config":
        """Read an official ``config.json`` (or the model directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data, where=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The official layout (every field explicit), ready for ``json.dump``."""
        out = {
            "architectures": ["DeepseekVLV2ForCausalLM"],
            "model_type": "deepseek_vl_v2",
            "tile_tag": self.tile_tag,
            "global_view_pos": self.global_view_pos,
            "candidate_resolutions": [list(r) for r in self.candidate_resolutions],
            "torch_dtype": "bfloat16",
            "vision_config": {"model_type": "vision", **dataclasses.asdict(self.vision_config)},
            "projector_config": {"model_type": "mlp_projector", **dataclasses.asdict(self.projector_config)},
            "language_config": {
                "model_type": "deepseek_v2",
                "architectures": ["DeepseekV2ForCausalLM"],
                **dataclasses.asdict(self.language_config),
            },
        }
        return out

    def save(self, directory: str | Path) -> None:
        Path(directory, "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _candidates(size: int, max_tiles: int = 9) -> tuple[tuple[int, int], ...]:
    """The released candidate list for tile ``size``: all (m*size, n*size) with m*n <= 9, in the shipped order."""
    shipped = [(1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (4, 1), (2, 2), (1, 5), (5, 1), (1, 6), (6, 1),
               (2, 3), (3, 2), (1, 7), (7, 1), (1, 8), (8, 1), (2, 4), (4, 2), (1, 9), (9, 1), (3, 3)]
    return tuple((m * size, n * size) for m, n in shipped if m * n <= max_tiles)


_RELEASED_VISION = VisionConfig(layers=27, width=1152, patch_size=14, mlp_ratio=3.7362)


def _released(hidden: int, lang: LanguageConfig) -> DSVL2Config:
    return DSVL2Config(
        vision_config=_RELEASED_VISION,
        projector_config=ProjectorConfig(n_embed=hidden, input_dim=1152),
        language_config=lang,
        candidate_resolutions=_candidates(384),
    )


PRESETS: dict[str, DSVL2Config] = {
    "tiny": _released(1280, LanguageConfig(
        vocab_size=129280, hidden_size=1280, intermediate_size=6848, moe_intermediate_size=896,
        num_hidden_layers=12, num_attention_heads=10, num_key_value_heads=10, use_mla=False,
        kv_lora_rank=None, q_lora_rank=None, qk_nope_head_dim=0, qk_rope_head_dim=0, v_head_dim=0,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
        topk_method="greedy", n_group=1, topk_group=1, max_position_embeddings=4096,
        bos_token_id=0, eos_token_id=1)),
    "small": _released(2048, LanguageConfig(
        hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
        num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, topk_method="greedy",
        n_group=1, topk_group=1, max_position_embeddings=4096)),
    "base": _released(2560, LanguageConfig(
        vocab_size=129280, hidden_size=2560, intermediate_size=12288, moe_intermediate_size=1536,
        q_lora_rank=None, n_routed_experts=72, n_shared_experts=2, num_experts_per_tok=6,
        first_k_dense_replace=1, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
        routed_scaling_factor=2.0, n_group=1, topk_group=1, max_position_embeddings=4096,
        bos_token_id=0, eos_token_id=1)),
    # What tests build: 64 wide, one dense + one MoE layer, 8 experts top-2, latent rank 16, a 2-block
    # ViT of width 32 on 98-pixel tiles (7x7 patches: odd, so the projector's padding path runs).
    "toy": DSVL2Config(
        vision_config=VisionConfig(image_size=98, patch_size=14, width=32, layers=2, heads=2, mlp_ratio=2.0),
        projector_config=ProjectorConfig(n_embed=64, input_dim=32),
        language_config=LanguageConfig(
            vocab_size=129280, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
            kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
            topk_method="greedy", n_group=1, topk_group=1, max_position_embeddings=4096,
            bos_token_id=0, eos_token_id=1),
        candidate_resolutions=_candidates(98, max_tiles=4),
    ),
}
