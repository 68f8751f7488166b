"""The cache key: the one place that decides which inputs make two feature sets the same.

Every read and every write of a feature set goes through :func:`feature_set_key`. Any
input that changes the numbers of the features must be a field of :class:`KeySpec`;
adding a field changes every key, which is what FORMAT_VERSION bumps are for.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

# Bumped whenever the layout of a feature set or the meaning of a key field changes.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class KeySpec:
    backbone: str  # registry name, e.g. "vgg16" or "mobilenet_0.25"
    weights: str  # weights identity: "random:seed=0", "imagenet:<file>:<hash>", "sha256:<hex>"
    input_size: int  # square input side in pixels
    resize: str  # PIL resampling method, e.g. "bilinear"
    preprocessing: str  # preprocess_input flavour, e.g. "caffe", "tf", "none", "scale01"
    layer: str  # the layer whose output is cached ("output" for the model output)
    pooling: str  # "none", "avg" or "max"
    dtype: str  # storage dtype, e.g. "float32", "float16"
    precision: str = "fp32"  # compute precision of the base
    augment: str = "none"  # augmentation recipe and seed, canonical JSON, or "none"
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return asdict(self)


def feature_set_key(spec: KeySpec) -> str:
    """The group name of a feature set: readable prefix plus a digest of every key field.

    The prefix is for people (``h5ls`` output); the digest is what makes keys distinct.
    """
    canonical = json.dumps(spec.to_dict(), sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:12]
    layer = spec.layer.replace("/", "_")
    return f"{spec.backbone}-{spec.input_size}-{layer}-{spec.pooling}-{spec.dtype}-{digest}"


def spec_from_attrs(attrs) -> KeySpec:
    """Rebuild the KeySpec stored in a feature set's attributes (the inverse of to_dict)."""
    fields = json.loads(attrs["key"])
    return KeySpec(**fields)
