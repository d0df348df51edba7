"""The `summarize` stage: a dozen headline numbers in one small, flat DVC metrics file.

The stage reports (`reports/*.json`) hold everything, nested per model, subset and curve point;
`dvc metrics show` prints all of it (thousands of characters per line) and `dvc exp show`
prefixes a key that two reports share. `reports/headline.json` holds only the numbers to read
first, under keys that no other report uses, flat, rounded to 4 decimals, sorted:

- `heldout_f1_<model>`, `heldout_reach_<model>`: first-error F1 and verdict-reach rate on the
  in-domain held-out benchmark (arithmetic domain), per evaluated model;
- `processbench_f1_<model>`: ProcessBench average F1 (out of domain on the default profile);
- `prmscore_<model>`: PRMBench PRMScore;
- `bon_gain_<dataset>`: Best-of-N accuracy of the PRM (prm@N) minus majority voting (maj@N);
- `dpo_pref_acc`: the DPO model's held-out preference accuracy (`reports/dpo.json`).

Per-model numbers come from `components.registry.headline_metrics`, which the register stage's
quality gate and version tags use too. A report that is missing leaves its keys out (the stage
says which); nothing else is read. No MLflow run: the Prefect flow copies these numbers onto its
parent run with every other report number.

    rprm summarize && dvc metrics diff --all --no-path --targets reports/headline.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from components.config import Params
from components.io import DataError, read_json_object, write_json
from components.paths import Layout

DIGITS = 4

# registry.headline_metrics key -> headline key prefix (the model name is appended)
PER_MODEL = {
    "heldout_f1": "heldout_f1",
    "heldout_verdict_reach_rate": "heldout_reach",
    "processbench_avg_f1": "processbench_f1",
    "prmbench_prmscore": "prmscore",
}


def _read(path: Path) -> dict[str, Any] | None:
    """A report as a dict; None when the file does not exist."""
    if not path.exists():
        return None
    return read_json_object(path)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return None
    return round(float(value), DIGITS)


def evaluated_models(reports: Path) -> list[str]:
    """The models of `reports`/processbench.json, in the order evaluate ran them."""
    pb = _read(reports / "processbench.json") or {}
    models = pb.get("models")
    return list(models) if isinstance(models, dict) else []


def headline(reports: Path) -> tuple[dict[str, float], list[str]]:
    """(the flat headline numbers of the reports in folder `reports`, the reports that were missing)."""
    from components.registry import headline_metrics

    out: dict[str, float] = {}
    missing = [name for name in ("processbench", "prmbench", "heldout", "bon", "dpo")
               if not (reports / f"{name}.json").exists()]
    models = evaluated_models(reports) if "processbench" not in missing and "prmbench" not in missing else []
    per_model = {m: headline_metrics(m, reports) for m in models}
    for key, prefix in PER_MODEL.items():
        for model in models:
            if (v := _num(per_model[model].get(key))) is not None:
                out[f"{prefix}_{model}"] = v
    bon = _read(reports / "bon.json") or {}
    datasets = bon.get("datasets") if isinstance(bon.get("datasets"), dict) else {}
    for dataset, entry in datasets.items():
        if not isinstance(entry, dict):
            continue
        n = entry.get("n")
        best, maj = _num(entry.get(f"prm@{n}")), _num(entry.get(f"maj@{n}"))
        if best is not None and maj is not None:
            out[f"bon_gain_{dataset}"] = round(best - maj, DIGITS)
    dpo = _read(reports / "dpo.json") or {}
    if (v := _num(dpo.get("preference_accuracy"))) is not None:
        out["dpo_pref_acc"] = v
    return out, missing


def table(numbers: dict[str, float]) -> str:
    """The headline numbers as aligned `key value` lines (what the stage prints)."""
    width = max((len(k) for k in numbers), default=0)
    return "\n".join(f"{k:<{width}}  {v:g}" for k, v in numbers.items())


def run(params: Params, layout: Layout = Layout()) -> dict[str, float]:
    """`rprm summarize`: write the layout's reports/headline.json from the stage reports; print it."""
    del params  # the reports say what was evaluated; the stage reads no params
    numbers, missing = headline(layout.reports)
    if not numbers:
        raise DataError(layout.reports, None, None,
                        "no headline number found: run the evaluate, dpo and best-of-n stages first")
    write_json(layout.report("headline.json"), numbers)
    print(table(numbers))
    if missing:
        print(f"(no {', '.join(f'reports/{m}.json' for m in missing)}: their numbers are left out)")
    return numbers
