"""Progress bars in a log file: every redraw a whole line, so log records start lines."""

import io
import logging

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
    assert out.getvalue() == "work: 10%|#\nwork: 20%|##\n"
