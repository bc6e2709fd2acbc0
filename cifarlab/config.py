"""Typed configuration of a run, and the named presets that are values of it.

One pydantic model per stage; the flows take them as parameters so Prefect validates them and
shows a form. Presets are plain `RunConfig` values: `preset("seed-baseline", train={"epochs": 4})`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from models import model_names


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    """Where the images come from and how the 50,000 training images are split."""

    source: str | None = Field(
        None,
        description="URL, archive path or extracted folder; None: $CIFAR10_SOURCE, "
        "else the official URL",
    )
    train_size: PositiveInt = Field(40_000, description="training images drawn from the 50,000")
    val_size: PositiveInt = Field(10_000, description="validation images, disjoint from train")
    split_seed: int = Field(0, description="seed of the stratified split")
    checksums: dict[str, str] | None = Field(
        None, description="per-file md5s; None: the official CIFAR-10 files"
    )
    extra_train: str | None = Field(
        None,
        description="labelled images added to the training split: a packed file's name in "
        "<root>/data/labelled/, or a path (cifarlab/labelled.py: the images clients labelled "
        "through the service's /feedback)",
    )
    download_retries: int = Field(4, ge=0, le=20, description="retries of a failed download")
    download_backoff_s: float = Field(1.0, ge=0, description="first retry delay, doubling after")

    @model_validator(mode="after")
    def _fits(self) -> DataConfig:
        if self.train_size + self.val_size > 50_000:
            raise ValueError(
                f"train_size + val_size = {self.train_size + self.val_size} "
                "exceeds the 50000 training images"
            )
        return self


class ModelConfig(_Strict):
    """An architecture from the registry, by name, with its options."""

    name: Literal[tuple(model_names())] = Field(  # type: ignore[valid-type]
        "fast", description="architecture from the registry (models/)"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments")

    @model_validator(mode="after")
    def _check_options(self) -> ModelConfig:
        # Unknown names and bad values fail here, when the parameters are validated, not when
        # training builds the net: "model.options.kernel_size: must be odd, got 4".
        from models import check_options

        check_options(self.name, self.options)
        return self


class TrainConfig(_Strict):
    """Optimisation, augmentation and evaluation settings shared by every net."""

    epochs: PositiveInt = 10
    batch_size: PositiveInt = 32
    optimizer: Literal["adam", "sgd", "muon"] = Field(
        "adam",
        description="muon: Muon for the conv filters (muon_lr, muon_momentum), Nesterov "
        "SGD for the other parameters (lr, momentum, weight_decay)",
    )
    lr: float = Field(4e-4, gt=0, description="peak learning rate (mean loss over the batch)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (Nesterov) / Adam beta1")
    muon_lr: float = Field(
        0.24,
        gt=0,
        le=1,
        description="optimizer muon: peak fraction of the "
        "conv filters' norm each step moves them by",
    )
    muon_momentum: float = Field(
        0.6, ge=0, lt=1, description="optimizer muon: the filters' Nesterov momentum"
    )
    weight_decay: float = Field(0.0, ge=0, description="coupled L2, as torch optimizers apply it")
    bias_lr_scale: float = Field(
        1.0, gt=0, description="BatchNorm shifts learn this much faster (and decay this much less)"
    )
    schedule: Literal["constant", "warmup_linear", "onecycle"] = "constant"
    warmup_frac: float = Field(0.2, ge=0, le=1, description="fraction of steps spent warming up")
    start_lr_frac: float = Field(0.2, ge=0, le=1, description="warm-up starts at lr * this")
    end_lr_frac: float = Field(0.0, ge=0, le=1, description="warmup_linear ends at lr * this")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    translate: int = Field(0, ge=0, le=8, description="random shift, pixels (reflect padding)")
    flip: Literal["none", "random", "alternating"] = "none"
    averaging: Literal["none", "ema", "lookahead"] = Field(
        "none",
        description="ema: evaluate an average of the weights; lookahead: also pull the "
        "weights back to it",
    )
    average_every: PositiveInt = Field(5, description="steps between weight-average updates")
    average_start_frac: float = Field(
        0.3, ge=0, lt=1, description="fraction of the steps trained before averaging starts"
    )
    average_decay: float = Field(0.95, gt=0, lt=1, description="per-step decay of the average")
    whiten_bias_epochs: int = Field(
        0, ge=0, description="epochs the whitening bias trains before freezing (fast net only)"
    )
    tta: Literal["none", "flip", "flip_translate"] = Field(
        "none",
        description="test-time augmentation (views averaged: flip 2, flip_translate 6); "
        "recorded as tta_*_accuracy only, unless serve_tta bakes it into the served model",
    )
    serve_tta: bool = Field(
        False,
        description="bake `tta` into the exported ONNX graph: the served model (and every "
        "accuracy that chooses the champion) then includes it, at 2x/6x the compute per image",
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="stop after this many epochs without a lower validation loss"
    )
    val_images_per_epoch: PositiveInt | None = Field(
        None,
        description="validate on the first N validation images after each epoch (the "
        "progress line), on all of them after the last; None: all after every epoch. Early "
        "stopping always uses all, so its epochs compare like with like",
    )
    channels_last: bool = True
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on the CPU (faster there)"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    compile: bool = Field(False, description="torch.compile the model (pays off on long runs)")

    @model_validator(mode="after")
    def _check_tta(self) -> TrainConfig:
        if self.serve_tta and self.tta == "none":
            raise ValueError(
                "serve_tta is true but tta is 'none': name the TTA to serve "
                "(tta 'flip' or 'flip_translate')"
            )
        return self


# Settings that change what is measured while training, not what is trained: a run with another
# value has the same config hash and resumes the same checkpoint.
MEASUREMENT_ONLY: dict[str, Any] = {"train": {"val_images_per_epoch"}}
# Settings that only one optimizer reads: left out of a config's identity under the others, so
# adding them changed no existing config's hash and refused no existing checkpoint.
_MUON_ONLY = {"muon_lr", "muon_momentum"}


def identity_exclude(config: RunConfig) -> dict[str, Any]:
    """What `model_dump(exclude=...)` leaves out of a config's identity (hash, checkpoint)."""
    train = set(MEASUREMENT_ONLY["train"])
    if config.train.optimizer != "muon":
        train |= _MUON_ONLY
    # Without extra images a config is what it was before the field existed: same hash, so
    # its runs and checkpoints are still resumed.
    data = {"extra_train"} if config.data.extra_train is None else set()
    return {"train": train, "data": data}


class RunConfig(_Strict):
    """Everything one training run needs besides its root folder."""

    preset: str = Field("custom", description="the preset this config started from")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _check_muon(self) -> RunConfig:
        # Muon rescales the filters every step, which only a BatchNorm after each conv ignores.
        if self.train.optimizer == "muon" and self.model.name != "fast":
            raise ValueError(
                f"optimizer 'muon' needs a BatchNorm after every conv (model "
                f"'fast'); model {self.model.name!r} has none: use 'sgd' or 'adam'"
            )
        return self


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------

_SEED_TRAIN = dict(
    optimizer="adam", lr=4e-4, batch_size=32, epochs=10, schedule="constant", precision="fp32"
)

# The fast recipe's optimisation in plain torch units (mean loss over the batch). Its learning
# rate is airbench's 11.5, stated per 1024 summed examples with momentum folded in, converted:
# 11.5 / (1 + 1/(1 - 0.85)) = 1.5 at batch 1024. Its weight decay is coupled L2 as torch's SGD
# applies it (lr x wd shrinks the weights each step): a value of this project's, not a
# conversion of airbench's.
_FAST_TRAIN = dict(
    optimizer="sgd",
    lr=1.5,
    momentum=0.85,
    weight_decay=1.33e-3,
    bias_lr_scale=64.0,
    schedule="warmup_linear",
    warmup_frac=0.23,
    start_lr_frac=0.2,
    end_lr_frac=0.07,
    label_smoothing=0.2,
    translate=2,
    flip="alternating",
    averaging="lookahead",
    whiten_bias_epochs=3,
    tta="flip_translate",
    batch_size=1024,
)

# On a CPU, what is evaluated besides the served model costs training time: validating all
# 10,000 images after each of 10 epochs and the unserved TTA's 6 views of 20,000 images were
# 220,000 forward passes. These presets drop 192,000 of them (about 120-145 s at the 1,300-1,600
# images/s of benchmarks/results/eval-batch-cpu.json; fast-cpu trains 777 s,
# train-cpu-flops.json): they validate each epoch on 2,000 images (all 10,000 after the last)
# and measure no unserved TTA. `train={"tta": "flip_translate"}` measures it again, and with
# `"serve_tta": true` as well it is served.
_CPU_EVAL = dict(val_images_per_epoch=2000, tta="none")

PRESETS: dict[str, dict[str, Any]] = {
    # The report's first net and settings: it measured 66.42 % test accuracy.
    "seed-baseline": dict(model=dict(name="seed-baseline"), train=_SEED_TRAIN),
    "seed-deep": dict(model=dict(name="seed-deep"), train=_SEED_TRAIN),
    "seed-wide": dict(
        model=dict(name="seed-wide"),
        train={**_SEED_TRAIN, "lr": 1e-3, "batch_size": 64, "epochs": 8},
    ),
    # The fast recipe sized for a CPU: narrower net, same schedule shape, batch 512 with the lr
    # scaled linearly (twice the steps of batch 1024). Its speed and accuracy:
    # benchmarks/results/train-*.json.
    "fast-cpu": dict(
        model=dict(name="fast", options={"widths": (64, 128, 128)}),
        train={**_FAST_TRAIN, **_CPU_EVAL, "epochs": 10, "batch_size": 512, "lr": 0.75},
    ),
    # A short schedule of a small net, past the report's best test accuracy (75.86 %) in a
    # fraction of fast-cpu's time. Muon moves its filters: over 2 epochs it scored 6.5 points
    # above the same recipe with SGD, at about the same speed (benchmarks/results/muon-tuning/, where
    # 0.24 beat 0.12 and 0.35). Over 6 epochs of fast-cpu's net it was no better than SGD, so
    # fast-cpu keeps SGD.
    "fast-cpu-quick": dict(
        model=dict(name="fast", options={"widths": (32, 64, 64)}),
        train={
            **_FAST_TRAIN,
            **_CPU_EVAL,
            "epochs": 2,
            "batch_size": 512,
            "lr": 0.75,
            "whiten_bias_epochs": 1,
            "optimizer": "muon",
            "muon_lr": 0.24,
            "muon_momentum": 0.6,
        },
    ),
    # The fast recipe for fewer FLOPs to the same accuracy on a CPU. The first block convolves
    # at full resolution, where a channel costs about 4x what it costs in the second block:
    # halved to 32, it pays for 16 more channels in the blocks after it, and Muon (muon_lr 0.1)
    # moves the filters. 0.232 GFLOP per image against fast-cpu's 0.324, 9 epochs: 83.5 TFLOP
    # of training where fast-cpu took 129.5 to 92 % test with the unserved flip+translate TTA
    # (benchmarks/results/train-cpu-lean.json, train-cpu-flops.json).
    "fast-cpu-lean": dict(
        model=dict(name="fast", options={"widths": (32, 144, 144)}),
        train={
            **_FAST_TRAIN,
            **_CPU_EVAL,
            "epochs": 9,
            "batch_size": 512,
            "lr": 0.75,
            "optimizer": "muon",
            "muon_lr": 0.1,
            "muon_momentum": 0.6,
        },
    ),
    # The full-width recipe for one GPU (airbench94's widths and schedule).
    "fast-gpu": dict(
        model=dict(name="fast", options={"widths": (64, 256, 256)}),
        train={**_FAST_TRAIN, "epochs": 10, "precision": "bf16"},
    ),
}
DEFAULT_PRESET = "fast"  # resolves to fast-gpu where CUDA is present, else fast-cpu


def preset_names() -> list[str]:
    """Every preset name, `fast` (device-dependent alias) included."""
    return sorted([*PRESETS, DEFAULT_PRESET])


def resolve_preset_name(name: str) -> str:
    """Map the `fast` alias to the variant for this machine; reject unknown names."""
    if name == DEFAULT_PRESET:
        import torch  # here, not at the top: the flows import this module for its types only

        return "fast-gpu" if torch.cuda.is_available() else "fast-cpu"
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(preset_names())}")
    return name


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "options":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def preset(name: str = DEFAULT_PRESET, **overrides: dict[str, Any]) -> RunConfig:
    """A preset as a validated RunConfig, with per-section overrides merged in."""
    resolved = resolve_preset_name(name)
    return RunConfig.model_validate(_merge({"preset": resolved, **PRESETS[resolved]}, overrides))
