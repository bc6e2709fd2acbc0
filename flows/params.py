"""Flow parameters: a preset name plus typed, partial overrides of each stage's config.

Every override field carries the constraints of the config field it overrides, so Prefect (and
the server, for deployment runs) rejects `lr=-1` or `train_size=0` naming the field, before any
work starts. A field left out (None) keeps the preset's value.
"""

from __future__ import annotations

import copy
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, create_model

from cifarlab.config import DataConfig, ModelConfig, RunConfig, TrainConfig, preset, preset_names


def _partial(model: type[BaseModel], name: str) -> type[BaseModel]:
    """A copy of `model` whose fields are all optional (default None), constraints kept."""
    fields: dict[str, Any] = {}
    for field_name, info in model.model_fields.items():
        optional = copy.copy(info)
        optional.default = None
        optional.default_factory = None
        fields[field_name] = (cast(Any, info.annotation) | None, optional)
    return create_model(
        name,
        __config__=ConfigDict(extra="forbid"),
        __doc__=(f"Overrides of {model.__name__}; unset fields keep the preset's value."),
        **fields,
    )


DataOverrides = _partial(DataConfig, "DataOverrides")
ModelOverrides = _partial(ModelConfig, "ModelOverrides")
TrainOverrides = _partial(TrainConfig, "TrainOverrides")
PresetName = Literal[tuple(preset_names())]  # type: ignore[valid-type]


def resolve_config(
    preset_name: str, data: BaseModel | None, model: BaseModel | None, train: BaseModel | None
) -> RunConfig:
    """The preset with the overrides that were set, validated as a whole."""
    overrides = {
        section: part.model_dump(exclude_none=True)
        for section, part in (("data", data), ("model", model), ("train", train))
        if part is not None
    }
    return preset(preset_name, **{k: v for k, v in overrides.items() if v})
