"""Run model-written code against a task's tests in separate, limited processes: pass / fail / timeout / error.

Called by the eval loop (:mod:`lopa.eval.runner`) with the :class:`Program` a code task builds. The model's code
(the *solution*) and the task's tests run as two processes (:mod:`~lopa.eval.sandbox.split`): the tests see only
the entry points the task names, as proxies that call into the solution process, and the verdict is the tests
process's exit status, which nothing the solution does can set. Each process is ``python -s -S`` (standard
library only, in an environment built from nothing; bootstrap :mod:`~lopa.eval.sandbox.boot`) with:

- when ``unshare`` works (root, or unprivileged user namespaces): new network, mount, PID and IPC namespaces with
  private ``/tmp``, ``/var/tmp``, ``/dev/shm`` and ``/run/lock``, every other mount read-only
  (:mod:`~lopa.eval.sandbox.isolation`);
- a fresh temporary working directory, removed afterwards, and ``TMPDIR`` pointing into it;
- no inherited file descriptors (``close_fds``), a stripped environment, a new session (process group);
- ``RLIMIT_CPU``, ``RLIMIT_AS`` (memory), ``RLIMIT_NPROC``, ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE`` and a wall-time
  limit after which every process of the sample is killed. The wall clock starts when both processes say they
  have started, so the sandbox's own set-up (namespaces, interpreter start) never counts against the program,
  however loaded the machine is;
- under root, a cgroup per sample (:mod:`~lopa.eval.sandbox.cgroup`) that bounds the memory and the number of
  processes of the sample as a whole;
- a guard that keeps destructive ``os``/``shutil`` calls inside the working directory and disables process
  creation (the normal-case protection);
- when the harness runs as root: a fresh unprivileged user id per process. Root ignores ``RLIMIT_NPROC`` and
  every file permission, so without this a fork bomb or ``rm`` would only be stopped by the guard. The fresh
  id lets the harness kill every process it left behind (all processes of that id) and remove the files and IPC
  objects it left in the shared temporary directories.

What each mode guarantees is listed in docs/eval.md and recorded by :meth:`Sandbox.describe` (``unisolated``
when the OS gave no isolation).
"""

from lopa.eval.sandbox.program import Program, SandboxLimits, SandboxResult, Status
from lopa.eval.sandbox.sandbox import Sandbox

__all__ = ["Program", "Sandbox", "SandboxLimits", "SandboxResult", "Status"]
