"""The GPU check's record and clock (bench/gpu_check.py runs its stages through `Check.stage`).

The record says what each call ran and found. It is kept in the work folder across the calls of
one commit and machine, and written to the record path (and $OUT) whenever a stage starts or ends,
so that a call killed mid-stage still leaves it. Each stage runs within its own budget, or the
call's --deadline if that is nearer; a stage that fails, is cut or is ended by a signal becomes one
line. The targets and the summary line are judged from the record alone.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: the sibling modules below
import gpu_env

REPO = Path(__file__).resolve().parents[1]
STAGES = ("data", "cuda_tests", "throughput", "training")
# The targets, on one H100 or H200 alike: about 10x the reference implementation's end-to-end
# throughput, and a model step as fast as bf16 + SDPA + compile make the reference's own step.
TARGETS = {"end_to_end_images_per_s": 6_000, "step_images_per_s": 5_400, "host_syncs_per_step": 0}
# What must be equal for a call to continue an earlier call's record.
IDENTITY = ("kind", "device", "torch", "git_sha", "git_dirty", "git_changed")


class Ended(BaseException):
    """The call was ended by a signal (the device tool's limit, a Ctrl-C of the terminal)."""

    def __init__(self, number: int):
        super().__init__(signal.Signals(number).name)
        self.number = number


def ended_by_signal(number, frame):
    """The SIGTERM and SIGHUP handler: the call ends where it is, through the stage it was in."""
    raise Ended(number)


class StageError(Exception):
    """A stage failed for a reason worth one line."""


class Cut(StageError):
    """A stage ran past its budget and was ended."""


class Check:
    """The record (kept in the work folder across calls, written to `out` too), the stages'
    budgets and the files sent back (`export`: $OUT) as each stage ends."""

    def __init__(self, out: Path, work: Path, kind: str, budgets: dict, deadline: float | None, export: Path | None):
        self.out, self.work, self.kind, self.budgets = out, work, kind, budgets
        self.deadline, self.export = deadline, export
        self.record: dict = {}
        self.call_index = 1
        self.ended_by: int | None = None
        if export is not None:
            export.mkdir(parents=True, exist_ok=True)

    # -- the record ---------------------------------------------------------------------------
    def begin(self, started: float, stages: list[str]) -> None:
        """The environment, and the record of earlier calls of the same commit and machine."""
        carry = REPO / os.environ.get("SODA_CARRY", ".carry")
        current = {
            "kind": self.kind,
            **gpu_env.machine(self.kind),
            **gpu_env.source_state(carry),
            "work": str(self.work),
        }
        earlier = self._earlier()
        if earlier is not None and all(earlier.get(key) == current.get(key) for key in IDENTITY):
            self.record = earlier
            self.call_index = len(earlier.get("calls", [])) + 1
            for entry in self.record.get("stages", {}).values():
                if entry.get("status") == "running":  # that call was killed before it could say so
                    entry.update(status="cut", reason="the call was killed during this stage (no end recorded)")
        else:
            self.record = {"stages": {}, "calls": []}
        self.record.update(current)
        self.record.setdefault("started_epoch", started)
        self.record["when"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.call = {"call": self.call_index, "when": self.record["when"], "started_epoch": started, "stages": stages}
        self.record["calls"].append(self.call)
        self.save()

    def _earlier(self) -> dict | None:
        try:
            record = json.loads((self.work / "record.json").read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and isinstance(record.get("stages"), dict) else None

    def save(self) -> None:
        text = json.dumps(self.record, indent=2, default=str) + "\n"
        for path in {self.work / "record.json", self.out}:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(path.name + ".tmp")
            temporary.write_text(text)
            temporary.replace(path)

    def earlier_data(self) -> Path | None:
        """The folder an earlier call's data stage decoded, if it is still there."""
        entry = self.record["stages"].get("data", {})
        root = Path(entry["root"]) if entry.get("status") == "ok" and entry.get("root") else None
        return root if root is not None and root.is_dir() else None

    def send(self, path: Path, name: str) -> None:
        """Copy a file into $OUT (when set), where the device tool brings it back."""
        if self.export is not None and path.is_file():
            shutil.copy2(path, self.export / name)

    def log_path(self, name: str) -> Path:
        """Where a stage's process writes: straight into $OUT when set, so a killed call keeps it."""
        return (self.export if self.export is not None else self.work) / f"gpu-check-{name}.log"

    # -- time -----------------------------------------------------------------------------------
    def timeout(self, name: str) -> tuple[float, str]:
        """A stage's limit and what sets it: its own budget, or the call's deadline if nearer."""
        budget = self.budgets[name]
        if self.deadline is not None and self.deadline - time.time() - 10 < budget:
            return max(0.0, self.deadline - time.time() - 10), "the call's --deadline"
        return budget, f"its {budget:.0f} s budget"

    # -- stages ---------------------------------------------------------------------------------
    def preflight(self) -> bool:
        """This torch is supported and every project module imports: else one line, no stage."""
        began = time.perf_counter()
        problem = gpu_env.torch_problem() or gpu_env.import_problem()
        carried = os.environ.get("SODA_CHECK_PACKAGES")
        self.record["packages"] = gpu_env.packages_used(Path(carried) if carried else None)
        entry = {"status": "ok", "seconds": round(time.perf_counter() - began, 1), "call": self.call_index}
        entry["min_torch"] = ".".join(map(str, gpu_env.MIN_TORCH))
        if problem:
            entry.update(status="failed", reason=problem)
            print(f"   preflight failed: {problem}", flush=True)
        self.record["preflight"] = entry
        self.save()
        return not problem

    def stage(self, name: str, run, run_it: bool = True):
        stages = self.record["stages"]
        if not run_it:  # not asked for in this call: what an earlier call recorded stays
            stages.setdefault(name, {"status": "not run"})
            self.save()
            return None
        if self.ended_by or self.record["preflight"]["status"] != "ok":
            why = "the call was ended" if self.ended_by else "the preflight failed"
            stages[name] = {"status": "not run", "reason": why, "call": self.call_index}
            self.save()
            return None
        limit, _ = self.timeout(name)
        print(f"## {name} (at most {limit:.0f} s)", flush=True)
        entry = stages[name] = {"status": "running", "budget_seconds": self.budgets[name], "call": self.call_index}
        self.save()
        began = time.perf_counter()
        result, reason = None, None
        try:
            result = run()
            status = "ok"
        except Ended as ended:
            self.ended_by = ended.number
            status, reason = "cut", f"the call was ended ({ended}) during this stage"
        except Cut as error:
            status, reason = "cut", str(error)
        except StageError as error:
            status, reason = "failed", str(error)
        except Exception as error:  # a stage's own bug must not cost the other stages
            status, reason = "failed", f"{type(error).__name__}: {error}"
        entry.update(status=status, seconds=round(time.perf_counter() - began, 1))
        if reason:
            entry["reason"] = reason
            print(f"   {name} {status}: {reason}", flush=True)
        else:
            print(f"   {name} ok in {entry['seconds']:.0f} s", flush=True)
        self.save()
        return result

    def finish(self) -> str:
        stages = self.record["stages"]
        self.record["targets"] = targets(self.record)
        self.call["seconds"] = round(time.time() - self.call["started_epoch"], 1)
        if self.ended_by:
            self.call["ended_by"] = signal.Signals(self.ended_by).name
        self.record["seconds_total"] = round(sum(call.get("seconds", 0.0) for call in self.record["calls"]), 1)
        if "preflight" not in self.record:  # ended before the preflight could say
            self.record["preflight"] = {"status": "cut", "reason": "the call was ended during the preflight"}
        problems = [("preflight", self.record["preflight"])] + [(name, stages.get(name, {})) for name in STAGES]
        failed = [(name, entry) for name, entry in problems if entry.get("status") in ("failed", "cut")]
        if failed:
            name, entry = failed[0]
            line = f"gpu-check failed {name}: {entry.get('reason', entry['status'])}"
        else:
            line = summary_line(self.record)
            not_run = [name for name in STAGES if stages.get(name, {}).get("status") != "ok"]
            if not_run:
                line += f" not_run={','.join(not_run)}"
        self.record["summary"] = self.call["summary"] = line
        self.save()
        return line


def targets(record: dict) -> dict:
    """Each target of one H100 or H200 against what this check measured (None where it did not)."""
    bench = record["stages"].get("throughput", {})
    training = record["stages"].get("training", {})

    def at_least(value, floor):
        return None if value is None else value >= floor

    learning = {
        "knn_end_above_start": None if training.get("knn_end") is None else training["knn_end"] > training["knn_start"],
        "latent_gap_grew": None
        if training.get("latent_gap_end") is None
        else training["latent_gap_end"] > training["latent_gap_start"],
    }
    if record["kind"] != "cuda":  # the throughput targets are a GPU's; a CPU says nothing about them
        return {"note": "throughput targets apply to one H100 or H200; not judged on a CPU", **learning}
    syncs = bench.get("host_syncs_per_step")
    return {
        "end_to_end_at_least_6000": at_least(bench.get("end_to_end_images_per_s"), TARGETS["end_to_end_images_per_s"]),
        "step_at_least_5400": at_least(bench.get("step_images_per_s"), TARGETS["step_images_per_s"]),
        "zero_host_syncs_per_step": None if syncs is None else syncs == 0,
        # A compile that fell back to eager would make every figure above an eager one.
        "compiled": None if bench.get("compile") is None else bench["compile"] == "compiled",
        **learning,
    }


def summary_line(record: dict) -> str:
    bench = record["stages"].get("throughput", {})
    training = record["stages"].get("training", {})

    def shown(value, digits: int) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{value:.{digits}f}"

    return (
        f"gpu-check ok e2e={shown(bench.get('end_to_end_images_per_s'), 0)} "
        f"step={shown(bench.get('step_images_per_s'), 0)} mfu={shown(bench.get('fraction_of_peak'), 3)} "
        f"knn_start={shown(training.get('knn_start'), 4)} knn_end={shown(training.get('knn_end'), 4)} "
        f"images={training.get('images_seen', '-')} latent_gap={shown(training.get('latent_gap_end'), 4)}"
    )
