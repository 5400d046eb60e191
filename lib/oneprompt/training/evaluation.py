"""Evaluation on held-out tasks, per prompt kind: mean Dice of the queries given each template of the task's
template split (oracle prompts, clean views), against two baselines computed in the same pass: (a) frozen LiteMedSAM
given the template's prompt copied onto the query and (b) a training-free prototype (the masked average of the
template's neck features, cosine similarity on the query's)."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lib.core.evaluation import dice
from lib.oneprompt.model import OnePromptModel, masked_prototype
from lib.oneprompt.model.prompt_encoder import PROMPT_KINDS
from lib.oneprompt.training.features import FeatureCache, stack_features
from lib.oneprompt.training.samples import SampleStore
from lib.oneprompt.training.simulated_prompts import make_prompt, oracle_box, oracle_click, simulate_doodle


def prototype_similarity(query_neck: torch.Tensor, template_neck: torch.Tensor, template_mask: np.ndarray,
                         size: int = 256) -> torch.Tensor:
    """PerSAM's training-free location prior without its refinement: the masked average of the template's neck
    features (mask area-pooled to the feature grid) against every query feature by cosine similarity, upsampled
    to (B, S, S)."""
    proto = masked_prototype(template_neck.float()[:1], torch.from_numpy(template_mask.astype(np.float32))[None, None])
    q = F.normalize(query_neck.float(), dim=1)
    sim = torch.einsum("bchw,c->bhw", q, F.normalize(proto[0], dim=0))
    return F.interpolate(sim[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def calibrate_prototype_threshold(store: SampleStore, cache: FeatureCache, max_tasks: int = 40, seed: int = 0,
                                  grid: Sequence[float] = tuple(np.round(np.arange(0.3, 0.96, 0.05), 2))) -> float:
    """The similarity threshold with the best mean Dice on TRAINING tasks (clean views), never held-out ones."""
    rng = np.random.default_rng(seed)
    tasks = store.task_ids("train")
    tasks = [tasks[i] for i in rng.permutation(len(tasks))[:max_tasks]]
    scores = {g: [] for g in grid}
    for task in tasks:
        templates, queries = store.select(task, "template"), store.select(task, "train")
        if not templates or not queries:
            continue
        tf, _, tm = cache.item(templates[0], 0)
        for q in queries[:4]:
            qf, _, qm = cache.item(q, 0)
            sim = prototype_similarity(qf["neck"], tf["neck"], tm)[0].numpy()
            for g in grid:
                scores[g].append(dice(sim > g, qm))
    return float(max(grid, key=lambda g: np.mean(scores[g]) if scores[g] else -1))


def litemedsam_prediction(sam, query_neck: torch.Tensor, kind: str, template_mask: np.ndarray) -> np.ndarray:
    """Frozen LiteMedSAM on the query (its cached image embedding = the encoder's neck) given the template's
    ORACLE prompt copied onto the query: box -> the template's box; click -> the template's click as a positive
    point; doodle -> the box around the template's positive doodle points; SegLab -> the template mask's box."""
    with torch.no_grad():
        if kind == "click":
            pt = torch.from_numpy(oracle_click(template_mask))[None, None]
            logits, _ = sam.decode(query_neck.float(), point_coords=pt, point_labels=torch.ones(1, 1))
        else:
            if kind == "doodle":
                pos, _ = simulate_doodle(template_mask, 0.0, np.random.default_rng(0))
                box = np.concatenate([pos.min(0), pos.max(0)])
            else:
                box = oracle_box(template_mask)
            logits, _ = sam.decode(query_neck.float(), boxes=torch.from_numpy(box.astype(np.float32))[None])
    if logits.shape[-1] != template_mask.shape[-1]:
        logits = F.interpolate(logits, size=template_mask.shape, mode="bilinear", align_corners=False)
    return (logits[0, 0] > 0).numpy()


def evaluate(model: OnePromptModel, store: SampleStore, cache: FeatureCache, sam=None,
             kinds: Sequence[str] = PROMPT_KINDS, role: str = "heldout", query_split: str = "test",
             prototype_threshold: Optional[float] = None, max_queries: Optional[int] = None,
             tasks: Optional[Sequence[str]] = None, max_templates: Optional[int] = None, log=print) -> dict:
    """Per task of `role` (held-out by default) and prompt kind: mean Dice over the queries of `query_split`,
    each given every template of the task's template split (oracle prompts, clean views). Baselines computed in
    the same pass: "litemedsam" (frozen LiteMedSAM, the template's prompt copied onto the query; needs `sam`) and
    "prototype" (masked-average template neck features, cosine similarity, `prototype_threshold`)."""
    model.eval()
    rng = np.random.default_rng(0)
    task_ids = list(tasks) if tasks is not None else store.task_ids(role)
    per_task: Dict[str, dict] = {}
    for task in task_ids:
        templates = store.select(task, "template")[:max_templates]
        queries = store.select(task, query_split)[:max_queries]
        if not templates or not queries:
            continue
        q_items = [cache.item(q, 0) for q in queries]
        q_feats = stack_features([f for f, _, _ in q_items])
        q_masks = [m for _, _, m in q_items]
        res = {k: [] for k in kinds}
        res.update({f"litemedsam_{k}": [] for k in kinds} if sam is not None else {})
        res["prototype"] = []
        for t in templates:
            tf, timg, tm = cache.item(t, 0)
            t_feats = stack_features([tf])
            for kind in kinds:
                prompt = make_prompt(kind, [tm], timg[None], "oracle", rng)
                with torch.no_grad():
                    logits = model(q_feats, t_feats, prompt)
                for b, qm in enumerate(q_masks):
                    res[kind].append(dice((logits[b, 0] > 0).numpy(), qm))
                if sam is not None and kind == "seglab" and "bbox" in kinds:
                    # the same oracle box as "bbox": LiteMedSAM cannot take a mask prompt from another image
                    res["litemedsam_seglab"] = res["litemedsam_bbox"]
                elif sam is not None:
                    for b, qm in enumerate(q_masks):
                        pred = litemedsam_prediction(sam, q_feats["neck"][b:b + 1], kind, tm)
                        res[f"litemedsam_{kind}"].append(dice(pred, qm))
            if prototype_threshold is not None:
                sim = prototype_similarity(q_feats["neck"], tf["neck"], tm)
                for b, qm in enumerate(q_masks):
                    res["prototype"].append(dice((sim[b] > prototype_threshold).numpy(), qm))
        per_task[task] = {k: float(np.mean(v)) for k, v in res.items() if v}
        per_task[task]["n_queries"] = len(queries)
        log(f"  {task}: " + " ".join(f"{k}={v:.3f}" for k, v in per_task[task].items() if k != "n_queries"))
    columns = sorted({k for r in per_task.values() for k in r if k != "n_queries"})
    mean = {c: float(np.mean([r[c] for r in per_task.values() if c in r])) for c in columns}
    return {"per_task": per_task, "mean": mean, "tasks": len(per_task),
            "prototype_threshold": prototype_threshold}


def markdown_table(result: dict, kinds: Sequence[str] = PROMPT_KINDS) -> str:
    mean = result["mean"]
    proto = mean.get("prototype")
    lines = ["| prompt | One-Prompt (ours) | LiteMedSAM, template prompt copied | prototype (training-free) |",
             "|---|---|---|---|"]
    for k in kinds:
        ours = mean.get(k)
        sam = mean.get(f"litemedsam_{k}")
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {k} | {fmt(ours)} | {fmt(sam)} | {fmt(proto)} |")
    lines.append(f"\nmean Dice over {result['tasks']} tasks (each task weighted equally; queries x templates "
                 f"averaged within a task); prototype threshold {result.get('prototype_threshold')} "
                 f"(calibrated on training tasks; it uses the template mask, whatever the prompt kind)")
    return "\n".join(lines)
