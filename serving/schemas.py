"""What the endpoint answers, as pydantic models, and the OpenAPI document built from them.

The handlers (serving/http.py) build plain dicts for speed; tests validate real answers against
these models, so the documentation cannot drift from what is sent.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from serving.uploads import MAX_TOP_K


class ClassProbability(BaseModel):
    label: str = Field(examples=["cat"])
    class_id: int = Field(ge=0, examples=[3])
    probability: float = Field(ge=0, le=1, examples=[0.87])


class ModelInfo(BaseModel):
    bento_tag: str = Field(examples=["cifar10-classifier:7c3kqvx2hkqmamvb"])
    registered_model: str | None = Field(examples=["cifar10-classifier"])
    version: str | None = Field(
        description="MLflow registry version (also the X-Model-Version header)", examples=["3"]
    )
    run_id: str | None = Field(description="MLflow run that trained it")
    val_accuracy: float | None = Field(
        description="validation accuracy of this very ONNX model (onnxruntime), the figure "
        "that made it champion",
        examples=[0.9103],
    )
    served_tta: str | None = Field(
        None,
        description="test-time augmentation inside the model's graph (none, flip, flip_translate)",
        examples=["none"],
    )
    precision: str = Field(
        "fp32",
        description="fp32, or int8 (the statically quantised twin, "
        "served when CIFAR_PRECISION=int8 and within 0.5 points of fp32)",
        examples=["fp32"],
    )
    model_card: str = Field("/model", description="where its model card is served")


class ImageInfo(BaseModel):
    format: str = Field(examples=["PNG"])
    width: int = Field(examples=[32])
    height: int = Field(examples=[32])
    mode: str = Field(
        description="Pillow mode of the upload before conversion to RGB", examples=["RGB"]
    )
    frames: int = Field(description="frames in the file; the first one is classified", examples=[1])


_OOD = (
    "how unlike the model's training images this image is (higher: less like CIFAR-10; "
    "cifarlab/ood.py); null when the served version has no reference (see GET /model)"
)


class Classification(BaseModel):
    request_id: str | None = Field(
        None,
        description="this answer's id, for POST /feedback (also the X-Request-Id header); "
        "in a batch, `<request id>.<index>`",
        examples=["5f0c2b6a9d8e4f1a8b7c6d5e4f3a2b1c"],
    )
    label: str = Field(examples=["cat"])
    class_id: int = Field(examples=[3])
    confidence: float = Field(description="probability of `label`", examples=[0.87])
    top_k: list[ClassProbability]
    ood_score: float | None = Field(None, description=_OOD, examples=[-0.8])
    in_distribution: bool | None = Field(
        None,
        description="false: this does not look like a CIFAR-10 image (ood_score above the "
        "version's threshold, which keeps 95 % of its validation images in); null: unknown",
    )
    image: ImageInfo
    model: ModelInfo


class Feedback(BaseModel):
    request_id: str = Field(description="the `request_id` of an answer", examples=["5f0c2b6a"])
    label: str = Field(description="the true CIFAR-10 class", examples=["cat"])


class FeedbackStored(BaseModel):
    stored: bool = True
    request_id: str
    label: str
    predicted: str | None = Field(None, description="what the service answered")
    model_version: str | None = None


class BatchClassification(BaseModel):
    request_id: str | None = Field(None, description="the request's id (X-Request-Id)")
    results: list[Classification] = Field(description="one per uploaded image, in upload order")
    model: ModelInfo


class ModelCard(BaseModel):
    bento_tag: str
    registered_model: str | None = None
    mlflow_version: str | None = None
    mlflow_run_id: str | None = None
    val_accuracy: float | None = None
    test_accuracy: float | None = None
    int8_val_accuracy: float | None = None
    int8_test_accuracy: float | None = None
    int8_servable: bool | None = Field(
        None, description="whether the int8 twin passed its 0.5-point rule (null: no twin)"
    )
    int8_judged_with_dot_product: bool | None = Field(
        None,
        description="whether the CPU that judged the twin has int8 dot-product "
        "instructions (null: no twin, or the CPU did not say)",
    )
    precision: str = "fp32"
    precision_note: str | None = Field(None, description="why int8 was asked for and not served")
    ood_threshold: float | None = Field(
        None, description="ood_score above it: in_distribution false"
    )
    ood_method: str | None = None
    ood_note: str | None = Field(None, description="why answers say in_distribution: null")
    served_tta: str | None = None
    preset: str | None = None
    promotion_reason: str | None = None
    class_names: list[str] | None = None
    model_card_markdown: str | None = Field(None, description="the registry version's model card")


class Problem(BaseModel):
    error: str = Field(
        description="what is wrong, in words",
        examples=["image format TIFF is not accepted; send one of PNG, JPEG, WEBP, BMP, GIF"],
    )
    reason: str = Field(description="a stable code for programs", examples=["unsupported_format"])


def _ref(model: type[BaseModel]) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _problems(*codes: int) -> dict[str, Any]:
    words = {
        400: "bad input",
        404: "no such answer on record",
        409: "a label was given before; the first is kept (its `label` is in the body)",
        413: "too large",
        415: "not an accepted type",
        503: "busy or not ready: retry after the Retry-After header's seconds",
    }
    return {
        str(c): {
            "description": words[c],
            "content": {"application/json": {"schema": _ref(Problem)}},
        }
        for c in codes
    }


def _ok(description: str, model: type[BaseModel]) -> dict[str, Any]:
    version_header = {
        "X-Model-Version": {
            "description": "registry version that answered",
            "schema": {"type": "string"},
        }
    }
    return {
        "200": {
            "description": description,
            "headers": version_header,
            "content": {"application/json": {"schema": _ref(model)}},
        }
    }


_TOP_K = {
    "type": "integer",
    "minimum": 1,
    "maximum": MAX_TOP_K,
    "default": 3,
    "description": "how many classes to list",
}
_BINARY = {"type": "string", "format": "binary"}


def openapi(max_upload_bytes: int, max_batch_images: int, max_pixels: int) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the classification endpoints (served at /docs.json)."""
    schemas: dict[str, Any] = {}
    for model in (
        Classification,
        BatchClassification,
        ModelCard,
        Problem,
        Feedback,
        FeedbackStored,
    ):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    image_rules = (
        f"PNG, JPEG, WebP, BMP or GIF; at most {max_pixels / 1e6:.0f} megapixels and "
        f"{max_upload_bytes / 2**20:.0f} MiB per request; the central square is "
        "resized to 32x32"
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "cifar10-classifier",
            "version": "1",
            "description": "CIFAR-10 image classification: `curl -F image=@cat.png "
            "http://127.0.0.1:3000/classify`. The page at / does the same "
            "in a browser.",
        },
        "paths": {
            "/classify": _classify_path(image_rules),
            "/classify_batch": _batch_path(image_rules, max_batch_images),
            "/feedback": {
                "post": {
                    "summary": "Tell the service the true class of an earlier answer",
                    "description": "curl -H 'Content-Type: application/json' -d "
                    '\'{"request_id": "...", "label": "cat"}\' http://127.0.0.1:3000/feedback. '
                    "Recorded in the prediction log beside the answer.",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref(Feedback)}},
                    },
                    "responses": {
                        "200": {
                            "description": "stored",
                            "content": {"application/json": {"schema": _ref(FeedbackStored)}},
                        },
                        **_problems(400, 404, 409, 413),
                    },
                }
            },
            "/model": {
                "get": {
                    "summary": "What is served, with its model card",
                    "responses": _ok("the served model", ModelCard),
                }
            },
        },
        "components": {"schemas": schemas},
    }


def _classify_path(image_rules: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": "Classify one image",
            "description": "curl -F image=@cat.png http://127.0.0.1:3000/classify, or the "
            "raw image as the body: curl --data-binary @cat.png -H "
            "'Content-Type: image/png' http://127.0.0.1:3000/classify. " + image_rules,
            "parameters": [{"name": "top_k", "in": "query", "required": False, "schema": _TOP_K}],
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["image"],
                            "properties": {
                                "image": {**_BINARY, "description": "exactly one file"},
                                "top_k": _TOP_K,
                            },
                        }
                    },
                    "image/*": {"schema": _BINARY},
                    "application/octet-stream": {"schema": _BINARY},
                },
            },
            "responses": {
                **_ok("the class and class probabilities", Classification),
                **_problems(400, 413, 415, 503),
            },
        }
    }


def _batch_path(image_rules: str, max_batch_images: int) -> dict[str, Any]:
    return {
        "post": {
            "summary": "Classify several images",
            "description": f"curl -F images=@a.png -F images=@b.png ... (up to {max_batch_images}); "
            "one bad image fails the request, naming it. " + image_rules,
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["images"],
                            "properties": {
                                "images": {"type": "array", "items": _BINARY},
                                "top_k": _TOP_K,
                            },
                        }
                    }
                },
            },
            "responses": {
                **_ok("one result per image, in upload order", BatchClassification),
                **_problems(400, 413, 415, 503),
            },
        }
    }
