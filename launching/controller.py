"""submitit's local job controller (`python -m submitit.local._local`), quiet on Ctrl-C.

A terminal's Ctrl-C reaches its whole foreground process group: the sweeper, each local job's
controller and the job's tasks. submitit's controller dies of it with a KeyboardInterrupt
traceback on the sweeper's terminal, and SIGKILLs its tasks a second later, while they are still
recording how they ended. This one lets the tasks end by themselves; it passes SIGINT on to the
tasks still running a few seconds later (a cancel sent to the controller alone: inflight.cancel_all).
Started by launching.local.quiet_controllers in place of submitit's.
"""

import signal
import sys
import time
from pathlib import Path

from submitit.local.local import Controller

SELF_STOP_S = 3.0  # how long tasks that got the terminal's Ctrl-C themselves have to end first


def main(folder: str) -> None:
    controller = Controller(Path(folder))
    interrupted = False

    def on_interrupt(signum, frame):
        nonlocal interrupted
        if interrupted:
            return
        interrupted = True
        deadline = time.monotonic() + SELF_STOP_S
        while time.monotonic() < deadline and any(task.poll() is None for task in controller.tasks):
            time.sleep(0.1)
        for task in controller.tasks:
            if task.poll() is None:
                task.send_signal(signal.SIGINT)

    signal.signal(signal.SIGINT, on_interrupt)
    controller.run()


if __name__ == "__main__":
    main(sys.argv[1])
