from __future__ import annotations

import dataclasses

import pytest

from embedkit.store import CacheKey, InvalidKeyError, canonical_json, digest_ids

# Pinned: if this changes, every existing cache entry is orphaned. Bump FEATURE_FORMAT_VERSION
# deliberately instead of changing the digest scheme by accident.
# FEATURE_FORMAT_VERSION 2 (store layout 2).
EXPECTED_DIGEST = "5437c09183d67016b6e178768ddad33200ef7119c2492c0ae9085205983fcc45"


def ids(n: int) -> list[str]:
    return [f"img{i:05d}" for i in range(n)]


def fixed_key(**changes: object) -> CacheKey:
    # Self-contained on purpose: the pinned digest must not follow edits to shared fixtures.
    fields: dict[str, object] = {
        "dataset": "demo",
        "model": "test/tiny-vit",
        "weights": "0" * 40,
        "resolution": 64,
        "preprocessing": canonical_json({"resize": "shorter", "mean": [0.485], "std": [0.229]}),
        "compute_dtype": "fp32",
        "storage_dtype": "float16",
        "poolings": ("cls", "mean"),
        "ids_digest": digest_ids(ids(10)),
        "content_digest": digest_ids([*ids(10), "sizes"]),
        "n_images": 10,
    }
    fields.update(changes)
    return CacheKey(**fields)  # type: ignore[arg-type]


def test_digest_is_pinned() -> None:
    key = fixed_key()
    assert key.digest() == EXPECTED_DIGEST
    assert key.short() == EXPECTED_DIGEST[:16]
    assert key.relpath() == f"demo/test--tiny-vit/64px-{EXPECTED_DIGEST[:16]}.zarr"


def test_equal_keys_built_separately_have_equal_digests() -> None:
    a, b = fixed_key(), fixed_key()
    assert a is not b
    assert a == b
    assert a.digest() == b.digest()
    # pooling order does not matter: the stored set is the identity
    assert fixed_key(poolings=("mean", "cls")).digest() == a.digest()


CHANGED = {
    "dataset": "other",
    "model": "dinov3/vitb16",
    "weights": "1" * 40,
    "resolution": 65,
    "preprocessing": canonical_json({"resize": "longer"}),
    "compute_dtype": "bf16",
    "storage_dtype": "float32",
    "poolings": ("cls", "mean", "patch"),
    "ids_digest": digest_ids(ids(11)),
    "content_digest": "a" * 64,
    "n_images": 11,
    "format_version": 3,
}


def test_every_field_changes_the_digest() -> None:
    key = fixed_key()
    assert set(CHANGED) == {f.name for f in dataclasses.fields(CacheKey)}
    digests = {key.digest()}
    for name, value in CHANGED.items():
        changed = dataclasses.replace(key, **{name: value})  # type: ignore[arg-type]
        digests.add(changed.digest())
    assert len(digests) == len(CHANGED) + 1


def test_to_dict_round_trip() -> None:
    key = fixed_key()
    d = key.to_dict()
    assert d["poolings"] == ["cls", "mean"]
    assert CacheKey.from_dict(d) == key
    with pytest.raises(InvalidKeyError, match="Unknown CacheKey fields"):
        CacheKey.from_dict({**d, "colour": "red"})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("dataset", ""),
        ("model", "  "),
        ("resolution", 0),
        ("resolution", True),
        ("n_images", -1),
        ("compute_dtype", "float32"),
        ("storage_dtype", "bfloat16"),
        ("poolings", ()),
        ("poolings", ("cls", "cls")),
        ("poolings", ("CLS!",)),
        ("ids_digest", "abc"),
        ("content_digest", "G" * 64),
        ("preprocessing", '{"b": 1, "a": 2}'),
        ("preprocessing", "not json"),
    ],
)
def test_invalid_keys_rejected(field: str, value: object) -> None:
    with pytest.raises(InvalidKeyError, match=field):
        dataclasses.replace(fixed_key(), **{field: value})  # type: ignore[arg-type]


def test_canonical_json_is_stable() -> None:
    assert canonical_json({"b": [1, 2.5, (3,)], "a": {"z": None, "y": True}}) == (
        '{"a":{"y":true,"z":null},"b":[1,2.5,[3]]}'
    )
    assert canonical_json({"x": 0.1}) == '{"x":0.1}'
    with pytest.raises(InvalidKeyError):
        canonical_json({"x": float("nan")})
    with pytest.raises(InvalidKeyError):
        canonical_json({"x": object()})


def test_digest_ids_depends_on_order_and_content() -> None:
    assert digest_ids(["a", "b"]) != digest_ids(["b", "a"])
    assert digest_ids(["ab"]) != digest_ids(["a", "b"])
    with pytest.raises(InvalidKeyError):
        digest_ids(["ok", ""])


def test_relpath_sanitises_unsafe_characters() -> None:
    key = fixed_key(dataset="../etc", model="hf-hub:org/name with space")
    rel = key.relpath()
    assert rel.count("/") == 2
    assert ".." not in rel.split("/")
    assert " " not in rel
    assert ":" not in rel
