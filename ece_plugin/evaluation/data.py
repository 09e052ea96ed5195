"""Edit records: loading CounterFact (EasyEdit and ROME formats), zsRE and plain record files.

Every loader returns a list of :class:`EditRecord`. A record carries what editing needs (prompt, subject,
new target) and what evaluation needs (true target, paraphrase and neighbourhood prompts with their true
answers, generation prompts). Records turn into EasyEdit request dicts with :meth:`EditRecord.to_request`
and into keyword arguments for EasyEdit's ``BaseEditor.edit`` / ``batch_edit`` with
:func:`to_easyedit_edit_kwargs`.

Formats
    * EasyEdit CounterFact (``data/counterfact/counterfact-edit.json``, ``counterfact-val.json``):
      ``case_id, prompt, subject, target_new, ground_truth, rephrase_prompt, locality_prompt,
      locality_ground_truth``; one paraphrase and one neighbourhood prompt per record.
    * ROME/MEMIT CounterFact (``counterfact-rome-format.json``): ``requested_rewrite{prompt (with a '{}'
      placeholder for the subject), subject, target_new{str,id}, target_true{str,id}, relation_id},
      paraphrase_prompts, neighborhood_prompts, generation_prompts``. All paraphrase and neighbourhood
      prompts are kept; a neighbourhood prompt's true answer is ``target_true.str`` (as in ROME).
    * zsRE (``data/zsre/zsre_mend_eval.json``): ``subject, src, rephrase, alt (new target), answers
      (answers[0] = true answer), loc ('nq question: ...'), loc_ans``; ``loc``/``loc_ans`` become the
      record's single neighbourhood prompt/answer.
    * plain: a JSON list or JSONL file of ``{prompt, subject, target_new[, ground_truth]}`` with optional
      ``case_id``, ``rephrase_prompt``/``paraphrase_prompts``, ``locality_prompt``/``neighborhood_prompts``
      and ``locality_ground_truth``/``neighborhood_answers``.

Targets are stripped of surrounding whitespace (the evaluation adds the single leading space); prompts are
kept as written.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

logger = logging.getLogger(__name__)

RECORD_KINDS: tuple[str, ...] = ("counterfact", "zsre", "plain")

#: Short names accepted by :func:`bundled_data_path` for the files under the repository's ``data/``.
BUNDLED_DATASETS: dict[str, str] = {
    "counterfact": "counterfact/counterfact-edit.json",
    "counterfact-edit": "counterfact/counterfact-edit.json",
    "counterfact-val": "counterfact/counterfact-val.json",
    "counterfact-rome": "counterfact/counterfact-rome-format.json",
    "counterfact-rome-format": "counterfact/counterfact-rome-format.json",
    "zsre": "zsre/zsre_mend_eval.json",
    "wikitext-2-valid": "wikitext-2-raw/wiki.valid.raw",
    "wikitext-2-test": "wikitext-2-raw/wiki.test.raw",
}

PathLike = Union[str, Path]


class DataError(ValueError):
    """A data file or record is malformed; the message names the file, the record and the problem."""


class InvalidRecordError(DataError):
    """A record fails validation; ``problem`` is the problem alone, the message also names the record."""

    def __init__(self, message: str, problem: str) -> None:
        super().__init__(message)
        self.problem = problem


@dataclass
class EditRecord:
    """One edit request plus everything its evaluation needs.

    ``prompt`` contains ``subject`` verbatim. ``neighborhood_answers`` holds the true answer of each
    neighbourhood prompt (same length as ``neighborhood_prompts``). ``target_true`` is ``None`` when the
    source does not know it. ``meta`` keeps source-specific extras (ROME's ``relation_id`` and target ids,
    zsRE's ``pred`` / ``portability``, ...).
    """

    case_id: Union[int, str]
    kind: str
    prompt: str
    subject: str
    target_new: str
    target_true: Optional[str] = None
    paraphrase_prompts: list[str] = field(default_factory=list)
    neighborhood_prompts: list[str] = field(default_factory=list)
    neighborhood_answers: list[str] = field(default_factory=list)
    generation_prompts: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_record(self)

    # ------------------------------------------------------------------ zsRE-style views
    @property
    def loc_prompt(self) -> Optional[str]:
        """zsRE's ``loc`` question (the first neighbourhood prompt), or None."""
        return self.neighborhood_prompts[0] if self.neighborhood_prompts else None

    @property
    def loc_answer(self) -> Optional[str]:
        """zsRE's ``loc_ans`` (the first neighbourhood answer), or None."""
        return self.neighborhood_answers[0] if self.neighborhood_answers else None

    @property
    def relation_id(self) -> Optional[str]:
        value = self.meta.get("relation_id")
        return None if value is None else str(value)

    @property
    def target_new_id(self) -> Optional[str]:
        value = self.meta.get("target_new_id")
        return None if value is None else str(value)

    # ------------------------------------------------------------------ conversions
    def to_request(self) -> dict[str, Any]:
        """The EasyEdit request dict for this record.

        Keys ``prompt, subject, target_new, ground_truth, rephrase_prompt, locality_prompt,
        locality_ground_truth, case_id`` hold plain strings as EasyEdit's CounterFact/zsRE datasets build
        them (``rephrase_prompt``/``locality_*`` are the first paraphrase/neighbourhood prompt, or None;
        ``ground_truth`` is None when unknown). ``locality`` and ``portability`` are added in the shape
        EasyEdit's ``_prepare_requests`` produces, so that EasyEdit's ``compute_edit_quality`` accepts the
        dict directly.
        """
        request: dict[str, Any] = {
            "case_id": self.case_id,
            "prompt": self.prompt,
            "subject": self.subject,
            "target_new": self.target_new,
            "ground_truth": self.target_true,
            "rephrase_prompt": self.paraphrase_prompts[0] if self.paraphrase_prompts else None,
            "locality_prompt": self.loc_prompt,
            "locality_ground_truth": self.loc_answer,
            "portability": {},
            "locality": {},
        }
        if self.neighborhood_prompts:
            request["locality"] = {
                "neighborhood": {"prompt": self.loc_prompt, "ground_truth": self.loc_answer}
            }
        return request

    @staticmethod
    def to_easyedit_edit_kwargs(records: Sequence[EditRecord]) -> dict[str, Any]:
        """Alias of :func:`to_easyedit_edit_kwargs`."""
        return to_easyedit_edit_kwargs(records)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of all fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditRecord:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)


def to_easyedit_edit_kwargs(records: Sequence[EditRecord]) -> dict[str, Any]:
    """Keyword arguments for EasyEdit ``BaseEditor.edit`` / ``batch_edit`` covering ``records``.

    Returns ``prompts, target_new, ground_truth, subject, rephrase_prompts, locality_inputs`` with one entry
    per record, as ``examples/run_AlphaEdit_editing.py`` builds them: ``locality_inputs =
    {'neighborhood': {'prompt': [...], 'ground_truth': [...]}}`` where a record with one neighbourhood prompt
    contributes a string and a record with several contributes a list (EasyEdit accepts both). A missing
    ground truth, paraphrase or neighbourhood is None (EasyEdit skips those).
    """
    if not records:
        raise DataError("to_easyedit_edit_kwargs: no records given")
    loc_prompts: list[Any] = []
    loc_answers: list[Any] = []
    for record in records:
        if not record.neighborhood_prompts:
            loc_prompts.append(None)
            loc_answers.append(None)
        elif len(record.neighborhood_prompts) == 1:
            loc_prompts.append(record.neighborhood_prompts[0])
            loc_answers.append(record.neighborhood_answers[0])
        else:
            loc_prompts.append(list(record.neighborhood_prompts))
            loc_answers.append(list(record.neighborhood_answers))
    kwargs: dict[str, Any] = {
        "prompts": [r.prompt for r in records],
        "target_new": [r.target_new for r in records],
        "ground_truth": [r.target_true for r in records],
        "subject": [r.subject for r in records],
        "rephrase_prompts": [r.paraphrase_prompts[0] if r.paraphrase_prompts else None for r in records],
    }
    if any(p is not None for p in loc_prompts):
        kwargs["locality_inputs"] = {"neighborhood": {"prompt": loc_prompts, "ground_truth": loc_answers}}
    return kwargs


# ---------------------------------------------------------------------------------------------- validation
def _where(record: EditRecord) -> str:
    return f"record case_id={record.case_id!r} ({record.kind})"


def record_problem(record: EditRecord) -> Optional[str]:
    """The first problem found in ``record`` (a sentence without the record's name), or None."""
    if record.kind not in RECORD_KINDS:
        return f"kind must be one of {RECORD_KINDS}, got {record.kind!r}"
    for name in ("prompt", "subject", "target_new"):
        value = getattr(record, name)
        if not isinstance(value, str):
            return f"field '{name}' must be a string, got {type(value).__name__}"
    if not record.subject.strip():
        return "empty subject"
    if not record.prompt.strip():
        return "empty prompt"
    if record.subject not in record.prompt:
        return f"subject {record.subject!r} does not appear in prompt {record.prompt!r}"
    if not record.target_new.strip():
        return "empty target_new"
    if record.target_true is not None:
        if not isinstance(record.target_true, str):
            return "target_true must be a string or None"
        if not record.target_true.strip():
            return "empty target_true (use None when unknown)"
    for name in ("paraphrase_prompts", "neighborhood_prompts", "neighborhood_answers", "generation_prompts"):
        values = getattr(record, name)
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            return f"'{name}' must be a list of strings"
        for i, value in enumerate(values):
            if not value.strip():
                return f"{name}[{i}] is empty"
    if len(record.neighborhood_prompts) != len(record.neighborhood_answers):
        return (
            f"{len(record.neighborhood_prompts)} neighborhood_prompts but "
            f"{len(record.neighborhood_answers)} neighborhood_answers (need one answer per prompt)"
        )
    return None


def validate_record(record: EditRecord) -> None:
    """Check one record; raise :class:`DataError` naming the record and the problem."""
    problem = record_problem(record)
    if problem is not None:
        raise InvalidRecordError(f"{_where(record)}: {problem}", problem)


# ---------------------------------------------------------------------------------------------- file reading
def _read_raw(path: PathLike) -> list[dict[str, Any]]:
    """Read a JSON list or a JSONL file of objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{path}: file is empty")
    data: Any
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON ({exc})") from exc
    else:
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # several lines: JSONL
        looks_like_record = isinstance(whole, dict) and any(
            k in whole for k in ("prompt", "src", "requested_rewrite")
        )
        one_line = len(stripped.rstrip().splitlines()) == 1
        if isinstance(whole, dict) and not (one_line and looks_like_record):
            raise DataError(f"{path}: expected a JSON list (or JSONL) of records, got a JSON object")
        data = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {line_no} is not valid JSON ({exc})") from exc
    if isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON list (or JSONL) of records, got a JSON object")
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise DataError(f"{path}: record {i} is a {type(item).__name__}, expected an object")
    return data  # type: ignore[no-any-return]


def _slice(raw: list[dict[str, Any]], limit: Optional[int], offset: int, source: str) -> list[dict[str, Any]]:
    if offset < 0:
        raise DataError(f"{source}: offset must be >= 0, got {offset}")
    if limit is not None and limit < 0:
        raise DataError(f"{source}: limit must be >= 0 or None, got {limit}")
    if offset > len(raw):
        raise DataError(f"{source}: offset {offset} is past the end of the file ({len(raw)} records)")
    end = len(raw) if limit is None else min(len(raw), offset + limit)
    return raw[offset:end]


class _RawRecord:
    """Field access on one raw record with errors naming the file, index and field."""

    def __init__(self, raw: dict[str, Any], source: str, index: int) -> None:
        self.raw = raw
        self.where = f"{source}: record {index}" + (
            f" (case_id={raw['case_id']!r})" if "case_id" in raw else ""
        )

    def get(self, key: str, expected: Union[type, tuple[type, ...]] = str) -> Any:
        if key not in self.raw:
            raise DataError(f"{self.where}: missing field '{key}'")
        value = self.raw[key]
        if not isinstance(value, expected):
            raise DataError(f"{self.where}: field '{key}' has type {type(value).__name__}")
        return value

    def optional(self, key: str, expected: Union[type, tuple[type, ...]] = str) -> Any:
        if self.raw.get(key) is None:
            return None
        return self.get(key, expected)

    def string_list(self, key: str) -> list[str]:
        value = self.raw.get(key)
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DataError(f"{self.where}: field '{key}' must be a string or a list of strings")
        return list(value)

    def target(self, key: str, value: Any) -> str:
        if not isinstance(value, str):
            raise DataError(f"{self.where}: field '{key}' must be a string, got {type(value).__name__}")
        value = value.strip()
        if not value:
            raise DataError(f"{self.where}: field '{key}' is empty")
        return value

    def build(self, **fields: Any) -> EditRecord:
        try:
            return EditRecord(**fields)
        except InvalidRecordError as exc:
            raise InvalidRecordError(f"{self.where}: {exc.problem}", exc.problem) from None


# ---------------------------------------------------------------------------------------------- parsers
def _is_rome_counterfact(raw: dict[str, Any]) -> bool:
    return "requested_rewrite" in raw


def _is_easyedit_counterfact(raw: dict[str, Any]) -> bool:
    return all(k in raw for k in ("prompt", "subject", "target_new", "ground_truth", "locality_prompt"))


def _is_zsre(raw: dict[str, Any]) -> bool:
    return all(k in raw for k in ("src", "alt", "subject"))


def _parse_rome_counterfact(raw: dict[str, Any], source: str, index: int) -> EditRecord:
    r = _RawRecord(raw, source, index)
    rewrite = r.get("requested_rewrite", dict)
    rr = _RawRecord(rewrite, source, index)
    rr.where = r.where + " requested_rewrite"
    subject = rr.get("subject")
    template = rr.get("prompt")
    if "{}" not in template:
        raise DataError(f"{rr.where}: prompt {template!r} has no '{{}}' placeholder for the subject")
    target_new = rr.get("target_new", dict)
    target_true = rr.get("target_true", dict)
    if "str" not in target_new:
        raise DataError(f"{rr.where}: target_new has no 'str'")
    if "str" not in target_true:
        raise DataError(f"{rr.where}: target_true has no 'str'")
    true_str = r.target("requested_rewrite.target_true.str", target_true["str"])
    neighborhood = r.string_list("neighborhood_prompts")
    meta: dict[str, Any] = {"format": "rome"}
    for key, value in (
        ("relation_id", rewrite.get("relation_id")),
        ("target_new_id", target_new.get("id")),
        ("target_true_id", target_true.get("id")),
    ):
        if value is not None:
            meta[key] = value
    attribute = r.string_list("attribute_prompts")
    if attribute:
        meta["attribute_prompts"] = attribute
    return r.build(
        case_id=raw.get("case_id", index),
        kind="counterfact",
        prompt=template.format(subject),
        subject=subject,
        target_new=r.target("requested_rewrite.target_new.str", target_new["str"]),
        target_true=true_str,
        paraphrase_prompts=r.string_list("paraphrase_prompts"),
        neighborhood_prompts=neighborhood,
        neighborhood_answers=[true_str] * len(neighborhood),
        generation_prompts=r.string_list("generation_prompts"),
        meta=meta,
    )


def _parse_easyedit_counterfact(raw: dict[str, Any], source: str, index: int) -> EditRecord:
    r = _RawRecord(raw, source, index)
    prompts = r.string_list("locality_prompt")
    answers_raw = raw.get("locality_ground_truth")
    if answers_raw is None and prompts:
        raise DataError(f"{r.where}: missing field 'locality_ground_truth'")
    answers = r.string_list("locality_ground_truth")
    if len(answers) == 1 and len(prompts) > 1:
        answers = answers * len(prompts)
    return r.build(
        case_id=raw.get("case_id", index),
        kind="counterfact",
        prompt=r.get("prompt"),
        subject=r.get("subject"),
        target_new=r.target("target_new", r.get("target_new")),
        target_true=r.target("ground_truth", r.get("ground_truth")),
        paraphrase_prompts=r.string_list("rephrase_prompt"),
        neighborhood_prompts=prompts,
        neighborhood_answers=[r.target("locality_ground_truth", a) for a in answers],
        generation_prompts=r.string_list("generation_prompts"),
        meta={"format": "easyedit"},
    )


def _parse_zsre(raw: dict[str, Any], source: str, index: int) -> EditRecord:
    r = _RawRecord(raw, source, index)
    answers = r.optional("answers", list)
    target_true = None
    if answers:
        target_true = r.target("answers[0]", answers[0])
    loc = r.optional("loc")
    loc_ans = r.optional("loc_ans")
    if (loc is None) != (loc_ans is None):
        raise DataError(f"{r.where}: 'loc' and 'loc_ans' must be given together")
    meta: dict[str, Any] = {"format": "zsre"}
    for key in ("pred", "cond", "portability"):
        if raw.get(key) is not None:
            meta[key] = raw[key]
    return r.build(
        case_id=raw.get("case_id", index),
        kind="zsre",
        prompt=r.get("src"),
        subject=r.get("subject"),
        target_new=r.target("alt", r.get("alt")),
        target_true=target_true,
        paraphrase_prompts=r.string_list("rephrase"),
        neighborhood_prompts=[] if loc is None else [loc],
        neighborhood_answers=[] if loc_ans is None else [r.target("loc_ans", loc_ans)],
        meta=meta,
    )


def _parse_plain(raw: dict[str, Any], source: str, index: int) -> EditRecord:
    r = _RawRecord(raw, source, index)
    truth = raw.get("ground_truth", raw.get("target_true"))
    truth_key = "ground_truth" if "ground_truth" in raw else "target_true"
    paraphrases = (
        r.string_list("paraphrase_prompts")
        + r.string_list("rephrase_prompt")
        + r.string_list("rephrase_prompts")
    )
    neighborhood = r.string_list("neighborhood_prompts") + r.string_list("locality_prompt")
    answers = r.string_list("neighborhood_answers") + r.string_list("locality_ground_truth")
    if len(answers) == 1 and len(neighborhood) > 1:
        answers = answers * len(neighborhood)
    return r.build(
        case_id=raw.get("case_id", index),
        kind="plain",
        prompt=r.get("prompt"),
        subject=r.get("subject"),
        target_new=r.target("target_new", r.get("target_new")),
        target_true=None if truth is None else r.target(truth_key, truth),
        paraphrase_prompts=paraphrases,
        neighborhood_prompts=neighborhood,
        neighborhood_answers=[r.target("neighborhood_answers", a) for a in answers],
        generation_prompts=r.string_list("generation_prompts"),
        meta={"format": "plain"},
    )


def _parse_all(raw: Iterable[dict[str, Any]], parser: Any, source: str, offset: int) -> list[EditRecord]:
    records = [parser(item, source, offset + i) for i, item in enumerate(raw)]
    _check_unique_ids(records, source)
    return records


def _check_unique_ids(records: Sequence[EditRecord], source: str) -> None:
    seen: set[Union[int, str]] = set()
    for record in records:
        if record.case_id in seen:
            raise DataError(f"{source}: duplicate case_id {record.case_id!r}")
        seen.add(record.case_id)


# ---------------------------------------------------------------------------------------------- loaders
def load_counterfact(path: PathLike, limit: Optional[int] = None, offset: int = 0) -> list[EditRecord]:
    """Load CounterFact records from EasyEdit's or ROME's format (detected per record).

    ``offset``/``limit`` select ``records[offset:offset+limit]`` of the file before parsing.
    """
    source = str(path)
    raw = _slice(_read_raw(path), limit, offset, source)
    records = []
    for i, item in enumerate(raw):
        if _is_rome_counterfact(item):
            records.append(_parse_rome_counterfact(item, source, offset + i))
        elif _is_easyedit_counterfact(item) or "prompt" in item:
            records.append(_parse_easyedit_counterfact(item, source, offset + i))
        else:
            raise DataError(
                f"{source}: record {offset + i} is neither ROME CounterFact (no 'requested_rewrite') nor "
                "EasyEdit CounterFact (no 'prompt')"
            )
    _check_unique_ids(records, source)
    logger.info("loaded %d CounterFact records from %s", len(records), source)
    return records


def load_zsre(path: PathLike, limit: Optional[int] = None, offset: int = 0) -> list[EditRecord]:
    """Load zsRE (MEND split) records: ``src`` -> prompt, ``alt`` -> target_new, ``answers[0]`` ->
    target_true, ``rephrase`` -> paraphrase, ``loc``/``loc_ans`` -> neighbourhood prompt/answer.
    ``case_id`` is the record's index in the file (as MEMIT numbers them) unless the record has one."""
    source = str(path)
    raw = _slice(_read_raw(path), limit, offset, source)
    records = _parse_all(raw, _parse_zsre, source, offset)
    logger.info("loaded %d zsRE records from %s", len(records), source)
    return records


def load_plain(path: PathLike, limit: Optional[int] = None, offset: int = 0) -> list[EditRecord]:
    """Load a JSON list / JSONL file of ``{prompt, subject, target_new[, ground_truth]}`` records."""
    source = str(path)
    raw = _slice(_read_raw(path), limit, offset, source)
    records = _parse_all(raw, _parse_plain, source, offset)
    logger.info("loaded %d plain records from %s", len(records), source)
    return records


def detect_kind(raw: dict[str, Any]) -> str:
    """The record kind of one raw record: 'counterfact', 'zsre' or 'plain'."""
    if _is_rome_counterfact(raw) or _is_easyedit_counterfact(raw):
        return "counterfact"
    if _is_zsre(raw):
        return "zsre"
    if all(k in raw for k in ("prompt", "subject", "target_new")):
        return "plain"
    raise DataError(
        "cannot recognise the record format (keys: "
        f"{sorted(raw)}); expected CounterFact (EasyEdit or ROME), zsRE or plain {{prompt, subject, target_new}}"
    )


def load_records(
    path: PathLike, kind: str = "auto", limit: Optional[int] = None, offset: int = 0
) -> list[EditRecord]:
    """Load records of ``kind`` ('counterfact', 'zsre', 'plain' or 'auto': detected from the first record)."""
    if kind not in ("auto", *RECORD_KINDS):
        raise DataError(f"kind must be 'auto' or one of {RECORD_KINDS}, got {kind!r}")
    if kind == "auto":
        raw = _read_raw(path)
        if not raw:
            raise DataError(f"{path}: no records")
        try:
            kind = detect_kind(raw[0])
        except DataError as exc:
            raise DataError(f"{path}: record 0: {exc}") from exc
        logger.debug("%s: detected record kind %r", path, kind)
    loader = {"counterfact": load_counterfact, "zsre": load_zsre, "plain": load_plain}[kind]
    return loader(path, limit=limit, offset=offset)


def repo_root() -> Path:
    """The repository root (parent of the ``ece_plugin`` package directory)."""
    from ..resources import REPO_ROOT

    return REPO_ROOT


def bundled_data_path(name: str) -> Path:
    """Path of a bundled data file under the repository's ``data/`` folder.

    ``name`` is a path relative to ``data/`` (e.g. ``'counterfact/counterfact-val.json'``) or a short name
    from :data:`BUNDLED_DATASETS` (e.g. ``'counterfact-val'``, ``'zsre'``).
    """
    relative = BUNDLED_DATASETS.get(name, name)
    data_dir = repo_root() / "data"
    path = (data_dir / relative).resolve()
    if not path.exists():
        known = ", ".join(sorted(BUNDLED_DATASETS))
        raise FileNotFoundError(
            f"bundled data file {name!r} not found at {path} (data folder {data_dir}; short names: {known})"
        )
    return path


__all__ = [
    "BUNDLED_DATASETS",
    "DataError",
    "EditRecord",
    "InvalidRecordError",
    "RECORD_KINDS",
    "bundled_data_path",
    "detect_kind",
    "load_counterfact",
    "load_plain",
    "load_records",
    "load_zsre",
    "record_problem",
    "repo_root",
    "to_easyedit_edit_kwargs",
    "validate_record",
]
