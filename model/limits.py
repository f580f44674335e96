"""Bounds on the sizes a stored model config may ask for, checked before anything is built.

A checkpoint's config.json decides how big a network `load_checkpoint` builds. A value typed by
hand (or by an attacker) such as `channels: [100000, ...]` would allocate many gigabytes before
any shape check could fail, and a `vocab_size` of "12" or 12.5 would fail deep inside torch. Each
size must be an integer (not a bool, not a float) inside its range: far above the `large`
preset, far below what would exhaust a host. Fields not listed are checked by ModelConfig itself.

A stored config may also hold options an ablation rejected and issue 25 removed (docs/quality.md
keeps the record): checkpoints saved before then store them at their "off" values, which
`without_removed_options` drops; a checkpoint that used one is refused by name.
"""

from __future__ import annotations

from typing import Any

from model.tokenizer import SPECIALS

# field -> (min, max). For the LISTS, the bounds of each entry.
CONFIG_LIMITS: dict[str, tuple[int, int]] = {
    "image_size": (8, 2048), "z_dim": (1, 4096), "channels": (1, 4096), "texture_bank": (0, 256),
    "text_width": (1, 8192), "text_layers": (1, 64), "text_encoder_layers": (1, 64), "text_heads": (1, 128),
    "max_caption_tokens": (3, 4096), "prefix_tokens": (1, 512), "feature_dim": (1, 16384),
    "embed_dim": (1, 8192), "prior_width": (1, 16384), "prior_depth": (1, 128),
    "prior_timesteps": (1, 100_000), "ddim_steps": (1, 100_000), "decoder_widths": (0, 4096),
    "pixel_shuffle": (1, 64),
}  # fmt: skip
LISTS = ("channels", "decoder_widths")  # fields whose every entry the limits bound
MAX_CHANNEL_STAGES = 16
VOCAB_LIMITS = (len(SPECIALS), 10_000_000)  # at least the four specials


def _check_int(name: str, value: Any, limits: tuple[int, int]) -> None:
    lo, hi = limits
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name}={value} is outside the supported range {lo}..{hi}")


def check_limits(model_config: Any, vocab_size: Any) -> None:
    """ValueError naming the field, its value and its limit when a size is not an integer in range."""
    _check_int("vocab_size", vocab_size, VOCAB_LIMITS)
    if not isinstance(model_config, dict):
        raise ValueError(f"model_config must be a JSON object, got {type(model_config).__name__}")
    for name, limits in CONFIG_LIMITS.items():
        if name not in model_config:
            continue  # a missing field takes ModelConfig's default
        value = model_config[name]
        if name not in LISTS:
            _check_int(f"model_config.{name}", value, limits)
            continue
        least = 1 if name == "channels" else 0
        if not isinstance(value, list) or not least <= len(value) <= MAX_CHANNEL_STAGES:
            raise ValueError(f"model_config.{name} must be a list of {least}..{MAX_CHANNEL_STAGES} integers, got {value!r}")
        for i, c in enumerate(value):
            _check_int(f"model_config.{name}[{i}]", c, limits)


# Options of older checkpoints -> the value that means "off"; then what meant something only with
# one of them on, dropped whatever its value.
REMOVED_OPTIONS: dict[str, Any] = {"detail_channels": 0, "noise_maps": False, "disc_channels": [], "free_bits": 0.0}
REMOVED_SETTINGS = ("detail_size", "adversarial_start")
REMOVED_LOSS_WEIGHTS = ("detail_kl", "adversarial")


def without_removed_options(model_config: dict[str, Any]) -> dict[str, Any]:
    """A stored model_config without the removed options (module docstring); ValueError naming the
    option when it is not off."""
    for name, off in REMOVED_OPTIONS.items():
        if name in model_config and model_config[name] != off:
            raise ValueError(
                f"model_config.{name}={model_config[name]!r}: this checkpoint uses the {name} option, which "
                "was removed from inkseed after an ablation rejected it (docs/quality.md keeps the record); "
                "load it with the inkseed version that trained it"
            )
    removed = {*REMOVED_OPTIONS, *REMOVED_SETTINGS}
    config = {k: v for k, v in model_config.items() if k not in removed}
    if isinstance(config.get("loss_weights"), dict):
        config["loss_weights"] = {k: v for k, v in config["loss_weights"].items() if k not in REMOVED_LOSS_WEIGHTS}
    return config
