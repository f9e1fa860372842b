"""`meshfit launch` output: forwarded as it arrives, carriage-return updates stay live."""

import io
import os
import threading
import time

from meshfit.engine.processes.launch import RankOutput, _pump


class Recording(io.StringIO):
    """A stdout that keeps each write, to see when text arrived."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, text):
        self.writes.append(text)
        return super().write(text)


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def start_pump():
    """A recorded launcher output and a pipe pumped into it as rank 0: (out, write end, pump)."""
    out = Recording()
    read, write = os.pipe()
    pump = threading.Thread(target=_pump, args=(os.fdopen(read, "rb"), 0, RankOutput(out)))
    pump.start()
    return out, write, pump


def test_carriage_return_segments_are_forwarded_live_with_the_rank():
    out, write, pump = start_pump()
    os.write(write, b"hello\n\r 10%|#")
    wait_for(lambda: "[rank 0]  10%|#" in out.getvalue())  # before any newline arrived
    os.write(write, "#\r 50%|█████".encode()[:-2])  # a character split between reads
    os.write(write, "█████".encode()[-2:] + b"\r100%|##########\n")
    os.close(write)
    pump.join(timeout=5)
    assert out.getvalue() == (
        "[rank 0] hello\n[rank 0]  10%|##\r[rank 0]  50%|█████\r[rank 0] 100%|##########\n"
    )


def test_another_rank_ends_an_unfinished_line_first():
    out = Recording()
    output = RankOutput(out)
    output.write(0, "\r 10%|#")
    output.write(1, "warning from rank 1\n")
    output.write(0, "\r 20%|##")
    output.write(0, "\n")
    output.write(1, "\n")  # an empty line keeps its prefix
    assert out.getvalue() == (
        "[rank 0]  10%|#\n[rank 1] warning from rank 1\n[rank 0]  20%|##\n[rank 1]\n"
    )


def test_plain_lines_arrive_whole_though_written_in_pieces():
    """An unbuffered child writes `print("pid", 7)` as "pid", " ", "7", "\\n": another rank's
    output in between must not split the line."""
    out = Recording()
    output = RankOutput(out)
    for rank, piece in [(0, "pid"), (0, " "), (1, "pid 8"), (1, "\n"), (0, "7"), (0, "\n")]:
        output.write(rank, piece)
    output.write(1, "\r 10%|#")  # a bar segment is still live
    assert out.getvalue() == "[rank 1] pid 8\n[rank 0] pid 7\n[rank 1]  10%|#"
    output.write(0, "no newline at the end")
    output.end(0)
    assert out.getvalue().endswith("[rank 1]  10%|#\n[rank 0] no newline at the end")


def test_text_left_without_a_newline_is_forwarded_when_the_stream_ends():
    out, write, pump = start_pump()
    os.write(write, b"done: 3 of 3")
    os.close(write)
    pump.join(timeout=5)
    assert out.getvalue() == "[rank 0] done: 3 of 3"
