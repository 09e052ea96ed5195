"""Normalising EasyEdit request dicts into :class:`EditRequest` objects, with clear errors.

EasyEdit hands an editing method a list of dicts (``prompt``, ``subject``, ``target_new``, ``ground_truth``,
``case_id``, ...). The prompt either contains the subject verbatim (EasyEdit's ``edit()`` API) or a ``{}``
placeholder for it (ROME/MEMIT's CounterFact format); ``target_new`` is a string or, ROME-style, a dict
``{"str": ...}``. Everything downstream works with :class:`EditRequest`: a prompt *template* with exactly one
``{}`` where the subject goes, and a target that starts with a space (as MEMIT does, so that BPE tokenizers
tokenize it as a word continuing the prompt).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

logger = logging.getLogger(__name__)

PLACEHOLDER = "{}"


class RequestError(ValueError):
    """An edit request is malformed; the message names the request and the problem."""


@dataclass(frozen=True)
class EditRequest:
    """One edit: ``template`` (with one ``{}`` for the subject), ``subject`` and ``target_new``."""

    template: str
    subject: str
    target_new: str
    ground_truth: Optional[str] = None
    case_id: Any = None
    index: int = 0

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return fill(self.template, self.subject)

    def describe(self) -> str:
        return f"[{self.text}] -> [{self.target_new}]"


def fill(template: str, subject: str) -> str:
    """Put ``subject`` at the single ``{}`` of ``template`` (other braces are left alone, unlike ``str.format``)."""
    prefix, suffix = split_template(template)
    return prefix + subject + suffix


def split_template(template: str) -> tuple[str, str]:
    """``(prefix, suffix)`` around the single ``{}`` of ``template``."""
    parts = template.split(PLACEHOLDER)
    if len(parts) != 2:
        raise RequestError(f"template {template!r} must contain exactly one '{{}}' (found {len(parts) - 1})")
    return parts[0], parts[1]


def _text_field(raw: Mapping[str, Any], key: str, where: str) -> str:
    if key not in raw:
        raise RequestError(f"{where}: missing key {key!r} (keys present: {sorted(raw)})")
    value = raw[key]
    if isinstance(value, Mapping):
        if "str" not in value:
            raise RequestError(f"{where}: {key} is a dict without a 'str' entry: {value!r}")
        value = value["str"]
    if not isinstance(value, str):
        raise RequestError(f"{where}: {key} must be a string, got {type(value).__name__}")
    return value


def _short(text: str, limit: int = 80) -> str:
    """``repr`` of ``text``, cut to about ``limit`` characters for a one-line message."""
    return repr(text) if len(text) <= limit else repr(text[: limit - 20] + " ... " + text[-15:]) + f" ({len(text)} chars)"


def _inside_word(prompt: str, subject: str, position: int) -> bool:
    before = prompt[position - 1] if position > 0 else ""
    after = prompt[position + len(subject)] if position + len(subject) < len(prompt) else ""
    return (before.isalnum() and subject[:1].isalnum()) or (after.isalnum() and subject[-1:].isalnum())


def _warn_ambiguous_subject(prompt: str, subject: str, position: int, where: str) -> None:
    """Warn when the subject occurs more than once in the prompt, or (where it is edited) only as part of a longer
    word; the warning says which occurrence is edited: the first, at ``position``."""
    count = prompt.count(subject)
    if count > 1:
        logger.warning("%s: subject %s occurs %d times in prompt %s; the first (at character %d) is edited",
                       where, _short(subject), count, _short(prompt), position)
    if _inside_word(prompt, subject, position):
        start = position
        while start > 0 and prompt[start - 1].isalnum():
            start -= 1
        end = position + len(subject)
        while end < len(prompt) and prompt[end].isalnum():
            end += 1
        logger.warning("%s: subject %s occurs in prompt %s inside the longer word %s; that occurrence (at character "
                       "%d) is edited", where, _short(subject), _short(prompt), _short(prompt[start:end]), position)


def normalise_request(raw: Mapping[str, Any], index: int = 0) -> EditRequest:
    """One EasyEdit request dict -> :class:`EditRequest` (raises :class:`RequestError` naming the problem)."""
    if not isinstance(raw, Mapping):
        raise RequestError(f"request {index}: expected a dict, got {type(raw).__name__}")
    case_id = raw.get("case_id")
    where = f"request {index}" + (f" (case_id={case_id!r})" if case_id is not None else "")
    prompt = _text_field(raw, "prompt", where)
    subject = _text_field(raw, "subject", where)
    target = _text_field(raw, "target_new", where)
    if not subject.strip():
        raise RequestError(f"{where}: empty subject")
    if not target.strip():
        raise RequestError(f"{where}: empty target_new")
    if not prompt.strip():
        raise RequestError(f"{where}: empty prompt")
    n_placeholders = prompt.count(PLACEHOLDER)
    if n_placeholders > 1:
        raise RequestError(
            f"{where}: prompt {_short(prompt)} has {n_placeholders} '{{}}' placeholders; one is allowed"
        )
    if n_placeholders == 1:
        template = prompt
    else:
        position = prompt.find(subject)
        if position < 0:
            raise RequestError(f"{where}: subject {_short(subject)} does not occur in prompt {_short(prompt)}")
        # The first occurrence is the subject's position (EasyEdit replaces all; an assertion then fails on
        # prompts that repeat the subject, so taking the first is the only sensible reading).
        _warn_ambiguous_subject(prompt, subject, position, where)
        template = prompt[:position] + PLACEHOLDER + prompt[position + len(subject) :]
    if not target.startswith(" "):
        target = " " + target  # as MEMIT: the target continues the prompt as a new word
    ground_truth = raw.get("ground_truth")
    if isinstance(ground_truth, Mapping):
        ground_truth = ground_truth.get("str")
    if ground_truth is not None and not isinstance(ground_truth, str):
        ground_truth = str(ground_truth)
    return EditRequest(
        template=template,
        subject=subject,
        target_new=target,
        ground_truth=ground_truth,
        case_id=case_id,
        index=index,
    )


def normalise_requests(requests: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> list[EditRequest]:
    """A list of EasyEdit request dicts (or a single dict) -> list of :class:`EditRequest`, in order."""
    if isinstance(requests, Mapping):
        requests = [requests]
    if not isinstance(requests, Sequence) or isinstance(requests, str):
        raise RequestError(f"requests must be a list of dicts, got {type(requests).__name__}")
    if len(requests) == 0:
        raise RequestError("no edit requests given")
    result = [normalise_request(raw, i) for i, raw in enumerate(requests)]
    for request in result[:10]:
        logger.info("ECE request: %s", request.describe())
    return result


def check_conflicts(requests: Sequence[EditRequest]) -> list[EditRequest]:
    """Refuse a batch holding two edits of the same prompt and subject with different targets (one of them
    would silently lose); exact duplicates are kept, with a warning."""
    seen: dict[tuple[str, str], EditRequest] = {}
    for request in requests:
        key = (request.template, request.subject)
        first = seen.setdefault(key, request)
        if first is request:
            continue
        if first.target_new != request.target_new:
            raise RequestError(
                f"requests {first.index} and {request.index} edit the same prompt {request.text!r} (subject "
                f"{request.subject!r}) to different targets {first.target_new.strip()!r} and "
                f"{request.target_new.strip()!r}; put them in different batches or drop one"
            )
        logger.warning("requests %d and %d are the same edit %s", first.index, request.index, request.describe())
    return list(requests)
