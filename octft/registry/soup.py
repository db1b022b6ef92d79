"""Greedy model soups at promotion (Wortsman et al. 2022): the weights of fine-tunes of one pretrained checkpoint,
averaged.

`octft promote SPEC --soup K` takes the study's K best promotable trials that share the best trial's data, encoder
checkpoint, class order, preprocessing (`octft.train.provenance.PROVENANCE_TAGS` on their runs) and architecture (the
`model` and `data` sections of the config inside `best.pt`, and the state dict's keys and shapes); a trial that
differs is skipped with the reason. In order of validation value, each trial joins the soup only when the soup's
validation value does not drop with it. Every floating tensor of the state dict is averaged (encoder, head, any
BatchNorm buffers); the rest are the best trial's.

Every validation value here, the best trial's included, is computed by one function (`ValidationSplit.metrics`): the
run's validation split, prepared as training prepared it (`prepare_data`, `run_datasets`), the model's logits on the
CPU in float32 (`predict_logits`, as the test split is scored) and training's own scores (`evaluate_logits`: the
participant-level `val/*`). The soup is thus compared with the best trial on one footing; where the trials validated
in bf16, their recorded values differ from these by precision.

    >>> candidates = [soup_candidate(store, trial, scratch) for trial in ranked]      # doctest: +SKIP
    >>> soup = greedy_soup(candidates, "val/balanced_accuracy", maximize=True)       # doctest: +SKIP
    >>> soup.members, soup.value, soup.best_value                                    # doctest: +SKIP
    ([1, 3], 0.74, 0.71)
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from optuna.trial import FrozenTrial

from octft.config import ExperimentConfig
from octft.data.dataset import prepare_data
from octft.data.layout import CLASS_SHORT_NAMES
from octft.errors import MissingInputError
from octft.models.checkpoint import CheckpointError
from octft.registry.inference import CHECKPOINT_FILE, CONFIG_FILE, load_checkpoint_folder, predict_logits
from octft.registry.model import log_trial_model, trial_model
from octft.track.mlflow_store import LoggedModelView, MlflowStore, MlflowTracker
from octft.train.loop import evaluate_logits
from octft.train.provenance import PROVENANCE_TAGS, provenance_mismatch
from octft.train.runtime import load_state

SOUP_KIND = "soup"  # the soup run's octft.kind tag
MEMBERS_TAG = "octft.soup_members"  # on the soup run and its registered version: "1,3"
CANDIDATES_TAG = "octft.soup_candidates"


def soup_number(members: Sequence[int]) -> int:
    """The soup's number where the test ledger and the study's evaluations want a trial number: minus the bitmask of
    its members, so one set of members is one model and never a trial.

    >>> soup_number([1, 3])
    -10
    """
    return -sum(1 << member for member in set(members))


@dataclass
class SoupCandidate:
    """A trial's best checkpoint, downloaded from its run, with what decides whether it can join a soup."""

    trial: FrozenTrial
    run_id: str
    run_tags: dict[str, str]
    checkpoint_dir: Path
    state: dict  # best.pt's entries: model (the state dict), config (JSON), epoch, metrics

    @property
    def config(self) -> dict:
        return json.loads(self.state["config"])

    def incompatibility(self, reference: SoupCandidate) -> str | None:
        """Why this trial cannot share a soup with `reference` (the best trial), or None."""
        what = f"trial {self.trial.number}"
        mismatch = provenance_mismatch(self.run_tags, reference.run_tags)
        if mismatch:
            return f"{what} {mismatch}"
        for section in ("model", "data"):
            mine, theirs = self.config.get(section, {}), reference.config.get(section, {})
            differ = sorted(key for key in set(mine) | set(theirs) if mine.get(key) != theirs.get(key))
            if differ:
                return (f"{what} has another {section} config than trial {reference.trial.number}: "
                        + ", ".join(f"{section}.{key} {mine.get(key)!r} vs {theirs.get(key)!r}" for key in differ))
        mine, theirs = self.state["model"], reference.state["model"]
        if mine.keys() != theirs.keys():
            return f"{what}'s state dict has other keys than trial {reference.trial.number}'s"
        shapes = [key for key in mine if tuple(mine[key].shape) != tuple(theirs[key].shape)]
        if shapes:
            return f"{what}'s tensors differ in shape from trial {reference.trial.number}'s ({', '.join(shapes[:3])})"
        return None


def soup_candidate(store: MlflowStore, trial: FrozenTrial, run_id: str, into: Path) -> SoupCandidate:
    """Trial `trial`'s logged `checkpoint` folder, downloaded under `into/trial-<n>`, and its run's tags."""
    folder = into / f"trial-{trial.number}"
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint_dir = store.download(run_id, "checkpoint", folder)
    state = load_state(checkpoint_dir / CHECKPOINT_FILE, required=("model", "config"))
    return SoupCandidate(trial, run_id, store.run(run_id).tags, checkpoint_dir, state)


def average_states(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform average of every floating tensor of `states` (summed in float64, kept in its dtype); any other
    tensor (a BatchNorm's batch count) is the first state's.

    >>> average_states([{"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}])["w"]
    tensor([2.])
    """
    first = states[0]
    averaged = {}
    for key, value in first.items():
        if torch.is_floating_point(value):
            total = sum(state[key].to(torch.float64) for state in states)
            averaged[key] = (total / len(states)).to(value.dtype)
        else:
            averaged[key] = value.clone()
    return averaged


class ValidationSplit:
    """A config's validation samples, prepared as training prepared them, scored as training scored them."""

    def __init__(self, config: ExperimentConfig, *, progress: bool = False) -> None:
        setup = prepare_data(config.data, progress=progress)
        _, self.samples = setup.prepared.run_datasets(config.data.inner_val_fraction, config.data.split.seed)
        self.targets = np.asarray(self.samples.labels, dtype=np.int64)
        self.participants = self.samples.participant_ids(range(len(self.samples)))
        self.batch_size = config.train.batch_size

    def metrics(self, model: torch.nn.Module) -> dict[str, float]:
        """`model`'s `val/*` (participant level) and `val_volume/*` scores: training's `evaluate_logits` on the CPU's
        float32 logits."""
        logits = predict_logits(model, lambda index: self.samples[index]["x"][0].numpy(), len(self.samples),
                                batch_size=self.batch_size)
        return evaluate_logits(logits, self.targets, self.participants, CLASS_SHORT_NAMES)


@dataclass
class Soup:
    """What the greedy soup kept and left out, and the validation values it was judged by."""

    metric: str
    candidates: list[int]  # the compatible trials tried, best first
    members: list[int]
    metrics: dict[str, float]  # the soup's validation scores
    best_trial: int
    best_metrics: dict[str, float]  # the best trial's, computed the same way
    state: dict = field(repr=False, default_factory=dict)
    left_out: list[str] = field(default_factory=list)  # trials that lowered the soup's value, each with the values

    @property
    def value(self) -> float:
        return self.metrics[self.metric]

    @property
    def best_value(self) -> float:
        return self.best_metrics[self.metric]

    @property
    def number(self) -> int:
        return soup_number(self.members)

    def beats_best(self, maximize: bool) -> bool:
        """True when the soup holds more than one trial and validates strictly better than the best trial alone."""
        better = self.value > self.best_value if maximize else self.value < self.best_value
        return len(self.members) > 1 and better

    def describe(self) -> str:
        return f"soup of trials {self.members}"


def soup_candidates(store: MlflowStore, ranked: Sequence[tuple[FrozenTrial, str]], k: int,
                    into: Path) -> tuple[list[SoupCandidate], list[str]]:
    """The first `k` of `ranked` ((trial, run id), best first) that can share a soup with the first, and why each
    trial passed over on the way cannot. A trial's provenance tags are read first: its checkpoint is downloaded only
    when they match."""
    candidates: list[SoupCandidate] = []
    skipped: list[str] = []
    for trial, run_id in ranked:
        if len(candidates) == k:
            break
        if candidates:
            mismatch = provenance_mismatch(store.run(run_id).tags, candidates[0].run_tags)
            if mismatch:
                skipped.append(f"soup: skipped trial {trial.number} {mismatch}")
                continue
        try:
            candidate = soup_candidate(store, trial, run_id, into)
        except (MissingInputError, CheckpointError) as error:
            if not candidates:
                raise
            skipped.append(f"soup: skipped trial {trial.number}: {error}")
            continue
        reason = candidate.incompatibility(candidates[0]) if candidates else None
        if reason:
            skipped.append(f"soup: skipped {reason}")
            shutil.rmtree(candidate.checkpoint_dir.parent, ignore_errors=True)
        else:
            candidates.append(candidate)
    return candidates, skipped


def greedy_soup(candidates: Sequence[SoupCandidate], metric: str, *, maximize: bool,
                progress: bool = False) -> Soup:
    """The greedy soup of `candidates` (compatible, best first; the first is the best trial): each later trial joins
    when the soup's `metric` with it does not drop."""
    best = candidates[0]
    loaded = load_checkpoint_folder(best.checkpoint_dir, source=f"trial {best.trial.number}")
    split = ValidationSplit(loaded.config, progress=progress)
    model = loaded.model
    best_metrics = split.metrics(model)
    members, metrics, left_out = [best], best_metrics, []
    for candidate in candidates[1:]:
        model.load_state_dict(average_states([member.state["model"] for member in [*members, candidate]]))
        with_it = split.metrics(model)
        dropped = with_it[metric] < metrics[metric] if maximize else with_it[metric] > metrics[metric]
        if dropped:
            left_out.append(f"soup: left out trial {candidate.trial.number}: {metric} {with_it[metric]:.4f} with it, "
                            f"{metrics[metric]:.4f} without")
        else:
            members.append(candidate)
            metrics = with_it
    return Soup(metric, [candidate.trial.number for candidate in candidates],
                [member.trial.number for member in members], metrics, best.trial.number, best_metrics,
                average_states([member.state["model"] for member in members]), left_out)


def write_soup_checkpoint(soup: Soup, best: SoupCandidate, folder: Path) -> Path:
    """The soup as a checkpoint folder like a run's: `best.pt` (its weights, the best trial's config, its validation
    scores) and that `config.yaml`, so `load_checkpoint_folder`, `octft predict` and the pyfunc read it unchanged."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": soup.state, "epoch": best.state.get("epoch", 0), "metrics": json.dumps(soup.metrics),
                "config": best.state["config"], "soup_members": soup.members}, folder / CHECKPOINT_FILE)
    shutil.copyfile(best.checkpoint_dir / CONFIG_FILE, folder / CONFIG_FILE)
    return folder


def log_soup(store: MlflowStore, experiment: str, soup: Soup, best: SoupCandidate, checkpoint_dir: Path, *,
             study_name: str, parent_run_id: str | None) -> tuple[str, LoggedModelView]:
    """The soup as its own MLflow run (a child of the study's parent run, tag `octft.kind=soup`; params: its members
    and candidates; metrics: its validation scores; artifact: its checkpoint folder) and its own LoggedModel. A soup
    of the same members logged before, in this study, is reused."""
    members = ",".join(map(str, soup.members))
    for run in store.search_runs(experiment, {"octft.kind": SOUP_KIND, "octft.study": study_name, MEMBERS_TAG: members}):
        model = trial_model(store, run.run_id)
        if model is not None:
            return run.run_id, model
    # The best trial's provenance and commit: every member shares them (`SoupCandidate.incompatibility`).
    tags = {key: value for key, value in best.run_tags.items() if key in (*PROVENANCE_TAGS, "octft.git_commit")}
    tags.update({"octft.kind": SOUP_KIND, "octft.study": study_name, MEMBERS_TAG: members,
                 CANDIDATES_TAG: ",".join(map(str, soup.candidates)), "octft.precision": "fp32",
                 "octft.soup_best_trial": str(soup.best_trial), "octft.soup_best_trial_value": f"{soup.best_value:.6g}"})
    tracker = MlflowTracker(store.uri, experiment, f"soup-{members.replace(',', '-')}", parent_run_id=parent_run_id,
                            tags=tags)
    with tracker:
        tracker.log_params({"soup.members": members, "soup.candidates": tags[CANDIDATES_TAG], "soup.metric": soup.metric,
                            "soup.best_trial": soup.best_trial})
        tracker.log_metrics({**soup.metrics, "soup/best_trial_value": soup.best_value}, step=0)
        tracker.log_artifact(checkpoint_dir, "checkpoint")
    return tracker.run_id, log_trial_model(store, tracker.run_id, checkpoint_dir, soup.metrics, step=0)
