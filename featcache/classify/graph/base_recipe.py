"""What rebuilds the frozen base a feature set came from: backbone, key, weights, seed.

``predict`` and ``export`` rebuild every base a run reads (one for a head, several for fused
heads and ensembles) from the key and the weights argument recorded in the run; the weights'
identity is checked against the key, so features are never computed with other weights.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ...cache.key import KeySpec
from ...errors import FeatcacheError
from ...extract.bases.backbones import Backbone, get_backbone
from ...extract.bases.weights import WeightsSource, resolve_weights


@dataclass(frozen=True)
class BaseRecipe:
    """What rebuilds the frozen base a run's features came from."""

    backbone: Backbone
    spec: KeySpec
    weights: WeightsSource
    seed: int

    @property
    def layer(self) -> str | None:
        return None if self.spec.layer == "output" else self.spec.layer

    @property
    def network(self) -> tuple:
        """What identifies the base network and its input: feature sets with the same network
        (other layers, poolings or storage dtypes) share one built base."""
        s = self.spec
        return (s.backbone, s.weights, s.input_size, s.resize, s.preprocessing, s.precision, self.seed)

    @property
    def compute_spec(self) -> KeySpec:
        """The key without the storage dtype: features computed once, then rounded per set."""
        return replace(self.spec, dtype="float32")


def recipe_for(record: dict, run_dir: str, weights: str | None = None) -> BaseRecipe:
    """Rebuild the base's weights source of one feature-set record and check it is the one the
    features were made with. ``weights`` overrides the recorded weights argument (a moved
    file, or a store written before the argument was recorded)."""
    spec = KeySpec(**record["key"])
    backbone = get_backbone(spec.backbone)
    identity = spec.weights
    seed = int(identity.split("=", 1)[1]) if identity.startswith("random:seed=") else 0
    if not backbone.is_network:
        return BaseRecipe(backbone, spec, resolve_weights(backbone, None, seed), seed)
    arg = weights or record.get("weights_arg")
    if arg is None:
        if identity.startswith("imagenet:"):
            arg = "imagenet"
        elif identity.startswith("random:"):
            arg = "none"
        else:
            raise FeatcacheError(f"{run_dir}: the features were extracted with a weights file ({identity}) whose "
                                 "path was not recorded; pass --weights PATH to that file")
    try:
        source = resolve_weights(backbone, arg, seed)
    except FeatcacheError as exc:
        raise FeatcacheError(f"{exc} (needed to rebuild the base of {run_dir}; pass --weights PATH if it moved)") from None
    if source.identity != identity:
        raise FeatcacheError(f"{arg}: these weights ({source.identity}) are not the ones the features were "
                             f"extracted with ({identity}); pass --weights with the original file")
    return BaseRecipe(backbone, spec, source, seed)


def base_recipe(run_dir: str, config: dict, weights: str | None = None) -> BaseRecipe:
    """The recipe of a one-feature-set run (head, finetune): its ``feature_set`` record."""
    return recipe_for(config["feature_set"], run_dir, weights)


def recipes_for(records: list[dict], run_dir: str, weights: str | None = None) -> dict[str, BaseRecipe]:
    """{feature-set name: recipe} for every record. With several network bases, ``weights``
    replaces the recorded file of the bases whose features it made (checked by identity) and
    must match at least one of them."""
    networks = [r for r in records if get_backbone(r["key"]["backbone"]).is_network]
    if weights is None or len(networks) <= 1:
        return {r["name"]: recipe_for(r, run_dir, weights) for r in records}
    recipes, used = {}, False
    for record in records:
        try:
            recipes[record["name"]] = recipe_for(record, run_dir, weights)
            used = used or record in networks
        except FeatcacheError:  # not this base's file: keep the recorded one
            recipes[record["name"]] = recipe_for(record, run_dir, None)
    if not used:
        raise FeatcacheError(f"{weights}: not the weights file of any base of {run_dir} (their features were "
                             f"extracted with {', '.join(sorted({r['key']['weights'] for r in networks}))})")
    return recipes
