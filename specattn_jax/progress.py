"""Progress bars for long work: tqdm's notebook widget where ipywidgets is installed, its text
bar elsewhere. (`tqdm.auto` picks the widget in any notebook kernel; without ipywidgets it
warns, then falls back to the same text bar.)"""

from __future__ import annotations

import importlib.util


def progress_bar(iterable=None, **options):
    """A tqdm bar over `iterable`, with tqdm's keyword options (desc, total, disable, ...)."""
    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    return tqdm(iterable, **options)
