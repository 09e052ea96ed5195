"""The fact world a testbed model is trained on: facts, relation templates and the training-sequence sampler.

A *fact* is (subject, relation, object) with the exact evaluation prompts it must answer (the CounterFact
prompt, its paraphrase and its neighbourhood prompt, each with the TRUE answer; zsRE questions likewise).
Relations are recovered from CounterFact itself: a prompt with its subject replaced by ``{}`` is a relation
*template*; templates are clustered into relations (union-find) when a record's neighbourhood prompt matches
another template (CounterFact draws neighbourhood prompts from the same relation) or when the ROME-format file
gives them the same ``relation_id``. Every fact is then asked in many phrasings (all templates of its
relation), behind random prefixes, which makes storing the fact at the subject's representation the
efficient solution -- the property locate-and-edit methods (ROME, MEMIT, ECE) rely on.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger(__name__)

# EasyEdit builds its context templates from generations that start with these words.
CONTEXT_STARTS = ("The", "Therefore", "Because", "I", "You")


class TestbedDataError(ValueError):
    """A data file for the testbed is missing, malformed or too small; the message names it."""

    __test__ = False  # not a pytest test class


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, object) fact with the verbatim prompts that must be answered by ``answer``."""

    subject: str
    answer: str
    relation: Optional[str]
    prompts: tuple[str, ...]
    source: str


@dataclass
class FactWorld:
    """Facts, relation templates and WikiText lines: everything a testbed is trained on."""

    facts: list[Fact]
    relations: dict[str, list[str]]
    wiki_lines: list[str]
    counterfact_case_ids: list[int] = field(default_factory=list)
    counterfact_val_case_ids: list[int] = field(default_factory=list)
    zsre_indices: list[int] = field(default_factory=list)
    counterfact_records: list[dict[str, Any]] = field(default_factory=list)
    mentions: list[str] = field(default_factory=list)
    """The edit targets' strings (CounterFact ``target_new``, zsRE ``alt``), shown as bare text when the
    sampler's ``mention_prob`` is positive: a real LLM can spell its edit targets before any edit."""


def load_json_records(path: Path, required: Sequence[str]) -> list[dict[str, Any]]:
    """Read a JSON list of dicts and check that every record has the ``required`` keys."""
    if not path.is_file():
        raise TestbedDataError(f"data file not found: {path}")
    with path.open(encoding="utf-8") as handle:
        data = json.load(handle)
    if not isinstance(data, list) or not data:
        raise TestbedDataError(f"{path}: expected a non-empty JSON list of records")
    for i, record in enumerate(data):
        missing = [key for key in required if key not in record]
        if missing:
            raise TestbedDataError(f"{path}: record {i} lacks keys {missing}")
    return data


COUNTERFACT_KEYS = (
    "case_id",
    "prompt",
    "subject",
    "target_new",
    "ground_truth",
    "rephrase_prompt",
    "locality_prompt",
    "locality_ground_truth",
)
ZSRE_KEYS = ("src", "answers", "rephrase", "loc", "loc_ans", "subject")


def template_of(prompt: str, subject: str) -> Optional[str]:
    """The relation template of a prompt: the prompt with its (first) subject occurrence replaced by ``{}``."""
    if not subject or subject not in prompt or "{" in prompt or "}" in prompt:
        return None
    return prompt.replace(subject, "{}", 1)


class _UnionFind:
    def __init__(self, items: Sequence[str]) -> None:
        self.parent = {item: item for item in items}

    def find(self, item: str) -> str:
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass(frozen=True)
class _TemplateMatch:
    template: str
    filler: str


class TemplateIndex:
    """All known templates, able to find which one a prompt instantiates (longest fixed text wins)."""

    def __init__(self, templates: Sequence[str]) -> None:
        self.templates = sorted(set(templates))
        self._parts = [(t, *t.split("{}", 1)) for t in self.templates]

    def match(self, prompt: str) -> Optional[_TemplateMatch]:
        best: Optional[_TemplateMatch] = None
        best_len = -1
        for template, prefix, suffix in self._parts:
            fixed = len(prefix) + len(suffix)
            if fixed > best_len and len(prompt) > fixed and prompt.startswith(prefix) and prompt.endswith(suffix):
                filler = prompt[len(prefix) : len(prompt) - len(suffix)]
                if filler.strip() and filler == filler.strip():
                    best, best_len = _TemplateMatch(template, filler), fixed
        return best


def cluster_relations(
    records: Sequence[dict[str, Any]], rome_records: Sequence[dict[str, Any]]
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Cluster CounterFact templates into relations.

    Returns (template -> relation name, relation name -> sorted templates). A relation is named by the
    ROME ``relation_id`` of one of its templates when known, else ``R<k>``.
    """
    templates = {t for r in records if (t := template_of(r["prompt"], r["subject"])) is not None}
    rome_rel: dict[str, str] = {}
    for record in rome_records:
        rewrite = record.get("requested_rewrite", {})
        prompt, relation_id = rewrite.get("prompt"), rewrite.get("relation_id")
        if isinstance(prompt, str) and prompt.count("{}") == 1 and relation_id:
            templates.add(prompt)
            rome_rel.setdefault(prompt, str(relation_id))
    index = TemplateIndex(sorted(templates))
    uf = _UnionFind(index.templates)
    for record in records:
        own = template_of(record["prompt"], record["subject"])
        match = index.match(record["locality_prompt"])
        if own is not None and match is not None:
            uf.union(own, match.template)
    by_id: dict[str, list[str]] = {}
    for template, relation_id in rome_rel.items():
        by_id.setdefault(relation_id, []).append(template)
    for group in by_id.values():
        for other in group[1:]:
            uf.union(group[0], other)
    clusters: dict[str, list[str]] = {}
    for template in index.templates:
        clusters.setdefault(uf.find(template), []).append(template)
    relations: dict[str, list[str]] = {}
    template_relation: dict[str, str] = {}
    for k, root in enumerate(sorted(clusters, key=lambda r: (-len(clusters[r]), r))):
        members = sorted(clusters[root])
        ids = sorted({rome_rel[t] for t in members if t in rome_rel})
        name = ids[0] if ids and ids[0] not in relations else f"R{k}"
        relations[name] = members
        for template in members:
            template_relation[template] = name
    return template_relation, relations


def _counterfact_facts(
    record: dict[str, Any], template_relation: dict[str, str], index: TemplateIndex, source: str
) -> list[Fact]:
    own = template_of(record["prompt"], record["subject"])
    relation = template_relation.get(own) if own else None
    facts = [
        Fact(
            subject=record["subject"],
            answer=record["ground_truth"],
            relation=relation,
            prompts=(record["prompt"], record["rephrase_prompt"]),
            source=source,
        )
    ]
    match = index.match(record["locality_prompt"])
    loc_relation = template_relation.get(match.template) if match else None
    facts.append(
        Fact(
            subject=match.filler if match else "",
            answer=record["locality_ground_truth"],
            relation=loc_relation,
            prompts=(record["locality_prompt"],),
            source=source + "-locality",
        )
    )
    return facts


ZSRE_MIN_FIXED_CHARS = 8
"""A zsRE question whose text around the subject is shorter than this is not used as a template."""


def _zsre_template(question: str, subject: str) -> Optional[str]:
    template = template_of(question, subject)
    if template is None or len(template) - 2 < ZSRE_MIN_FIXED_CHARS:
        return None
    return template


def cluster_zsre_relations(records: Sequence[dict[str, Any]]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Cluster zsRE question templates into relations: a record's question and its rephrase ask the same
    relation, and one template shared by two records joins their relations.

    zsRE records carry no relation id; this recovers them from the questions themselves so that a zsRE fact,
    like a CounterFact one, is asked through every phrasing of its relation. Returns (template -> relation
    name ``zsre-<k>``, relation name -> sorted templates).
    """
    pairs = [(_zsre_template(r["src"], r["subject"]), _zsre_template(r["rephrase"], r["subject"])) for r in records]
    templates = sorted({t for pair in pairs for t in pair if t is not None})
    uf = _UnionFind(templates)
    for src, rephrase in pairs:
        if src is not None and rephrase is not None:
            uf.union(src, rephrase)
    clusters: dict[str, list[str]] = {}
    for template in templates:
        clusters.setdefault(uf.find(template), []).append(template)
    relations: dict[str, list[str]] = {}
    template_relation: dict[str, str] = {}
    for k, root in enumerate(sorted(clusters, key=lambda r: (-len(clusters[r]), r))):
        name = f"zsre-{k}"
        relations[name] = sorted(clusters[root])
        for template in relations[name]:
            template_relation[template] = name
    return template_relation, relations


def _zsre_facts(record: dict[str, Any], template_relation: Optional[dict[str, str]] = None) -> list[Fact]:
    answer = record["answers"][0] if record["answers"] else None
    facts: list[Fact] = []
    if isinstance(answer, str) and answer.strip():
        relation = None
        if template_relation:
            template = _zsre_template(record["src"], record["subject"])
            relation = template_relation.get(template) if template else None
        facts.append(Fact(record["subject"], answer, relation, (record["src"], record["rephrase"]), "zsre"))
    if isinstance(record.get("loc_ans"), str) and record["loc_ans"].strip():
        facts.append(Fact("", record["loc_ans"], None, (record["loc"],), "zsre-locality"))
    return facts


_SYLLABLES = ("ka", "lo", "ver", "mi", "tan", "dor", "sel", "ru", "ben", "qua", "fen", "ith", "zar", "po", "lek", "um")


def synthetic_subject(index: int, taken: set[str]) -> str:
    """A made-up two-word name, deterministic in ``index`` and absent from ``taken``."""
    rng = random.Random(f"synthetic-subject-{index}")
    while True:
        words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize() for _ in range(2)]
        name = " ".join(words)
        if name not in taken:
            return name


def _target_answer_facts(
    pairs: Sequence[tuple[Optional[str], Optional[str], str]], taken: set[str]
) -> list[Fact]:
    """For each (relation, template, target): a fact of that relation about a synthetic subject answered by the
    target, so that the target is a string the model has given as an answer, not only read."""
    facts: list[Fact] = []
    for relation, template, target in pairs:
        if relation is None or template is None or not target.strip():
            continue
        subject = synthetic_subject(len(facts), taken)
        taken.add(subject)
        facts.append(Fact(subject, target.strip(), relation, (template.format(subject),), "target-answer"))
    return facts


def read_wiki_lines(paths: Sequence[Path], min_chars: int = 40) -> list[str]:
    """WikiText-2 paragraphs (headings and short lines dropped)."""
    lines: list[str] = []
    for path in paths:
        if not path.is_file():
            raise TestbedDataError(f"WikiText file not found: {path}")
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if len(line) >= min_chars and not line.startswith("="):
                lines.append(line)
    if not lines:
        raise TestbedDataError(f"no usable text lines in {[str(p) for p in paths]}")
    return lines


def build_fact_world(
    counterfact_path: Path,
    n_records: int,
    counterfact_val_path: Optional[Path],
    n_val_records: int,
    rome_format_path: Optional[Path],
    zsre_path: Optional[Path],
    n_zsre: int,
    wiki_paths: Sequence[Path],
    zsre_relations: bool = False,
    target_answers: bool = False,
    counterfact_offset: int = 0,
    zsre_offset: int = 0,
) -> FactWorld:
    """Load ``n_records`` CounterFact records from ``counterfact_offset`` (+ validation and ``n_zsre`` zsRE records
    from ``zsre_offset``) as facts; the offsets are 0 for a testbed's own world (its first records) and point
    past them for a held-out world (:mod:`.corpus`).

    With ``zsre_relations`` the zsRE questions are clustered into relations (:func:`cluster_zsre_relations`)
    and each zsRE fact is also asked through its relation's other templates; otherwise only verbatim. With
    ``target_answers`` every edit target (CounterFact ``target_new``, zsRE ``alt`` where its relation is known)
    is also the answer of one fact of the same relation about a synthetic subject that no evaluation asks about.
    """
    records = load_json_records(counterfact_path, COUNTERFACT_KEYS)
    if counterfact_offset < 0 or counterfact_offset + n_records > len(records):
        raise TestbedDataError(
            f"{counterfact_path} has {len(records)} records, {n_records} requested from record {counterfact_offset}"
        )
    chosen = records[counterfact_offset : counterfact_offset + n_records]
    val_chosen: list[dict[str, Any]] = []
    if counterfact_val_path is not None and n_val_records > 0:
        val_records = load_json_records(counterfact_val_path, COUNTERFACT_KEYS)
        if n_val_records > len(val_records):
            raise TestbedDataError(f"{counterfact_val_path} has {len(val_records)} records, {n_val_records} requested")
        val_chosen = val_records[:n_val_records]
    rome_records = load_json_records(rome_format_path, ("requested_rewrite",)) if rome_format_path else []
    template_relation, relations = cluster_relations(records + val_chosen, rome_records)
    index = TemplateIndex(list(template_relation))
    facts: list[Fact] = []
    for record in chosen:
        facts.extend(_counterfact_facts(record, template_relation, index, "counterfact"))
    for record in val_chosen:
        facts.extend(_counterfact_facts(record, template_relation, index, "counterfact-val"))
    # every edit target with its relation and template: the mentions and the target-answer facts come from these
    answer_pairs: list[tuple[Optional[str], Optional[str], str]] = []
    for record in chosen + val_chosen:
        own = template_of(record["prompt"], record["subject"])
        answer_pairs.append((template_relation.get(own) if own else None, own, str(record["target_new"])))
    zsre_indices: list[int] = []
    if zsre_path is not None and n_zsre > 0:
        zsre_records = load_json_records(zsre_path, ZSRE_KEYS)
        if zsre_offset < 0 or zsre_offset + n_zsre > len(zsre_records):
            raise TestbedDataError(
                f"{zsre_path} has {len(zsre_records)} records, {n_zsre} requested from record {zsre_offset}"
            )
        zsre_chosen = zsre_records[zsre_offset : zsre_offset + n_zsre]
        zsre_template_relation: dict[str, str] = {}
        if zsre_relations:
            zsre_template_relation, zsre_rel = cluster_zsre_relations(zsre_chosen)
            relations.update(zsre_rel)
        for i, record in enumerate(zsre_chosen):
            facts.extend(_zsre_facts(record, zsre_template_relation))
            zsre_indices.append(zsre_offset + i)
            if isinstance(record.get("alt"), str):
                template = _zsre_template(record["src"], record["subject"])
                answer_pairs.append((zsre_template_relation.get(template) if template else None, template, record["alt"]))
    if target_answers:
        facts.extend(_target_answer_facts(answer_pairs, {f.subject for f in facts}))
    logger.info(
        "fact world: %d facts from %d CounterFact + %d validation + %d zsRE records, %d relations",
        len(facts), len(chosen), len(val_chosen), len(zsre_indices), len(relations),
    )
    return FactWorld(
        facts=facts,
        relations=relations,
        wiki_lines=read_wiki_lines(wiki_paths),
        counterfact_case_ids=[int(r["case_id"]) for r in chosen],
        counterfact_val_case_ids=[int(r["case_id"]) for r in val_chosen],
        zsre_indices=zsre_indices,
        counterfact_records=chosen + val_chosen,
        mentions=list(dict.fromkeys(t.strip() for _, _, t in answer_pairs if t.strip())),
    )


@dataclass(frozen=True)
class SamplerConfig:
    """How training text is drawn from a :class:`FactWorld`."""

    verbatim_prob: float = 0.5
    prefix_prob: float = 0.5
    wiki_sequence_prob: float = 0.2
    prefix_words: tuple[int, int] = (2, 7)
    mention_prob: float = 0.0
    """Share of the pieces of a fact sequence that are a bare edit-target string ("<target>.") instead of a
    fact sentence. 0 draws no extra random numbers, so builds made before this option reproduce exactly."""


class SequenceSampler:
    """Deterministic stream of training texts (each a list of segments joined into one sequence).

    A fact sequence is a run of fact sentences ("<prompt> <answer>.") -- each phrased either verbatim as an
    evaluation prompt or by a template of its relation -- some behind a random prefix in EasyEdit's
    context-template style ("The <wiki words>. "); a wiki sequence is a stretch of WikiText-2.
    """

    def __init__(self, world: FactWorld, config: SamplerConfig, seed: int) -> None:
        self.world = world
        self.config = config
        self.rng = random.Random(seed)
        self._order: list[int] = []
        self._mention_order: list[int] = []

    def _next_fact(self) -> Fact:
        if not self._order:
            self._order = list(range(len(self.world.facts)))
            self.rng.shuffle(self._order)
        return self.world.facts[self._order.pop()]

    def _next_mention(self) -> str:
        if not self._mention_order:
            self._mention_order = list(range(len(self.world.mentions)))
            self.rng.shuffle(self._mention_order)
        return self.world.mentions[self._mention_order.pop()] + "."

    def _piece(self) -> str:
        if self.config.mention_prob > 0 and self.world.mentions and self.rng.random() < self.config.mention_prob:
            return self._next_mention()
        return self.fact_sentence(self._next_fact())

    def fact_sentence(self, fact: Fact) -> str:
        templates = self.world.relations.get(fact.relation, []) if fact.relation and fact.subject else []
        if not templates or self.rng.random() < self.config.verbatim_prob:
            prompt = self.rng.choice(fact.prompts)
        else:
            prompt = self.rng.choice(templates).format(fact.subject)
        return f"{prompt} {fact.answer}."

    def wiki_words(self, n_words: int) -> str:
        words = self.rng.choice(self.world.wiki_lines).split()
        start = self.rng.randrange(max(1, len(words) - n_words))
        return " ".join(words[start : start + n_words])

    def prefix(self) -> str:
        lo, hi = self.config.prefix_words
        return f"{self.rng.choice(CONTEXT_STARTS)} {self.wiki_words(self.rng.randint(lo, hi))}. "

    def text(self, approx_chars: int) -> str:
        """One training text of roughly ``approx_chars`` characters (the tokenizer truncates it)."""
        if self.rng.random() < self.config.wiki_sequence_prob:
            line = self.rng.choice(self.world.wiki_lines)
            start = self.rng.randrange(max(1, len(line) - approx_chars))
            start = line.rfind(" ", 0, start) + 1 if start else 0
            return line[start : start + approx_chars * 2]
        parts: list[str] = []
        length = 0
        first = True
        while length < approx_chars:
            piece = self._piece()
            if not first and self.rng.random() < self.config.prefix_prob:
                piece = self.prefix() + piece
            elif first and self.rng.random() < self.config.prefix_prob / 2:
                piece = self.prefix() + piece
            parts.append(piece)
            length += len(piece) + 1
            first = False
        return " ".join(parts)

    def texts(self, n: int, approx_chars: int) -> Iterator[str]:
        for _ in range(n):
            yield self.text(approx_chars)
