"""The fact-world testbed: a small causal LM trained from scratch on CounterFact/zsRE facts + WikiText-2.

``build_testbed(TestbedConfig(output_dir=Path("testbed/testbed-llama")))`` builds one;
``counterfact_preedit`` and ``subject_recall_probe`` measure whether it knows its facts and whether they can be
moved from the subject's representation (what ROME/MEMIT/ECE edit).
"""

from .builder import MANIFEST_NAME, TestbedConfig, TestbedConfigError, build_testbed
from .facts import FactWorld, SamplerConfig, TestbedDataError, build_fact_world
from .probe import PreEditFigures, ProbeResult, counterfact_preedit, subject_recall_probe

__all__ = [
    "MANIFEST_NAME",
    "FactWorld",
    "PreEditFigures",
    "ProbeResult",
    "SamplerConfig",
    "TestbedConfig",
    "TestbedConfigError",
    "TestbedDataError",
    "build_fact_world",
    "build_testbed",
    "counterfact_preedit",
    "subject_recall_probe",
]
