"""inseq side of bench/bench_attribution.py — runs in the separate ``.venv-inseq`` environment (inseq pins
typeguard<=2.13.3, which clashes with transformer-lens in the main environment), from the repository root:

    .venv-inseq/bin/python -m bench.attribution_inseq job.json out.json

``job.json``: {"model_dir", "prompt", "target_text", "target_id", "prompt_ids", "repeats", "threads",
"n_steps", "internal_batch_size", "reagent": {...}, "tmp"}. Writes the raw (granular, un-aggregated, un-normalised)
attribution tensors per method and the wall and process-CPU seconds of each ``attribute`` call to ``out.json``.

ReAGent in inseq samples replacements with a POS-tag sampler whose vocabulary→tag table is built with nltk's
tagger, downloaded at first use (impossible offline). The table is cached as a pickle; we pre-write that cache with
a single tag holding the whole vocabulary, which makes inseq's sampler exactly uniform over the vocabulary — the
same replacement rule as ``lb.attribute(..., method="reagent", replacement="uniform")``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pickle
import sys
import time
import warnings
from pathlib import Path

from bench._harness import Timer


def main(job_path: str, out_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    tmp = Path(job["tmp"])
    cache = tmp / "inseq-artifacts"
    (cache / "pos_tag_sampler_cache").mkdir(parents=True, exist_ok=True)
    os.environ["INSEQ_ARTIFACTS_CACHE"] = str(cache)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    warnings.simplefilter("ignore")
    import torch
    torch.set_num_threads(job["threads"])
    t0 = time.perf_counter()
    import inseq
    import_s = time.perf_counter() - t0

    model_dir = job["model_dir"]
    name = model_dir.rstrip("/").split("/")[-1]
    with open(cache / "pos_tag_sampler_cache" / f"{name}.pkl", "wb") as f:  # uniform replacement (see above)
        from transformers import AutoTokenizer
        pickle.dump({"ALL": list(range(AutoTokenizer.from_pretrained(model_dir).vocab_size))}, f)

    prompt, gen = job["prompt"], job["prompt"] + job["target_text"]
    out: dict = {"inseq_version": importlib.metadata.version("inseq"), "torch": torch.__version__, "import_s": import_s, "methods": {}}
    reps = job["repeats"]
    cases = {
        "saliency": ({}, {}),
        "integrated_gradients": ({}, {"n_steps": job["n_steps"], "internal_batch_size": job["internal_batch_size"]}),
        "reagent": (job["reagent"], {}),
    }
    for method, (load_kw, attr_kw) in cases.items():
        t = time.perf_counter()
        model = inseq.load_model(model_dir, method, **load_kw)
        load_s = time.perf_counter() - t
        timer = Timer()
        for r in range(reps if method != "reagent" else job.get("reagent_repeats", reps)):
            torch.manual_seed(job.get("seed", 0) + r)
            res = timer(lambda attr_kw=attr_kw, model=model: model.attribute(
                input_texts=prompt, generated_texts=gen, attributed_fn="probability", show_progress=False, **attr_kw))
        seq = res.sequence_attributions[0]
        raw = seq.target_attributions  # decoder-only: [prefix+generated, n_generated, hidden] (granular)
        out["methods"][method] = {
            "seconds": timer.wall, "cpu_seconds": timer.cpu, "load_s": load_s,
            "tokens": [t.token for t in seq.target],
            "ids": [int(t.id) for t in seq.target],
            "raw": raw[:, 0].float().tolist() if method != "reagent" else raw[:, 0, 0].float().tolist(),
            "step_scores": {k: v.float().tolist() for k, v in (seq.step_scores or {}).items()},
        }
        del model
    Path(out_path).write_text(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
