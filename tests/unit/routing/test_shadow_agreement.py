"""server.routing.shadow.Agreement.compare: primary vs shadow outputs, per request."""

from __future__ import annotations

import numpy as np
import pytest

from server.routing.shadow import Agreement
from server.types import DataType, InferResponse, OutputTensor


def response(**outputs: np.ndarray) -> InferResponse:
    tensors = [
        OutputTensor(name, DataType.INT64 if data.dtype.kind == "i" else DataType.FP32, data)
        for name, data in outputs.items()
    ]
    return InferResponse(model_name="m", model_version="1", id="", outputs=tensors)


def test_identical_outputs_agree_fully_with_no_difference() -> None:
    figures = Agreement()
    labels = np.array([[1], [2], [3]], dtype=np.int64)
    scores = np.array([[0.1, 0.9], [0.5, 0.5], [0.7, 0.3]], dtype=np.float32)
    for _ in range(3):
        figures.compare(response(label=labels, score=scores),
                        response(label=labels.copy(), score=scores.copy()))
    assert figures.compared == 3
    assert figures.agreement == 1.0
    assert figures.class_elements == 9
    assert figures.max_abs_diff == 0.0 and figures.mean_abs_diff == 0.0
    assert figures.max_rel_diff == 0.0


def test_class_agreement_is_the_share_of_equal_elements() -> None:
    figures = Agreement()
    figures.compare(response(label=np.array([1, 2, 3, 4], dtype=np.int64)),
                    response(label=np.array([1, 2, 0, 0], dtype=np.int64)))
    assert figures.agreement == 0.5
    figures.compare(response(label=np.array([5, 5, 5, 5], dtype=np.int64)),
                    response(label=np.array([5, 5, 5, 5], dtype=np.int64)))
    assert figures.agreement == 6 / 8


def test_score_differences_absolute_and_relative() -> None:
    figures = Agreement()
    figures.compare(response(score=np.array([1.0, 2.0, 4.0, 0.0], dtype=np.float32)),
                    response(score=np.array([1.0, 2.5, 3.0, 0.0], dtype=np.float32)))
    assert figures.max_abs_diff == pytest.approx(1.0)
    assert figures.mean_abs_diff == pytest.approx(1.5 / 4)
    assert figures.max_rel_diff == pytest.approx(0.25)  # 1.0 of 4.0 (the larger magnitude)
    assert figures.agreement == 1.0  # no class outputs compared


def test_near_zero_scores_do_not_make_a_huge_relative_difference() -> None:
    figures = Agreement()
    figures.compare(response(score=np.array([1e-12], dtype=np.float32)),
                    response(score=np.array([0.0], dtype=np.float32)))
    assert figures.max_rel_diff < 1e-5


def test_missing_or_reshaped_outputs_are_skipped_but_the_request_counts() -> None:
    figures = Agreement()
    figures.compare(response(score=np.zeros(4, dtype=np.float32),
                             label=np.zeros(2, dtype=np.int64)),
                    response(score=np.ones(3, dtype=np.float32)))
    assert figures.compared == 1
    assert figures.float_elements == 0 and figures.class_elements == 0
    assert figures.max_abs_diff == 0.0
