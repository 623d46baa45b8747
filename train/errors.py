"""The one exception type a user sees: a sentence they can act on, no traceback.

Every stage raises `ZeroLLMError` (or a subclass) for bad input; the `zerollm`
CLI prints it as one line (`--debug` shows the traceback).
"""


class ZeroLLMError(Exception):
    """Bad input or state a user can fix; the message names the file and field."""


class ConfigError(ZeroLLMError):
    """A run config or DeepSpeed config is missing, malformed or inconsistent."""


# Exit codes: the contract with the tools that run a stage (`zerollm launch`, the
# deepspeed launcher, launch/slurm/*.sbatch, a user's retry script).
EXIT_OK = 0
EXIT_BAD_INPUT = 2  # a ZeroLLMError: bad config, data or arguments (one line on stderr)
EXIT_BAD_LOSS = 3  # train.max_bad_steps consecutive NaN/inf losses; the last good checkpoint is kept
EXIT_PREEMPTED = 75  # checkpoint saved after SIGTERM / SIGUSR1; re-run to resume (Slurm requeues on it)
