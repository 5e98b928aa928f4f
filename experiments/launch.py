"""Starts one `python -m experiments.run` per worker of a multi-host job (docs/multihost.md).

    python -m experiments.launch tpu --tpu NAME --zone ZONE -- --config=clair_apo_zero:paper
    python -m experiments.launch ssh --hosts h0,h1,h2,h3 --port 8476 --dir ~/apo_jax -- --config=...
    python -m experiments.launch slurm --nodes 4 -- --config=...   (prints an sbatch script)
    python -m experiments.launch local --processes 2 --devices 4 -- --config=...   (one machine)

Every worker runs the same command; only its process id differs. On a Cloud TPU VM slice and
under SLURM JAX finds the coordinator, the process count and the id itself (`--distributed`);
over plain SSH and locally the launcher passes `--coordinator_address` (the first host),
`--num_processes` and `--process_id`. `--dry-run` prints the commands instead of running them.
When a worker fails, the launcher stops the others (`supervise`) and exits with its status.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

RUN = ("python", "-m", "experiments.run")


def _cd(directory: str) -> str:
    """`cd DIR`, quoted, with a leading ~/ left for the worker's shell to expand."""
    home, rest = ("~/", directory[2:]) if directory.startswith("~/") else ("", directory)
    return f"cd {home}{shlex.quote(rest) if rest else ''}"


def _remote(directory: str, args: list[str]) -> str:
    """The shell line a worker runs: the run command in `directory`."""
    return f"{_cd(directory)} && " + shlex.join([*RUN, *args])


def tpu_commands(
    tpu: str, zone: str, project: str | None, directory: str, args: list[str]
) -> list[list[str]]:
    """One gcloud command that runs the job on every worker of a Cloud TPU VM slice at once."""
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, f"--zone={zone}", "--worker=all"]
    if project:
        cmd.append(f"--project={project}")
    return [[*cmd, f"--command={_remote(directory, [*args, '--distributed'])}"]]


def ssh_commands(hosts: list[str], port: int, directory: str, args: list[str]) -> list[list[str]]:
    """One ssh command per host; the first host coordinates."""
    coordinator = f"{hosts[0]}:{port}"
    return [
        [
            "ssh",
            host,
            _remote(
                directory,
                [
                    *args,
                    f"--coordinator_address={coordinator}",
                    f"--num_processes={len(hosts)}",
                    f"--process_id={i}",
                ],
            ),
        ]
        for i, host in enumerate(hosts)
    ]


def local_commands(processes: int, port: int, args: list[str]) -> list[list[str]]:
    """`processes` runs of the job on this machine, talking over loopback (a multi-host rehearsal)."""
    return [
        [
            sys.executable,
            *RUN[1:],
            *args,
            f"--coordinator_address=127.0.0.1:{port}",
            f"--num_processes={processes}",
            f"--process_id={i}",
        ]
        for i in range(processes)
    ]


def slurm_script(nodes: int, directory: str, args: list[str], time: str = "04:00:00") -> str:
    """An sbatch script: one task per node, each running the job with `--distributed`."""
    return "\n".join(
        [
            "#!/bin/bash",
            f"#SBATCH --nodes={nodes}",
            "#SBATCH --ntasks-per-node=1",
            "#SBATCH --gpus-per-node=8",
            f"#SBATCH --time={time}",
            _cd(directory),
            "srun " + shlex.join([*RUN, *args, "--distributed"]),
            "",
        ]
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.launch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="kind", required=True)
    tpu = sub.add_parser("tpu", help="every worker of a Cloud TPU VM slice, through gcloud")
    tpu.add_argument("--tpu", required=True, help="the TPU VM's name")
    tpu.add_argument("--zone", required=True)
    tpu.add_argument("--project", default=None)
    ssh = sub.add_parser("ssh", help="one process per host over SSH; the first host coordinates")
    ssh.add_argument("--hosts", required=True, help="comma-separated, the coordinator first")
    ssh.add_argument("--port", type=int, default=8476)
    slurm = sub.add_parser("slurm", help="print an sbatch script (one task per node)")
    slurm.add_argument("--nodes", type=int, required=True)
    slurm.add_argument("--time", default="04:00:00")
    local = sub.add_parser("local", help="several processes on this machine (CPU devices)")
    local.add_argument("--processes", type=int, default=2)
    local.add_argument("--devices", type=int, default=4, help="CPU devices per process")
    local.add_argument("--port", type=int, default=8476)
    for s in (tpu, ssh, slurm):
        s.add_argument("--dir", default="~/apo_jax", help="the repository's folder on the workers")
    for s in (tpu, ssh, local):
        s.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ours, args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    a = _parser().parse_args(ours)
    if not any(x.startswith("--config") for x in args):
        print("error: give the run's flags after --, e.g. -- --config=clair_apo_zero:paper", file=sys.stderr)
        return 2
    if a.kind == "slurm":
        print(slurm_script(a.nodes, a.dir, args, a.time), end="")
        return 0
    env = None
    if a.kind == "tpu":
        commands = tpu_commands(a.tpu, a.zone, a.project, a.dir, args)
    elif a.kind == "ssh":
        commands = ssh_commands([h for h in a.hosts.split(",") if h], a.port, a.dir, args)
    else:
        commands = local_commands(a.processes, a.port, args)
        flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={a.devices}"
        env = {**os.environ, "XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"}
    if a.dry_run:
        print("\n".join(shlex.join(c) for c in commands))
        return 0
    return supervise([subprocess.Popen(c, env=env) for c in commands])


def supervise(procs: list[subprocess.Popen], grace: float = 10.0, poll: float = 0.2) -> int:
    """Waits for every worker; when one fails, stops the others (SIGTERM, then SIGKILL after `grace`
    seconds: with a peer gone they cannot save, and would wait on it until JAX's own timeout).
    Returns the first failure's exit status (128 + N for signal N), 0 when all succeed."""
    while True:
        codes = [p.poll() for p in procs]
        failed = next((i for i, c in enumerate(codes) if c), None)
        if failed is not None or None not in codes:
            break
        time.sleep(poll)
    if failed is None:
        return 0
    alive = [p for p in procs if p.poll() is None]
    if alive:
        print(
            f"worker {failed} exited with status {codes[failed]}: stopping the other {len(alive)}",
            file=sys.stderr,
        )
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + grace
    for p in alive:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return codes[failed] if codes[failed] > 0 else 128 - codes[failed]


if __name__ == "__main__":
    sys.exit(main())
