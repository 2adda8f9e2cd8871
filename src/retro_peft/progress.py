"""Progress bars of retro-peft's long jobs (embedding chunks, computing a frozen KV cache, the demo's phases).

One rule for all of them: a bar is for a person watching a terminal, so it is drawn on stderr, and only when
asked for (`progress=True`; the CLI's `--no-progress` says no) and stderr is a terminal. A redirected or
piped stderr (CI logs, `2> log`) gets no bar, and stdout (results, `--json`) never gets one.
"""

from __future__ import annotations

import sys


def enabled(requested: bool = True) -> bool:
    """Whether a bar is drawn: `requested` and stderr is a terminal."""
    return bool(requested) and sys.stderr.isatty()


def bar(*, progress: bool, desc: str, total: int | None = None, unit: str = "it", **kwargs):
    """A tqdm bar on stderr (rate and ETA from `total`), disabled unless `enabled(progress)`."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled(progress),
                dynamic_ncols=True, **kwargs)
