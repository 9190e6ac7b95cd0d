"""Each finetuning method trains exactly its parameters; the frozen ones stay bit-identical."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import embedkit.finetune
from embedkit.errors import ConfigError
from embedkit.finetune import (
    METHOD_NAMES,
    METHODS,
    Classifier,
    FinetuneRequest,
    LoraSettings,
    Method,
    count_parameters,
    get_method,
    register_method,
)
from embedkit.finetune.losses import masked_loss
from embedkit.finetune.model import EncoderHead
from embedkit.finetune.train import _param_groups, _plan
from embedkit.manifest import load_manifest
from embedkit.models import EncoderSpec, get_family, get_spec, list_families, load_encoder

MODELS = {"test/tiny-dinov3-vit": 64, "test/tiny-dinov2": 56, "test/tiny-dinov3-convnext": 64}

EXPECTED: dict[str, Callable[[str], bool]] = {
    "full": lambda name: True,
    "linear": lambda name: name.startswith("head."),
    "bitfit": lambda name: name.startswith("head.") or name.endswith(".bias"),
    "lora": lambda name: name.startswith("head.") or ".lora_" in name,
}


def _classifier(model: str, cache: Path, method: str, **lora: object) -> Classifier:
    encoder = load_encoder(model, cache_dir=cache)
    torch.manual_seed(0)
    classifier = Classifier(encoder.model, encoder.spec, 3, "mean")
    get_method(method).prepare(classifier, LoraSettings(**lora))  # type: ignore[arg-type]
    return classifier


def test_registry_holds_the_four_methods() -> None:
    assert set(METHODS) == {"full", "lora", "bitfit", "linear"}
    assert METHOD_NAMES == ("full", "lora", "bitfit", "linear") == tuple(METHODS)
    with pytest.raises(ConfigError, match="did you mean 'lora'"):
        get_method("lorra")
    with pytest.raises(ConfigError, match="Methods: full, lora, bitfit, linear"):
        get_method("adapter")
    with pytest.raises(ValueError, match="already registered"):
        register_method(Method("lora", "again", 1.0, METHODS["lora"].prepare))


def test_the_train_loop_asks_the_method_never_its_name() -> None:
    """No ``if method == "lora"``: what differs per method is in its registry entry."""
    folder = Path(embedkit.finetune.__file__).parent
    for path in folder.glob("*.py"):
        if path.name not in ("methods.py", "request.py"):  # the registry; the option schema
            text = path.read_text()
            assert not re.search(r"method\s*(==|!=|\bin\b)\s*[\"'(]", text), path.name
            assert not any(f'"{name}"' in text for name in ("lora", "bitfit")), path.name


def test_lora_records_its_settings_and_peft() -> None:
    spec = get_spec("test/tiny-dinov3-convnext")
    lora = get_method("lora")
    assert lora.packages == ("peft",)
    assert lora.record_params(spec, LoraSettings(r=4)) == {
        "lora": {"r": 4, "alpha": 16, "dropout": 0.05,
                 "targets": ["pointwise_conv1", "pointwise_conv2"]}
    }  # fmt: skip
    custom = LoraSettings(targets=("fc1",))
    assert lora.record_params(spec, custom)["lora"]["targets"] == ["fc1"]
    for name in ("full", "bitfit", "linear"):
        assert get_method(name).record_params(spec, LoraSettings()) == {}
        assert get_method(name).packages == ()


@pytest.mark.parametrize("family", [f.name for f in list_families()])
def test_lora_defaults_come_from_the_family_adapter(family: str) -> None:
    from embedkit.finetune.methods import lora_targets

    assert lora_targets(family, LoraSettings()) == get_family(family).lora_targets
    assert lora_targets(family, LoraSettings(targets=("x",))) == ("x",)


@pytest.fixture
def headonly() -> Iterator[Method]:
    """A method added by one registration (the extension path of docs/extending.md)."""

    def prepare(model: EncoderHead, _settings: LoraSettings) -> None:
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("head.weight"))

    def record(_spec: EncoderSpec, _settings: LoraSettings) -> dict[str, Any]:
        return {"headonly": {"bias": False}}

    method = register_method(Method("test-headonly", "head weights", 2e-3, prepare, record))
    try:
        yield method
    finally:
        del METHODS["test-headonly"]


def test_a_registered_method_runs_through_the_plan(
    headonly: Method, ft_manifest: Path, ft_model_cache: Path
) -> None:
    request = FinetuneRequest(
        model="test/tiny-dinov2", dataset="demo", resolution=56,
        method="test-headonly",
        device="cpu",
    )  # fmt: skip
    assert request.effective_lr == 2e-3
    plan = _plan(request, load_manifest(ft_manifest), ft_model_cache)
    assert plan.params["method"] == "test-headonly"
    assert plan.params["headonly"] == {"bias": False}
    assert "lora" not in plan.params
    assert plan.identity["kind"] == "finetune-test-headonly"
    assert "/finetune-test-headonly-" in plan.relpath
    classifier = _classifier("test/tiny-dinov2", ft_model_cache, "test-headonly")
    assert {n for n, p in classifier.named_parameters() if p.requires_grad} == {"head.weight"}


@pytest.mark.parametrize("method", sorted(EXPECTED))
@pytest.mark.parametrize("model", sorted(MODELS))
def test_method_trains_only_its_parameters(method: str, model: str, ft_model_cache: Path) -> None:
    classifier = _classifier(model, ft_model_cache, method)
    trainable = {n for n, p in classifier.named_parameters() if p.requires_grad}
    expected = {n for n, _ in classifier.named_parameters() if EXPECTED[method](n)}
    assert trainable == expected
    counts = count_parameters(classifier)
    assert counts["trainable"] == sum(
        p.numel() for n, p in classifier.named_parameters() if n in expected
    )
    before = {n: p.detach().clone() for n, p in classifier.named_parameters()}
    optimizer = torch.optim.AdamW(_param_groups(classifier, 1e-2, 0.0, 1.0))
    torch.manual_seed(1)
    pixels = torch.randn(4, 3, MODELS[model], MODELS[model])
    y = torch.randint(0, 2, (4, 3)).float()
    for _ in range(3):  # LoRA B starts at zero: A moves from the second step on
        optimizer.zero_grad()
        masked_loss(classifier(pixels), y, torch.ones_like(y, dtype=torch.bool)).backward()
        optimizer.step()
    after = dict(classifier.named_parameters())
    for name, value in before.items():
        if name not in trainable:
            assert torch.equal(after[name], value), f"frozen {name} changed"
    changed = {n for n in trainable if not torch.equal(after[n], before[n])}
    assert {"head.weight", "head.bias"} <= changed
    if method != "linear":
        assert changed - {"head.weight", "head.bias"}, "no encoder parameter trained"


def test_lora_defaults_target_query_and_value_projections(ft_model_cache: Path) -> None:
    classifier = _classifier("test/tiny-dinov3-vit", ft_model_cache, "lora")
    adapted = {n.split(".lora_")[0] for n, _ in classifier.named_parameters() if ".lora_" in n}
    assert {n.rsplit(".", 1)[-1] for n in adapted} == {"q_proj", "v_proj"}
    assert len(adapted) == 4  # 2 blocks x (q, v)
    # r 16 on 32 -> 32 linear layers: A (16 x 32) + B (32 x 16) per adapted layer, + head 32*3+3
    assert count_parameters(classifier)["trainable"] == 4 * 2 * 16 * 32 + 32 * 3 + 3


def test_lora_custom_targets_and_bad_targets(ft_model_cache: Path) -> None:
    classifier = _classifier(
        "test/tiny-dinov2", ft_model_cache, "lora", r=4, targets=("q_proj", "k_proj", "fc1")
    )
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in classifier.named_parameters()
               if ".lora_" in n}  # fmt: skip
    assert adapted == {"q_proj", "k_proj", "fc1"}
    with pytest.raises(ConfigError, match="linear layers are named"):
        _classifier("test/tiny-dinov2", ft_model_cache, "lora", targets=("qkv",))


def test_layer_decay_scales_lr_by_depth(ft_model_cache: Path) -> None:
    classifier = _classifier("test/tiny-dinov3-vit", ft_model_cache, "full")
    groups = _param_groups(classifier, 1.0, 0.0, 0.5)
    by_name = {id(p): g["lr"] for g in groups for p in g["params"]}
    params = dict(classifier.named_parameters())
    assert by_name[id(params["head.weight"])] == 1.0
    assert by_name[id(params["encoder.model.layer.1.norm1.weight"])] == 0.5
    assert by_name[id(params["encoder.model.layer.0.norm1.weight"])] == 0.25
    assert by_name[id(params["encoder.embeddings.cls_token"])] == 0.125


def test_layer_decay_is_refused_for_a_family_without_it(
    ft_manifest: Path, ft_model_cache: Path
) -> None:
    request = FinetuneRequest(
        model="test/tiny-dinov3-convnext", dataset="demo", resolution=64, method="full",
        layer_decay=0.5, device="cpu",
    )  # fmt: skip
    assert not get_family("dinov3-convnext").supports_layer_decay
    with pytest.raises(ConfigError, match=r"use --layer-decay 1\.0"):
        _plan(request, load_manifest(ft_manifest), ft_model_cache)
    classifier = _classifier("test/tiny-dinov3-convnext", ft_model_cache, "full")
    with pytest.raises(ConfigError, match="layer-wise lr decay"):
        _param_groups(classifier, 1.0, 0.0, 0.5)
    assert len(_param_groups(classifier, 1.0, 0.0, 1.0)) == 1
