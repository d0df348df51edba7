"""Where every stage reads and writes: the project layout.

The constants below are the names, relative to the project root, that dvc.yaml lists (all DVC
outputs). A stage is handed a :class:`Layout` (its `run(params, layout)`), which joins them to a
root; `Layout()` is the current directory and gives back exactly these relative paths, which is
what the CLI and `dvc repro` use. The library under the stages (prompts, records, io, backends,
scoring, search, grading, metrics, journal) imports nothing from here: it is handed paths.
"""

from __future__ import annotations

from dataclasses import dataclass
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
HELDOUT_KINDS = PREPARED / "heldout_error_kinds.json"  # {solution id: kind of its first error} (arithmetic; else {})
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


# The stage (`rprm <stage>`, `dvc repro <stage>`) that builds each pipeline model folder.
MODEL_STAGES = {"base": "base-model", "sft": "sft", "dpo": "dpo"}


def model_hint(name: str) -> str:
    """How to build a pipeline model's folder: "run `rprm <stage>` (or `dvc repro <stage>`) first"."""
    stage = MODEL_STAGES[name]
    return f"run `rprm {stage}` (or `dvc repro {stage}`) first"


def _under_root(rel: Path) -> property:
    """A Layout attribute: the relative path `rel` joined to the layout's root."""
    return property(lambda self: Path(self.root) / rel, doc=f"{rel.as_posix()} under the root")


@dataclass(frozen=True)
class Layout:
    """The project's files under one root: each stage's inputs and outputs.

    `Layout()` (root ".") gives the relative paths above unchanged, as reports and dvc.yaml name
    them; `Layout(tmp_path)` puts a whole project elsewhere (tests, a second checkout).
    """

    root: Path = Path(".")

    # models and trainer checkpoints
    base_model = _under_root(BASE_MODEL)
    sft_model = _under_root(SFT_MODEL)
    dpo_model = _under_root(DPO_MODEL)
    checkpoints = _under_root(CHECKPOINTS)
    # prepare
    steps_train = _under_root(STEPS_TRAIN)
    steps_val = _under_root(STEPS_VAL)
    processbench = _under_root(PROCESSBENCH)
    prmbench = _under_root(PRMBENCH)
    heldout = _under_root(HELDOUT)
    heldout_kinds = _under_root(HELDOUT_KINDS)
    bon_arithmetic = _under_root(BON_ARITHMETIC)
    prepare_counts = _under_root(PREPARE_COUNTS)
    incoming = _under_root(INCOMING)
    labelled = _under_root(LABELLED)
    # synthesize
    synth_journal = _under_root(SYNTH_JOURNAL)
    synth_critiques = _under_root(SYNTH_CRITIQUES)
    sft_train = _under_root(SFT_TRAIN)
    sft_val = _under_root(SFT_VAL)
    # sample-pairs
    pairs_journal = _under_root(PAIRS_JOURNAL)
    pairs_critiques = _under_root(PAIRS_CRITIQUES)
    dpo_train = _under_root(DPO_TRAIN)
    dpo_val = _under_root(DPO_VAL)
    # evaluate and best-of-n
    scores = _under_root(SCORES)
    bon_pools = _under_root(BON_POOLS)
    bon_scores = _under_root(BON_SCORES)
    bon_guided = _under_root(BON_GUIDED)
    bon_report = _under_root(BON_REPORT)
    guided_search_report = _under_root(GUIDED_SEARCH_REPORT)
    bon_curve_csv = _under_root(BON_CURVE_CSV)
    bon_curve_png = _under_root(BON_CURVE_PNG)
    reports = _under_root(REPORTS)
    plots = _under_root(PLOTS)

    def report(self, name: str) -> Path:
        """reports/<name> under the root."""
        return self.reports / name

    def plot(self, name: str) -> Path:
        """plots/<name> under the root."""
        return self.plots / name

    def model_dir(self, name: str) -> Path:
        """Folder of a pipeline model by name (base, sft, dpo)."""
        return {"base": self.base_model, "sft": self.sft_model, "dpo": self.dpo_model}[name]

    def require_model(self, name: str, key: str) -> Path:
        """The folder of pipeline model `name` (named by params `key`); DataError naming the folder
        and the stage that builds it when it is missing or holds no config.json."""
        from components.io import DataError

        path, hint = self.model_dir(name), f"{model_hint(name)} ({key}={name!r})"
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
