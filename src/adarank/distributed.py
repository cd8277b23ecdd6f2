"""Several processes: starting them, checking that they are connected, and keeping them in step.

`adarank train --nproc-per-node N` calls `launch`, which starts N local processes of `adarank train` with
the environment `torchrun` gives its workers (MASTER_ADDR/PORT, WORLD_SIZE, RANK, LOCAL_RANK), so that
Accelerate connects them (gloo on CPU, NCCL on GPUs). We start them ourselves rather than through torchrun
so that a failure ends in one line (a worker's error, or which worker was killed) instead of torchrun's
report, a Ctrl-C reaches every worker exactly once (each finishes its step, checkpoints and exits), and the
workers die with the launcher.

Growth replaces LoRA parameters, which DistributedDataParallel registered when it wrapped the model, so the
model is wrapped again after every rank change (`rewrap_model`) -- without Accelerate's `prepare_model`,
which would patch the forward for mixed precision once more and append to its model list each time. After
every rank change the processes compare digests of their trainable parameters (`agree`) and stop if they
differ. FSDP and DeepSpeed shard parameters whose shapes growth changes: they are refused at setup.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import torch
from torch import nn

UNSUPPORTED_ENV = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
                   "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}
SHARDED = ("FSDP", "DEEPSPEED", "MEGATRON_LM")
LAUNCHED = "ADARANK_LAUNCHED"  # set in the workers `launch` starts: the launcher reports a lost process
ERROR_FILE = "ADARANK_ERROR_FILE"  # where such a worker writes its one-line error for the launcher to print
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted",
             "ProcessGroupNCCL", "Socket Timeout")


class LaunchError(ValueError):
    """The processes were not started the way a run needs; the message says how to start them."""


class ProcessesDisagree(RuntimeError):
    """After a rank change the processes of a run hold different parameters."""


def world_size() -> int:
    """The number of processes the launcher says it started (1 without a launcher)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        return 1


def use_cpu() -> bool:
    """Tell Accelerate to run on the CPU when a launcher started several processes and there is no GPU:
    without it Accelerate ignores the launcher and every process trains alone."""
    return world_size() > 1 and not torch.cuda.is_available()


def check_launch_env() -> None:
    """Before anything is loaded: refuse the sharded setups Accelerate would pick from its environment."""
    for var, name in UNSUPPORTED_ENV.items():
        if os.environ.get(var, "").lower() in ("1", "true", "yes"):
            raise LaunchError(f"{name} ({var} is set) is not supported: rank growth changes parameter shapes, which "
                              f"{name} shards; run data-parallel instead (adarank train --nproc-per-node N)")


def check_processes(accelerator: Any) -> None:
    """After Accelerate set up: every process the launcher started is connected, and the setup is DDP."""
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type)).upper()
    if any(s in kind for s in SHARDED):
        raise LaunchError(f"distributed type {kind} is not supported: rank growth changes parameter shapes, which "
                          "it shards; run data-parallel instead (adarank train --nproc-per-node N)")
    world = world_size()
    if world > 1 and accelerator.num_processes != world:
        raise LaunchError(
            f"the launcher started {world} processes (WORLD_SIZE={world}) but they are not connected (Accelerate "
            f"sees {accelerator.num_processes}); start them with `adarank train --nproc-per-node {world} ...` or "
            f"`torchrun --nproc_per_node {world} -m adarank.cli train ...`")


def process_max(accelerator: Any, *values: int) -> list[int]:
    """Each value's maximum over the processes (one all-reduce; none in a single process)."""
    if accelerator.num_processes == 1:
        return [int(v) for v in values]
    t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=accelerator.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


def params_digest(model: nn.Module) -> str:
    """A digest of the trainable parameters' names, shapes and exact bytes."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def agree(accelerator: Any, model: nn.Module, what: str) -> list[str]:
    """Every process's digest of its trainable parameters; raises when they differ."""
    digest = params_digest(model)
    if accelerator.num_processes == 1:
        return [digest]
    from accelerate.utils import gather_object

    digests = gather_object([digest])
    if len(set(digests)) > 1:
        raise ProcessesDisagree(f"the processes hold different trainable parameters after {what} (digests {digests}); "
                                "the run stopped")
    return digests


def rewrap_model(accelerator: Any, wrapped: nn.Module, raw: nn.Module) -> nn.Module:
    """A new DistributedDataParallel over `raw` (whose parameters surgery replaced) in the place of
    `wrapped` in the accelerator's model list, built as Accelerate builds it; `wrapped` when not DDP."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(wrapped, DistributedDataParallel):
        return wrapped
    kwargs = accelerator.ddp_handler.to_kwargs() if accelerator.ddp_handler is not None else {}
    ids = None if accelerator.device.type == "cpu" else [accelerator.local_process_index]
    model = DistributedDataParallel(raw, device_ids=ids, output_device=ids[0] if ids else None, **kwargs)
    if accelerator.ddp_handler is not None:
        accelerator.ddp_handler.register_comm_hook(model)
    model._is_accelerate_prepared = True
    accelerator._models = [model if m is wrapped else m for m in accelerator._models]
    return model


# ---------------------------------------------------------------------------------------------- launcher


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child before exec (Linux): SIGKILL when the launcher dies
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def launch(nproc: int, argv: list[str], grace_s: float = 10.0) -> int:
    """Run `python -m adarank.cli ARGV` in `nproc` connected local processes and wait for them. When a
    process fails, the others get `grace_s` seconds to end on their own (on bad input they fail alike),
    then are killed. The workers hand their one-line errors to the launcher, which prints one: that of the
    lowest process rank that had one, or else names the process that was killed from outside. Returns that
    process's exit code (0 when all succeed). SIGINT/SIGTERM are passed on to the workers."""
    import tempfile

    if nproc < 1:
        raise LaunchError(f"--nproc-per-node must be >= 1, got {nproc}")
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise LaunchError(f"--nproc-per-node {nproc}: this machine has {torch.cuda.device_count()} GPU(s)")
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="adarank-launch-") as errors:
        procs = []
        for rank in range(nproc):
            env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(nproc),
                       RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0",
                       **{LAUNCHED: "1", ERROR_FILE: os.path.join(errors, f"rank{rank}.txt")})
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
            if rank:
                env.setdefault("TRANSFORMERS_VERBOSITY", "error")
            kwargs = {"preexec_fn": _die_with_parent} if sys.platform.startswith("linux") else {}
            # a session of their own: a terminal's Ctrl-C reaches the launcher alone, which passes it on once
            procs.append(subprocess.Popen([sys.executable, "-m", "adarank.cli", *argv], env=env,
                                          start_new_session=True, **kwargs))
        codes, ours, ended = _wait(procs, grace_s)
        said = {}
        for rank in range(nproc):
            path = os.path.join(errors, f"rank{rank}.txt")
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as fh:
                    said[rank] = fh.read().strip()
    codes = [128 - c if c < 0 else c for c in codes]  # killed by signal N: 128 + N, as a shell reports it
    spoke = [r for r in sorted(said) if said[r] and codes[r]]
    # killed from outside, first to go first; a SIGABRT is how gloo/NCCL end a process whose peer went
    killed = sorted((r for r, c in enumerate(codes) if c > 128 and r not in said and r not in ours),
                    key=lambda r: (codes[r] == 128 + signal.SIGABRT, ended[r], r))
    if spoke:
        rank = spoke[0]
        line = said[rank] if rank == 0 else said[rank].replace("adarank: ", f"adarank: process {rank} of {nproc}: ", 1)
        print(line, file=sys.stderr, flush=True)
        return codes[rank]
    if killed:
        rank = killed[0]
        print(f"adarank: process {rank} of {nproc} was killed by {signal.Signals(codes[rank] - 128).name}; the run "
              "stopped there and continues from its last checkpoint with --resume", file=sys.stderr, flush=True)
        return codes[rank]
    return next((c for c in codes if c), 0)


def _wait(procs: list[subprocess.Popen], grace_s: float) -> tuple[list[int], set[int], list[float]]:
    """Wait for every worker, passing SIGINT/SIGTERM on; once one fails, kill the rest after `grace_s`.
    Returns the exit codes, the ranks this function killed, and when each process was seen ending."""

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    failed_at, ours, ended = None, set(), [float("inf")] * len(procs)
    try:
        while any(p.poll() is None for p in procs):
            for rank, p in enumerate(procs):
                if p.returncode is not None and ended[rank] == float("inf"):
                    ended[rank] = time.monotonic()
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                for rank, p in enumerate(procs):
                    if p.poll() is None:
                        p.kill()
                        ours.add(rank)
            time.sleep(0.02)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return [p.wait() for p in procs], ours, ended


def lost_peer(exc: BaseException) -> bool:
    """Whether an exception in a worker of a multi-process run says that another process is gone."""
    text = str(exc)
    return world_size() > 1 and any(s in text for s in PEER_LOST)


__all__ = ["LaunchError", "ProcessesDisagree", "agree", "process_max", "check_launch_env", "check_processes", "launch", "lost_peer",
           "params_digest", "rewrap_model", "use_cpu", "world_size"]
