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


def row(arch: str) -> str:
    cells = []
    final = cls = ""
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
        except Exception as e:  # noqa: BLE001 - the table reports failures
            cells.append(f"❌ {type(e).__name__}")
    return f"| {arch.split('_project_out')[0]}{' (project_out)' if 'project_out' in arch else ''} | {cls} | `{final}` | {cells[0]} | {cells[1]} |"


def main() -> int:
    lines = ["| model_type | class | final modules found | float32: max lens-vs-logits diff | bfloat16 |",
             "|---|---|---|---|---|"] + [row(a) for a in sorted(ARCHITECTURES)]
    lines.append("| default: SmolLM2-135M-Instruct | LlamaForCausalLM | `model.norm` | tested on every run | tested |")
    table = "\n".join(lines)
    readme = ROOT / "README.md"
    text = readme.read_text()
    new = re.sub(r"(<!-- support-table:start -->\n).*?(<!-- support-table:end -->)",
                 lambda mt: mt.group(1) + table + "\n" + mt.group(2), text, flags=re.S)
    readme.write_text(new)
    print(table)
    return 0 if "❌" not in table else 1


if __name__ == "__main__":
    sys.exit(main())
