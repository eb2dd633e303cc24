"""Training settings: one pydantic model (the Prefect UI renders it as a form).

The defaults are the reference recipe; ``QUICK`` is the laptop preset.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

N_VGG_LAYERS = 19  # VGG16 without top: input + 13 conv + 5 pool
RECIPE_FREEZE = 15  # input through block4_pool

# The laptop run: a seeded subset, small input, random init, one epoch: under 4 minutes
# on 2 AVX2-only cores (bench/quick_run.py compares it with the other candidates). The
# learning rate anneals to 0 by the last step: with the recipe's near-constant rate the
# last weights are one noisy step's (bfloat16 on an AVX512-BF16 CPU: test RMSE 45-75 by
# seed, against 45-48 annealed).
QUICK = {
    "weights": "none",
    "input_size": 32,
    "epochs": 1,
    "lr_schedule": "cosine",
    "train_limit": 4000,
    "test_limit": 1000,
}
CATALOG_INPUT_SIZE = 96  # catalogs' default input side (the demo keeps 48)
# RGB at 96; each night starts from the line's champion and fits what changed since it
CATALOG_DEFAULTS = {"preprocess": "rgb", "input_size": CATALOG_INPUT_SIZE, "warm_start": "champion"}


class TrainSettings(BaseModel):
    """Every training setting; the defaults are the reference recipe."""

    input_size: int = Field(48, ge=32, description="VGG16 input side (>= 32)")
    preprocess: Literal["gray28", "rgb"] = Field(
        "gray28",
        description="gray28: the demo's 28x28 gray images, resized in the model; rgb: colour "
        "images fit into an input_size square (catalogs)",
    )
    weights: str = Field(
        "imagenet", description="imagenet, none, or a path / s3:// URI of a .h5 weights file"
    )
    weights_sha256: str | None = Field(None, description="expected SHA-256 of a weights file")
    freeze: int | None = Field(
        None,
        ge=0,
        le=N_VGG_LAYERS,
        description="VGG16 layers frozen from the input; default 15 (through block4_pool) "
        "with pretrained weights, 0 with weights=none",
    )
    head_units: int = Field(256, ge=1)
    dropout: float = Field(0.5, ge=0, lt=1)
    learning_rate: float = Field(1e-4, gt=0)
    decay: float = Field(1e-6, ge=0, description="inverse-time decay per step (Keras 2 'decay')")
    lr_schedule: Literal["inverse_time", "cosine"] = Field(
        "inverse_time",
        description="inverse_time: the recipe's decay per step; cosine: from learning_rate "
        "down to 0 over the run's steps, so the last weights are not a noisy step's",
    )
    batch_size: int = Field(32, ge=1)
    epochs: int = Field(5, ge=1)
    augment: Literal["cached", "online", "none"] = Field(
        "cached",
        description="cached: train the top on pre-augmented cached views; online: the "
        "recipe's full model with random shifts per batch; none: no augmentation",
    )
    views: int = Field(
        4, ge=1, description="cached views per train image: original, flip, then shifted"
    )
    shift: float = Field(0.1, ge=0, lt=0.5, description="max width/height shift fraction")
    flip: bool = Field(True, description="random horizontal flips")
    precision: Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"] = "auto"
    extraction_engine: Literal["auto", "keras", "openvino"] = Field(
        "auto",
        description="what computes the frozen features: auto = openvino (float32) where "
        "training runs float32 on a CPU and OpenVINO is installed, else keras",
    )
    warm_start: str = Field(
        "off",
        pattern=r"^(off|champion|m-[0-9a-f]{16})$",
        description="off: train the top from its initial weights on every train image; "
        "champion (the line's) or a model version: start from that model's top and fit on "
        "the train images that are new or repriced since it, plus a sample of the rest "
        "(catalogs with frozen layers; docs/catalog.md)",
    )
    replay: float = Field(
        4.0, ge=0, description="with warm_start: unchanged train images sampled per changed one"
    )
    warm_learning_rate: float | None = Field(
        None,
        gt=0,
        description="with warm_start: the fit's learning rate (default learning_rate / 10)",
    )
    train_limit: int | None = Field(None, ge=1, description="train on a seeded subset")
    test_limit: int | None = Field(None, ge=1, description="validate on a seeded subset")
    seed: int = 0

    @model_validator(mode="after")
    def _weights_named(self) -> TrainSettings:
        if self.weights.strip() == "":
            raise ValueError("weights must be imagenet, none, or a path/URI of a weights file")
        return self

    def frozen_layers(self) -> int:
        if self.freeze is not None:
            return self.freeze
        return 0 if self.weights == "none" else RECIPE_FREEZE

    def fit_learning_rate(self) -> float:
        """The learning rate the fit starts at: a warm start's is lower (default a tenth):
        at the full rate RMSprop's first steps undo part of what the parent learnt
        (docs/catalog.md has the measurement)."""
        if self.warm_start == "off":
            return self.learning_rate
        return self.warm_learning_rate or self.learning_rate / 10

    def uses_cache(self) -> bool:
        return self.frozen_layers() > 1 and self.augment != "online"

    def cached_views(self) -> int:
        return self.views if self.augment == "cached" else 1
