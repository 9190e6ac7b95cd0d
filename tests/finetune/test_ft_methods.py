"""Each finetuning method trains exactly its parameters; the frozen ones stay bit-identical."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from embedkit.errors import ConfigError
from embedkit.finetune import METHODS, Classifier, LoraSettings, count_parameters, get_method
from embedkit.finetune.losses import masked_loss
from embedkit.finetune.train import _param_groups
from embedkit.models import load_encoder

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
    with pytest.raises(ConfigError, match="did you mean 'lora'"):
        get_method("lorra")


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
