"""Demo test: `tdbot demo` as a subprocess, the daemon against the simulator on 127.0.0.1.

This is the slowest test of the suite: at 120 simulated seconds per real second the
story (outbid at +3 min, top-up at +30 min, idle stop after its warning) takes
roughly 20 s of real time.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

TDBOT = str(Path(sys.executable).parent / "tdbot")
CHECK_ROWS = (
    "cheapest hostnode",
    "spot re-bid",
    "idle stop: warning",
    "idle stop: stop",
    "low balance: fired",
    "low balance: cleared",
)


def test_demo_all_rule_kinds_act() -> None:
    # Without these the demo would also try to send its alerts to a real Telegram chat.
    environ = {name: value for name, value in os.environ.items() if not name.startswith("TDBOT_")}
    environ.update({"COLUMNS": "200", "NO_COLOR": "1", "PYTHONIOENCODING": "utf-8"})

    completed = subprocess.run(
        [TDBOT, "demo", "--speed", "120", "--timeout", "80"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=environ,
        timeout=90,
        check=False,
    )

    output = completed.stdout
    assert completed.returncode == 0, output + completed.stderr
    for row in CHECK_ROWS:
        assert re.search(rf"[│|] {re.escape(row)}\s+[│|] yes\s+[│|] \+\dh\d\dm", output), row
    assert " NO " not in output
    assert "All four rule kinds acted." in output
    assert "Traceback" not in completed.stderr
