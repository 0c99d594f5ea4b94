"""Jobs: the persistent queue (SQLite store), the commands that change it and the worker that runs it.

`from fluxgym.jobs import JobStore, Job, JOB_STATES, IllegalTransition, StoreError` needs only the
stdlib; `fluxgym.jobs.worker` also imports the supervisor.
"""

from fluxgym.jobs.states import ACTIVE_STATES, JOB_STATES, TRANSITIONS, IllegalTransition
from fluxgym.jobs.schema import Job
from fluxgym.jobs.store import JobStore, StoreCorruptError, StoreError, StoreFullError, StoreLockedError

__all__ = ["ACTIVE_STATES", "JOB_STATES", "TRANSITIONS", "IllegalTransition", "Job", "JobStore", "StoreError",
           "StoreCorruptError", "StoreFullError", "StoreLockedError"]
