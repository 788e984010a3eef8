"""Assemble docs/benchmarks.md from the per-topic results each benchmark writes.

Every benchmark script writes ``docs/results/<topic>.md`` (its tables, the exact command, the
machine and the date). This script puts them on one page in a fixed order:

    python bench/collect.py
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["targets", "samplers", "samplers_overhead", "samplers_fit", "samplers_real",
         "samplers_real_h200", "train", "train_gpu", "nets", "metrics", "metrics_eval", "guidance",
         "guidance_mnist", "t2i", "controlnet", "consistency", "t2i_lcm", "likelihood"]
HEADER = """# difflab benchmarks

Every number on this page was measured by a script in `bench/`; each section names the command
that produced it, the machine and the date. `bench/README.md` says how to rerun all of it, and
`python bench/collect.py` rebuilds this page from `docs/results/*.md`. Ratios against peers
(HuggingFace `diffusers`) come from the same run on the same machine; absolute times on a shared
2-core machine are noise. All of it ran on 2026-11-26 (`samplers_overhead`, `samplers_fit`,
`samplers_real`: 2026-12-02) on a 2-core CPU (CI-class) that other jobs shared during most runs,
except the GPU section (`train_gpu`: one NVIDIA H200, lent for 15 minutes), which names its
card.

"""


def _relink(text: str, results: Path) -> str:
    """Rewrite relative links of a results page so they resolve from docs/."""

    def fix(m: re.Match) -> str:
        target = m.group(1)
        if "://" in target or target.startswith("#"):
            return m.group(0)
        path = os.path.relpath((results / target).resolve(), results.parent)
        return f"]({path})"

    return re.sub(r"\]\(([^)\s]+)\)", fix, text)


def main() -> None:
    results = ROOT / "docs" / "results"
    topics = sorted(p.stem for p in results.glob("*.md"))
    ordered = [t for t in ORDER if t in topics] + [t for t in topics if t not in ORDER]
    parts = [HEADER, "## Contents\n"]
    parts += [f"- [{t}](#{t})" for t in ordered]
    parts.append("")
    for t in ordered:
        text = _relink((results / f"{t}.md").read_text().strip(), results)
        # demote the section's headings by one level so the page has a single title
        text = "\n".join("#" + line if line.startswith("#") else line
                         for line in text.splitlines())
        parts += [f'<a id="{t}"></a>\n', text, ""]
    (ROOT / "docs" / "benchmarks.md").write_text("\n".join(parts) + "\n")
    print(f"wrote docs/benchmarks.md from {len(ordered)} result files")


if __name__ == "__main__":
    main()
