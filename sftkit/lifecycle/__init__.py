"""The process lifecycle around a training run: launch (`launch.py`), one run per checkpoint
directory (`lock.py`), and what stops a run early (`signals.py`: SIGTERM/SIGUSR1, the
checkpoint deadline, the preemption marker for job scripts). Exit codes: `sftkit.errors`.

Sits below `train` (which drives it) and above `dist`, `config` and `errors`."""
