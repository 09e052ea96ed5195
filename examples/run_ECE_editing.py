"""Run ECE (or an EasyEdit baseline) through EasyEdit's BaseEditor, as EasyEdit's
examples/run_AlphaEdit_editing.py does, with the same arguments.

    PYTHONPATH=/path/to/EasyEdit:. python examples/run_ECE_editing.py \
        --editing_method ECE --hparams_dir hparams/ECE/testbed-llama.yaml \
        --data_dir data/zsre --data_type ZsRE --ds_size 100 --sequential_edit

Data types: ZsRE (``zsre_mend_eval.json``), CF / MCF (ROME-format ``counterfact.json`` /
``multi_counterfact.json``) as in EasyEdit's script, plus ``counterfact`` (EasyEdit-format CounterFact,
``counterfact-edit.json``, bundled in data/counterfact). Nothing is downloaded: the file must exist in
``--data_dir``. ``import ece_plugin`` registers ECE in EasyEdit (ALG_DICT, batchable methods).

Runs from any folder, in a clone or with ece-plugin installed: ``--hparams_dir`` may be a bundled name
(``testbed-llama``, ``llama3-8b``), ``--data_dir`` a folder under the bundled ``data/`` (``zsre``), and a
``model_name`` the hparams give relative to the repository (``./testbed/testbed-llama``) is found there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ece_plugin  # noqa: E402,F401 - registers ECE in EasyEdit
from ece_plugin.easyedit import import_easyedit  # noqa: E402
from ece_plugin.evaluation.data import load_records, to_easyedit_edit_kwargs  # noqa: E402
from ece_plugin.resources import repo_path, resolve_hparams, resolve_model  # noqa: E402

DATA_FILES = {
    "ZsRE": ("zsre_mend_eval.json", "zsre"),
    "CF": ("counterfact.json", "counterfact"),
    "MCF": ("multi_counterfact.json", "counterfact"),
    "counterfact": ("counterfact-edit.json", "counterfact"),
}
HPARAMS_CLASSES = {
    "ECE": None,
    "MEMIT": "MEMITHyperParams",
    "ROME": "ROMEHyperParams",
    "AlphaEdit": "AlphaEditHyperParams",
    "FT": "FTHyperParams",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--editing_method", required=True, type=str, choices=sorted(HPARAMS_CLASSES))
    parser.add_argument("--hparams_dir", required=True, type=str)
    parser.add_argument("--data_dir", required=True, type=str)
    parser.add_argument("--data_type", required=True, type=str, choices=sorted(DATA_FILES))
    parser.add_argument("--output_dir", default="./outputs", type=str)
    parser.add_argument("--ds_size", default=3, type=int)
    parser.add_argument("--sequential_edit", action="store_true")
    parser.add_argument("--batch_edit", action="store_true",
                        help="use BaseEditor.batch_edit (the default when the hparams' batch_size > 1)")
    parser.add_argument("--test_generation", action="store_true", help="EasyEdit's fluency test (slower)")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    name, kind = DATA_FILES[args.data_type]
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir() and repo_path("data", data_dir.name).is_dir():
        data_dir = repo_path("data", data_dir.name)  # the bundled data/<name>
    data_file = data_dir / name
    if not data_file.is_file():
        print(f"error: {data_file} does not exist (this script does not download data)", file=sys.stderr)
        return 1
    records = load_records(data_file, kind=kind, limit=args.ds_size)
    easyeditor = import_easyedit("easyeditor")
    hparams_file = str(resolve_hparams(args.hparams_dir, args.editing_method))
    if args.editing_method == "ECE":
        hparams = ece_plugin.ECEHyperParams.from_hparams(hparams_file)
    else:
        hparams = getattr(easyeditor, HPARAMS_CLASSES[args.editing_method]).from_hparams(hparams_file)
    if not Path(hparams.model_name).exists():
        hparams.model_name = str(resolve_model(hparams.model_name))  # ./testbed/... outside the clone, or a hub id

    os.makedirs(args.output_dir, exist_ok=True)
    output_file = os.path.join(
        args.output_dir,
        f"{hparams.model_name.split('/')[-1]}_{args.editing_method}_N={args.ds_size}"
        f"_Sequential={args.sequential_edit}.json",
    )
    print("See results at: ", output_file)

    editor = easyeditor.BaseEditor.from_hparams(hparams)
    # BaseEditor.edit needs batch_size 1 (single edits); with a larger batch size use batch_edit.
    use_batch = args.batch_edit or int(getattr(hparams, "batch_size", 1) or 1) > 1
    edit = editor.batch_edit if use_batch else editor.edit
    metrics, _edited_model, _ = edit(
        **to_easyedit_edit_kwargs(records),
        keep_original_weight=True,
        sequential_edit=args.sequential_edit,
        test_generation=args.test_generation,
    )
    with open(output_file, "w") as f:
        json.dump(metrics, f, indent=4, default=str)
    if len(metrics) > 0:
        easyeditor.summary_metrics(metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
