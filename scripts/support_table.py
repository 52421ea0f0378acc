"""Regenerate the README's support table: load every tiny architecture in float32 and bfloat16 and record
the load-time checks and the lens identity (last layer vs the model's own log-probs)."""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import torch

import lensbench as lb
from lensbench.testing import ARCHITECTURES, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _probe_cells(m) -> list[str]:
    """geometry / attribution / generation on a float32 model: ✅, or the error class / the refusal."""
    out = []
    texts = ["The quick brown fox jumps over the lazy dog. " * 3, "One, two, three, four, five; six seven. " * 3]
    for fn in (lambda: lb.intrinsic_dimension(m, texts, estimator="twonn", progress=False),
               lambda: lb.attribute(m, "The capital of France is", method="grad_x_input", progress=False)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn()
            out.append("✅")
        except Exception as e:  # noqa: BLE001 - the table reports failures
            out.append(f"❌ {type(e).__name__}")
    out.append("✅" if m.capabilities["prefix_cache"] else "refused (state not rewindable)")
    return out


def row(arch: str) -> str:
    cells = []
    final = cls = kinds = ""
    extra = ["", "", ""]
    for dtype in (torch.float32, torch.bfloat16):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = lb.load(*tiny_model(arch, dtype=dtype))
            res = lb.logit_lens(m, "The capital of France is", progress=False)
            with torch.no_grad():
                lp = torch.log_softmax(m.forward(res.input_ids[None]).logits[0].float(), -1)
            diff = float((res.top_probs[-1].log() - lp.topk(res.top_probs.shape[-1], -1).values).abs().max())
            cells.append(f"✅ {diff:.0e}")
            final, cls = " → ".join(m.anatomy.final), type(m.model).__name__
            kinds = "several streams" if m.anatomy.streams else ("mixed blocks" if m.anatomy.block_kinds else "")
            if dtype == torch.float32:
                extra = _probe_cells(m)
        except Exception as e:  # noqa: BLE001 - the table reports failures
            cells.append(f"❌ {type(e).__name__}")
    name = arch.split('_project_out')[0] + (" (project_out)" if "project_out" in arch else "")
    return f"| {name} | {cls} | `{final}` {kinds} | {cells[0]} | {cells[1]} | {' | '.join(extra)} |"


def main() -> int:
    lines = ["| model_type | class | final modules found | lens float32: max diff vs logits | lens bfloat16 | "
             "geometry | attribution | generation (prefix cache) |",
             "|---|---|---|---|---|---|---|---|"] + [row(a) for a in sorted(ARCHITECTURES)]
    lines.append("| default: SmolLM2-135M-Instruct (Q4_1 → float32) | LlamaForCausalLM | `model.norm` | tested on "
                 "every run | tested | tested | tested | tested |")
    table = "\n".join(lines)
    readme = ROOT / "README.md"
    text = readme.read_text()
    new = re.sub(r"(<!-- support-table:start -->\n).*?(<!-- support-table:end -->)",
                 lambda mt: mt.group(1) + table + "\n" + mt.group(2), text, flags=re.S)
    readme.write_text(new)
    print(table)
    return 0 if "❌" not in table else 1  # refusals of generation for recurrent states are by design


if __name__ == "__main__":
    sys.exit(main())
