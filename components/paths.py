"""Where every stage reads and writes (relative to the project root; all DVC outputs)."""

from __future__ import annotations

from pathlib import Path

MODELS = Path("models")
BASE_MODEL = MODELS / "base"
SFT_MODEL = MODELS / "sft"
DPO_MODEL = MODELS / "dpo"
CHECKPOINTS = Path("checkpoints")  # trainer checkpoints (resume); persisted DVC outs

PREPARED = Path("data/prepared")
STEPS_TRAIN = PREPARED / "steps_train.jsonl"  # StepSample, training problems
STEPS_VAL = PREPARED / "steps_val.jsonl"  # StepSample, held-out problems
PROCESSBENCH = PREPARED / "processbench.jsonl"  # ProcessBenchItem (profile subset)
PRMBENCH = PREPARED / "prmbench.jsonl"  # PRMBenchItem (profile subset)
HELDOUT = PREPARED / "heldout.jsonl"  # ProcessBenchItem: in-domain held-out benchmark (arithmetic domain; else empty)
BON_ARITHMETIC = PREPARED / "bon_arithmetic.jsonl"  # CandidatePool: in-domain Best-of-N pool (arithmetic domain)
PREPARE_COUNTS = Path("reports/prepare.json")
INCOMING = Path("data/incoming")  # drop folder for new labelled PRM800K-format files (git-ignored)
LABELLED = Path("data/labelled")  # files accepted from INCOMING by flows/retrain.py; prepare reads them

SYNTH = Path("data/synth")
SYNTH_JOURNAL = SYNTH / "journal.jsonl"  # teacher analyses as they finish
SYNTH_CRITIQUES = SYNTH / "critiques.jsonl"  # every analysis, verdict, kept flag
SFT_TRAIN = SYNTH / "sft_train.jsonl"
SFT_VAL = SYNTH / "sft_val.jsonl"

PAIRS = Path("data/pairs")
PAIRS_JOURNAL = PAIRS / "journal.jsonl"
PAIRS_CRITIQUES = PAIRS / "critiques.jsonl"
DPO_TRAIN = PAIRS / "dpo_train.jsonl"
DPO_VAL = PAIRS / "dpo_val.jsonl"

SCORES = Path("data/scores")  # evaluate: per-model journals and StepScores
BON = Path("data/bon")  # best-of-n: generated pools, scores
BON_POOLS = BON / "pools"  # best-of-n: policy-generated candidate pools (journals, reused)
BON_SCORES = BON / "scores"  # best-of-n: step-scorer journals of the candidates
BON_GUIDED = BON / "guided"  # best-of-n: guided-search results and PRM journal
BON_REPORT = Path("reports/bon.json")
GUIDED_SEARCH_REPORT = Path("reports/guided_search.json")
BON_CURVE_CSV = Path("plots/bon_curve.csv")  # the table behind the figure: n, accuracy, dataset, method
BON_CURVE_PNG = Path("plots/bon_curve.png")  # a DVC plot (images render offline)

REPORTS = Path("reports")
PLOTS = Path("plots")

# Inside a data folder (data.bundled_dir, data.dir; relative to it).
PROCESSBENCH_IDS_FILE = "processbench/rprm_part_subset_ids.json"  # the R-PRM authors' quick-eval ids
PRMBENCH_FILE = "prmbench/prmbench_preview.jsonl"

BUNDLED = Path("data/bundled")  # small real subsets shipped in git (data/bundled/README.md)
BUNDLED_PROCESSBENCH = BUNDLED / "processbench"  # default benchmark of `rprm score-processbench`
BUNDLED_PRMBENCH = BUNDLED / PRMBENCH_FILE  # ... of `rprm score-prmbench`


def model_dir(name: str) -> Path:
    """Folder of a pipeline model by name (base, sft, dpo)."""
    return {"base": BASE_MODEL, "sft": SFT_MODEL, "dpo": DPO_MODEL}[name]


# The stage (`rprm <stage>`, `dvc repro <stage>`) that builds each pipeline model folder.
MODEL_STAGES = {"base": "base-model", "sft": "sft", "dpo": "dpo"}


def model_hint(name: str) -> str:
    """How to build a pipeline model's folder: "run `rprm <stage>` (or `dvc repro <stage>`) first"."""
    stage = MODEL_STAGES[name]
    return f"run `rprm {stage}` (or `dvc repro {stage}`) first"


def require_model(name: str, key: str) -> Path:
    """The folder of pipeline model `name` (named by params `key`); DataError naming the folder and
    the stage that builds it when it is missing or holds no config.json."""
    from components.io import DataError

    path, hint = model_dir(name), f"{model_hint(name)} ({key}={name!r})"
    if not path.is_dir():
        raise DataError(path, None, None, f"does not exist: {hint}")
    if not (path / "config.json").is_file():
        raise DataError(path, None, "config.json", f"not a model folder (no config.json): {hint}")
    return path


def project_root() -> Path:
    """The project root (the folder holding params.yaml), from the current directory up."""
    here = Path.cwd().resolve()
    for p in [here, *here.parents]:
        if (p / "dvc.yaml").exists() or (p / "params.yaml").exists():
            return p
    return here
