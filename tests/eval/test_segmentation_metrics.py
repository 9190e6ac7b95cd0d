"""Dice, IoU and HD95 against hand counts and a brute-force pairwise surface distance."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from embedkit.errors import MetricInputError
from embedkit.eval import segmentation as S


def _brute_surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels by an explicit face-neighbour loop (border = outside), as coordinates."""
    points = []
    for idx in zip(*np.nonzero(mask), strict=True):
        for axis, step in itertools.product(range(mask.ndim), (-1, 1)):
            j = list(idx)
            j[axis] += step
            if not 0 <= j[axis] < mask.shape[axis] or not mask[tuple(j)]:
                points.append(idx)
                break
    return np.asarray(points, dtype=np.float64)


def _brute_hd95(t: np.ndarray, p: np.ndarray, spacing: tuple[float, ...]) -> float:
    st, sp = _brute_surface(t) * spacing, _brute_surface(p) * spacing
    d = np.sqrt(((st[:, None, :] - sp[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([d.min(1), d.min(0)]), 95))


def test_dice_and_iou_match_hand_counts() -> None:
    truth = np.array([[0, 1, 1, 2], [0, 1, 1, 2], [0, 0, 0, 0]])
    pred = np.array([[0, 1, 0, 2], [1, 1, 1, 0], [0, 0, 0, 3]])
    dice, iou = S.dice_iou(truth, pred, 4)
    # class 1: |T| = 4, |P| = 4, |T∩P| = 3; class 2: 2, 1, 1; class 3: 0, 1, 0
    np.testing.assert_allclose(dice, [6 / 8, 2 / 3, 0.0])
    np.testing.assert_allclose(iou, [3 / 5, 1 / 2, 0.0])


def test_a_class_absent_from_both_has_no_score_and_one_side_empty_scores_zero() -> None:
    truth = np.zeros((4, 4), np.int64)
    truth[1:3, 1:3] = 1
    dice, iou = S.dice_iou(truth, np.zeros_like(truth), 3)
    assert dice[0] == 0.0 and iou[0] == 0.0  # missed
    assert np.isnan(dice[1]) and np.isnan(iou[1])  # absent from both: left out


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 0.7, 1.3)])
def test_hd95_matches_brute_force_pairwise_distances(spacing: tuple[float, ...]) -> None:
    rng = np.random.default_rng(0)
    for _ in range(4):
        t = np.zeros((7, 8, 9), bool)
        p = np.zeros_like(t)
        a, b = rng.integers(0, 3, 3), rng.integers(4, 7, 3)
        t[a[0] : b[0], a[1] : b[1], a[2] : b[2]] = True
        p |= rng.random(p.shape) < 0.15
        p[2:5, 3:6, 1:8] = True
        assert S.hd95(t, p, spacing) == pytest.approx(_brute_hd95(t, p, spacing), rel=1e-9)


def test_hd95_2d_and_empty_conventions() -> None:
    t = np.zeros((6, 6), bool)
    t[1:3, 1:3] = True
    p = np.zeros_like(t)
    p[1:3, 4:6] = True  # shifted by 3 columns
    assert S.hd95(t, p) == pytest.approx(_brute_hd95(t, p, (1.0, 1.0)))
    assert S.hd95(t, t) == 0.0
    assert np.isnan(S.hd95(np.zeros_like(t), np.zeros_like(t)))
    # exactly one side empty: the diagonal of the extent in spacing units
    assert S.hd95(t, np.zeros_like(t), (2.0, 3.0)) == pytest.approx(np.hypot(12.0, 18.0))


def test_case_scores_per_class_hd95() -> None:
    truth = np.zeros((5, 6, 6), np.int64)
    truth[1:4, 1:4, 1:4] = 1
    truth[1:3, 4:6, 4:6] = 2
    pred = truth.copy()
    pred[1, 1, 1] = 0
    out = S.case_scores(truth, pred, 3, spacing=(2.0, 1.0, 1.0), with_hd95=True)
    for c in (1, 2):
        assert out["hd95"][c - 1] == pytest.approx(
            _brute_hd95(truth == c, pred == c, (2.0, 1.0, 1.0))
        )
    assert out["dice"][1] == 1.0 and out["dice"][0] == pytest.approx(2 * 26 / 53)


def test_bad_inputs_are_clear_errors() -> None:
    with pytest.raises(MetricInputError, match="same shape"):
        S.dice_iou(np.zeros((2, 2), int), np.zeros((2, 3), int), 2)
    with pytest.raises(MetricInputError, match=r"class ids in \[0, 5\]"):
        S.dice_iou(np.array([[0, 5]]), np.zeros((1, 2), int), 3)
    with pytest.raises(MetricInputError, match="integer"):
        S.dice_iou(np.zeros((2, 2)), np.zeros((2, 2), int), 2)
    with pytest.raises(MetricInputError, match="positive voxel spacings"):
        S.hd95(np.ones((2, 2, 2), bool), np.ones((2, 2, 2), bool), (1.0, 0.0, 1.0))


def test_summary_means_classes_of_case_means_and_bootstraps_cases() -> None:
    rng = np.random.default_rng(1)
    dice = rng.random((40, 3))
    dice[:5, 2] = np.nan  # class 3 absent from five cases
    scores = S.SegmentationScores([f"c{i}" for i in range(40)], ["a", "b", "c"], dice, dice / 2)
    metrics, per_label = S.summarize_segmentation(scores, n_boot=300, seed=0)
    class_means = [dice[:, 0].mean(), dice[:, 1].mean(), dice[5:, 2].mean()]
    assert metrics["dice"]["point"] == pytest.approx(np.mean(class_means))
    assert metrics["iou"]["point"] == pytest.approx(np.mean(class_means) / 2)
    assert set(metrics) == {"dice", "iou"}
    for row, mean in zip(per_label, class_means, strict=True):
        d = row["dice"]
        assert d["point"] == pytest.approx(mean) and d["low"] < mean < d["high"]
    assert [r["n_cases"] for r in per_label] == [40, 40, 35]
    # the CI of a mean of 40 uniforms: about ±1.96 * 0.29 / sqrt(40) = ±0.09
    width = per_label[0]["dice"]["high"] - per_label[0]["dice"]["low"]
    assert 0.1 < width < 0.25


def test_case_scorer_stacks_a_volumes_slices_in_order_and_scores_images_at_once() -> None:
    from embedkit.eval.segmentation import CaseScorer, case_scores

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, (4, 6, 5))  # (slices, H, W)
    pred = np.where(rng.random(truth.shape) < 0.8, truth, 0)
    image_t, image_p = rng.integers(0, 2, (6, 5)), rng.integers(0, 2, (6, 5))
    scorer = CaseScorer(("bg", "a", "b"), expected={"vol": 4})
    for k in (2, 0, 3):  # out of order; the volume is scored when its last slice comes
        scorer.add("vol", truth[k], [pred[k]], (2.0, 1.0, 0.5), key=10 + k, slice_at=k)
    scorer.add("img", image_t, [image_p], key=99)
    scorer.add("vol", truth[1], [pred[1]], (2.0, 1.0, 0.5), key=11, slice_at=1)
    (scores,) = scorer.finish()
    assert scores.ids == ("img", "vol") and scores.labels == ("a", "b")
    want = case_scores(truth, pred, 3, spacing=(2.0, 1.0, 0.5), with_hd95=True)
    np.testing.assert_allclose(scores.dice[1], want["dice"])
    np.testing.assert_allclose(scores.iou[1], want["iou"])
    assert scores.hd95 is None  # an image has no HD95, so the set of cases has none
    np.testing.assert_allclose(scores.dice[0], case_scores(image_t, image_p, 3)["dice"])
    np.testing.assert_array_equal(scores.in_truth[0], [(image_t == 1).any(), False])
    fg = [(truth[k] > 0).sum() for k in range(4)]
    assert scorer.shown == {"vol": 10 + int(np.argmax(fg)), "img": 99}


def test_a_volume_missing_slices_is_scored_at_finish_with_hd95() -> None:
    from embedkit.eval.segmentation import CaseScorer

    truth = np.zeros((3, 8, 8), np.int64)
    truth[:, 2:5, 2:5] = 1
    scorer = CaseScorer(("bg", "organ"), expected={"v": 4})  # one slice never comes
    for k in range(3):
        scorer.add("v", truth[k], [truth[k]], (1.0, 1.0, 1.0), slice_at=k)
    (scores,) = scorer.finish()
    assert scores.dice[0, 0] == 1.0 and scores.hd95 is not None and scores.hd95[0, 0] == 0.0


def test_paired_dice_leaves_out_classes_and_cases_without_a_score() -> None:
    from embedkit.report.compare import paired_dice_test

    nan = np.nan
    a = np.array([[0.8, nan], [0.6, 0.4], [nan, nan]])
    b = np.array([[0.7, 0.0], [0.5, nan], [0.9, nan]])
    # case 0: 0.8 - 0.35; case 1: 0.5 - 0.5; case 2: no score in a, left out
    result = paired_dice_test(a, b, n_boot=50, n_perm=50)
    assert result.delta == pytest.approx(((0.8 - 0.35) + 0.0) / 2)
