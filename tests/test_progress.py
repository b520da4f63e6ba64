"""Progress bars in a log file: every redraw a whole line, so log records start lines."""

import io
import logging
import re
import time

from tldr_jax.utils import progress


class _File(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_a_bar_writes_whole_lines_where_stderr_is_a_file():
    out = _File()
    log = logging.getLogger("test_progress")
    handler = logging.StreamHandler(out)
    log.addHandler(handler)
    try:
        bar = progress.bar(range(5), desc="work", file=out, mininterval=0, miniters=1)
        for i in bar:
            log.warning("record %d", i)
        bar.close()
    finally:
        log.removeHandler(handler)
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    records = [ln for ln in lines if "record" in ln]
    assert records == [f"record {i}" for i in range(5)]  # each a line of its own
    bars = [ln for ln in lines if ln.startswith("work:")]
    assert bars and bars[-1].startswith("work: 100%") and "5/5" in bars[-1]
    assert all(ln.startswith(("work:", "record")) for ln in lines)


def test_a_bar_on_a_terminal_redraws_in_place():
    class Tty(_File):
        def isatty(self) -> bool:
            return True

    out = Tty()
    for _ in progress.bar(range(3), desc="work", file=out, mininterval=0, miniters=1):
        pass
    assert "\r" in out.getvalue()


def test_line_stream_drops_clears_and_splits_redraws():
    out = io.StringIO()
    stream = progress.LineStream(out)
    stream.write("\rwork: 10%|#")
    stream.write("\r" + " " * 20 + "\r")  # tqdm clearing a bar
    stream.write("\rwork: 20%|##\n")
    stream.write("\n\x1b[A")  # tqdm moving the cursor back over a second bar
    assert out.getvalue() == "work: 10%|#\nwork: 20%|##\n"


def test_file_lines_come_at_the_interval_without_repeats(monkeypatch):
    """The real defaults at a short interval: no line for a bar that ends sooner, then at
    most one line per interval, each with new counts (no monitor-thread repeats)."""
    monkeypatch.setattr(progress, "FILE_INTERVAL_S", 0.2)
    quick = _File()
    for _ in progress.bar(range(3), desc="quick", file=quick):
        pass
    assert quick.getvalue() == ""
    out = _File()
    t0 = time.monotonic()
    for _ in progress.bar(range(15), desc="slow", file=out):
        time.sleep(0.05)
    elapsed = time.monotonic() - t0
    counts = re.findall(r"(\d+)/15", out.getvalue())
    assert 1 <= len(counts) <= elapsed / 0.2 + 1
    assert len(set(counts)) == len(counts)
