"""Import TensorFlow without the two lines it writes before its logging is set up.

TensorFlow's C++ side logs through absl. Until absl's logging is initialised, every message goes
to stderr whatever ``TF_CPP_MIN_LOG_LEVEL`` says, so each command that loads TensorFlow used to
start with::

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 00:00:... port.cc:153] oneDNN custom operations are on. You may see slightly different ...

(twice: two of TensorFlow's libraries log it), and on some CPUs an INFO line of
``cpu_feature_guard.cc``. :func:`import_quietly` imports TensorFlow with the
process's stderr (file descriptor 2) read by a thread that passes every other line on at once,
so an error TensorFlow writes while it loads still reaches the terminal. Nothing is filtered
when ``TF_CPP_MIN_LOG_LEVEL`` is ``0`` (show everything) or TensorFlow is already imported.
"""
from __future__ import annotations

import os
import re
import sys
import threading

#: The lines kept off the terminal: absl's notice, oneDNN's (cellstudy turns oneDNN on and
#: records it in provenance.json; see ``cellstudy.onednn_enabled``) and the CPU-feature notice
#: (an INFO line; the CPU's flags are in provenance.json too).
NOISE = re.compile(r"(All log messages before absl::InitializeLog\(\) is called are written to STDERR"
                   r"|port\.cc:\d+\] oneDNN custom operations are on"
                   r"|I\d{4} [\d:. ]+\d+ cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized)")


#: Seconds the import waits for the reader to pass on what is left in the pipe.
TIMEOUT = 10.0


def is_noise(line: str) -> bool:
    """Whether a line TensorFlow writes while it loads is one of those kept off the terminal (:data:`NOISE`)."""
    return bool(NOISE.search(line))


def import_quietly() -> None:
    """``import tensorflow`` with the lines of :data:`NOISE` dropped from stderr, every other line
    passed on as it comes (see the module docstring). A Python error of the import is raised."""
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        import tensorflow  # noqa: F401
        return
    import cellstudy  # noqa: F401  (oneDNN's variable, before TensorFlow reads it)

    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:   # no stderr (closed: 2>&-): nothing to keep quiet
        import tensorflow  # noqa: F401
        return
    read_end, write_end = os.pipe()

    def forward() -> None:   # owns `saved`: closes it when the pipe's last writer is gone
        try:
            with os.fdopen(read_end, "rb") as src:
                for raw in src:
                    if not is_noise(raw.decode(errors="replace")):
                        os.write(saved, raw)
        finally:
            os.close(saved)

    reader = threading.Thread(target=forward, name="tf-import-stderr", daemon=True)
    restore = os.dup(saved)   # stderr back on fd 2 after the import (the reader closes `saved`)
    reader.start()
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        import tensorflow  # noqa: F401
    finally:
        sys.stderr.flush()
        os.dup2(restore, 2)   # the pipe's last writer in this process is gone: the reader sees its end
        os.close(restore)
        # a process TensorFlow started while it loaded may hold the pipe open; its lines still
        # reach the terminal through the reader, which ends when that process closes it
        reader.join(timeout=TIMEOUT)
