"""The multi-host launcher builds, for each worker, the command the guide (docs/multihost.md) gives."""

from __future__ import annotations

import sys

from experiments import launch

RUN = "--config=clair_apo_zero:paper"


def test_ssh_gives_each_host_its_process_id_and_the_first_host_coordinates():
    cmds = launch.ssh_commands(["h0", "h1", "h2"], 9000, "~/apo jax", [RUN])
    assert cmds == [
        [
            "ssh",
            f"h{i}",
            f"cd ~/'apo jax' && python -m experiments.run {RUN} --coordinator_address=h0:9000 "
            f"--num_processes=3 --process_id={i}",
        ]
        for i in range(3)
    ]


def test_tpu_runs_on_every_worker_and_lets_jax_find_the_slice():
    (cmd,) = launch.tpu_commands("pod", "us-central2-b", "proj", "/srv/apo", [RUN])
    assert cmd == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        "pod",
        "--zone=us-central2-b",
        "--worker=all",
        "--project=proj",
        f"--command=cd /srv/apo && python -m experiments.run {RUN} --distributed",
    ]


def test_slurm_script_and_local_rehearsal(capsys):
    script = launch.slurm_script(4, "/shared/apo", [RUN], time="01:00:00")
    assert script.splitlines() == [
        "#!/bin/bash",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --time=01:00:00",
        "cd /shared/apo",
        f"srun python -m experiments.run {RUN} --distributed",
    ]
    local = launch.local_commands(2, 1234, [RUN])
    assert [c[:3] for c in local] == [[sys.executable, "-m", "experiments.run"]] * 2
    assert [c[3:] for c in local] == [
        [RUN, "--coordinator_address=127.0.0.1:1234", "--num_processes=2", f"--process_id={i}"]
        for i in range(2)
    ]
    assert launch.main(["ssh", "--hosts", "a,b", "--dry-run", "--", RUN]) == 0
    assert capsys.readouterr().out.splitlines()[1].endswith("--process_id=1'")
    assert launch.main(["ssh", "--hosts", "a,b"]) == 2  # no run flags: refused in one line
    assert "give the run's flags after --" in capsys.readouterr().err
