"""EditRequest normalisation: placeholders, ROME-style targets, clear errors."""

from __future__ import annotations

import pytest

from ece_plugin.method.requests import EditRequest, RequestError, fill, normalise_requests


def test_subject_in_prompt_becomes_placeholder() -> None:
    (req,) = normalise_requests(
        [
            {
                "prompt": "The Eiffel Tower is in",
                "subject": "Eiffel Tower",
                "target_new": "Rome",
                "ground_truth": "Paris",
                "case_id": 7,
            }
        ]
    )
    assert isinstance(req, EditRequest)
    assert req.template == "The {} is in"
    assert req.text == "The Eiffel Tower is in"
    assert req.target_new == " Rome"  # MEMIT's leading space
    assert req.ground_truth == "Paris" and req.case_id == 7 and req.index == 0


def test_placeholder_prompt_and_dict_target() -> None:
    reqs = normalise_requests(
        [
            {"prompt": "{} plays", "subject": "Danny Green", "target_new": {"str": " soccer"}},
            {"prompt": "x {} y", "subject": "S", "target_new": "t", "ground_truth": {"str": "g"}},
        ]
    )
    assert reqs[0].template == "{} plays" and reqs[0].target_new == " soccer"
    assert reqs[1].index == 1 and reqs[1].ground_truth == "g"


def test_single_dict_is_accepted() -> None:
    assert len(normalise_requests({"prompt": "{} is", "subject": "A", "target_new": "b"})) == 1


def test_only_first_occurrence_of_subject_is_replaced() -> None:
    (req,) = normalise_requests([{"prompt": "Rome and Rome", "subject": "Rome", "target_new": "x"}])
    assert req.template == "{} and Rome"


def test_fill_ignores_other_braces() -> None:
    assert fill("a {x} {} b", "S") == "a {x} S b"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"prompt": "The tower is in", "subject": "Eiffel", "target_new": "Rome"}, "does not occur"),
        ({"prompt": "{} is in", "subject": "Eiffel", "target_new": "  "}, "empty target_new"),
        ({"prompt": "{} is in", "subject": "Eiffel"}, "missing key 'target_new'"),
        ({"subject": "Eiffel", "target_new": "Rome"}, "missing key 'prompt'"),
        ({"prompt": "{} is in {}", "subject": "Eiffel", "target_new": "Rome"}, "placeholders"),
        ({"prompt": "{} is in", "subject": "", "target_new": "Rome"}, "empty subject"),
        ({"prompt": "{} is in", "subject": "E", "target_new": {"text": "Rome"}}, "'str'"),
        ({"prompt": "{} is in", "subject": "E", "target_new": 3}, "must be a string"),
    ],
)
def test_bad_requests_raise_clear_errors(raw: dict, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        normalise_requests([raw])


def test_error_names_the_request() -> None:
    good = {"prompt": "{} is", "subject": "A", "target_new": "b"}
    with pytest.raises(RequestError, match=r"request 1 \(case_id=42\)"):
        normalise_requests([good, {"prompt": "x", "subject": "A", "target_new": "b", "case_id": 42}])


def test_empty_list_and_wrong_types() -> None:
    with pytest.raises(RequestError, match="no edit requests"):
        normalise_requests([])
    with pytest.raises(RequestError, match="expected a dict"):
        normalise_requests(["not a dict"])  # type: ignore[list-item]
    assert issubclass(RequestError, ValueError)
