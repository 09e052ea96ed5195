"""Loading CounterFact (EasyEdit and ROME formats), zsRE and plain records; validation errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ece_plugin.evaluation.data import (
    DataError,
    EditRecord,
    bundled_data_path,
    load_counterfact,
    load_plain,
    load_records,
    load_zsre,
    to_easyedit_edit_kwargs,
)

REQUEST_KEYS = {
    "case_id",
    "prompt",
    "subject",
    "target_new",
    "ground_truth",
    "rephrase_prompt",
    "locality_prompt",
    "locality_ground_truth",
}


def _write(tmp_path: Path, records: Any, name: str = "records.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _rome_record(**overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "case_id": 7,
        "requested_rewrite": {
            "prompt": "{} plays the",
            "relation_id": "P1303",
            "target_new": {"str": "piano", "id": "Q5994"},
            "target_true": {"str": " guitar ", "id": "Q6607"},
            "subject": "Ann Lee",
        },
        "paraphrase_prompts": ["Ann Lee is an instrumentalist. She plays the", "Ann Lee, who plays the"],
        "neighborhood_prompts": ["Bob Ray plays the", "Cy Dee plays the", "Di Eck plays the"],
        "attribute_prompts": ["Ed Fox plays the"],
        "generation_prompts": ["Ann Lee is known for", "Ann Lee performs"],
    }
    record.update(overrides)
    return record


def _easyedit_cf_record(**overrides: Any) -> dict[str, Any]:
    record = {
        "case_id": 3,
        "prompt": "The mother tongue of Ann Lee is",
        "target_new": "English",
        "subject": "Ann Lee",
        "ground_truth": "French",
        "rephrase_prompt": "Ann Lee speaks the language",
        "locality_prompt": "Bob Ray is a native speaker of",
        "locality_ground_truth": "French",
    }
    record.update(overrides)
    return record


# ---------------------------------------------------------------------------------------------- bundled files
def test_bundled_easyedit_counterfact_loads_with_offset_and_limit() -> None:
    path = bundled_data_path("counterfact-val")
    assert path == bundled_data_path("counterfact/counterfact-val.json")
    records = load_counterfact(path, limit=5, offset=2)
    raw = json.loads(path.read_text(encoding="utf-8"))[2:7]
    assert [r.case_id for r in records] == [r["case_id"] for r in raw]
    first = records[0]
    assert first.kind == "counterfact"
    assert first.subject in first.prompt
    assert first.target_new == raw[0]["target_new"] and first.target_true == raw[0]["ground_truth"]
    assert first.paraphrase_prompts == [raw[0]["rephrase_prompt"]]
    assert first.neighborhood_prompts == [raw[0]["locality_prompt"]]
    assert first.neighborhood_answers == [raw[0]["locality_ground_truth"]]
    assert first.generation_prompts == []


def test_bundled_rome_counterfact_keeps_all_paraphrase_and_neighbourhood_prompts() -> None:
    path = bundled_data_path("counterfact-rome")
    raw = json.loads(path.read_text(encoding="utf-8"))
    records = load_counterfact(path, limit=3)
    assert len(records) == 3
    for record, item in zip(records, raw):
        rewrite = item["requested_rewrite"]
        assert record.prompt == rewrite["prompt"].format(rewrite["subject"])
        assert record.paraphrase_prompts == item["paraphrase_prompts"]
        assert len(record.neighborhood_prompts) == len(item["neighborhood_prompts"]) == 10
        assert record.neighborhood_answers == [rewrite["target_true"]["str"]] * 10
        assert record.generation_prompts == item["generation_prompts"]
        assert record.relation_id == rewrite["relation_id"]
        assert record.target_new_id == rewrite["target_new"]["id"]


def test_bundled_zsre_maps_fields() -> None:
    path = bundled_data_path("zsre")
    raw = json.loads(path.read_text(encoding="utf-8"))
    records = load_zsre(path, limit=4)
    for i, (record, item) in enumerate(zip(records, raw)):
        assert record.case_id == i
        assert record.kind == "zsre"
        assert record.prompt == item["src"]
        assert record.target_new == item["alt"].strip()
        assert record.target_true == item["answers"][0].strip()
        assert record.paraphrase_prompts == [item["rephrase"]]
        assert record.loc_prompt == item["loc"] and item["loc"].startswith("nq question: ")
        assert record.loc_answer == item["loc_ans"]


def test_zsre_targets_are_stripped(tmp_path: Path) -> None:
    item = {
        "subject": "MAT-49",
        "src": "What year did MAT-49 enter service?",
        "rephrase": "When was MAT-49 introduced?",
        "alt": " 1955 ",
        "answers": ["1949"],
        "loc": "nq question: who wrote x",
        "loc_ans": "Someone ",
    }
    (record,) = load_zsre(_write(tmp_path, [item]))
    assert record.target_new == "1955"
    assert record.neighborhood_answers == ["Someone"]


def test_auto_detection_of_all_formats(tmp_path: Path) -> None:
    assert load_records(bundled_data_path("counterfact-rome"), limit=1)[0].meta["format"] == "rome"
    assert load_records(bundled_data_path("counterfact"), limit=1)[0].meta["format"] == "easyedit"
    assert load_records(bundled_data_path("zsre"), limit=1)[0].kind == "zsre"
    plain = _write(tmp_path, [{"prompt": "Ann Lee plays the", "subject": "Ann Lee", "target_new": "piano"}])
    (record,) = load_records(plain)
    assert record.kind == "plain" and record.target_true is None


def test_plain_jsonl_with_optional_fields(tmp_path: Path) -> None:
    lines = [
        {
            "prompt": "Ann Lee plays the",
            "subject": "Ann Lee",
            "target_new": " piano",
            "ground_truth": "guitar",
        },
        {
            "case_id": "b",
            "prompt": "Bob Ray lives in",
            "subject": "Bob Ray",
            "target_new": "Rome",
            "paraphrase_prompts": ["Bob Ray resides in"],
            "neighborhood_prompts": ["Cy Dee lives in", "Di Eck lives in"],
            "neighborhood_answers": "Paris",
        },
    ]
    path = tmp_path / "plain.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    first, second = load_plain(path)
    assert first.case_id == 0 and first.target_new == "piano" and first.target_true == "guitar"
    assert second.case_id == "b"
    assert second.neighborhood_answers == ["Paris", "Paris"]
    assert second.paraphrase_prompts == ["Bob Ray resides in"]


# ---------------------------------------------------------------------------------------------- conversions
def test_to_request_has_easyedit_keys_as_plain_strings() -> None:
    (record,) = load_counterfact(bundled_data_path("counterfact-rome"), limit=1)
    request = record.to_request()
    assert REQUEST_KEYS <= set(request)
    for key in REQUEST_KEYS - {"case_id"}:
        assert isinstance(request[key], str), key
    assert request["rephrase_prompt"] == record.paraphrase_prompts[0]
    assert request["locality_prompt"] == record.neighborhood_prompts[0]
    assert request["locality"] == {
        "neighborhood": {"prompt": record.neighborhood_prompts[0], "ground_truth": record.target_true}
    }


def test_to_easyedit_edit_kwargs_shapes(tmp_path: Path) -> None:
    rome = load_counterfact(_write(tmp_path, [_rome_record()], "rome.json"))
    ee = load_counterfact(_write(tmp_path, [_easyedit_cf_record()], "ee.json"))
    records = rome + ee
    kwargs = to_easyedit_edit_kwargs(records)
    assert kwargs == EditRecord.to_easyedit_edit_kwargs(records)
    assert kwargs["prompts"] == ["Ann Lee plays the", "The mother tongue of Ann Lee is"]
    assert kwargs["target_new"] == ["piano", "English"]
    assert kwargs["ground_truth"] == ["guitar", "French"]
    assert kwargs["subject"] == ["Ann Lee", "Ann Lee"]
    assert kwargs["rephrase_prompts"] == [rome[0].paraphrase_prompts[0], "Ann Lee speaks the language"]
    neighbourhood = kwargs["locality_inputs"]["neighborhood"]
    assert neighbourhood["prompt"][0] == rome[0].neighborhood_prompts  # several prompts -> list
    assert neighbourhood["ground_truth"][0] == ["guitar"] * 3
    assert neighbourhood["prompt"][1] == "Bob Ray is a native speaker of"  # one prompt -> string
    assert neighbourhood["ground_truth"][1] == "French"


def test_record_round_trips_through_dict(tmp_path: Path) -> None:
    (record,) = load_counterfact(_write(tmp_path, [_rome_record()]))
    assert record.target_true == "guitar"  # stripped
    assert EditRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record


# ---------------------------------------------------------------------------------------------- errors
def test_subject_not_in_prompt_names_record(tmp_path: Path) -> None:
    path = _write(tmp_path, [_easyedit_cf_record(), _easyedit_cf_record(case_id=9, subject="Zed")])
    with pytest.raises(DataError, match=r"record 1 \(case_id=9\).*subject 'Zed' does not appear in prompt"):
        load_counterfact(path)


def test_empty_target_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"record 0.*'target_new' is empty"):
        load_counterfact(_write(tmp_path, [_easyedit_cf_record(target_new="  ")]))


def test_missing_field_is_named(tmp_path: Path) -> None:
    item = _easyedit_cf_record()
    del item["ground_truth"]
    with pytest.raises(DataError, match="missing field 'ground_truth'"):
        load_counterfact(_write(tmp_path, [item]))
    zsre = {"subject": "X", "src": "Who is X?", "alt": "Y"}
    del zsre["alt"]
    with pytest.raises(DataError, match="missing field 'alt'"):
        load_zsre(_write(tmp_path, [zsre], "z.json"))


def test_mismatched_lists_are_rejected(tmp_path: Path) -> None:
    item = {
        "prompt": "Ann Lee plays the",
        "subject": "Ann Lee",
        "target_new": "piano",
        "neighborhood_prompts": ["Bob Ray plays the", "Cy Dee plays the"],
        "neighborhood_answers": ["guitar", "drums", "violin"],
    }
    with pytest.raises(DataError, match="2 neighborhood_prompts but 3 neighborhood_answers"):
        load_plain(_write(tmp_path, [item]))


def test_rome_prompt_without_placeholder(tmp_path: Path) -> None:
    item = _rome_record()
    item["requested_rewrite"]["prompt"] = "Ann Lee plays the"
    with pytest.raises(DataError, match="no '\\{\\}' placeholder"):
        load_counterfact(_write(tmp_path, [item]))


def test_duplicate_case_ids_and_bad_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="duplicate case_id 3"):
        load_counterfact(_write(tmp_path, [_easyedit_cf_record(), _easyedit_cf_record()]))
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "missing.json")
    with pytest.raises(DataError, match="JSON object"):
        load_records(_write(tmp_path, {"records": [_easyedit_cf_record()]}, "obj.json"))
    with pytest.raises(DataError, match="cannot recognise"):
        load_records(_write(tmp_path, [{"question": "x"}], "odd.json"))
    with pytest.raises(DataError, match="kind must be"):
        load_records(_write(tmp_path, [_easyedit_cf_record()], "k.json"), kind="mquake")
    with pytest.raises(DataError, match="offset 5 is past the end"):
        load_counterfact(_write(tmp_path, [_easyedit_cf_record()], "o.json"), offset=5)


def test_direct_construction_is_validated() -> None:
    with pytest.raises(DataError, match="kind must be one of"):
        EditRecord(case_id=1, kind="other", prompt="A b", subject="A", target_new="c")
    with pytest.raises(DataError, match="empty target_true"):
        EditRecord(case_id=1, kind="plain", prompt="A b", subject="A", target_new="c", target_true=" ")


def test_bundled_data_path_unknown_name() -> None:
    with pytest.raises(FileNotFoundError, match="no-such-file.json"):
        bundled_data_path("no-such-file.json")
