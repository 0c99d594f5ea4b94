"""One run supervisor for `python -m fluxgym train|resume`, tools/training_monitor.py and the job worker.

Launch or adopt a training run, follow its train.log, track its progress (heartbeats of every rank, then the
console markers, then file activity), end the whole process tree when a phase stops moving, resume it from
its newest valid state (with more block swap after an out-of-memory death), and report everything as
JSON-lines events. Stdlib + psutil only at import time (never torch): see engine.md section 1.
"""

from fluxgym.supervise.events import EVENT_KINDS, EventLog, read_events
from fluxgym.supervise.outcome import RunOutcome
from fluxgym.supervise.policy import RestartPolicy
from fluxgym.supervise.process import ProcessRecord, process_alive, stop_tree
from fluxgym.supervise.progress import Deadlines
from fluxgym.supervise.supervisor import RunSpec, Supervisor

__all__ = ["EVENT_KINDS", "Deadlines", "EventLog", "ProcessRecord", "RestartPolicy", "RunOutcome", "RunSpec",
           "Supervisor", "process_alive", "read_events", "stop_tree"]
