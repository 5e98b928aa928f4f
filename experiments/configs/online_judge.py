"""The online loop labeled by an LLM judge's 1-10 grades (the miniature's judge: the task's checker,
served over loopback HTTP): the best-graded sample over the worst.

    python -m experiments.run --config=online_judge
"""

from experiments.configs import online_dpo


def get_config(arg: str = ""):
    config = online_dpo.get_config(arg, name="online_judge")
    config.online.labeler = "judge"
    return config
