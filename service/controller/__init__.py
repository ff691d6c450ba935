"""The study controller: ask → dispatch → record → tell, for every active study.

One loop (``Controller.start()`` in a thread, or ``python -m service.controller``: the process
``evomerge serve`` supervises by default) runs all studies whose status is ``queued`` or
``running``. Each iteration (``Controller.step()``):

1. loads the active studies and builds a :class:`~service.runtime.StudyRuntime` for new
   ones (re-validating the stored spec, restoring the optimizer, reconciling what a
   previous controller left behind);
2. hands idle workers to studies round-robin, one trial at a time: ask one point, decode
   it, INSERT the trial (state running, a lease) and COMMIT, then submit it;
3. collects finished trials: UPDATE the trial, the study's counters and best, add an
   event, COMMIT, then tell the optimizer;
4. ends studies whose budget is spent (held-out re-scoring first, if the spec asks).

Ordering rule: every state change is committed before it is acted on. An optimizer that keeps
its own state (pycma) has it saved in the same transaction as the trial row it belongs to, so
the two never disagree. Optuna's storage is a separate connection: a crash can fall between
our commit and Optuna's write, and restart recovery closes each such gap.

pause / resume / cancel: the API only sets ``Study.status`` (``paused``, ``running``,
``cancelled``) and commits; the controller notices on its next iteration.

One module per job; :class:`Controller` (``loop``) puts them together:

- ``loop``: the controller, its thread and its ``step``;
- ``recovery``: the active studies kept in step with the database; opening a study,
  restart recovery, cancelling and dropping;
- ``scheduler``: worker pools, dispatch, collection (the ask → dispatch → tell loop);
- ``recorder``: :class:`ResultRecorder`, every trial result, failure, retry and baseline
  score written;
- ``end_of_study``: baselines, held-out re-scoring, completing a study;
- ``optimizer_store``: :class:`OptimizerStore`, each study's optimizer, kept as it declares;
- ``service.controller_faults``: write faults (a full disk, a lost database);
- ``standalone``: ``python -m service.controller``;
- ``supervised``: its side of ``evomerge serve``'s supervision (``service.controller_process``):
  SIGTERM, the lifeline on stdin, the state it reports.

How often a trial may be dispatched is the retry policy of workers/retry.py.
"""

from service.controller.loop import Controller
from service.controller.optimizer_store import OptimizerStore
from service.controller.recorder import ResultRecorder
from service.controller.standalone import main

__all__ = ["Controller", "OptimizerStore", "ResultRecorder", "main"]
